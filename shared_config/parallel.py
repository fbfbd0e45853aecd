"""Data-parallel and fully-sharded training, framework-neutral: which dimension of each canonical tensor
is sharded, and how a global batch is split (no numpy, no framework).

Both twins read these rules, written once against the layout table: jax_model/distributed.py turns
them into `PartitionSpec`s over the `fsdp` axis of a device mesh, torch_model/distributed.py into
FSDP2 `Shard` placements and each rank's rows.
"""

from __future__ import annotations

import math
import os
import time

from .layout import Tensor
from .config_file import SpecError, did_you_mean
from .resources import accelerator_present

AXES = ("data", "fsdp")
# A CPU mesh's devices are emulated (XLA's --xla_force_host_platform_device_count), each with its own thread pools
# and buffers: 2,000 of them took 17 GB and over a minute before the first step. Tests use 8.
MAX_HOST_DEVICES = 64
# seconds a torchrun rank other than 0 waits, after an error every rank meets, for rank 0 to print it and exit
PEER_GRACE_S = 10.0


def env_int(name: str, default: int = 0) -> int:
    """Environment variable `name` that a launcher sets (torchrun's RANK, WORLD_SIZE, LOCAL_RANK; JAX_PROCESS_ID) as
    an integer >= 0, `default` where unset. SpecError naming it otherwise (`WORLD_SIZE=abc`)."""
    text = os.environ.get(name)
    if text is None:
        return default
    if not (text.strip().isascii() and text.strip().isdigit()):  # str.isdigit alone takes '²', which int() refuses
        raise SpecError(f"environment variable {name}={text!r:.80} must be an integer >= 0 (a launcher sets it: "
                        "torchrun, or JAX's multi-process start); unset it to run one process")
    return int(text)


def process_index(index_var: str, count_var: str) -> tuple[int, int]:
    """(index, count) of a launcher's environment (torchrun's RANK and WORLD_SIZE, JAX_PROCESS_ID and
    JAX_NUM_PROCESSES; 0 and 1 where unset), the count at least 1 and the index below it, else SpecError naming them:
    no launcher sets other values. Unchecked, RANK=1 WORLD_SIZE=1 would wait silently for a rank 0 that never
    comes (rank 0 prints the errors); WORLD_SIZE=0 would be a ZeroDivisionError's traceback, JAX_PROCESS_ID=1
    JAX_NUM_PROCESSES=1 jax's ValueError's."""
    index, count = env_int(index_var), env_int(count_var, 1)
    if count < 1:
        raise SpecError(f"environment variable {count_var}=0 must be >= 1 (the number of processes a launcher "
                        "started); unset it to run one process")
    if index >= count:
        raise SpecError(f"environment variable {index_var}={index} must be below {count_var}={count} (a launcher "
                        f"numbers its processes 0 to {count - 1})")
    return index, count


def rank_zero() -> bool:
    """Whether this process is torchrun's rank 0 or runs alone. A RANK that is not a number is rank 0's too: its
    error (env_int) must be printed, where `RANK=x` exited 2 without a word."""
    try:
        return process_index("RANK", "WORLD_SIZE")[0] == 0  # RANK=1 WORLD_SIZE=1 has no rank 0 to print its error
    except SpecError:
        return True


def leaves_error_to_rank_zero(signal: bool) -> bool:
    """Whether this process, a torchrun rank other than 0, exits without printing an error that every rank meets
    alike (shared_config.cli.fail): a signal (torchrun sends it to every rank) at once; bad input or a non-finite loss
    once rank 0 has printed it and exited, when torchrun ends this rank (SIGTERM, whose default action it keeps).
    Exiting at once, a rank that met the error first had torchrun stop rank 0 before rank 0 met it: rank 0 said
    'interrupted by SIGTERM; partial outputs removed' and the error went unsaid. False after PEER_GRACE_S: rank 0 did
    not meet it, and this rank prints it."""
    if rank_zero():
        return False
    if not signal:
        time.sleep(PEER_GRACE_S)  # torchrun ends it here when rank 0 exits; SIGKILL comes only 30 s after SIGTERM
    return signal


def world_size() -> int:
    """torchrun's WORLD_SIZE, 1 where unset, checked with RANK (process_index). SpecError for one past 1 without
    RANK, which no launcher sets so: the run was taken for a torchrun's, and refused as "parallel='ddp' needs a
    process group" (a --parallel never passed) or, for JAX, "under torchrun train the torch twin"."""
    count = process_index("RANK", "WORLD_SIZE")[1]
    if count > 1 and "RANK" not in os.environ:
        raise SpecError(f"environment variable WORLD_SIZE={count} is set but RANK not: launch with torchrun, or "
                        "unset WORLD_SIZE to run one process")
    return count


def torchrun_error(parallel: str | None, fits: bool, command: str, needs: str = "--backend torch") -> str | None:
    """The one rule of torchrun and `--parallel ddp|fsdp2` (scripts/train.py, bench/compare.py): both scale out the
    torch twin's training alone (the JAX twin's scale-out is --devices/--mesh), and `--parallel` needs a torchrun
    launch (RANK set; a torchrun of one process is one). `fits`: this run is what `needs` asks for (the torch twin's
    train step). Returns the error's one line, or None; SpecError as world_size. Before this rule, `--parallel ddp`
    with JAX was told it "needs torchrun", which then refused JAX, and under a torchrun of one process it was read
    as a mesh axis or timed on one device."""
    if parallel and not fits:
        return (f"--parallel {parallel} scales the torch twin's training under torchrun: pass {needs} (the JAX twin "
                "scales out with --devices/--mesh)")
    if world_size() > 1 and not fits:
        return (f"under torchrun {command} scales the torch twin's training: pass {needs} (the JAX twin scales out "
                "with --devices/--mesh)")
    if parallel and "RANK" not in os.environ:  # as torch_model.distributed.init_distributed reads a launch
        return f"--parallel {parallel} needs torchrun: torchrun --standalone --nproc_per_node=N {command} {needs} ..."
    return None


def fsdp_dim(t: Tensor, n: int) -> int | None:
    """The dim of canonical tensor `t` (torch orientation) split n ways over fsdp; None: replicated.

    Linear weights and embeddings: the larger dim (dim 0 on a tie) when n divides it, else the other
    when n divides that. Norm weights, biases and scalars are small and stay whole everywhere.
    """
    if n == 1 or t.kind == "param":
        return None
    by_size = sorted(range(len(t.shape)), key=lambda d: -t.shape[d])  # stable: dim 0 first on a tie
    return next((d for d in by_size if t.shape[d] % n == 0), None)


def rows_per_shard(batch_size: int, shards: int, grad_accum_steps: int = 1) -> int:
    """Rows each of `shards` devices or ranks reads from a global batch: the global batch is fixed, split evenly,
    and each shard's rows split evenly into `grad_accum_steps` micro-batches (each device or rank keeps its rows)."""
    if batch_size % shards:
        raise SpecError(f"batch_size={batch_size} must be divisible by the {shards} data-parallel shards "
                        f"(data × fsdp devices, or torch ranks): the global batch is split evenly across them")
    if (batch_size // shards) % grad_accum_steps:
        raise SpecError(f"grad_accum_steps={grad_accum_steps} must divide the {batch_size // shards} rows of a batch "
                        "(per device or rank)")
    return batch_size // shards


def splits_rows(rows: int, devices: int) -> bool:
    """Whether `devices` (more than one) split `rows` batch rows evenly: where the JAX twin pins its hidden states
    by rows (jax_model.layers.split_rows) and runs a Pallas kernel per device (jax_model.gla.per_device), and where
    each torchrun rank evaluates its own rows (torch_model.distributed.make_eval_step)."""
    return devices > 1 and rows % devices == 0


def parse_mesh(text: str) -> dict[str, int]:
    """`"data=2,fsdp=4"` -> {"data": 2, "fsdp": 4}; an axis left out has size 1. SpecError for anything else."""
    sizes, given = dict.fromkeys(AXES, 1), set()
    if not isinstance(text, str):  # make_mesh(4) failed on 'int' object has no attribute 'strip'
        raise SpecError(f"mesh={text!r:.80} must be a text of axis=N pairs, e.g. 'data=2,fsdp=4'")
    if not text.strip(" ,"):  # '' or ',' named no axis: the run was not sharded, without a word
        raise SpecError(f"mesh {text!r} names no axis: give axis=N pairs, e.g. data=2,fsdp=4")
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = (s.strip() for s in item.partition("="))
        if name not in AXES:
            raise SpecError(f"mesh {text!r}: unknown axis {name!r}{did_you_mean(name, AXES)} (axes: {', '.join(AXES)})")
        # ASCII digits only: str.isdigit also takes '²', which int() then refused in a traceback
        if not sep or not (value.isascii() and value.isdigit()) or int(value) < 1:
            raise SpecError(f"mesh {text!r}: {item!r} must be axis=N with N >= 1")
        if name in given:  # data=2,data=4 kept the last silently
            raise SpecError(f"mesh {text!r}: axis {name!r} given twice")
        sizes[name] = int(value)
        given.add(name)
    return sizes


def mesh_devices(mesh: str | None, devices: int | None) -> int | None:
    """The devices a JAX run's --mesh (an axis=N text) or --devices asks for, None for neither. Raises SpecError for
    a mesh that names no axis (`--mesh ''` ran unsharded) and, on a machine without an accelerator, where XLA
    emulates every device on the CPU, for more than MAX_HOST_DEVICES of them."""
    if mesh is None and not devices:
        return None
    flag, n = ("--mesh", math.prod(parse_mesh(mesh).values())) if mesh is not None else ("--devices", devices)
    if n > MAX_HOST_DEVICES and not accelerator_present():
        raise SpecError(f"{flag}: {n:,} devices; a CPU emulates at most {MAX_HOST_DEVICES} (each holds its own "
                        "thread pools and buffers)")
    return n
