"""Data-parallel (DDP) and fully-sharded (FSDP2) training of the PyTorch twin on torch.distributed,
launched by torchrun; jax_model/distributed.py is the JAX counterpart, and both read the rules in
shared_config.parallel.

    device = init_distributed()                                  # torchrun's RANK, WORLD_SIZE, LOCAL_RANK
    model = torch_model.from_safetensors(path, device=device)    # every rank reads the whole file
    state, train_step = parallelize(model, cfg, "fsdp2")         # or "ddp"; train.make_train_step's signature
    state, metrics = train_step(state, tokens_BN)                # the global batch: each rank trains on its rows
    losses = make_eval_step(model)(state, tokens_BN)             # each rank evaluates its rows; summed over ranks
    to_safetensors(model, "out.safetensors")                     # gathered to rank 0, written atomically there

Every rank passes the same global batch (a pure function of seed and step); rank r trains on rows
[r·B/W, (r+1)·B/W), the rows the JAX side's device r reads on a mesh of W devices. Gradients are
averaged over ranks, and each rank divides its summed loss by the global batch's count of targets / W,
so the update is the single-process update on the global batch (the JAX mesh's) also when a mask or
ignored tokens leave the ranks different numbers of targets. A routed spec's aux terms are means over every
position: each rank adds its own rows' mean (train.model_loss), and the average over ranks is the global mean.
Evaluation splits the rows the same way (make_eval_step): each rank's summed loss over the global count, summed
over ranks.

Notation: B batch, N = T + 1 tokens per batch row, W ranks.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Callable, NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import Shard
from torch.nn.parallel import DistributedDataParallel

from shared_config import SpecError, TrainConfig, check_train_state, did_you_mean, model_layout, save_checkpoint
from shared_config.parallel import env_int, fsdp_dim, process_index, rows_per_shard, splits_rows
from shared_config.tokens import check_batch

from . import loss, train
from .weights import to_canonical, to_state_dict

PARALLEL = ("ddp", "fsdp2")


def init_distributed() -> torch.device:
    """Join torchrun's process group (gloo on CPU, NCCL on GPU); this rank's device. Without torchrun: no group."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return torch.device("cuda" if cuda else "cpu")
    # each was a traceback (KeyError; torch's ValueError after the run directory was made, for MASTER_ADDR/PORT)
    if missing := [k for k in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]:
        raise SpecError(f"RANK is set but {' and '.join(missing)} not: launch with torchrun, or unset RANK")
    (rank, world_size), local_rank = process_index("RANK", "WORLD_SIZE"), env_int("LOCAL_RANK")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # MASTER_ADDR and MASTER_PORT: read from torchrun's environment
        backend, device_id = ("nccl", device) if cuda else ("gloo", None)
        dist.init_process_group(backend, rank=rank, world_size=world_size, device_id=device_id)
    return device


def close_distributed(finished: bool = True) -> None:
    """Leave torchrun's process group, if one was joined. `finished` (the run ended without an error): first a
    barrier, which in gloo also waits for this rank's pending work, so that no rank tears down its connections
    while another still trains or writes. After an error no barrier: the other ranks may never reach it."""
    if not dist.is_initialized():
        return
    if finished:
        try:
            dist.barrier()
        except RuntimeError:  # a peer left after an error of its own (gloo: "Connection closed by peer"): its
            pass  # error line is the run's; this rank's work is done
    dist.destroy_process_group()


def peer_left(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another rank left the group (after an error of its own, or
    killed): gloo's "Connection closed by peer" / "reset by peer", or torch.distributed's DistError (NCCL)."""
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and
                                             any(s in str(e) for s in ("closed by peer", "reset by peer")))


def exit_rank() -> NoReturn:
    """End a torchrun rank whose work is done and written: leave the group (`close_distributed`), flush, exit 0
    without the interpreter's teardown. torch's C++ teardown at exit sometimes aborted a gloo rank after an FSDP2
    run ("terminate called without an active exception", about 1 run in 25 on a busy CPU), after every file was
    written: the launcher then reported the run failed."""
    close_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def rank_rows(x_BN, rank: int | None = None, world_size: int | None = None):
    """This rank's rows [r·B/W, (r+1)·B/W) of a global batch (numpy or tensor); B must divide evenly."""
    rank = _rank() if rank is None else rank
    world_size = _world_size() if world_size is None else world_size
    n = rows_per_shard(len(x_BN), world_size)
    return x_BN[rank * n : (rank + 1) * n]


def parallelize(model, cfg: TrainConfig, parallel: str = "ddp", *, compile: bool = False,
                fused: bool = True) -> tuple[train.TrainState, Callable]:
    """The train state and step of `model` over the process group: DDP, or FSDP2 (each block, then the root).

    What `train.init_train_state` and `train.make_train_step` are in one process, with the same step
    signature; the optimizer holds the wrapped model's parameters (FSDP2: this rank's shards).
    """
    if parallel not in PARALLEL:
        raise SpecError(f"parallel={parallel!r} must be one of {', '.join(PARALLEL)}{did_you_mean(parallel, PARALLEL)}")
    if not dist.is_initialized():
        raise SpecError(f"parallel={parallel!r} needs a process group: launch with torchrun, call init_distributed()")
    wrapped = data_parallel(model) if parallel == "ddp" else fully_shard_model(model)
    state = train.TrainState(wrapped, *train.make_optimizer(model, cfg, fused=fused))
    return state, make_train_step(model, cfg, compile=compile)


def set_train_state(model, state: train.TrainState, canonical: dict) -> train.TrainState:
    """`parallelize`'s state holding a canonical train state's AdamW moments and step (either twin's, every rank
    calls it); the weights are loaded before wrapping (`from_weights(canonical["weights"])`), as FSDP2 shards them.

    torch.distributed's full optimizer state dict places each rank's shard of the moments (FSDP2) or the whole
    moments (DDP), as `train.set_train_state` does in one process; CheckpointError as there (check_train_state).
    """
    check_train_state(canonical, model.spec)
    step, options = canonical["step"], StateDictOptions(full_state_dict=True)
    m, v = (to_state_dict(canonical[key], model.spec) for key in ("m", "v"))  # by the model's parameter names
    full = get_optimizer_state_dict(model, state.optimizer, options=options)
    full["state"] = {name: {"step": torch.tensor(float(step)), "exp_avg": m[name], "exp_avg_sq": v[name]} for name in m}
    set_optimizer_state_dict(model, state.optimizer, full, options=options)
    # a scheduler built at last_epoch = step − 1 steps once on construction: update `step` gets lr_factor(step)
    scheduler = train.LambdaLR(state.optimizer, state.scheduler.lr_lambdas, last_epoch=step - 1)
    return train.TrainState(state.model, state.optimizer, scheduler)


def get_train_state(model, state: train.TrainState) -> dict:
    """`train.get_train_state` of a DDP or FSDP2 run (every rank calls it: FSDP2's shards are gathered).

    FSDP2 leaves the root module's parameters gathered after a forward without a backward (an
    evaluation), while the optimizer's state is keyed by the shards: reshard first, or the root's
    moments (embeddings, final norm, head) would be looked up under the wrong tensors and read as zeros.
    """
    if isinstance(model, FSDPModule):
        model.reshard()
    return train.get_train_state(model, state)


def data_parallel(model: nn.Module) -> DistributedDataParallel:
    """DDP: a whole replica per rank, gradients averaged by all-reduce during the backward."""
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def fully_shard_model(model: nn.Module) -> nn.Module:
    """FSDP2 in place: each block one unit (gathered for its forward and backward only), then the root for the rest.

    Each parameter is split along `fsdp_dim`, the dim the JAX side shards; where that is None
    (norms, scalars: the JAX side replicates them) FSDP2 splits dim 0, as it splits everything.
    """
    device, world_size = next(model.parameters()).device, _world_size()
    mesh = init_device_mesh(device.type, (world_size,))
    params = dict(model.named_parameters())
    dims = {id(params[t.name]): fsdp_dim(t, world_size) for t in model_layout(model.spec)}

    def placement(p: nn.Parameter) -> Shard:
        return Shard(dims[id(p)] or 0)

    for block in model.model.layers:
        fully_shard(block, mesh=mesh, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement)
    average_gradients(model, mesh)
    return model


def make_train_step(model, cfg: TrainConfig, *, compile: bool = False) -> Callable:
    """`train_step(state, tokens_BN, mask_BN=None) -> (state, metrics)` on the global batch: train.make_train_step's
    step on this rank's rows; loss averaged over ranks. Build it after wrapping (FSDP2 replaces the parameters).

    The update is the one-device update of the global batch, also when the ranks' rows hold different numbers
    of counted targets (a mask, ignored targets): each rank divides its summed loss by the global count / W, so
    that DDP's and FSDP2's average of the W gradients is the gradient of the global mean (the JAX mesh's loss).
    With grad_accum_steps, each rank's rows split into that many micro-batches (train.micro_batches), and only the
    last one's backward reduces the gradients (DDP's no_sync, FSDP2's set_requires_gradient_sync).
    """
    step = train.make_train_step(model, cfg, compile=compile).step  # unchecked: the global batch is checked below

    def train_step(state: train.TrainState, tokens_BN, mask_BN=None):
        # the global batch, on every process
        check_batch(tokens_BN, model.spec, loss.IGNORE_INDEX, mask_BN, loss.host_ids)
        _, _, weights_BT = loss.split_batch(tokens_BN, mask_BN)  # every rank holds the global batch: no collective
        count = torch.clamp(torch.sum(weights_BT), min=1.0) / _world_size()
        state, metrics = step(state, rank_rows(tokens_BN), None if mask_BN is None else rank_rows(mask_BN), count)
        # grad_norm is already global (FSDP2: a replicated DTensor reduced over every shard; DDP: averaged gradients)
        averaged = {k: mean_over_ranks(v)
                    for k, v in metrics.items() if k in ("loss", "router_bce", "predictor_acc", "prior_mse")}
        return state, {**metrics, **averaged, "grad_norm": _local(metrics["grad_norm"])}

    return train_step


def make_eval_step(model, *, compile: bool = False) -> Callable:
    """`eval_step(state, tokens_BN, mask_BN=None) -> {"loss", "loss_topk"}` on the global batch: train.make_eval_step's
    step on this rank's rows, each rank's summed loss divided by the global batch's count of targets, then summed over
    ranks (one all-reduce): the one-process mean over the global batch's targets, each row evaluated by one rank.

    Every loss is row-separable: a sum over targets, and routing's top-k picks k tokens per row. Rows the ranks do
    not divide evenly: every rank evaluates the whole batch (the same losses, W times the work, no collective of its
    own), as the JAX mesh leaves such rows whole (jax_model.layers.split_rows). Every rank takes part in every
    forward either way, as FSDP2's all-gathers need."""
    step = train.make_eval_step(model, compile=compile).step  # unchecked: the global batch is checked below

    def eval_step(state: train.TrainState, tokens_BN, mask_BN=None):
        # the global batch, on every process
        check_batch(tokens_BN, model.spec, loss.IGNORE_INDEX, mask_BN, loss.host_ids)
        if not splits_rows(len(tokens_BN), _world_size()):
            return step(state, tokens_BN, mask_BN)
        _, _, weights_BT = loss.split_batch(tokens_BN, mask_BN)  # every rank holds the global batch: no collective
        count = torch.clamp(torch.sum(weights_BT), min=1.0)
        losses = step(state, rank_rows(tokens_BN), None if mask_BN is None else rank_rows(mask_BN), count)
        summed = sum_over_ranks(torch.stack(list(losses.values())))  # loss and loss_topk in one all-reduce
        return dict(zip(losses, summed))

    return eval_step


def to_safetensors(model, path: str | Path) -> None:
    """Write the canonical file (every rank calls it): gathered to rank 0's CPU memory, written there atomically."""
    model = model.module if isinstance(model, DistributedDataParallel) else model
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # only rank 0 keeps the gathered tensors
    state_dict = get_model_state_dict(model, options=options)
    if _rank() == 0:
        save_checkpoint(path, to_canonical(state_dict, model.spec), model.spec)
    if dist.is_initialized():
        dist.barrier()  # the file is in place for every rank on return


# --- FSDP2's gradient average ------------------------------------------------------------------


def average_gradients(model: nn.Module, mesh: DeviceMesh) -> None:
    """Make FSDP2 average gradients over ranks, as DDP and the JAX step do, or refuse.

    FSDP2 reduce-scatters float32 gradients with ReduceOp.AVG; where the process group sums instead
    (gloo: pytorch/pytorch#162338, a silent bug) every gradient would come out W times too large
    and AdamW, nearly scale-free, would hide it. A probe finds out; where AVG sums, FSDP2 is switched
    to ReduceOp.SUM followed by its own division by W (`set_force_sum_reduction_for_comms`), which
    the probe must then confirm. torch 2.13.0's gloo averages: the switch is not needed there.
    """
    if averages(probe_gradient_factor(mesh)):
        return
    if not averages(factor := probe_gradient_factor(mesh, force_sum=True)):
        raise RuntimeError(f"FSDP2 on {dist.get_backend()}: gradients come out {factor:g}x their mean over ranks, even "
                           f"summed then divided (see pytorch/pytorch#162338); use parallel='ddp'")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
    if _rank() == 0:
        warnings.warn(f"FSDP2 on {dist.get_backend()}: ReduceOp.AVG sums (pytorch/pytorch#162338); "
                      f"gradients are summed, then divided by {_world_size()} by FSDP2 itself", stacklevel=2)


def probe_gradient_factor(mesh: DeviceMesh, force_sum: bool = False) -> float:
    """FSDP2's reduced gradient over the true mean, on a one-row-per-rank probe: 1 averages, W sums (a collective)."""
    rank, world_size = _rank(), _world_size()
    probe = nn.Linear(1, world_size, bias=False, device=mesh.device_type)  # weight [W, 1]: one row per rank
    fully_shard(probe, mesh=mesh)
    probe.set_force_sum_reduction_for_comms(force_sum)
    probe(torch.full((1, 1), rank + 1.0, device=mesh.device_type)).sum().backward()  # rank r's gradient: r + 1
    got = float(probe.weight.grad.to_local().flatten()[0])
    return got / ((world_size + 1) / 2)  # the mean of 1..W


def averages(factor: float) -> bool:
    return abs(factor - 1.0) < 1e-3  # a sum would be off by W - 1 >= 1; NCCL's AVG may round (premultiplies by 1/W)


# --- helpers ---------------------------------------------------------------------------------------


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over ranks (SUM, then divided here: every backend has SUM)."""
    return sum_over_ranks(x) / _world_size()


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over ranks (an all-reduce)."""
    if not dist.is_initialized():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def _local(x: torch.Tensor) -> torch.Tensor:
    return x.to_local() if hasattr(x, "to_local") else x  # a replicated DTensor: every rank holds the value


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
