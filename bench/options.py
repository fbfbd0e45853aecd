"""The command line that bench/compare.py and bench/profile_step.py share, and what it sets up: the job options
(spelt like the train config's keys, today's spellings kept as aliases), the spec variants they name, the CPU
threads and attention kernels every framework is given, and the environment a report records.

Nothing here imports jax or torch at module level: `configure_threads` must run before either is imported.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

from shared_config import SpecError, load_spec, parse_overrides
from shared_config.cli import UsageError, at_least, no_repeats, nonempty, printable
from shared_config.limits import quote
from shared_config.parallel import env_int
from shared_config.run import SPEC_KEYS
from shared_config.compile_cache import TORCH_CACHE_ENV, add_compile_cache_option
from shared_config.hardware import GLA_KERNEL_NAMES, GLA_KERNEL_TWIN, GLA_KERNELS, check_kernel
from shared_config.report import versions

from bench.load import usable_cpus

BACKENDS = {"both": ["jax", "torch"], "jax": ["jax"], "torch": ["torch"], "hf": ["hf"], "all": ["jax", "torch", "hf"]}
#   the --backend values and what each times: compare.py offers all, profile_step.py the twins' (both, jax, torch)
ATTENTION = ("auto", "sdpa", "cudnn", "xla", "einsum", "blocked", "pallas")


def add_job_options(p: argparse.ArgumentParser, *, backends: list[str], backend_help: str, modes: list[str],
                    mode_help: str, steps: int, steps_help: str, compiled: str) -> None:
    """The options of one benchmarked job, on parser `p`: what runs (--backend, --spec, --set, --mode), its shape
    (--batch-size, --seq-len, --steps, --warmup), its precision and kernels (--compute-dtype, --compile, --attention),
    --train-config and --threads. Where the tools differ, the caller says: the backends and modes offered, the
    default and meaning of --steps, and which backends `compiled` names for --compile ("torch", "torch/hf").
    Each option named like a train-config key takes that key's spelling first and keeps the old one as an alias
    (--batch-size and --batch); args keep the old names (args.batch, args.seq, args.dtype)."""
    p.add_argument("--backend", default="both", choices=backends, help=backend_help)
    p.add_argument("--spec", type=nonempty, default="tiny", help="preset name or YAML path (default: tiny)")
    p.add_argument("--set", action="append", default=[], type=p.key_item(SPEC_KEYS, "spec"), metavar="KEY=VALUE",
                   help="override a spec key")
    p.add_argument("--batch-size", "--batch", dest="batch", type=at_least(1), default=None, metavar="BATCH_SIZE",
                   help="sequences per step (default: --train-config's batch_size, else 8)")
    p.add_argument("--seq-len", "--seq", dest="seq", type=at_least(1), default=None, metavar="SEQ_LEN",
                   help="tokens per sequence (default: --train-config's seq_len, else min(256, max_seq_len))")
    p.add_argument("--steps", type=at_least(1), default=steps, help=steps_help)
    p.add_argument("--warmup", type=at_least(0), default=3, help="untimed steps after compilation")
    p.add_argument("--mode", default="train", choices=modes, help=mode_help)
    p.add_argument("--compute-dtype", "--dtype", dest="dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype (default: the spec's compute_dtype)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help=f"torch.compile the {compiled} step (default: on GPU yes, on CPU no)")
    p.add_argument("--attention", default="auto", choices=ATTENTION, help="attention kernel (translated per twin)")
    p.add_argument("--gla-kernel", default="auto", choices=GLA_KERNELS,
                   help="GLA layers' kernel (mixer: gla): auto is each twin's GPU kernel on a GPU (JAX: Pallas; torch: "
                        "flash-linear-attention's chunk_gla, when installed), else the pure chunked form")
    p.add_argument("--train-config", type=nonempty, default=None, help="YAML of optimizer settings for train mode")
    p.add_argument("--threads", type=cpu_threads, default=usable_cpus(),
                   help="CPU threads for every framework (default: every CPU this process may use)")


def cpu_threads(text: str) -> int:
    """argparse's type for --threads: 1 to the CPUs this process may use (--threads 100000 crashed torch, signal 11;
    more threads than CPUs time the oversubscription, not the framework)."""
    n, cpus = at_least(1)(text), usable_cpus()
    if n > cpus:
        raise argparse.ArgumentTypeError(f"must be at most {cpus}, the CPUs this process may use, got {n}")
    return n


def add_report_options(p: argparse.ArgumentParser, plot: bool = False) -> None:
    """The last options of both tools, on parser `p`: --json (and, with `plot`, --plot), --quiet, --compile-cache."""
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    if plot:
        p.add_argument("--plot", type=Path, default=None, help="write a PNG of the step times here")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_compile_cache_option(p)


def job_inputs(args) -> list[tuple[str, str | None]]:
    """The files a job reads, for check_outputs: a --json or --plot naming one of them replaced it."""
    return [("--spec", args.spec), ("--train-config", args.train_config)]


def check_used_options(args) -> None:
    """Refuse options this job would ignore without a word, or fail on midway: --compile/--no-compile (torch.compile)
    with only the JAX backend asked, a twin's --attention kernel with only transformers asked, --train-config (the
    train step's optimizer) in another mode, a --gla-kernel that is one twin's (pallas: JAX's, fla: torch's) with
    another backend asked."""
    if args.train_config is not None and args.mode != "train":
        raise UsageError(f"--train-config: the optimizer settings of --mode train; --mode {args.mode} runs no "
                         "optimizer (drop --train-config)")
    if (twin := GLA_KERNEL_TWIN.get(args.gla_kernel)) and args.backend != twin:  # the other twin has no such kernel
        raise UsageError(f"--gla-kernel {args.gla_kernel}: {GLA_KERNEL_NAMES[args.gla_kernel]}, the {twin} twin's "
                         f"alone; pass --backend {twin} (the other twin runs auto or pure)")
    if args.attention not in ("auto", "sdpa") and args.backend == "hf":  # the twins' kernels: hf ran sdpa all the same
        raise UsageError(f"--attention {args.attention}: a kernel of the twins; transformers' Llama runs SDPA, and "
                         "--backend hf times it alone (drop --attention, or add a twin: --backend all)")
    if args.compile is not None and args.backend == "jax":
        flag = "--compile" if args.compile else "--no-compile"
        raise UsageError(f"{flag}: torch.compile steers the torch (and hf) step, and --backend jax times JAX alone "
                         "(XLA always compiles)")


MEMORY_FLAGS = {"grad_accum_steps": "grad_accum", "remat": "remat", "loss_chunk": "loss_chunk"}  # config key: args'


def memory_options(args) -> list[str]:
    """Set the twins' memory options a train step runs with on `args` (args.grad_accum, args.remat, args.loss_chunk):
    each flag's value where given, else --train-config's where that file sets the key off its default (a config's
    `remat: full` was timed while the report, its table and the memory check said remat none). Returns what sets
    each one that is not at its default, named for an error: the flag, or the config's key; [] outside train mode
    (check_used_options refuses a --train-config there). args.batch and args.seq likewise: the flag's, else the
    config's batch_size and seq_len where it sets them off their defaults; else args.batch 8, args.seq None."""
    from shared_config import TrainConfig, load_train_config

    default = TrainConfig()
    config = load_train_config(args.train_config) if args.train_config and args.mode == "train" else default
    # the shape too: a config's batch_size 32 x seq_len 64 was timed at 8 x 256 without a word (the flag wins)
    args.seq_from = "--seq-len"  # what set args.seq, for an error that names it
    for key, attr in (("batch_size", "batch"), ("seq_len", "seq")):
        if getattr(args, attr) is None and getattr(config, key) != getattr(default, key):
            setattr(args, attr, getattr(config, key))
            args.seq_from = f"--train-config {args.train_config}'s seq_len" if attr == "seq" else args.seq_from
    args.batch = args.batch or default.batch_size  # args.seq None: the tool's default, from the spec
    named = []
    for key, attr in MEMORY_FLAGS.items():
        if getattr(args, attr, None) is not None:
            named.append("--" + key.replace("_", "-"))
        elif getattr(config, key) != getattr(default, key):
            setattr(args, attr, getattr(config, key))
            named.append(f"{key}: {getattr(config, key)} of --train-config {args.train_config}")
        else:
            setattr(args, attr, None)  # profile_step.py has no such flags: the default, as compare.py's None
    return named


# spec keys a bench option sets: a --set or --sweep of one would be overridden by the option, or disagree with what
# the report records and the kernels chosen for it
OPTION_SETS = {"compute_dtype": "--compute-dtype"}


def variants(args) -> list[tuple[str, object]]:
    """(label, spec) for the base spec with --set applied and every combination of --sweep values."""
    base = load_spec(args.spec)
    changes = parse_overrides(args.set)
    sweeps, swept_keys = [], []
    for item in args.sweep:
        key, sep, values = (part.strip() for part in item.partition("="))
        if not sep or not key or not values:
            raise UsageError(f"--sweep {quote(item)} must look like key=v1,v2")
        if key in swept_keys:
            raise UsageError(f"--sweep {key}: given twice; list every value in one --sweep {key}=v1,v2,...")
        # (key, value, the value as typed: a variant's label, `d_model=null` where the value reads None)
        swept = [(key, parse_overrides([f"{key}={v}"], "--sweep")[key], v.strip()) for v in values.split(",")]
        no_repeats(f"--sweep {key}", [value for _, value, _ in swept])
        sweeps.append(swept)
        swept_keys.append(key)
    if both := [key for key in swept_keys if key in changes]:  # the sweep's values replaced --set's without a word
        raise UsageError(f"--set {both[0]} and --sweep {both[0]}: every variant takes the sweep's value; pass "
                         f"{both[0]} in one of them")
    for flag, keys in (("--set", changes), ("--sweep", swept_keys)):
        if taken := [key for key in keys if key in OPTION_SETS]:
            raise UsageError(f"{flag} {taken[0]}: the bench sets it from {OPTION_SETS[taken[0]]}; pass "
                             f"{OPTION_SETS[taken[0]]} instead")
    if args.dtype is None:  # the spec's own: a spec file's bfloat16 was timed in float32, the option's default
        args.dtype = base.compute_dtype
    changes["compute_dtype"] = args.dtype
    out = []
    for combo in itertools.product(*sweeps) if sweeps else [()]:
        # a --spec path's bytes that are not UTF-8 as \xNN: the plot's label (matplotlib's TypeError after the bench)
        label = ",".join(f"{k}={typed}" for k, _, typed in combo) or printable(args.spec)
        try:
            out.append((label, base.replace(**{**changes, **{k: v for k, v, _ in combo}})))
        except SpecError as e:
            raise SpecError(f"variant {label}: {e}") from None
    for i, (label, spec) in enumerate(out):  # an alias (norm_type=tanh is dyt): one model timed under two labels
        if same := next((other for other, o in out[:i] if o == spec), None):
            raise UsageError(f"--sweep: variant {label} is the spec of {same} again; list each model once")
    labels, have = ", ".join(label for label, _ in out), "has" if len(out) == 1 else "have"
    layer_mixers = {m for _, spec in out for m in spec.layer_mixers}  # a hybrid stack has two
    mixers = ", ".join(sorted(layer_mixers))
    for flag, kernel, mixer in (("--gla-kernel", getattr(args, "gla_kernel", "auto"), "gla"),
                                ("--attention", getattr(args, "attention", "auto"), "attention")):
        if kernel != "auto" and mixer not in layer_mixers:  # it ran, the option ignored
            raise UsageError(f"{flag} {kernel}: no variant has a layer of mixer {mixer} for it to run; {labels} "
                             f"{have} layers of mixer {mixers}")
    return out


def configure_threads(n: int, cpu_devices: int | None) -> None:
    """The same CPU threads for every framework (and, for a mesh on a CPU, that many host devices);
    must run before jax or torch is imported.

    XLA has no thread-count flag: it sizes its pools from the CPUs the process may run on, so the
    process is pinned to n CPUs; torch gets the same n (torch.set_num_threads, OMP_NUM_THREADS).
    """
    if hasattr(os, "sched_setaffinity") and n < len(os.sched_getaffinity(0)):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    if cpu_devices:  # only the CPU platform reads it: GPUs are counted as they are
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={cpu_devices}"
        os.environ["XLA_FLAGS"] = flags.strip()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch in one process


def kernels(attention: str, platform: str, dtype: str, mesh: bool = False) -> dict[str, str]:
    """The attention kernel each backend is asked for. On GPU in bf16 `auto` pins cuDNN's flash
    attention in both twins, so they run the same kernel family; on a TPU it pins the Pallas flash
    kernel (the same kernel: torch_xla wraps JAX's), except JAX over a mesh: XLA cannot partition a
    Pallas kernel ("Mosaic kernels cannot be automatically partitioned"), so XLA's attention runs there."""
    check_kernel(attention, platform, f"--attention {attention}")  # before any model is built: one line, exit code 2
    if attention == "auto" and platform == "tpu":
        return {"jax": "xla" if mesh else "pallas", "torch": "pallas", "hf": "sdpa"}
    if attention == "auto":
        attention = "cudnn" if platform == "gpu" and dtype == "bfloat16" else "auto"
    jax_name = {"sdpa": "xla"}.get(attention, attention)
    torch_name = {"xla": "sdpa"}.get(attention, attention)
    return {"jax": jax_name, "torch": torch_name, "hf": "sdpa"}


def environment(args, device: str) -> dict:
    """What a report's "env" records: date, device, platform, versions, threads and every job option."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device,
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": args.threads,
        "versions": versions("jax", "torch", "flax", "optax", "transformers", "numpy"),
        "mode": args.mode, "dtype": args.dtype, "batch": args.batch, "seq": args.seq, "steps": args.steps,
        "warmup": args.warmup, "rounds": args.rounds, "spec": args.spec, "set": args.set, "sweep": args.sweep,
        "matmul_precision": "highest (no TF32)" if args.dtype == "float32" else "bf16 matmuls, fp32 accumulate",
        "mesh": args.mesh or (f"data={args.devices}" if args.devices else None),
        # the memory options: the flags' (compare.py) or --train-config's (both tools), memory_options
        "grad_accum_steps": getattr(args, "grad_accum", None) or 1, "remat": getattr(args, "remat", None) or "none",
        "loss_chunk": getattr(args, "loss_chunk", None) or 0, "gla_kernel": args.gla_kernel,
        "world_size": env_int("WORLD_SIZE", 1),
        "parallel": args.parallel if "WORLD_SIZE" in os.environ else None,
        "compiler_flags": compiler_flags(),
        "compile_cache": getattr(args, "cache_state", {"dir": None}),  # its entries before the run: cold or warm
    }


COMPILER_ENV = ("XLA_FLAGS", "LIBTPU_INIT_ARGS", "TORCHINDUCTOR_", "TORCH_COMPILE_", "TORCHDYNAMO_")


def compiler_flags() -> dict[str, str]:
    """The environment variables that steer XLA's or torch.compile's code generation (docs/bench.md, "Compiler
    options"), as set for this run: a row measured with other flags is another measurement. The compile cache's own
    settings (--compile-cache) are where code is kept, not how it is made: left out."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(COMPILER_ENV) and k not in TORCH_CACHE_ENV}
