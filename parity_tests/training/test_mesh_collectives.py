"""What a JAX mesh step moves between devices (docs/training.md, "Scaling out"): FSDP all-gathers weights and sums
gradients back; the activations stay on the device whose rows they are. Read off the compiled train step's HLO (XLA's
collectives and the shapes they move) on 4 host devices, for a dense, a routed (mod, dtf) and a GLA spec."""

import json
import math

import pytest

from shared_config import model_layout

from ..support.common import run_python
from ..support.parallel_common import CFG, ROUTED_CFG, SPEC, variant

MESHES = ("data=2,fsdp=2",)  # both axes: weights split over fsdp, rows over data × fsdp
NAMES = ("", "mod", "dtf", "gla-peri")  # "": the dense base spec

COLLECTIVES = """
import json, re, sys
from flax import nnx
import jax_model
from jax_model import distributed
from shared_config import TrainConfig, load_spec, synthetic_batch

OPS = "all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all"
out = {}
for key, spec, cfg in json.loads(sys.argv[1]):
    spec, cfg = load_spec(spec), TrainConfig(**cfg)
    for mesh_text in sys.argv[2:]:
        mesh = distributed.make_mesh(mesh_text)
        state, step = distributed.parallelize(jax_model.Transformer(spec, rngs=nnx.Rngs(0)), cfg, mesh)
        tokens = distributed.shard_batch(synthetic_batch(0, 0, cfg.batch_size, cfg.seq_len, spec.V), mesh)
        hlo = step.jitted.lower(state, tokens, None).compile().as_text()
        found = []  # [op, the shapes it returns]
        for returned, op in re.findall(r"= (.+?) (" + OPS + r")(?:-start)?\\(", hlo):
            shapes = re.findall(r"\\[([0-9,]*)\\]", returned)
            found.append([op, [[int(d) for d in dims.split(",") if d] for dims in shapes]])
        out[f"{key}/{mesh_text}"] = found
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def collectives():
    """Per spec name and mesh, every collective of the compiled train step: [op, [shapes it returns]]."""
    runs = []
    for name in NAMES:
        spec, cfg, _ = variant(name) if name else (SPEC, CFG, None)
        runs.append([name, spec.to_dict(), cfg.replace(grad_accum_steps=1).to_dict()])
    r = run_python("-c", COLLECTIVES, json.dumps(runs), *MESHES,
                   XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def weight_sizes(spec) -> set[int]:
    """The element counts of the spec's weights, whole or split in 2 or 4 (an fsdp shard), and of the MLP's gate and up
    joined (layers.MLP): what a collective of weights or gradients moves."""
    sizes = {math.prod(t.shape) for t in model_layout(spec)}
    sizes |= {2 * math.prod(t.shape) for t in model_layout(spec) if t.name.endswith("gate_proj.weight")}
    return {s // k for s in sizes for k in (1, 2, 4) if s % k == 0}


def activations(found, spec) -> list:
    """The collectives of `found` that move an array no weight has the size of: an all-to-all's pieces are one
    array's, the operands of any other collective one array each; scalars (the loss, the norm's sums) are left out."""
    weights, moved = weight_sizes(spec), []
    for op, shapes in found:
        sizes = [math.prod(s) for s in shapes if math.prod(s) > 1]
        if op == "all-to-all" and sizes:
            sizes = [sum(sizes)]
        if any(s not in weights for s in sizes):
            moved.append([op, shapes])
    return moved


@pytest.mark.slow
@pytest.mark.parametrize("mesh_text", MESHES)
@pytest.mark.parametrize("name", [n or "dense" for n in NAMES])
def test_a_mesh_train_step_moves_weights_and_gradients_never_activations(collectives, name, mesh_text):
    """Weights whole where a matmul reads them (layers.gathered), the routed block's scatters per row (routing.py):
    a routed block's gathered tokens [B, k, D] were all-gathered and its MLP's hidden [B, k, F] exchanged by F
    (all-to-all) where the tokens took fewer bytes than a weight (mod: B·k = 72 tokens of 48 against a [48, 80]
    weight), and its updates [B, k, D] gathered to every device for the scatter-add back, its gradient all-reduced
    (mod and dtf). An activation of these shapes never has a weight's size (checked)."""
    spec = SPEC if name == "dense" else variant(name)[0]
    found = collectives[f"{'' if name == 'dense' else name}/{mesh_text}"]
    assert any(op == "all-gather" for op, _ in found) and any(op == "all-reduce" for op, _ in found), found
    cfg = CFG if name == "dense" else ROUTED_CFG
    k = math.floor(spec.routing_capacity * cfg.seq_len) if spec.routing != "none" else cfg.seq_len
    rows = {cfg.batch_size // n for n in (1, 2, 4)}
    tokens = {r * t for r in rows for t in (cfg.seq_len, k)}
    assert not {t * d for t in tokens for d in (spec.D, spec.F)} & weight_sizes(spec)  # the test can tell them apart
    assert not activations(found, spec), activations(found, spec)
