"""Gated Linear Attention as a Pallas kernel (forward and backward, `jax.custom_vjp`): the GPU path of the JAX twin.
torch_model/gla_kernel.py is its counterpart: flash-linear-attention's Triton `chunk_gla` behind the same interface.

The same outputs [B, H, T, V] and last state [B, H, K, V] as `gla.chunked_gla` (the pure form, which stays the
reference and the CPU path), computed one (batch, head) per program, 16 tokens per step of a sequential loop that
carries the state [K, V] in registers, as flash-linear-attention's `chunk_gla` computes a sub-chunk:
  - within the 16 tokens, A[i, j] = Σ_k q_ik k_jk exp(Σ_{j<s≤i} log α_sk) for j ≤ i, every exponent a sum of
    log-gates taken directly (a 0/1 matmul), never the difference of two cumulative sums, and ≤ 0;
  - from earlier tokens, (q_i · exp(Σ_{s≤i} log α_s)) S, S the state at the 16 tokens' start;
  - the state, exp(Σ log α) · S + (k_j · exp(Σ_{s>j} log α_s))ᵀ v_j.
The backward runs the same loop forward for dq (with the state) and backward for dk, dv (with the state's
gradient), and takes the gates' gradient outside the kernel from the identity every exponent obeys
(flash-linear-attention's `chunk_gla` backward): with B the cumulative log-gates, ∂L/∂B_t = q_t·dq_t − k_t·dk_t
(plus dS_T·S_T at the last token), and d log α_t = Σ_{s≥t} ∂L/∂B_s.

Triton needs power-of-two blocks: T is padded to a power of two (at least 16) with zero keys and gates, K and V to
powers of two with zeros; none of it changes the outputs or the state. `interpret=True` runs the kernel on any
backend through Pallas' interpreter (the tests, on CPU). Notation as gla.py; C = 16 tokens per loop step.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

GATE_FLOOR = -1e30  # log α below it acts as it: exp of any sum holding it is 0 in float32 either way (no 0·−inf)
C = 16  # tokens per step of the kernel's loop (flash-linear-attention's sub-chunk)
HIGHEST = jax.lax.Precision.HIGHEST


def _dot(a, b):
    return jnp.dot(a, b, precision=HIGHEST, preferred_element_type=jnp.float32)  # full float32, never TF32


def _triangles():
    """rows, cols [C, C] int32; L [C, C] 1 where s ≤ i; U [C, C] 1 where s > j: the cumulative sums as matmuls."""
    rows, cols = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0), jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
    return rows, cols, (cols <= rows).astype(jnp.float32), (cols > rows).astype(jnp.float32)


def _exponents(g_CK, j: int, L_CC):
    """E_j [C, K]: row i holds Σ_{j<s≤i} log α_s (0 for i ≤ j), a direct sum of gates."""
    after_j = jax.lax.broadcasted_iota(jnp.int32, g_CK.shape, 0) > j
    return _dot(L_CC, jnp.where(after_j, g_CK, 0.0))


def _chunk(refs, n):
    """Token slice of loop step n and the 16 tokens' q, k, v, g [C, ·]."""
    t = pl.ds(pl.multiple_of(n * C, C), C)
    return t, tuple(ref[t, :] for ref in refs)


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, s0_ref, o_ref, sT_ref):
    rows, cols, L_CC, U_CC = _triangles()

    def step(n, S_KV):
        t, (q_CK, k_CK, v_CV, g_CK) = _chunk((q_ref, k_ref, v_ref, g_ref), n)
        A_CC = jnp.zeros((C, C), jnp.float32)
        for j in range(C):  # column j of the within-chunk scores
            k_1K = k_ref[pl.ds(n * C + j, 1), :]
            a_C1 = jnp.sum(q_CK * k_1K * jnp.exp(_exponents(g_CK, j, L_CC)), axis=1, keepdims=True)
            A_CC = A_CC + jnp.where((cols == j) & (rows >= j), a_C1, 0.0)
        o_ref[t, :] = _dot(A_CC, v_CV) + _dot(q_CK * jnp.exp(_dot(L_CC, g_CK)), S_KV)
        decay_K1 = jnp.exp(jnp.sum(g_CK, axis=0))[:, None]
        return decay_K1 * S_KV + _dot((k_CK * jnp.exp(_dot(U_CC, g_CK))).T, v_CV)

    sT_ref[...] = jax.lax.fori_loop(0, q_ref.shape[0] // C, step, s0_ref[...])


def _backward_kernel(q_ref, k_ref, v_ref, g_ref, s0_ref, do_ref, dsT_ref, dq_ref, dk_ref, dv_ref, ds0_ref):
    rows, cols, L_CC, U_CC = _triangles()
    N = q_ref.shape[0] // C

    def dq_step(n, S_KV):  # forward order, carrying the state
        t, (q_CK, k_CK, v_CV, g_CK) = _chunk((q_ref, k_ref, v_ref, g_ref), n)
        dA_CC = jnp.where(rows >= cols, _dot(do_ref[t, :], v_CV.T), 0.0)
        dq_CK = _dot(do_ref[t, :], S_KV.T) * jnp.exp(_dot(L_CC, g_CK))
        for j in range(C):
            k_1K = k_ref[pl.ds(n * C + j, 1), :]
            dA_C1 = jnp.sum(jnp.where(cols == j, dA_CC, 0.0), axis=1, keepdims=True)
            dq_CK = dq_CK + dA_C1 * k_1K * jnp.exp(_exponents(g_CK, j, L_CC))
        dq_ref[t, :] = dq_CK
        return jnp.exp(jnp.sum(g_CK, axis=0))[:, None] * S_KV + _dot((k_CK * jnp.exp(_dot(U_CC, g_CK))).T, v_CV)

    def dkv_step(m, dS_KV):  # backward order, carrying the state's gradient
        n = N - 1 - m
        t, (q_CK, k_CK, v_CV, g_CK) = _chunk((q_ref, k_ref, v_ref, g_ref), n)
        do_CV = do_ref[t, :]
        dA_CC = jnp.where(rows >= cols, _dot(do_CV, v_CV.T), 0.0)
        A_CC, dk_CK = jnp.zeros((C, C), jnp.float32), jnp.zeros(k_CK.shape, jnp.float32)
        for j in range(C):
            k_1K, E_CK = k_ref[pl.ds(n * C + j, 1), :], jnp.exp(_exponents(g_CK, j, L_CC))
            a_C1 = jnp.sum(q_CK * k_1K * E_CK, axis=1, keepdims=True)
            A_CC = A_CC + jnp.where((cols == j) & (rows >= j), a_C1, 0.0)
            dA_C1 = jnp.sum(jnp.where(cols == j, dA_CC, 0.0), axis=1, keepdims=True)
            dk_1K = jnp.sum(dA_C1 * q_CK * E_CK, axis=0, keepdims=True)
            dk_CK = dk_CK + jnp.where(jax.lax.broadcasted_iota(jnp.int32, k_CK.shape, 0) == j, dk_1K, 0.0)
        to_end_CK = jnp.exp(_dot(U_CC, g_CK))
        dk_ref[t, :] = dk_CK + to_end_CK * _dot(v_CV, dS_KV.T)
        dv_ref[t, :] = _dot(A_CC.T, do_CV) + _dot(k_CK * to_end_CK, dS_KV)
        q_from_start_CK = q_CK * jnp.exp(_dot(L_CC, g_CK))
        return jnp.exp(jnp.sum(g_CK, axis=0))[:, None] * dS_KV + _dot(q_from_start_CK.T, do_CV)

    jax.lax.fori_loop(0, N, dq_step, s0_ref[...])
    ds0_ref[...] = jax.lax.fori_loop(0, N, dkv_step, dsT_ref[...])


def _call(kernel, outputs, *inputs, interpret: bool):
    """One program per row of the leading (batch·head) axis; every array's block is that row, whole."""
    block = lambda a: pl.BlockSpec((None, *a.shape[1:]), lambda i: (i,) + (0,) * (a.ndim - 1))  # noqa: E731
    return pl.pallas_call(kernel, grid=(inputs[0].shape[0],), in_specs=[block(a) for a in inputs],
                          out_specs=[block(o) for o in outputs], out_shape=outputs, interpret=interpret,
                          compiler_params=plt.CompilerParams())(*inputs)


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gla(q, k, v, g, s0, interpret):
    return _gla_forward(q, k, v, g, s0, interpret)[0]


def _gla_forward(q, k, v, g, s0, interpret):
    o, sT = _call(_forward_kernel,
                  [jax.ShapeDtypeStruct(v.shape, jnp.float32), jax.ShapeDtypeStruct(s0.shape, jnp.float32)],
                  q, k, v, g, s0, interpret=interpret)
    return (o, sT), (q, k, v, g, s0, sT)


def _gla_backward(interpret, saved, cotangents):
    q, k, v, g, s0, sT = saved
    do, dsT = cotangents
    shapes = [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v, s0)]
    dq, dk, dv, ds0 = _call(_backward_kernel, shapes, q, k, v, g, s0, do, dsT, interpret=interpret)
    dB = q * dq - k * dk
    dB = dB.at[:, -1].add(jnp.sum(dsT * sT, axis=-1))  # the last state's own exp(B_T) factors
    dg = jnp.flip(jnp.cumsum(jnp.flip(dB, 1), axis=1), 1)  # d log α_t = Σ_{s≥t} ∂L/∂B_s
    return dq, dk, dv, dg, ds0


_gla.defvjp(_gla_forward, _gla_backward)


def _pow2(n: int) -> int:
    return max(C, 1 << (n - 1).bit_length())


def pallas_gla(q_BHTK, k_BHTK, v_BHTV, g_BHTK, S_BHKV, *, interpret: bool | None = None):
    """outputs [B, H, T, V] and last state [B, H, K, V], float32, as `gla.chunked_gla` (any chunk size: the result
    does not depend on it), differentiable in every input; log-gates below GATE_FLOOR act as it. `interpret`
    (default: when JAX's default backend is not a GPU) runs Pallas' interpreter instead of Triton."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    B, H, T, K = q_BHTK.shape
    V = v_BHTV.shape[-1]
    Tp, Kp, Vp = _pow2(T), _pow2(K), _pow2(V)
    g_BHTK = jnp.maximum(g_BHTK, GATE_FLOOR)
    rows = lambda x, E: jnp.pad(x.astype(jnp.float32),  # noqa: E731
                                ((0, 0),) * 2 + ((0, Tp - T), (0, E - x.shape[-1]))).reshape(B * H, Tp, E)
    q, k, g = (rows(x, Kp) for x in (q_BHTK, k_BHTK, g_BHTK))
    s0 = jnp.pad(S_BHKV.astype(jnp.float32), ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V))).reshape(B * H, Kp, Vp)
    o, sT = _gla(q, k, rows(v_BHTV, Vp), g, s0, interpret)
    return o.reshape(B, H, Tp, Vp)[:, :, :T, :V], sT.reshape(B, H, Kp, Vp)[:, :, :K, :V]

