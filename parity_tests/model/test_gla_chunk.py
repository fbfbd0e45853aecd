"""GLA's two-level chunk form (jax_model/gla.py, torch_model/gla.py `chunked_gla`) against the float64 recurrence
(parity_tests/support/reference.py `gla_recurrence`): outputs, last state and gradients, over the whole range of gates a
model can produce: log α from about −1e-6 to −1e6, exactly 0 (α = 1), reset gates (−1e38, −inf), at and across
sub-chunk and chunk boundaries, for chunk sizes that do and do not divide T."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_model.gla
import torch_model.gla
from shared_config.parity import FORWARD_TOL, GRAD_TOL, max_rel, rel_err

from ..support import reference

B, H, T, K, V = 2, 2, 150, 12, 10
STRONG = [15, 16, 40, 63, 64, 77, 100, 127]  # the last token of a sub-chunk and of a chunk, the first of the next
GATES = {  # log α at the positions in STRONG, or a run of 0 (α = 1)
    "moderate": None,
    "open": 0.0,
    "strong-1e2": -1e2,
    "strong-1e4": -1e4,
    "strong-1e6": -1e6,
    "reset-1e38": -1e38,
    "reset-inf": -np.inf,
}


def gla_inputs(gate, seed=0, shape=(B, H, T, K, V)):
    """q, k, v, log α [B, H, T, ·] and a state [B, H, K, V], float32: gates logsigmoid(4·N(0, 1)) / 16 (α from
    ~0.3 to 1), one tenth of them tiny (log α ~ −1e-6), then `gate` at the STRONG positions (one head, one row
    keep the ordinary gates there) and a run of α = 1 over tokens 110-129 (`shape`: B, H ≥ 2, T ≥ 130)."""
    B, H, T, K, V = shape
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((B, H, T, K)).astype(np.float32) * K**-0.5 for _ in range(2))
    v = rng.standard_normal((B, H, T, V)).astype(np.float32)
    g = -np.logaddexp(0, -4 * rng.standard_normal((B, H, T, K))) / 16
    g = np.where(rng.random(g.shape) < 0.1, -1e-6 * rng.random(g.shape), g).astype(np.float32)
    if gate is not None:
        g[0, :, STRONG] = gate
        g[1, 1, STRONG, ::2] = gate
    g[:, :, 110:130] = 0.0
    S = rng.standard_normal((B, H, K, V)).astype(np.float32)
    return q, k, v, g, S


def float64_recurrence(q, k, v, g, S):
    """reference.gla_recurrence in the twins' [B, H, T, ·] layout."""
    o, S = reference.gla_recurrence(*(x.transpose(0, 2, 1, 3) for x in (q, k, v, g)), S)
    return o.transpose(0, 2, 1, 3), S


def run_jax(fn, xs, *static):
    """`fn(*xs, *static)` compiled as one program, as a model runs it: op by op, JAX compiles a kernel per op and
    shape (3x the time here); `fn` compiled again with inputs of the same shapes reuses the first compilation."""
    jitted = jax.jit(fn, static_argnums=tuple(range(len(xs), len(xs) + len(static))))
    return [np.asarray(y) for y in jitted(*(jnp.asarray(x) for x in xs), *static)]


def run_torch(fn, xs, *static):
    return [y.numpy() for y in fn(*(torch.as_tensor(x) for x in xs), *static)]


TWINS = {"jax": (jax_model.gla, run_jax), "torch": (torch_model.gla, run_torch)}


@pytest.mark.parametrize("gate", GATES, ids=list(GATES))
@pytest.mark.parametrize("twin", TWINS)
def test_chunk_form_equals_the_float64_recurrence(twin, gate):
    """Every chunk size (7: one sub-chunk that does not divide T; 16: one sub-chunk; 64, 128: 4 and 8 sub-chunks,
    128 > T) gives the recurrence's outputs and last state at float32's floor, as the float32 recurrence does."""
    module, run = TWINS[twin]
    xs = gla_inputs(GATES[gate])
    o64, S64 = float64_recurrence(*xs)
    o32, S32 = run(module.recurrent_gla, xs)
    floor = max(rel_err(o32, o64), rel_err(S32, S64))
    assert floor <= FORWARD_TOL
    for chunk in (7, 16, 64, 128):
        o, S = run(module.chunked_gla, xs, chunk)
        assert np.isfinite(o).all() and np.isfinite(S).all()
        assert rel_err(o, o64) <= FORWARD_TOL, f"chunk {chunk}: outputs {rel_err(o, o64):.2e} (floor {floor:.1e})"
        assert rel_err(S, S64) <= FORWARD_TOL, f"chunk {chunk}: last state {rel_err(S, S64):.2e} (floor {floor:.1e})"


@partial(jax.jit, static_argnums=(0, 3))
def jitted_grads(fn, xs, cotangents, static):
    loss = lambda xs: sum(jnp.sum(y * c) for y, c in zip(fn(*xs, *static), cotangents))  # noqa: E731
    return jax.grad(loss)(xs)


def grads_jax(fn, xs, cotangents, *static):
    """The gradient of Σ fn(*xs, *static)·cotangents, compiled as one program (run_jax's reason)."""
    return [np.asarray(g) for g in jitted_grads(fn, [jnp.asarray(x) for x in xs], cotangents, static)]


def grads_torch(fn, xs, cotangents, *static):
    ts = [torch.tensor(x, requires_grad=True) for x in xs]
    sum((y * torch.as_tensor(c)).sum() for y, c in zip(fn(*ts, *static), cotangents)).backward()
    return [t.grad.numpy() for t in ts]


@pytest.mark.parametrize("gate", ["moderate", "strong-1e6", "reset-inf"])
@pytest.mark.parametrize("twin", TWINS)
def test_chunk_form_gradients_match_the_recurrence_and_float64_differences(twin, gate):
    """The gradient of Σ o·c_o + Σ S·c_S with respect to q, k, v, log α and the state: the chunk form's (chunk 64)
    equals the float32 recurrence's and, along a random direction per input, the float64 recurrence's central
    difference (reset gates are not perturbed: −inf ± h is −inf); all finite."""
    xs = gla_inputs(GATES[gate], seed=1)
    rng = np.random.default_rng(2)
    cotangents = [rng.standard_normal((B, H, T, V)).astype(np.float32),
                  rng.standard_normal((B, H, K, V)).astype(np.float32)]
    module = TWINS[twin][0]
    grads = grads_jax if twin == "jax" else grads_torch
    got = grads(module.chunked_gla, xs, cotangents, 64)
    want = grads(module.recurrent_gla, xs, cotangents)
    loss64 = lambda xs: sum(np.sum(y * c) for y, c in zip(float64_recurrence(*xs), cotangents))  # noqa: E731
    h = 1e-5
    for name, x, g, w in zip(("q", "k", "v", "log α", "state"), xs, got, want):
        assert np.isfinite(g).all(), name
        assert max_rel(g, w) <= GRAD_TOL, f"{name}: chunk vs recurrence {max_rel(g, w):.1e}"
        d = np.where(np.isfinite(x) & (np.abs(x) < 1e3), rng.standard_normal(x.shape), 0.0)
        plus, minus = ([y if y is not x else x + s * h * d for y in xs] for s in (1, -1))
        fd = (loss64(plus) - loss64(minus)) / (2 * h)
        scale = np.linalg.norm(g) * np.linalg.norm(d)
        assert abs(np.sum(g * d) - fd) <= 1e-4 * scale, f"{name}: g·d {np.sum(g * d)} vs float64 difference {fd}"


def test_no_chunk_by_chunk_by_key_tensor():
    """The JAX twin's chunk form (chunk 64) holds no [.., C, C, K] tensor: its largest intermediate, forward and
    backward, has at most 16·K elements per (row, head, token), the sub-chunk pairs' exponents (136 per 16 tokens)."""
    xs = [jnp.asarray(x) for x in gla_inputs(None)]
    loss = lambda xs: sum(jnp.sum(y) for y in jax_model.gla.chunked_gla(*xs, 64))  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(loss))(xs)

    # (scan bodies: one chunk)
    largest = max(int(np.prod(v.aval.shape)) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars)
    padded = B * H * 192  # T padded to whole chunks of 64
    assert largest <= padded * 16 * K < padded * 64 * K, largest
