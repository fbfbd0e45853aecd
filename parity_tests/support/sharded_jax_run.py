"""The sharded JAX runs of test_sharding.py: one process with 8 host devices, or several processes
whose host devices add up to 8 (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID set).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python parity_tests/support/sharded_jax_run.py DIR MESH...

For each mesh (MESH, or MESH:KEY=VALUE,... with train config changes; SUB/...: in DIR/SUB), from DIR/init.safetensors
with DIR/train.json: load the checkpoint sharded, train,
and write what parallel_runs.py says (process 0), plus each leaf's PartitionSpec and this process's
shard shapes (parameters, AdamW mu and nu) and the batch's, read off the arrays themselves, and (for a run without
train config changes) a Trainer's validation losses on the mesh with its eval step's flops per device.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import optax
from flax import nnx

from jax_model import distributed, train
from jax_model.gla import GLA
from jax_model.loss import IGNORE_INDEX
from jax_model.precision import exact_float32
from jax_model.trainer import Trainer
from jax_model.weights import flat_arrays
from parity_tests.support.parallel_runs import ignored_batch, masked_batch, read_config, save_run
from shared_config import parse_overrides, synthetic_batch

def layout_of(x: jax.Array) -> dict:
    """What the array really is: its PartitionSpec and the shapes of its blocks, one per device."""
    return {"spec": [a if a is None or isinstance(a, str) else list(a) for a in x.sharding.spec],
            "shards": sorted(list(s.data.shape) for s in x.addressable_shards)}


def pallas_calls(jaxpr, inside: bool = False) -> list[bool]:
    """Whether each pallas_call of `jaxpr`, nested ones included, runs inside a shard_map."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(inside)
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found += pallas_calls(sub, inside or eqn.primitive.name == "shard_map")
    return found


def run(directory: Path, run_text: str) -> None:
    """One run on a mesh, `MESH` or `MESH:KEY=VALUE,...` (train config changes, e.g. the memory options); `SUB/...`:
    the run in the subdirectory SUB (a routed variant's inputs and outputs)."""
    sub, _, run_text = run_text.rpartition("/")
    directory = directory / sub
    mesh_text, _, changes = run_text.partition(":")
    cfg = read_config(directory).replace(**parse_overrides(changes.split(",") if changes else []))
    mesh = distributed.make_mesh(mesh_text)
    model = distributed.from_safetensors(directory / "init.safetensors", mesh)
    if cfg.gla_kernel == "pallas":  # here on CPU in Pallas' interpreter (set_kernel gives it to a GPU only)
        for _, layer in nnx.iter_modules(model):
            if isinstance(layer, GLA):
                layer.kernel = "pallas"
    state, train_step = distributed.parallelize(model, cfg, mesh)
    record = {"loss": [], "grad_norm": []}
    if cfg.gla_kernel == "pallas":  # each device runs the kernel on its own rows, inside a shard_map
        jaxpr = jax.make_jaxpr(train_step.jitted)(state, *(distributed.shard_batch(x, mesh)
                                                           for x in masked_batch(cfg, 0, model.spec.V)))
        record["kernel_in_shard_map"] = pallas_calls(jaxpr.jaxpr)
    for step in range(cfg.steps):
        state, metrics = train_step(state, *masked_batch(cfg, step, model.spec.V))
        record["loss"].append(float(metrics["loss"]))
        record["grad_norm"].append(float(metrics["grad_norm"]))
    trees = {"params": state.params, **{k: optax.tree_utils.tree_get(state.opt_state, k) for k in ("mu", "nu")}}
    for key, tree in trees.items():
        record[key] = {name: layout_of(x) for name, x in flat_arrays(tree).items()}
    record["batch"] = layout_of(distributed.shard_batch(synthetic_batch(0, 0, cfg.batch_size, cfg.seq_len, 7), mesh))
    processes = jax.process_count()
    name = f"jax-{run_text}" if processes == 1 else f"jax-{processes}proc-{run_text}"
    distributed.to_safetensors(model, state, directory / f"{name}.safetensors")
    canonical = train.get_train_state(model, state)  # several processes: each gathers from all
    if not changes:  # test_each_device_evaluates_its_rows... reads the plain runs' (the memory and Pallas runs:
        # two more compiles each, read by no test)
        record["eval"] = evaluate(model.spec, cfg, canonical, mesh_text)
    if jax.process_index() == 0:
        save_run(directory, name, record, canonical)


def evaluate(spec, cfg, canonical: dict, mesh_text: str) -> dict:
    """The validation losses of a Trainer on the mesh (what loop.Loop.evaluate reads) on an ignored_batch (each row,
    so each device, counting a different number of targets), and its compiled eval step's flops per device over a
    one-device Trainer's: 1 / devices where each device evaluates only its rows."""
    batch_BN = ignored_batch(cfg, cfg.steps + 1, spec.V, IGNORE_INDEX)
    mesh = Trainer(spec, cfg, canonical, parallel=mesh_text)
    compiled = mesh.eval_step.lower(mesh.state, batch_BN).compile()  # run as compiled: eval_loss would compile again
    if (spec, cfg) not in ONE_DEVICE_FLOPS:  # the same for every mesh of a spec: compiled once
        one = Trainer(spec, cfg, canonical)
        ONE_DEVICE_FLOPS[spec, cfg] = flops_per_device(one.eval_step.lower(one.state, batch_BN).compile())
    losses = mesh.fetch(compiled(mesh.state, batch_BN))
    return {"losses": {k: float(v) for k, v in losses.items()},
            "flops_ratio": flops_per_device(compiled) / ONE_DEVICE_FLOPS[spec, cfg]}


ONE_DEVICE_FLOPS = {}  # (spec, train config) -> a one-device eval step's flops


def flops_per_device(compiled) -> float:
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


if __name__ == "__main__":
    distributed.init_distributed()
    exact_float32()  # as parity_tests/conftest.py
    assert jax.device_count() == 8, f"needs 8 devices, has {jax.device_count()}: set XLA_FLAGS before starting"
    for run_text in sys.argv[2:]:
        run(Path(sys.argv[1]), run_text)
