"""Data-parallel and fully-sharded training of the JAX twin on JAX's own engine: a device mesh,
`NamedSharding`s read off the canonical layout table, jax_model.train's step jitted with in/out
shardings, and checkpoints gathered to (and placed from) the canonical file.

torch_model/distributed.py is the PyTorch counterpart (DDP and FSDP2 under torchrun); both read
the rules in shared_config.parallel.

    mesh = make_mesh("data=2,fsdp=4")                      # or make_mesh(devices=8): data=8
    model = from_safetensors("init.safetensors", mesh)     # each device receives only its shards
    state, train_step = parallelize(model, cfg, mesh)      # sharded TrainState, the step jitted over the mesh
    state, metrics = train_step(state, tokens_BN)          # the global batch, rows split over data × fsdp
    to_safetensors(model, state, "out.safetensors")        # gathered, written by process 0

Several hosts: `init_distributed()` before anything touches a device, then every process runs the
same program on the same global batches (each device reads its own rows of them).

Notation: B batch, N = T + 1 tokens per batch row.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from shared_config import SpecError, Tensor, TrainConfig, load_checkpoint, model_layout, save_checkpoint
from shared_config.generation import is_int
from shared_config.parallel import AXES, fsdp_dim, parse_mesh, process_index, rows_per_shard
from shared_config.tokens import check_batch

from . import loss, train
from .model import Transformer, set_mesh
from .weights import dotted, flat_arrays, set_pure_dict, to_canonical, to_pure_dict

# Batch rows are split over both axes (each of data × fsdp devices reads B / (data·fsdp) rows);
# parameters and AdamW moments over fsdp only, replicated over data.
BATCH = PartitionSpec(AXES)


def init_distributed() -> None:
    """Join a multi-process run as the environment says (torchrun's counterpart); no JAX_COORDINATOR_ADDRESS: nothing.

    Reads JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID;
    call it before anything touches a device.
    """
    if "JAX_COORDINATOR_ADDRESS" not in os.environ:
        return
    if missing := [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in os.environ]:
        raise SpecError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} not: set all three, or unset it")
    index, count = process_index("JAX_PROCESS_ID", "JAX_NUM_PROCESSES")  # `-1` was taken as a process id
    jax.distributed.initialize(num_processes=count, process_id=index)  # the address is read from the environment


def make_mesh(mesh: str | None = None, *, devices: int | None = None) -> Mesh:
    """A (data, fsdp) mesh from `"data=2,fsdp=4"`; `devices=N` alone means data=N; neither: data over every device.
    Raises SpecError for a mesh that is not such a text or names no axis ('' was data over every device, without a
    word), devices not an integer >= 1, and more devices than there are."""
    # devices=0 was read as "every device"; devices="2" failed on '<' between str and int, 2.5 became 'data=2.5'
    if devices is not None and not is_int(devices, 1):
        raise SpecError(f"devices={devices!r:.80} must be an integer >= 1")
    sizes = parse_mesh(mesh if mesh is not None else f"data={devices or jax.device_count()}")
    n, available, text = math.prod(sizes.values()), jax.device_count(), ",".join(f"{a}={sizes[a]}" for a in AXES)
    if devices is not None and n != devices:
        raise SpecError(f"mesh {text} has {n} devices, not the {devices} asked for")
    if n > available:
        raise SpecError(f"mesh {text} needs {n} devices, {available} available")
    # Auto axes: XLA propagates the parameters' and the batch's shardings through the twin's plain
    # code (make_mesh's default, Explicit, would ask every op for its output sharding).
    return jax.make_mesh(tuple(sizes.values()), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def check_mesh(mesh) -> Mesh:
    """`mesh`, a device mesh of the axes (data, fsdp) as `make_mesh` builds; else SpecError saying what it is. A
    mesh text ("data=2") or None failed on a missing `.shape` or `.size` in a traceback, other axes on a KeyError."""
    if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != AXES:
        given = f"axes {mesh.axis_names}" if isinstance(mesh, Mesh) else f"{type(mesh).__name__} {mesh!r:.80}"
        raise SpecError(f"mesh must be a jax.sharding.Mesh of axes {AXES} (distributed.make_mesh), got {given}")
    return mesh


def leaf_spec(t: Tensor, fsdp: int) -> PartitionSpec:
    """The PartitionSpec of `t`'s JAX leaf: `fsdp_dim` of the canonical tensor, through the leaf's transpose."""
    d = fsdp_dim(t, fsdp)
    if d is None:
        return PartitionSpec()
    axes = [None] * len(t.shape)
    axes[len(t.shape) - 1 - d if t.transposed else d] = "fsdp"
    return PartitionSpec(*axes)


def param_shardings(spec, mesh: Mesh) -> dict[str, NamedSharding]:
    """The sharding of every parameter leaf, keyed by `Tensor.jax_name` (fused q/k/v as the model holds them); a bad
    `mesh`: SpecError (`check_mesh`)."""
    fsdp = check_mesh(mesh).shape["fsdp"]
    return {t.jax_name: NamedSharding(mesh, leaf_spec(t, fsdp)) for t in model_layout(spec)}


def param_state_shardings(model, mesh: Mesh) -> nnx.State:
    """The sharding of each of `model`'s parameters, as a state shaped like `nnx.state(model, nnx.Param)`."""
    by_name = param_shardings(model.spec, mesh)
    return nnx.map_state(lambda path, v: v.replace(by_name[dotted(path)]), nnx.state(model, nnx.Param))


def state_shardings(model, cfg: TrainConfig, mesh: Mesh) -> train.TrainState:
    """Shardings of the train state: parameters by `leaf_spec`; optax's state derived from them (each moment like
    its parameter, counts replicated)."""
    by_name, replicated = param_shardings(model.spec, mesh), NamedSharding(mesh, PartitionSpec())
    params, params_sharding = nnx.state(model, nnx.Param), param_state_shardings(model, mesh)
    optimizer = train.make_optimizer(model, cfg)
    opt_sharding = optax.tree_utils.tree_map_params(  # finds the params-shaped parts of the state by running init
        optimizer, lambda _, sharding: sharding, jax.eval_shape(optimizer.init, params), params_sharding,
        transform_non_params=lambda _: replicated,
    )
    working = {name: by_name[name] for name in train.working_names(model, cfg)}  # each copy as its master
    return train.TrainState(replicated, params_sharding, opt_sharding, working)


def place(x, sharding: NamedSharding) -> jax.Array:
    """A host array (the same on every process) split over devices: each device receives only its own block."""
    if isinstance(x, jax.Array):
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def shard_batch(x_BN, mesh: Mesh) -> jax.Array:
    """A global batch (tokens or mask) [B, ...] with its rows split over data × fsdp; SpecError unless the devices
    divide B evenly, for an array without rows, or a bad `mesh` (`check_mesh`)."""
    if not np.ndim(x_BN):  # an IndexError from np.shape(x)[0]
        raise SpecError(f"a batch has rows [B, ...]; got a scalar {x_BN!r:.80}")
    rows_per_shard(np.shape(x_BN)[0], check_mesh(mesh).size)
    return place(x_BN, NamedSharding(mesh, BATCH))


def init_train_state(model, cfg: TrainConfig, mesh: Mesh) -> train.TrainState:
    """Step 0, sharded: `train.init_train_state` placed by `state_shardings`. A model from
    `from_safetensors(path, mesh)` is in place already: no device ever holds it whole."""
    return jax.device_put(train.init_train_state(model, cfg), state_shardings(model, cfg, mesh))


def make_train_step(model, cfg: TrainConfig, mesh: Mesh) -> Callable:
    """`train_step(state, tokens_BN, mask_BN=None) -> (state, metrics)`: train.make_train_step's function, jitted with
    the state's and the batch's shardings, the state donated; it takes the global batch. With grad_accum_steps,
    every device's rows split into that many micro-batches (train.micro_batches): each device keeps its rows.
    `model` is put on `mesh` (to_mesh): loaded on one device or on another mesh, it goes on computing there."""
    state_sharding, batch_sharding = state_shardings(model, cfg, mesh), NamedSharding(mesh, BATCH)
    to_mesh(model, mesh)  # hidden states split by rows; a GLA layer's Pallas kernel runs per device, on its rows
    step = jax.jit(
        train.make_train_step(model, cfg, compile=False),
        in_shardings=(state_sharding, batch_sharding, batch_sharding),
        out_shardings=(state_sharding, NamedSharding(mesh, PartitionSpec())),  # metrics: replicated scalars
        donate_argnums=0,
    )

    def train_step(state: train.TrainState, tokens_BN, mask_BN=None):
        # the global batch, on every process
        check_batch(tokens_BN, model.spec, loss.IGNORE_INDEX, mask_BN, loss.host_ids)
        rows_per_shard(np.shape(tokens_BN)[0], mesh.size, cfg.grad_accum_steps)  # as torch's ranks
        return step(state, shard_batch(tokens_BN, mesh), None if mask_BN is None else shard_batch(mask_BN, mesh))

    train_step.jitted = step  # jax.jit's own function (state, tokens_BN, mask_BN): bench/ lowers it for memory and HLO
    return train_step


def to_mesh(model, mesh: Mesh) -> None:
    """Put `model` on `mesh`, as `from_safetensors(path, mesh)` places it: its parameters split by `param_shardings`
    (those placed so already are kept, not copied) and its steps told the mesh (model.set_mesh). make_train_step
    does it: it had set the mesh alone, and a model on one device or on another mesh then failed its next forward
    or decode on XLA's "incompatible devices" (its parameters on some devices, its hidden states on others)."""
    nnx.update(model, jax.device_put(nnx.state(model, nnx.Param), param_state_shardings(model, mesh)))
    set_mesh(model, mesh)


def parallelize(model, cfg: TrainConfig, mesh: Mesh) -> tuple[train.TrainState, Callable]:
    """The sharded train state and step of `model` on `mesh`: what `train.init_train_state` and
    `train.make_train_step` are on one device, with the same step signature."""
    return init_train_state(model, cfg, mesh), make_train_step(model, cfg, mesh)


def from_safetensors(path: str | Path, mesh: Mesh, spec=None, *, attention: str = "auto",
                     allow_nonfinite: bool = False) -> Transformer:
    """Load a canonical checkpoint with its parameters sharded over `mesh`: every device receives its blocks
    straight from host memory, no device holds the whole model. Raises SpecError for a bad `mesh` (`check_mesh`:
    before the file is read), CheckpointError naming the file and what is wrong with it (NaN or Inf values too,
    unless `allow_nonfinite`, as checkpoint.from_safetensors)."""
    check_mesh(mesh)
    weights, spec = load_checkpoint(path, spec, allow_nonfinite)
    by_name = param_shardings(spec, mesh)
    pure = jax.tree_util.tree_map_with_path(
        lambda keys, x: place(x, by_name[dotted(k.key for k in keys)]), to_pure_dict(weights, spec, xp=np)
    )
    model = nnx.eval_shape(lambda: Transformer(spec, rngs=nnx.Rngs(0), attention=attention))
    set_pure_dict(model, pure)
    set_mesh(model, mesh)
    return model


def to_safetensors(model, state: train.TrainState, path: str | Path) -> None:
    """Write the canonical file of `state`'s parameters (every process calls it): gathered, written by process 0."""
    weights = to_canonical(flat_arrays(state.params), model.spec)
    if jax.process_index() == 0:
        save_checkpoint(path, weights, model.spec)
    multihost_utils.sync_global_devices(f"to_safetensors {path}")  # the file exists for every process on return
