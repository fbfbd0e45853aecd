"""Sharded JAX training (jax_model.distributed) on 8 host devices: data-only, fsdp-only and mixed meshes,
in one process and in two (the multi-host path), give the single-device losses, parameters and AdamW
moments, with parameters and moments really split over fsdp; the gathered checkpoint loads in torch
with the same logits. A model loaded sharded decodes as on one device. Also the sharding rule and the one-line
errors for bad meshes and batches."""

import json
import math
import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jax_model import distributed
from jax_model.loss import IGNORE_INDEX
from jax_model.trainer import Trainer
from shared_config import SpecError, Tensor, model_layout
from shared_config.parallel import fsdp_dim, parse_mesh, rows_per_shard
from shared_config.parity import FORWARD_TOL

from ..support.common import ROOT, run_python
from ..support.parallel_common import (
    CFG, SPEC, TOL, assert_checkpoint_loads_in_both, assert_same_run, free_port, load_run, run_processes, variant,
    write_inputs,
)
from ..support.parallel_runs import ignored_batch

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
    (lambda: distributed.make_mesh(devices=0), "devices=0 must be an integer >= 1"),
    (lambda: rows_per_shard(6, 4), "batch_size=6 must be divisible by the 4 data-parallel shards"),
    # each of these was a traceback: AttributeError, TypeError, IndexError, KeyError
    (lambda: distributed.make_mesh(4), "mesh=4 must be a text of axis=N pairs"),
    (lambda: distributed.make_mesh(devices="2"), "devices='2' must be an integer >= 1"),
    (lambda: distributed.make_mesh(devices=1.5), "devices=1.5 must be an integer >= 1"),  # was "mesh 'data=1.5'"
    (lambda: distributed.from_safetensors("absent.safetensors", "data=1"), "mesh must be a jax.sharding.Mesh of axes "
                                                                           "('data', 'fsdp') (distributed.make_mesh), "
                                                                           "got str 'data=1'"),
    (lambda: distributed.shard_batch(np.zeros((2, 3)), None), "got NoneType None"),
    (lambda: distributed.param_shardings(SPEC, jax.make_mesh((1,), ("x",))), "got axes ('x',)"),
    (lambda: distributed.shard_batch(np.int32(3), distributed.make_mesh("data=1")), "a batch has rows [B, ...]"),
], ids=["axis", "size", "syntax", "devices", "devices-flag", "empty", "no-devices", "batch", "mesh-type",
        "devices-type", "devices-float", "mesh-text", "mesh-none", "mesh-axes", "batch-scalar"])
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
@pytest.mark.parametrize("name", [*MESHES, "2proc-data=2,fsdp=4", *(f"{v}/{ROUTED_MESH}" for v in ROUTED_JAX)])
def test_each_device_evaluates_its_rows_and_the_losses_are_one_device(runs, name):
    """Trainer.eval_loss on a mesh (what loop.Loop.evaluate reads; two processes too): the compiled eval step does
    1/devices of one device's flops per device (each evaluates its rows: the model, on the mesh, splits its hidden
    states by rows), and its losses (loss_topk too) are one device's, though each device counts a different number
    of targets. A routed spec's eval step on an fsdp axis did 1.20-1.22/devices (dtf, mod; 4 devices of 8): where a
    matmul's tokens took fewer bytes than its weight (the routed block's gathered [B, k, D] in the top-k forward),
    XLA kept the weight split, all-gathered the tokens and split the block by heads, so that parts of it (the softmax
    over all-reduced scores [B, K, H/K, k, k]) ran for every row on several devices; every Linear reads its weight
    whole (layers.gathered), as FSDP does."""
    sub, _, run = name.rpartition("/")
    record, state = load_run(runs / sub, f"jax-{run}")
    spec, cfg, _ = variant(sub)
    devices = math.prod(parse_mesh(run.removeprefix("2proc-")).values())
    one = Trainer(spec, cfg, {"step": cfg.steps, **state})
    want = one.fetch(one.eval_loss(ignored_batch(cfg, cfg.steps + 1, spec.V, IGNORE_INDEX)))
    got = record["eval"]
    assert set(got["losses"]) == set(want) == {"loss", *(["loss_topk"] if spec.routing != "none" else [])}, got
    assert all(abs(got["losses"][k] - v) <= TOL * abs(v) for k, v in want.items()), (got, want)
    assert 0.95 / devices <= got["flops_ratio"] <= 1.05 / devices, (got["flops_ratio"], devices)


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


# --- decoding with a model loaded sharded ----------------------------------------------------------------------------

DECODED = ("", "mod", "gla-peri")  # attention (dense and routed: the routing cache) and GLA (its recurrent state)
MESH_DECODE = """
import json, sys
import numpy as np, jax
import jax_model
from jax_model import distributed
from jax_model.generate import Decoder
from jax_model.precision import exact_float32
from jax.sharding import NamedSharding, PartitionSpec
from shared_config.parallel import AXES

exact_float32()
out = {}
for name in sys.argv[2:]:
    path = f"{sys.argv[1]}/{name}/init.safetensors"
    found = {"one": jax_model.from_pretrained(path)}
    found.update((m, distributed.from_safetensors(path, distributed.make_mesh(m))) for m in ("fsdp=4", "data=2,fsdp=2"))
    for where, model in found.items():
        decoder, start_B = Decoder(model), np.array([0, 3, 1, 5])  # left padding of each row
        tokens_BP = np.random.default_rng(0).integers(0, model.spec.V, (4, 8))
        logits_BV, cache = decoder.prefill(tokens_BP, decoder.init_cache(4, 16, start_B))
        logits, next_B = [np.asarray(logits_BV)], np.asarray(logits_BV).argmax(-1)
        for _ in range(5):
            logits_BV, cache = decoder.decode_step(next_B, cache)
            logits.append(np.asarray(logits_BV))
            next_B = logits[-1].argmax(-1)
        by_rows = NamedSharding(model.model.mesh, PartitionSpec(AXES)) if where != "one" else None
        rows = [by_rows is None or x.sharding.is_equivalent_to(by_rows, x.ndim)
                for x in jax.tree.leaves(cache) if x.ndim and x.shape[0] == 4]
        found[where] = {"logits": np.stack(logits).tolist(), "compiled": decoder._decode._cache_size(), "rows": rows}
    out[name or "base"] = found
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def mesh_decode(tmp_path_factory):
    """Prefill and 5 greedy decode steps of each DECODED variant, loaded sharded on an fsdp=4 and a data=2 × fsdp=2
    mesh of 4 host devices and on one device: each step's logits, the decode step's compilations, whether each
    row-first array of the cache is split by rows; and XLA's warnings that it replicated an array to reshard it."""
    directory = write_inputs(tmp_path_factory.mktemp("mesh_decode"), [n for n in DECODED if n])
    r = run_python("-c", MESH_DECODE, directory, *DECODED, **host_devices(4))
    assert r.returncode == 0, r.stderr[-3000:]
    replicated = [line for line in r.stderr.splitlines() if "Involuntary full rematerialization" in line]
    return json.loads(r.stdout.strip().splitlines()[-1]), replicated


@pytest.mark.slow
@pytest.mark.parametrize("mesh_text", ["fsdp=4", "data=2,fsdp=2"])
@pytest.mark.parametrize("name", [n or "base" for n in DECODED])
def test_a_model_loaded_sharded_decodes_as_on_one_device_and_compiles_the_decode_step_once(mesh_decode, name,
                                                                                            mesh_text):
    """Prefill and decode return the cache split by rows (model.split_cache_rows), so the decode step compiles once
    on a mesh too: on fsdp=4 a GLA layer's prefill returned its state whole on every device and decode returned it
    split by rows, so the second decode step compiled again; attention's keys and values came back split by slots
    over fsdp on data=2 × fsdp=2. The logits are one device's, within float32's floor."""
    found, _ = mesh_decode
    mesh, one = found[name][mesh_text], found[name]["one"]
    assert mesh["compiled"] == 1 and one["compiled"] == 1, (mesh["compiled"], one["compiled"])
    assert mesh["rows"] and all(mesh["rows"]), mesh["rows"]  # every row-first array of the cache split by rows
    a, b = np.array(mesh["logits"]), np.array(one["logits"])
    assert np.abs(a - b).max() <= FORWARD_TOL * b.std(), np.abs(a - b).max() / b.std()


@pytest.mark.slow
def test_decoding_on_a_mesh_never_replicates_an_array_to_reshard_it(mesh_decode):
    """A GLA layer pins its heads, gate and state by rows (layers.split_rows): after the fsdp-split projections XLA
    split them by heads, and replicated them on every device to reach the state's rows (16 warnings at gla-tiny)."""
    _, replicated = mesh_decode
    assert not replicated, replicated[:3]


# --- a model trained on a mesh it was not loaded on ------------------------------------------------------------------

ON_ANOTHER_MESH = """
import json, sys
import numpy as np, jax
from flax import nnx
import jax_model
from jax_model import distributed
from jax_model.generate import generate
from jax_model.precision import exact_float32
from parity_tests.support.parallel_runs import read_config

exact_float32()
path, cfg = sys.argv[1] + "/init.safetensors", read_config(sys.argv[1])
tokens_BN = np.random.default_rng(0).integers(0, 7, (cfg.batch_size, cfg.seq_len + 1))
expected = np.asarray(jax_model.from_pretrained(path)(tokens_BN[:, :-1]))
out = {}
for start in ("one device", "fsdp=2"):  # fsdp=2: the first 2 of the 4 devices
    model = (jax_model.from_pretrained(path) if start == "one device"
             else distributed.from_safetensors(path, distributed.make_mesh(start)))
    state, train_step = distributed.parallelize(model, cfg, distributed.make_mesh("data=2,fsdp=2"))
    logits = np.asarray(model(tokens_BN[:, :-1]))  # its own weights, now on the new mesh
    state, _ = train_step(state, tokens_BN)  # donates the state, and with it the model's arrays (jax_model/train.py)
    nnx.update(model, state.params)  # the trained weights, as docs/training.md says
    out[start] = {"error": float(np.abs(logits - expected).max() / expected.std()),
                  "generated": np.asarray(generate(model, tokens_BN[:4, :3], 2)).shape}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_a_model_trained_on_a_mesh_it_was_not_loaded_on_goes_on_computing_there(tmp_path):
    """parallelize / make_train_step put the model on the mesh (distributed.to_mesh): they had only told it the
    mesh, so a model loaded on one device or on another mesh failed its next forward, or a decode with the trained
    weights, on XLA's "incompatible devices" (parameters on some devices, hidden states split over others)."""
    r = run_python("-c", ON_ANOTHER_MESH, write_inputs(tmp_path, ()), **host_devices(4))
    assert r.returncode == 0, r.stderr[-3000:]
    for start, found in json.loads(r.stdout.strip().splitlines()[-1]).items():
        assert found["error"] <= FORWARD_TOL and found["generated"] == [4, 2], (start, found)
