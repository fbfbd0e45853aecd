"""Working weights (docs/training.md, "Working weights"): under mixed precision the train state keeps each Linear
weight's compute-dtype copy, refreshed after every update, and the forward reads it instead of casting the float32
master at each use. The update is bit for bit the one of casting at each use, in both twins, for every mixer, routing,
head and memory option; the copies follow a resumed state; the forward casts no master weight left."""

import json

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import jax
import jax.extend
import jax.numpy as jnp

from shared_config import TrainConfig, load_spec, model_layout, synthetic_batch
from shared_config.parity import BF16_LOSS_TOL

from ..support.common import parity_weights, quick_first, run_python
from ..support.train_common import TWINS

CFG = TrainConfig(lr=1e-3, warmup_steps=1, steps=3, batch_size=4, seq_len=32)
CASES = [  # (spec, spec changes, train config changes)
    ("tiny", {}, {}),
    ("tiny", {"tie_embeddings": False}, {"loss_chunk": 64}),  # the head reads its master (head_loss)
    ("tiny", {"fused_qkv": True}, {"grad_accum_steps": 2}),
    ("tiny", {}, {"remat": "block"}),  # not with the others: the torch twin keeps no copies under remat
    ("tiny-dyt", {"mlp": "gelu", "tie_embeddings": False}, {}),  # an untied head read through its copy
    ("gla-tiny", {}, {}),
    ("tiny", {"routing": "mod"}, {}),
    ("tiny", {"routing": "dtf"}, {}),
]


def bf16(name, spec_changes):
    return load_spec(name).replace(compute_dtype="bfloat16", **spec_changes)


def run(twin, train, spec, cfg, working: bool, monkeypatch, compile_backend: str | None = None):
    """Losses and the final canonical state of cfg.steps steps, with the working weights or (monkeypatched) without;
    `compile_backend`: torch.compile the torch twin's blocks with it first."""
    with monkeypatch.context() as patch:
        if not working:
            patch.setattr(train, "working_names", lambda model, cfg: ())
        model = twin.from_weights(parity_weights(spec), spec)
        if compile_backend:
            train.compile_blocks(model, backend=compile_backend)
        state, step, losses = train.init_train_state(model, cfg), train.make_train_step(model, cfg), []
        for i in range(cfg.steps):
            state, metrics = step(state, synthetic_batch(cfg.seed, i, cfg.batch_size, cfg.seq_len, spec.V))
            losses.append(float(metrics["loss"]))
        return losses, train.get_train_state(model, state), dict(state.working)


@pytest.mark.parametrize("name,spec_changes,cfg_changes", quick_first(CASES, 1, multi=True),
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in {**s, **c}.items()) or 'default'}"
                              for n, s, c in CASES])
@pytest.mark.parametrize("twin_name,twin,train", TWINS, ids=[t[0] for t in TWINS])
def test_working_weights_give_the_update_of_casting_bit_for_bit(twin_name, twin, train, name, spec_changes,
                                                                 cfg_changes, monkeypatch):
    spec, cfg = bf16(name, spec_changes), CFG.replace(**cfg_changes)
    losses, state, working = run(twin, train, spec, cfg, True, monkeypatch)
    want_losses, want_state, none = run(twin, train, spec, cfg, False, monkeypatch)
    assert not none
    expected = {t for t in train.working_names(twin.from_weights(parity_weights(spec), spec), cfg)}
    assert set(working) == expected
    if not (twin_name == "torch" and cfg.remat != "none"):  # torch keeps none under remat (working_names says why)
        assert expected, "the case must exercise working weights"
    assert losses == want_losses
    for key in ("weights", "m", "v"):
        for k, want in want_state[key].items():
            assert np.array_equal(state[key][k], want), f"{key} {k}"


@pytest.mark.parametrize("twin_name,twin,train", TWINS, ids=[t[0] for t in TWINS])
def test_working_weights_follow_the_state_and_exist_only_under_mixed_precision(twin_name, twin, train):
    """After set_train_state (a resume, either twin's checkpoint) each copy is its new master cast; a float32 spec
    and bf16 parameters keep none."""
    spec = bf16("tiny", {})
    model = twin.from_weights(parity_weights(spec), spec)
    state = train.init_train_state(model, CFG)
    canonical = train.get_train_state(model, state)
    canonical["weights"] = {k: v * 1.5 for k, v in canonical["weights"].items()}
    state = train.set_train_state(model, state, canonical)
    assert len(state.working) == sum(t.kind == "linear" for t in model_layout(spec))  # every Linear, the head too
    if twin_name == "jax":
        masters = {k: np.asarray(v) for k, v in twin.weights.flat_arrays(state.params).items()}
        copies = {k: np.asarray(v.astype(jnp.float32)) for k, v in state.working.items()}
    else:
        masters = {k: p.detach().numpy() for k, p in model.named_parameters()}
        copies = {k: v.float().numpy() for k, v in state.working.items()}
    for name, copy in copies.items():
        want = np.asarray(jnp.asarray(masters[name]).astype(jnp.bfloat16).astype(jnp.float32))
        assert np.array_equal(copy, want), name
        assert not np.array_equal(copy, np.asarray(jnp.asarray(masters[name] / 1.5).astype(jnp.bfloat16)
                                                   .astype(jnp.float32))), f"{name}: the copy of the old weights"
    for other in (spec.replace(compute_dtype="float32"), spec.replace(param_dtype="bfloat16")):
        assert not train.init_train_state(twin.from_weights(parity_weights(other), other), CFG).working


def test_the_forward_casts_no_master_weight_jax():
    """The JAX step casts each Linear weight once, after the update, into its new working copy: the forward and the
    backward cast none (the tied embedding, read by the head, is cast at its use, and counted by no shape here)."""
    import jax_model
    from jax_model import train

    spec = bf16("tiny", {})
    model = jax_model.from_weights(parity_weights(spec), spec)
    shapes = {t.jax_shape for t in model_layout(spec) if t.kind == "linear"}

    def casts(state):
        jaxpr = jax.make_jaxpr(train.make_train_step(model, CFG, compile=False))(state, np.zeros((4, 33), np.int32))
        return sum(1 for e in iter_eqns(jaxpr.jaxpr) if e.primitive.name == "convert_element_type"
                   and e.invars[0].aval.dtype == jnp.float32 and e.params["new_dtype"] == jnp.bfloat16
                   and e.invars[0].aval.shape in shapes)

    state = train.init_train_state(model, CFG)
    assert casts(state) == len(state.working), "the step casts each master once, into its new copy, and no more"
    assert casts(state._replace(working={})) > 0, "without working weights, the forward casts"


def iter_eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            yield from iter_eqns(sub)


class Casts(TorchDispatchMode):
    """Counts the float32 → bf16 casts of tensors shaped like `shapes` (torch's dispatch of `.to`)."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.count = shapes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32
                and kwargs.get("dtype") == torch.bfloat16 and tuple(args[0].shape) in self.shapes):
            self.count += 1
        return func(*args, **kwargs)


def test_the_forward_casts_no_master_weight_torch():
    """In the eager torch step no Linear weight is cast (the copies' refresh after the update is one multi-tensor
    copy, not a cast); without working weights, every use casts, in each micro-batch's forward."""
    import torch_model
    from torch_model import train

    spec = bf16("tiny", {})
    shapes = {t.shape for t in model_layout(spec) if t.kind == "linear"}
    model = torch_model.from_weights(parity_weights(spec), spec)
    cfg = CFG.replace(grad_accum_steps=2)
    state, step = train.init_train_state(model, cfg), train.make_train_step(model, cfg)
    tokens = synthetic_batch(0, 0, 4, 32, spec.V)
    for working in (state.working, {}):
        with Casts(shapes) as casts:
            step(train.TrainState(state.model, state.optimizer, state.scheduler, working), tokens)
        if working:
            assert casts.count == 0, casts.count
        else:
            assert casts.count > 0 and casts.count % 2 == 0, casts.count  # the same casts in each micro-batch



@pytest.mark.slow
def test_compiled_blocks_read_the_working_weights_as_eager_does(monkeypatch):
    """What the GPU bench runs: blocks torch.compile'd one by one (aot_eager here: dynamo and AOT autograd trace as
    inductor's path does) read the copies functional_call swaps in; one graph serves every block and step (the
    copies are graph inputs, refreshed in place), and the update is eager's, bit for bit."""
    import torch_model
    from torch_model import train

    spec = bf16("tiny", {})
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    losses, state, working = run(torch_model, train, spec, CFG, True, monkeypatch, compile_backend="aot_eager")
    assert working and torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    want_losses, want_state, _ = run(torch_model, train, spec, CFG, True, monkeypatch)
    assert losses == want_losses
    for key in ("weights", "m", "v"):
        for k, want in want_state[key].items():
            assert np.array_equal(state[key][k], want), f"{key} {k}"


MESH_RUN = """
import json, re, numpy as np
from unittest import mock
import jax.numpy as jnp
from jax_model import distributed, layers, train
import jax_model
from jax_model.weights import flat_arrays
from parity_tests.support.common import parity_weights
from shared_config import TrainConfig, load_spec, synthetic_batch

spec = load_spec("tiny").replace(compute_dtype="bfloat16")
cfg = TrainConfig(lr=1e-3, warmup_steps=1, steps=3, batch_size=4, seq_len=32)
losses = {}
for where in ("mesh", "one device"):
    model = jax_model.from_weights(parity_weights(spec), spec)
    if where == "mesh":
        mesh = distributed.make_mesh("data=2,fsdp=2")
        state, step = distributed.parallelize(model, cfg, mesh)
        masters = flat_arrays(state.params)
        specs = {k: [str(masters[k].sharding.spec), str(c.sharding.spec)] for k, c in state.working.items()}
        tokens = distributed.shard_batch(synthetic_batch(cfg.seed, 0, cfg.batch_size, cfg.seq_len, spec.V), mesh)
        hlo = step.jitted.lower(state, tokens, None).compile().as_text()
        # and as a GPU runs its matmuls: layers.linear flattens the tokens on CPU only
        with mock.patch.object(layers, "linear", lambda x, w, dtype: jnp.dot(x.astype(dtype), w.astype(dtype))):
            gpu_state, gpu_step = distributed.parallelize(jax_model.from_weights(parity_weights(spec), spec), cfg, mesh)
            hlo += gpu_step.jitted.lower(gpu_state, tokens, None).compile().as_text()
        # and with the LM head and the loss fused over chunks (loss.rows_summed: each device its own rows' chunks)
        chunked_state, chunked_step = distributed.parallelize(jax_model.from_weights(parity_weights(spec), spec),
                                                              cfg.replace(loss_chunk=64), mesh)
        hlo += chunked_step.jitted.lower(chunked_state, tokens, None).compile().as_text()
        reduced = [re.findall(r"\\[([0-9,]*)\\]", m) for m in re.findall(r"= (.+?) all-reduce(?:-start)?\\(", hlo)]
    else:
        state, step = train.init_train_state(model, cfg), train.make_train_step(model, cfg)
    losses[where] = []
    for i in range(cfg.steps):
        state, m = step(state, synthetic_batch(cfg.seed, i, cfg.batch_size, cfg.seq_len, spec.V))
        losses[where].append(float(m["loss"]))
all_reduced = [[int(d) for d in dims.split(",") if d] for shapes in reduced for dims in shapes]
print(json.dumps({"losses": losses, "specs": specs, "all_reduced": all_reduced}))
"""


@pytest.fixture(scope="module")
def mesh_run():
    """The bf16 tiny step on a data=2 × fsdp=2 mesh of 4 host devices and on one device: the losses of 3 steps each,
    the PartitionSpecs of each master and its working copy, and the shapes every all-reduce of the mesh step moves
    (with the CPU's matmuls over flattened tokens, with a GPU's over [B, T, D], and with loss_chunk), and XLA's
    warnings that it replicated an array on every device to reshard it."""
    r = run_python("-c", MESH_RUN, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    replicated = [line for line in r.stderr.splitlines() if "Involuntary full rematerialization" in line]
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "replicated": replicated}


@pytest.mark.slow
def test_a_jax_mesh_shards_each_copy_as_its_master_and_trains_as_one_device(mesh_run):
    """On a data × fsdp mesh the copies are sharded as their masters (XLA gathers bf16 copies), and the bf16 step's
    losses are the one-device step's within bf16's loss tolerance: each device multiplies its own rows, which XLA:CPU
    blocks (and so sums) in another order, and a bf16 rounding of the products is 2⁻⁸ (measured: 1.3e-4 relative;
    stale copies would be 0.1 off by step 2). float32 meshes equal one device at 1e-5 (test_sharding.py)."""
    assert mesh_run["specs"] and all(master == copy for master, copy in mesh_run["specs"].values()), mesh_run["specs"]
    assert any("fsdp" in master for master, _ in mesh_run["specs"].values())
    mesh, one = (np.array(mesh_run["losses"][k]) for k in ("mesh", "one device"))
    assert np.abs(mesh - one).max() <= BF16_LOSS_TOL, (mesh, one)


@pytest.mark.slow
def test_a_jax_mesh_step_all_reduces_gradients_and_metrics_never_activations(mesh_run):
    """FSDP as it should be (jax_model.layers.split_rows pins the hidden states by rows): each matmul reads its
    gathered weight, and the step all-reduces gradients and scalars only. Unpinned, XLA split the LM head's and the
    MLP's contractions over fsdp and all-reduced partial logits [64, 257] and activations [64, 544]: more bytes, and
    on jax 0.11 a bf16 loss 2e-4 off one device's. So did a chunked loss scanning the whole batch's chunks on every
    device (loss.rows_summed). An activation has a dim of the tokens of 1, 2 or 4 rows."""
    T, rows = CFG.seq_len, CFG.batch_size
    token_dims = {T * r for r in (1, 2, rows)}
    weight_dims = {d // k for t in model_layout(load_spec("tiny")) for d in t.shape for k in (1, 2) if d % k == 0}
    assert not token_dims & weight_dims  # the test can tell an activation from a gradient
    assert mesh_run["all_reduced"] and any(len(s) == 2 for s in mesh_run["all_reduced"])  # gradients are there
    activations = [s for s in mesh_run["all_reduced"] if token_dims & set(s)]
    assert not activations, activations


@pytest.mark.slow
def test_a_jax_mesh_step_never_replicates_an_array_to_reshard_it(mesh_run):
    """Every array moves between its shardings by collectives XLA can plan. The embedding table, split over fsdp by
    D, sent its gradient's cotangent [B, T, D] from rows over data × fsdp to D over fsdp: XLA replicated it on every
    device ("Involuntary full rematerialization"). jax_model.layers.gathered reads the table whole instead."""
    assert not mesh_run["replicated"], mesh_run["replicated"][:2]
