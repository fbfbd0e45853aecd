"""Sharded JAX training (jax_model.distributed) on 8 host devices: data-only, fsdp-only and mixed meshes,
in one process and in two (the multi-host path), give the single-device losses, parameters and AdamW
moments, with parameters and moments really split over fsdp; the gathered checkpoint loads in torch
with the same logits. Also the sharding rule and the one-line errors for bad meshes and batches."""

import os

import pytest
from jax.sharding import PartitionSpec

from jax_model import distributed
from shared_config import SpecError, Tensor, model_layout
from shared_config.parallel import fsdp_dim, rows_per_shard

from ..support.common import ROOT
from ..support.parallel_common import (
    CFG, SPEC, assert_checkpoint_loads_in_both, assert_same_run, free_port, load_run, run_processes, write_inputs,
)

ROUTED_MESH = "data=2,fsdp=2"  # 8 rows: 2 per device, one per micro-batch (grad_accum_steps=2 in ROUTED_CFG)
ROUTED_JAX = ("mod", "dtf")  # every router; mixers and placements: the torch FSDP2 runs

# GLA's Pallas kernel on a mesh (in Pallas' interpreter here): each device runs it on its own rows; and on one
# device, the run the mesh's must equal (the kernel against the pure form: test_gla_kernel.py, at GRAD_TOL)
GLA_PALLAS_RUN = f"{ROUTED_MESH}:gla_kernel=pallas"
GLA_PALLAS_ONE_DEVICE = "data=1:gla_kernel=pallas"

MESHES = ("data=8", "fsdp=8", "data=2,fsdp=4")
# the memory options on a mixed mesh: 2 micro-batches of 4 rows, one row per device in each
MEMORY_RUN = "data=2,fsdp=2:grad_accum_steps=2,remat=block,loss_chunk=48"


def host_devices(n: int) -> dict[str, str]:
    """The environment of a JAX process on CPU with n devices (set before JAX starts)."""
    return {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip(),
            "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The directory where the subprocesses left every run: one process of 8 devices on each mesh, then
    two processes of 4 devices (the multi-host code path) on the mixed mesh."""
    directory = write_inputs(tmp_path_factory.mktemp("sharded_jax"), (*ROUTED_JAX, "gla-peri"))
    script = str(ROOT / "parity_tests" / "support" / "sharded_jax_run.py")
    routed = [*(f"{name}/{ROUTED_MESH}" for name in ROUTED_JAX),
              *(f"gla-peri/{run}" for run in (GLA_PALLAS_RUN, GLA_PALLAS_ONE_DEVICE))]
    run_processes([script, str(directory), *MESHES, MEMORY_RUN, *routed], [host_devices(8)])
    coordinator = {"JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}", "JAX_NUM_PROCESSES": "2"}
    run_processes([script, str(directory), "data=2,fsdp=4"],
                  [{**host_devices(4), **coordinator, "JAX_PROCESS_ID": str(i)} for i in range(2)])
    return directory


# --- the rule, written once against the layout table ----------------------------------------------


def linear(*shape, kind="linear"):
    return Tensor("w", shape, kind, "linear")


def test_fsdp_dim_shards_the_larger_divisible_dim():
    assert fsdp_dim(linear(80, 48), 4) == 0  # the larger dim
    assert fsdp_dim(linear(48, 80), 4) == 1
    assert fsdp_dim(linear(48, 48), 4) == 0  # a tie: dim 0
    assert fsdp_dim(linear(97, 48, kind="embedding"), 4) == 1  # 97 is prime: the other dim
    assert fsdp_dim(linear(97, 7), 4) is None  # neither divides: replicated
    assert fsdp_dim(linear(48, kind="param"), 4) is None  # norm weights and scalars: replicated
    assert fsdp_dim(linear(80, 48), 1) is None


def test_leaf_spec_goes_through_the_transpose():
    # canonical [out, in] = [80, 48] split on out -> the JAX kernel [in, out] split on its dim 1
    assert distributed.leaf_spec(linear(80, 48), 4) == PartitionSpec(None, "fsdp")
    assert distributed.leaf_spec(linear(97, 48, kind="embedding"), 4) == PartitionSpec(None, "fsdp")  # not transposed
    assert distributed.leaf_spec(linear(48, kind="param"), 4) == PartitionSpec()


def test_parse_mesh():
    assert distributed.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
    assert distributed.parse_mesh("fsdp=8") == {"data": 1, "fsdp": 8}


@pytest.mark.parametrize("make,message", [
    (lambda: distributed.parse_mesh("data=2,tensor=4"), "unknown axis 'tensor' (axes: data, fsdp)"),
    (lambda: distributed.parse_mesh("data=0"), "'data=0' must be axis=N with N >= 1"),
    (lambda: distributed.parse_mesh("fsdp"), "'fsdp' must be axis=N"),
    (lambda: distributed.make_mesh("data=2,fsdp=4"), "mesh data=2,fsdp=4 needs 8 devices, 1 available"),
    (lambda: distributed.make_mesh("fsdp=2", devices=4), "mesh data=1,fsdp=2 has 2 devices, not the 4 asked for"),
    (lambda: distributed.make_mesh(""), "mesh '' names no axis"),
    (lambda: distributed.make_mesh(devices=0), "devices=0 must be >= 1"),
    (lambda: rows_per_shard(6, 4), "batch_size=6 must be divisible by the 4 data-parallel shards"),
], ids=["axis", "size", "syntax", "devices", "devices-flag", "empty", "no-devices", "batch"])
def test_bad_meshes_and_batches_are_one_line_errors(make, message):
    with pytest.raises(SpecError, match="^[^\n]*$") as e:
        make()
    assert message in str(e.value)


# --- the sharded runs -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", [*MESHES, "2proc-data=2,fsdp=4", MEMORY_RUN])
def test_sharded_steps_equal_one_device(runs, name):
    assert_same_run(*load_run(runs, f"jax-{name}"), "jax")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ROUTED_JAX)
def test_routed_sharded_steps_equal_the_one_shot_step(runs, variant):
    """Micro-batches and devices holding different numbers of targets: the one-device, one-shot update."""
    assert_same_run(*load_run(runs / variant, f"jax-{ROUTED_MESH}"), "jax", variant)


@pytest.mark.slow
def test_gla_pallas_kernel_runs_per_device_on_a_mesh(runs):
    """XLA cannot partition a Pallas call: without a shard_map it would gather every row onto every device. Every
    pallas_call of the sharded step (forward and backward) sits in one, and the run equals the kernel's run on one
    device (which calls it unwrapped)."""
    record, state = load_run(runs / "gla-peri", f"jax-{GLA_PALLAS_RUN}")
    assert record["kernel_in_shard_map"] and all(record["kernel_in_shard_map"]), record["kernel_in_shard_map"]
    one_device = load_run(runs / "gla-peri", f"jax-{GLA_PALLAS_ONE_DEVICE}")
    assert one_device[0]["kernel_in_shard_map"] and not any(one_device[0]["kernel_in_shard_map"])
    assert_same_run(record, state, "jax", "gla-peri", reference=one_device)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_parameters_and_moments_are_split_over_fsdp(runs, mesh):
    record, _ = load_run(runs, f"jax-{mesh}")
    fsdp = distributed.parse_mesh(mesh)["fsdp"]
    assert record["batch"] == {"spec": [["data", "fsdp"]], "shards": [[1, CFG.seq_len + 1]] * 8}
    for t in model_layout(SPEC):
        d = fsdp_dim(t, fsdp)
        axes, shard = [None] * len(t.shape), list(t.jax_shape)
        if d is not None:
            d = len(t.shape) - 1 - d if t.transposed else d
            axes[d], shard[d] = "fsdp", shard[d] // fsdp
        expected = {"spec": axes if d is not None else [], "shards": [shard] * 8}
        for part in ("params", "mu", "nu"):
            assert record[part][t.jax_name] == expected, f"{part} {t.jax_name}"
    # every matrix of this spec has a divisible dim: on an fsdp mesh none stays whole
    assert fsdp == 1 or all(record["params"][t.jax_name]["spec"] for t in model_layout(SPEC) if t.kind != "param")
    assert record["params"]["model.embed_tokens.embedding"]["shards"][0] == [97, 48 // fsdp]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["data=2,fsdp=4", "2proc-data=2,fsdp=4"])
def test_sharded_checkpoint_loads_in_torch(runs, name):
    _, state = load_run(runs, f"jax-{name}")
    assert_checkpoint_loads_in_both(runs / f"jax-{name}.safetensors", state)
