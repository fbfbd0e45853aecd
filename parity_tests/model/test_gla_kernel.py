"""GLA's GPU kernels, proven on CPU: the JAX twin's Pallas kernel (jax_model/gla_kernel.py) in Pallas' interpreter
against the pure chunk form and the float64 recurrence, gradients included, over the same gates as
test_gla_chunk.py; the torch twin's flash-linear-attention dispatch (torch_model/gla_kernel.py) against a stand-in
fla module on a faked CUDA machine (the layout, the scale and the state it hands fla); the `gla_kernel` choice
(auto, pure, pallas, fla) resolved per twin and machine, refusals included. The kernels' speed and fla's distance
to the pure form are measured on a GPU by bench/gpu_check.py (docs/gla.md)."""

import re
import sys
import types

import numpy as np
import pytest
import torch
from flax import nnx

import jax_model
import jax_model.gla
import torch_model
import torch_model.gla
from jax_model.gla_kernel import pallas_gla
from shared_config.hardware import HardwareError, resolve_gla_kernel
from shared_config.parity import FORWARD_TOL, GRAD_TOL, max_rel, rel_err

from ..support.common import parity_weights, quick_first
from .test_gla import gla_spec
from .test_gla_chunk import GATES, float64_recurrence, gla_inputs, grads_jax, run_jax


@pytest.mark.parametrize("gate", quick_first(["moderate", "reset-inf",
                                              *(g for g in GATES if g not in ("moderate", "reset-inf"))], 2))
def test_pallas_kernel_equals_the_float64_recurrence(gate):
    """T = 150 (padded to 256), K = 12 and V = 10 (padded to 16), a random initial state, every gate of
    test_gla_chunk.py from −1e-6 to −inf: outputs and last state at float32's floor, all finite."""
    xs = gla_inputs(GATES[gate])
    o64, S64 = float64_recurrence(*xs)
    o, S = run_jax(lambda *a: pallas_gla(*a, interpret=True), xs)
    assert np.isfinite(o).all() and np.isfinite(S).all()
    assert rel_err(o, o64) <= FORWARD_TOL and rel_err(S, S64) <= FORWARD_TOL, (rel_err(o, o64), rel_err(S, S64))


WIDE = (2, 2, 150, 20, 80)  # K padded to 32, V to 128: two blocks of the state's 64 columns


@pytest.mark.slow  # the quick tier under 5 minutes (5 min 37 s this stop); CI runs the full suite
@pytest.mark.parametrize("gate, shape", quick_first([("strong-1e6", None), ("strong-1e6", WIDE), ("moderate", None),
                                                     ("reset-inf", None)], multi=True))
def test_pallas_kernel_gradients_equal_the_pure_forms(gate, shape):
    """The custom_vjp's gradients (q, k, v, log α from the identity ∂L/∂B = q·dq − k·dk, the initial state)
    against autodiff of the pure chunk form, for cotangents on both outputs and the last state; T = 150 is three
    chunks, the last one partly padding; WIDE heads take the state in two blocks of columns. Its forward too."""
    xs = gla_inputs(GATES[gate], seed=1, **({"shape": shape} if shape else {}))
    if shape:
        o64, S64 = float64_recurrence(*xs)
        o, S = run_jax(lambda *a: pallas_gla(*a, interpret=True), xs)
        assert rel_err(o, o64) <= FORWARD_TOL and rel_err(S, S64) <= FORWARD_TOL, (rel_err(o, o64), rel_err(S, S64))
    rng = np.random.default_rng(2)
    B, H, T, _ = xs[0].shape
    cotangents = [rng.standard_normal((B, H, T, xs[2].shape[-1])).astype(np.float32),
                  rng.standard_normal(xs[4].shape).astype(np.float32)]
    got = grads_jax(lambda *a: pallas_gla(*a, interpret=True), xs, cotangents)
    want = grads_jax(lambda *a: jax_model.gla.chunked_gla(*a, 64), xs, cotangents)
    for name, g, w in zip(("q", "k", "v", "log α", "state"), got, want):
        assert np.isfinite(g).all(), name
        assert max_rel(g, w) <= GRAD_TOL, f"{name}: kernel vs pure {max_rel(g, w):.1e}"


@pytest.mark.parametrize("B, H, T, K, V", [(1, 2, 150, 12, 10), (8, 4, 2048, 96, 192)], ids=["tiny", "gla-small"])
def test_pallas_kernel_lowers_to_triton_for_a_gpu(B, H, T, K, V):
    """The GPU path, lowered here for CUDA (jax.export of the forward and backward, no GPU needed): all four kernels
    reach Pallas' Triton lowering (bench/gla_triton.py catches each one's Triton module there). Pallas lowers to
    Mosaic GPU unless told Triton; these kernels are written for Triton (blocks as pointers, 16-row dots), and Mosaic
    refuses them. Lowering also checks what Triton needs: power-of-two loads and dots at least 16 a side."""
    from bench.gla_triton import kernel_ir

    assert set(kernel_ir(B, H, T, K, V)) == {"_states_kernel", "_output_kernel", "_state_grads_kernel",
                                             "_grads_kernel"}


@pytest.mark.slow  # ~12 s; the kernel's gradients against the pure forms stay in the quick tier
def test_a_gla_model_on_the_pallas_kernel_trains_as_on_the_pure_form():
    """A whole two-layer GLA model: logits and every parameter's gradient with the kernel equal the pure form's."""
    from jax_model import train

    spec = gla_spec(n_layers=2)
    tokens = np.random.default_rng(0).integers(0, spec.V, (2, 41))
    results = []
    for kernel in ("pure", "pallas"):
        model = jax_model.from_weights(parity_weights(spec), spec)
        for _, layer in nnx.iter_modules(model):
            if isinstance(layer, jax_model.gla.GLA):
                layer.kernel = kernel  # on CPU the kernel runs in Pallas' interpreter
        results.append(train.loss_and_grads(model, tokens))
    (loss, grads), (got_loss, got) = results
    assert abs(got_loss - loss) <= 1e-6 * abs(loss)
    assert max(max_rel(got[k], g) for k, g in grads.items()) <= GRAD_TOL


def test_the_pallas_kernel_is_mapped_over_a_mesh_only_when_its_rows_split():
    """jax_model.gla.per_device: a shard_map over the batch axes when the mesh's devices divide the rows; the
    kernel itself without a mesh, on one device, or for rows the devices do not divide (a whole sharded run:
    test_sharding.py)."""
    from jax.sharding import AbstractMesh

    from jax_model.gla import per_device

    kernel = lambda *xs: xs  # noqa: E731
    mesh = AbstractMesh((2, 2), ("data", "fsdp"))
    assert per_device(kernel, None, 8) is kernel and per_device(kernel, AbstractMesh((1,), ("data",)), 8) is kernel
    assert per_device(kernel, mesh, 6) is kernel and per_device(kernel, mesh, 8) is not kernel


RESOLVED = [  # gla_kernel, twin, platform, fla installed -> the kernel that runs
    ("auto", "jax", "cpu", False, "pure"), ("auto", "jax", "gpu", False, "pallas"),
    ("auto", "jax", "tpu", False, "pure"),
    ("auto", "torch", "cpu", True, "pure"), ("auto", "torch", "gpu", True, "fla"),
    ("auto", "torch", "gpu", False, "pure"),
    ("pure", "jax", "gpu", False, "pure"), ("pure", "torch", "gpu", True, "pure"),
    ("pallas", "jax", "gpu", False, "pallas"), ("fla", "torch", "gpu", True, "fla"),
]
REFUSED = [
    ("pallas", "jax", "cpu", False, "it needs a GPU"), ("fla", "torch", "cpu", True, "it needs a GPU"),
    ("fla", "jax", "gpu", True, "the jax twin runs auto, pure or pallas"),
    ("pallas", "torch", "gpu", True, "the torch twin runs auto, pure or fla"),
    ("fla", "torch", "gpu", False, "pip install -e '.[gla]'"), ("triton", "jax", "gpu", False, "must be one of"),
]


@pytest.mark.parametrize("kernel,twin,platform,installed,want", RESOLVED)
def test_the_kernel_choice_resolves_per_twin_and_machine(kernel, twin, platform, installed, want):
    assert resolve_gla_kernel(kernel, twin, platform, installed) == want


@pytest.mark.parametrize("kernel,twin,platform,installed,message", REFUSED)
def test_a_kernel_not_here_is_refused_in_one_line(kernel, twin, platform, installed, message):
    with pytest.raises(HardwareError, match=re.escape(message)) as e:
        resolve_gla_kernel(kernel, twin, platform, installed)
    assert "\n" not in str(e.value)


def test_set_kernel_on_this_cpu_runs_the_pure_form_and_refuses_the_gpu_kernels():
    spec = gla_spec()
    jax_twin, torch_twin = (jax_model.from_weights(parity_weights(spec), spec),
                            torch_model.from_weights(parity_weights(spec), spec))
    assert (jax_model.gla.set_kernel(jax_twin, "auto") == "pure"
            and torch_model.gla.set_kernel(torch_twin, "auto") == "pure")
    with pytest.raises(HardwareError):
        jax_model.gla.set_kernel(jax_twin, "pallas")
    with pytest.raises(HardwareError):
        torch_model.gla.set_kernel(torch_twin, "fla")


def test_the_fla_dispatch_hands_fla_its_layout_on_a_faked_cuda_machine(monkeypatch):
    """On a GPU with flash-linear-attention installed, `auto` runs fla's chunk_gla: a stand-in fla module checks
    what it is handed ([B, T, H, K] tensors, scale 1 for queries already scaled, the initial state, the final state
    asked for, gates floored) and computes it with the pure form; the model's logits equal the pure form's."""
    calls = []

    def chunk_gla(q, k, v, g, scale, initial_state, output_final_state):
        B, T, H, K = q.shape
        assert (k.shape, g.shape, v.shape[:3]) == ((B, T, H, K), (B, T, H, K), (B, T, H))
        assert scale == 1.0 and output_final_state and initial_state.shape == (B, H, K, v.shape[-1])
        assert torch.isfinite(g).all()
        calls.append(T)
        o, S = torch_model.gla.chunked_gla(*(x.transpose(1, 2) for x in (q, k, v, g)), initial_state, 64)
        return o.transpose(1, 2), S

    fla = types.ModuleType("fla")
    fla.ops = types.ModuleType("fla.ops")
    fla.ops.gla = types.ModuleType("fla.ops.gla")
    fla.ops.gla.chunk_gla = chunk_gla
    monkeypatch.setitem(sys.modules, "fla", fla)
    monkeypatch.setitem(sys.modules, "fla.ops", fla.ops)
    monkeypatch.setitem(sys.modules, "fla.ops.gla", fla.ops.gla)
    monkeypatch.setattr(torch_model.gla, "device_platform", lambda: "gpu")
    monkeypatch.setattr(torch_model.gla, "fla_installed", lambda: True)

    spec = gla_spec(n_layers=2)
    tokens = torch.as_tensor(np.random.default_rng(0).integers(0, spec.V, (2, 40)))
    model = torch_model.from_weights(parity_weights(spec), spec)
    with torch.no_grad():
        want = model(tokens)
        assert torch_model.gla.set_kernel(model, "auto") == "fla"
        got = model(tokens)
    assert calls == [40, 40]  # both layers, the whole sequence
    assert rel_err(got.numpy(), want.numpy()) <= FORWARD_TOL


@pytest.mark.parametrize("found, installed", [
    ({}, False), ({"fla-core": "0.6.0"}, True), ({"fla-core": "0.3.2"}, True), ({"fla-core": "0.10.1"}, True),
    ({"flash-linear-attention": "0.2.2"}, False), ({"flash-linear-attention": "0.1"}, False),
    ({"fla-core": "0.3.1.dev0"}, False), (None, True)])
def test_an_older_fla_counts_as_absent(found, installed, monkeypatch):
    """fla before 0.3.2 reads [B, H, T, K] by default: the twin would hand it the wrong axes and get no error.
    `found` maps distributions to versions ({}: no `fla` to import; None: importable with no distribution, as a
    source checkout on the path, taken as it is)."""
    import importlib.metadata
    import importlib.util

    from torch_model import gla_kernel

    def version(dist):
        if found is None or dist not in found:
            raise importlib.metadata.PackageNotFoundError(dist)
        return found[dist]

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if found != {} else None)
    monkeypatch.setattr(importlib.metadata, "version", version)
    assert gla_kernel.fla_installed() is installed

