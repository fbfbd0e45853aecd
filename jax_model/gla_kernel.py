"""Gated Linear Attention as Pallas kernels (forward and backward, `jax.custom_vjp`): the GPU path of the JAX twin.
torch_model/gla_kernel.py is its counterpart: flash-linear-attention's Triton `chunk_gla` behind the same interface.

The same outputs [B, H, T, V] and last state [B, H, K, V] as `gla.chunked_gla` (the pure form, which stays the
reference and the CPU path), in flash-linear-attention's `chunk_gla` plan: only the state crosses chunks, so one
sequential pass carries it and everything else runs one program per chunk.
  - states: grid (B·H, V blocks), chunk by chunk: h_n [K, BV], the state at chunk n's start, and the last state;
    S ← exp(Σ_chunk log α) · S + (k_j · exp(Σ_{s>j} log α_s))ᵀ v_j.
  - outputs: grid (B·H, chunks of C = 64 tokens), each chunk as 4 sub-chunks of c = 16: between sub-chunks,
    (q_i · exp(Σ_{I₀≤s≤i} log α_s)) · (k_j · exp(Σ_{j<s<I₀} log α_s))ᵀ, I₀ the start of i's sub-chunk; within one,
    Σ_k q_ik k_jk exp(Σ_{j<s≤i} log α_sk) column by column; from earlier chunks, (q_i · exp(Σ_{s≤i} log α_s)) h_n.
  Every exponent is a sum of log-gates taken directly (0/1 matmuls and sums of sub-chunk totals), never the
  difference of two cumulative sums, and ≤ 0: exact for any gate down to −inf
  (github.com/fla-org/flash-linear-attention/issues/20).
The backward runs the states pass again, a second pass backward for the state's gradient after each chunk
(dh_n = ∂L/∂S_{n+1}; the initial state's gradient at the end), and one program per chunk for dq, dk, dv. The gates'
gradient comes outside the kernels from the identity every exponent obeys (flash-linear-attention's `chunk_gla`
backward): with B the cumulative log-gates, ∂L/∂B_t = q_t·dq_t − k_t·dk_t (plus dS_T·S_T at the last token), and
d log α_t = Σ_{s≥t} ∂L/∂B_s.

Triton loads power-of-two blocks: T is padded to whole chunks with zero keys and gates, K and V to powers of two
(at least 16) with zeros; none of it changes the outputs or the state. V is taken BV = 64 columns at a time (the
state [K, BV] stays in registers). Every dot is full float32 (never TF32). `interpret=True` runs the kernels on any
backend through Pallas' interpreter (the tests, on CPU); `pallas_call` is told Triton (JAX's default GPU lowering,
Mosaic GPU, is another kernel language). Notation as gla.py.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

GATE_FLOOR = -1e30  # log α below it acts as it: exp of any sum holding it is 0 in float32 either way (no 0·−inf)
C = 64  # tokens per chunk: one program of the output and gradient kernels (flash-linear-attention's BT)
c = 16  # tokens per sub-chunk (flash-linear-attention's BC)
BV = 64  # value columns per block of the state [K, BV]
HIGHEST = jax.lax.Precision.HIGHEST


def _dot(a, b):
    return jnp.dot(a, b, precision=HIGHEST, preferred_element_type=jnp.float32)  # full float32, never TF32


def _triangles(n: int):
    """L [n, n] 1 where s ≤ i; U [n, n] 1 where s > j: sums of gates up to / after each token as matmuls."""
    rows, cols = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0), jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return (cols <= rows).astype(jnp.float32), (cols > rows).astype(jnp.float32)


def _blocks(V: int) -> list[slice]:
    return [slice(b, b + min(V, BV)) for b in range(0, V, BV)]


# ---- the sequential passes: grid (B·H, V blocks), chunk by chunk ----

def _states_kernel(k_ref, g_ref, v_ref, s0_ref, h_ref, sT_ref):
    """h [N, K, BV]: the state at each chunk's start; sT [K, BV] the last state."""
    _, U = _triangles(C)

    def step(n, S_KV):
        t = pl.ds(pl.multiple_of(n * C, C), C)
        k_CK, v_CV, g_CK = k_ref[t, :], v_ref[t, :], g_ref[t, :]
        h_ref[n] = S_KV
        return jnp.exp(jnp.sum(g_CK, axis=0))[:, None] * S_KV + _dot((k_CK * jnp.exp(_dot(U, g_CK))).T, v_CV)

    sT_ref[...] = jax.lax.fori_loop(0, k_ref.shape[0] // C, step, s0_ref[...])


def _state_grads_kernel(q_ref, g_ref, do_ref, dsT_ref, dh_ref, ds0_ref):
    """dh [N, K, BV]: the gradient of the state after each chunk; ds0 [K, BV] that of the initial state."""
    L, _ = _triangles(C)
    N = q_ref.shape[0] // C

    def step(m, dS_KV):
        n = N - 1 - m
        t = pl.ds(pl.multiple_of(n * C, C), C)
        q_CK, g_CK, do_CV = q_ref[t, :], g_ref[t, :], do_ref[t, :]
        dh_ref[n] = dS_KV
        return jnp.exp(jnp.sum(g_CK, axis=0))[:, None] * dS_KV + _dot((q_CK * jnp.exp(_dot(L, g_CK))).T, do_CV)

    ds0_ref[...] = jax.lax.fori_loop(0, N, step, dsT_ref[...])


# ---- one chunk per program: grid (B·H, chunks) ----

class _Chunk:
    """A chunk's sub-chunks (static slices of its refs) and the sums of log-gates every exponent is made of."""

    def __init__(self, q_ref, k_ref, g_ref):
        self.q_ref, self.k_ref = q_ref, k_ref
        self.L, self.U = _triangles(c)
        self.rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
        self.cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
        self.g = [g_ref[self.at(m), :] for m in range(C // c)]
        self.total = [jnp.sum(g_cK, axis=0, keepdims=True) for g_cK in self.g]  # [1, K]: a whole sub-chunk

    @staticmethod
    def at(m: int) -> slice:
        return slice(m * c, (m + 1) * c)

    def _span(self, first: int, last: int):
        """Σ of the totals of sub-chunks first..last-1 [1, K] (0 when none)."""
        return sum(self.total[first:last], jnp.zeros_like(self.total[0]))

    def from_start(self, m: int):
        """[c, K] row i: Σ_{m₀≤s≤i} log α_s, within sub-chunk m."""
        return _dot(self.L, self.g[m])

    def from_chunk_start(self, m: int):
        """[c, K] row i: Σ_{C₀≤s≤i} log α_s, from the chunk's start."""
        return self.from_start(m) + self._span(0, m)

    def until(self, p: int, m: int):
        """[c, K] row j of sub-chunk p: Σ_{j<s<m₀} log α_s, up to sub-chunk m's start (p < m; m = C/c: the end)."""
        return _dot(self.U, self.g[p]) + self._span(p + 1, m)

    def Q(self, m: int):
        return self.q_ref[self.at(m), :] * jnp.exp(self.from_start(m))

    def K(self, p: int, m: int):
        return self.k_ref[self.at(p), :] * jnp.exp(self.until(p, m))

    def diagonal(self, m: int, dA_cc=None):
        """Sub-chunk m with itself, column by column (a loop, not unrolled: one column's code, compiled once):
        A [c, c] (j ≤ i) and, given dA, its parts of dq and dk."""
        q_cK = self.q_ref[self.at(m), :]
        token = jax.lax.broadcasted_iota(jnp.int32, q_cK.shape, 0)

        def column(j, carry):
            A_cc, dq_cK, dk_cK = carry
            k_1K = self.k_ref[pl.ds(m * c + j, 1), :]
            E_cK = jnp.exp(_dot(self.L, jnp.where(token > j, self.g[m], 0.0)))  # row i: Σ_{j<s≤i} (0 for i ≤ j)
            a_c1 = jnp.sum(q_cK * k_1K * E_cK, axis=1, keepdims=True)
            in_column = (self.cols == j) & (self.rows >= j)
            A_cc = A_cc + jnp.where(in_column, a_c1, 0.0)
            if dA_cc is not None:
                dA_c1 = jnp.sum(jnp.where(in_column, dA_cc, 0.0), axis=1, keepdims=True)
                dq_cK = dq_cK + dA_c1 * k_1K * E_cK
                dk_cK = dk_cK + jnp.where(token == j, jnp.sum(dA_c1 * q_cK * E_cK, axis=0, keepdims=True), 0.0)
            return A_cc, dq_cK, dk_cK

        zeros_cK = jnp.zeros(q_cK.shape, jnp.float32)
        return jax.lax.fori_loop(0, c, column, (jnp.zeros((c, c), jnp.float32), zeros_cK, zeros_cK))


def _output_kernel(q_ref, k_ref, g_ref, v_ref, h_ref, o_ref):
    """o [C, V] of one chunk from its tokens and h [K, V], the state at its start."""
    ch = _Chunk(q_ref, k_ref, g_ref)
    for m in range(C // c):
        Q_cK = ch.Q(m)
        A = [(p, _dot(Q_cK, ch.K(p, m).T)) for p in range(m)] + [(m, ch.diagonal(m)[0])]
        q_from_chunk_start_cK = q_ref[ch.at(m), :] * jnp.exp(ch.from_chunk_start(m))
        for b in _blocks(v_ref.shape[1]):
            o_cV = _dot(q_from_chunk_start_cK, h_ref[:, b])
            for p, A_cc in A:
                o_cV = o_cV + _dot(A_cc, v_ref[ch.at(p), b])
            o_ref[ch.at(m), b] = o_cV


def _grads_kernel(q_ref, k_ref, g_ref, v_ref, do_ref, h_ref, dh_ref, dq_ref, dk_ref, dv_ref):
    """dq, dk [C, K] and dv [C, V] of one chunk, from h (the state at its start) and dh (the gradient after it)."""
    ch = _Chunk(q_ref, k_ref, g_ref)
    n, blocks = C // c, _blocks(v_ref.shape[1])
    dA = {(m, p): sum(_dot(do_ref[ch.at(m), b], v_ref[ch.at(p), b].T) for b in blocks)  # do_i·v_j: sums over V
          for m in range(n) for p in range(m + 1)}
    for x in range(n):
        A_xx, dq_cK, dk_cK = ch.diagonal(x, dA[x, x])
        # dq: from earlier sub-chunks, then from earlier chunks
        dQ_cK = sum((_dot(dA[x, p], ch.K(p, x)) for p in range(x)), jnp.zeros_like(dq_cK))
        dqS_cK = sum(_dot(do_ref[ch.at(x), b], h_ref[:, b].T) for b in blocks)
        dq_ref[ch.at(x), :] = (dq_cK + dQ_cK * jnp.exp(ch.from_start(x))
                               + dqS_cK * jnp.exp(ch.from_chunk_start(x)))
        # dk: from later sub-chunks, then through the state after the chunk
        for m in range(x + 1, n):
            dk_cK = dk_cK + _dot(dA[m, x].T, ch.Q(m)) * jnp.exp(ch.until(x, m))
        to_end_cK = jnp.exp(ch.until(x, n))
        dkS_cK = sum(_dot(v_ref[ch.at(x), b], dh_ref[:, b].T) for b in blocks)
        dk_ref[ch.at(x), :] = dk_cK + dkS_cK * to_end_cK
        # dv: the scores of every later token (this sub-chunk's and later ones'), then the state after the chunk
        A = [(x, A_xx)] + [(m, _dot(ch.Q(m), ch.K(x, m).T)) for m in range(x + 1, n)]
        k_to_end_cK = k_ref[ch.at(x), :] * to_end_cK
        for b in blocks:
            dv_cV = _dot(k_to_end_cK, dh_ref[:, b])
            for m, A_cc in A:
                dv_cV = dv_cV + _dot(A_cc.T, do_ref[ch.at(m), b])
            dv_ref[ch.at(x), b] = dv_cV


# ---- the calls ----

def _f32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _call(kernel, grid, inputs, outputs, interpret: bool):
    """pallas_call on Triton; `inputs`, `outputs`: (array or shape, block shape, index map) triples."""
    return pl.pallas_call(kernel, grid=grid, in_specs=[pl.BlockSpec(b, i) for _, b, i in inputs],
                          out_specs=[pl.BlockSpec(b, i) for _, b, i in outputs], out_shape=[o for o, _, _ in outputs],
                          interpret=interpret, compiler_params=plt.CompilerParams())(*(a for a, _, _ in inputs))


def _sequential(kernel, keys, values, state, interpret: bool):
    """A pass over the chunks, one program per (B·H, V block): `keys` [BH, T, K] whole, `values` [BH, T, V] and
    `state` [BH, K, V] by V block. Returns one state per chunk [BH, N, K, V] and the pass's last state."""
    BH, T, K = keys[0].shape
    V = state.shape[-1]
    bv = min(V, BV)
    ins = ([(a, (None, T, K), lambda i, j: (i, 0, 0)) for a in keys]
           + [(a, (None, T, bv), lambda i, j: (i, 0, j)) for a in values]
           + [(state, (None, K, bv), lambda i, j: (i, 0, j))])
    outs = [(_f32(BH, T // C, K, V), (None, T // C, K, bv), lambda i, j: (i, 0, 0, j)),
            (_f32(BH, K, V), (None, K, bv), lambda i, j: (i, 0, j))]
    return _call(kernel, (BH, V // bv), ins, outs, interpret)


def _chunked(kernel, keys, values, states, widths: str, interpret: bool):
    """One program per (B·H, chunk): `keys` [BH, T, K], `values` [BH, T, V], `states` [BH, N, K, V] (one per
    chunk); outputs [BH, T, K or V] as `widths` says ("KKV": dq, dk, dv)."""
    BH, T, K = keys[0].shape
    V, N = values[0].shape[-1], T // C
    chunk = lambda a: (a.reshape(BH, N, C, a.shape[-1]), (None, None, C, a.shape[-1]),  # noqa: E731
                       lambda i, n: (i, n, 0, 0))
    ins = [chunk(a) for a in (*keys, *values)] + [(s, (None, None, K, V), lambda i, n: (i, n, 0, 0)) for s in states]
    width = {"K": K, "V": V}
    outs = [(_f32(BH, N, C, width[w]), (None, None, C, width[w]), lambda i, n: (i, n, 0, 0)) for w in widths]
    return [o.reshape(BH, T, o.shape[-1]) for o in _call(kernel, (BH, N), ins, outs, interpret)]


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gla(q, k, v, g, s0, interpret):
    return _gla_forward(q, k, v, g, s0, interpret)[0]


def _gla_forward(q, k, v, g, s0, interpret):
    h, sT = _sequential(_states_kernel, [k, g], [v], s0, interpret)
    (o,) = _chunked(_output_kernel, [q, k, g], [v], [h], "V", interpret)
    return (o, sT), (q, k, v, g, s0, sT)


def _gla_backward(interpret, saved, cotangents):
    q, k, v, g, s0, sT = saved
    do, dsT = cotangents
    h, _ = _sequential(_states_kernel, [k, g], [v], s0, interpret)  # recomputed: T/C states cost more to keep
    dh, ds0 = _sequential(_state_grads_kernel, [q, g], [do], dsT, interpret)
    dq, dk, dv = _chunked(_grads_kernel, [q, k, g], [v, do], [h, dh], "KKV", interpret)
    dB = q * dq - k * dk
    dB = dB.at[:, -1].add(jnp.sum(dsT * sT, axis=-1))  # the last state's own exp(B_T) factors
    dg = jnp.flip(jnp.cumsum(jnp.flip(dB, 1), axis=1), 1)  # d log α_t = Σ_{s≥t} ∂L/∂B_s
    return dq, dk, dv, dg, ds0


_gla.defvjp(_gla_forward, _gla_backward)


def _pow2(n: int) -> int:
    return max(c, 1 << (n - 1).bit_length())


def pallas_gla(q_BHTK, k_BHTK, v_BHTV, g_BHTK, S_BHKV, *, interpret: bool | None = None):
    """outputs [B, H, T, V] and last state [B, H, K, V], float32, as `gla.chunked_gla` (any chunk size: the result
    does not depend on it), differentiable in every input; log-gates below GATE_FLOOR act as it. `interpret`
    (default: when JAX's default backend is not a GPU) runs Pallas' interpreter instead of Triton."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    B, H, T, K = q_BHTK.shape
    V = v_BHTV.shape[-1]
    Tp, Kp, Vp = C * -(-T // C), _pow2(K), _pow2(V)
    g_BHTK = jnp.maximum(g_BHTK, GATE_FLOOR)
    rows = lambda x, E: jnp.pad(x.astype(jnp.float32),  # noqa: E731
                                ((0, 0),) * 2 + ((0, Tp - T), (0, E - x.shape[-1]))).reshape(B * H, Tp, E)
    q, k, g = (rows(x, Kp) for x in (q_BHTK, k_BHTK, g_BHTK))
    s0 = jnp.pad(S_BHKV.astype(jnp.float32), ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V))).reshape(B * H, Kp, Vp)
    o, sT = _gla(q, k, rows(v_BHTV, Vp), g, s0, interpret)
    return o.reshape(B, H, Tp, Vp)[:, :, :T, :V], sT.reshape(B, H, Kp, Vp)[:, :, :K, :V]
