"""Gated Linear Attention as Pallas kernels (forward and backward, `jax.custom_vjp`): the GPU path of the JAX twin.
torch_model/gla_kernel.py is its counterpart: flash-linear-attention's Triton `chunk_gla` behind the same interface.

The same outputs [B, H, T, V] and last state [B, H, K, V] as `gla.chunked_gla` (the pure form, which stays the
reference and the CPU path), in flash-linear-attention's `chunk_gla` plan: only the state crosses chunks, so one
sequential pass carries it and everything else runs one program per chunk.
  - states: grid (B·H, K blocks, V blocks), chunk by chunk: h_n [BK, BV], the state at chunk n's start, and the
    last state; S ← exp(Σ_chunk log α) · S + (k_j · exp(Σ_{s>j} log α_s))ᵀ v_j.
  - outputs: grid (B·H, chunks of C = 64 tokens, V blocks), each chunk as 4 sub-chunks of c = 16: between
    sub-chunks, (q_i · exp(Σ_{I₀≤s≤i} log α_s)) · (k_j · exp(Σ_{j<s<I₀} log α_s))ᵀ, I₀ the start of i's sub-chunk;
    within one, Σ_k q_ik k_jk exp(Σ_{j<s≤i} log α_sk) column by column; from earlier chunks,
    (q_i · exp(Σ_{s≤i} log α_s)) h_n.
  Every exponent is a sum of log-gates taken directly (0/1 matmuls and sums of sub-chunk totals), never the
  difference of two cumulative sums, and ≤ 0: exact for any gate down to −inf
  (github.com/fla-org/flash-linear-attention/issues/20).
The backward runs the states pass again, a second pass backward for the state's gradient after each chunk
(dh_n = ∂L/∂S_{n+1}; the initial state's gradient at the end), and one program per chunk for dq, dk, dv. The gates'
gradient comes outside the kernels from the identity every exponent obeys (flash-linear-attention's `chunk_gla`
backward): with B the cumulative log-gates, ∂L/∂B_t = q_t·dq_t − k_t·dk_t (plus dS_T·S_T at the last token), and
d log α_t = Σ_{s≥t} ∂L/∂B_s.

Triton loads power-of-two blocks: T is padded to whole chunks with zero keys and gates, K and V to powers of two
(at least 16) with zeros; none of it changes the outputs or the state. A program takes BK = 64 key rows of the state
in the sequential passes and BV = 64 value columns everywhere (the state block [BK, BV] stays in registers); dq and
dk, sums over the value columns, are added over the blocks outside. On a GPU the dots run on tensor cores in three
TF32 passes (about float32's accuracy; a float32 dot in Triton runs as scalar FMAs, and spills: measured with
Triton 3.6's ptxas for sm_90); `interpret=True` runs the kernels on any backend through Pallas' interpreter with
float32 dots (the tests, on CPU). `pallas_call` is told Triton (JAX's default GPU lowering, Mosaic GPU, is another
kernel language). Notation as gla.py.
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
BK, BV = 64, 64  # a program's block of key rows (the sequential passes) and of value columns (every kernel)


def _dot_float32(a, b):
    """a · b in float32 as XLA computes it (Pallas' interpreter: the tests, on CPU)."""
    return jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _dot_tf32x3(a, b):
    """a · b on tensor cores in three TF32 passes (hi·hi + hi·lo + lo·hi of each operand split in two), about float32's
    accuracy; a float32 dot in Triton would run as scalar FMAs. Used by the Triton kernels (on a GPU)."""
    return jnp.dot(a, b, precision=jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3, preferred_element_type=jnp.float32)


DOTS = {True: _dot_float32, False: _dot_tf32x3}  # by `interpret`
# Triton's warps and pipeline stages per kernel, chosen by what ptxas reports for sm_90 (bench/gla_triton.py, at
# gla-small's geometry): 8 warps halve the per-chunk kernels' spills; 2 stages keep the sequential passes' shared
# memory to 112 KiB (3: 160 KiB) at the same spills
LAUNCH = {"_states_kernel": (4, 2), "_state_grads_kernel": (4, 2), "_output_kernel": (8, 3), "_grads_kernel": (8, 3)}


def _triangles(n: int):
    """L [n, n] 1 where s ≤ i; U [n, n] 1 where s > j: sums of gates up to / after each token as matmuls."""
    rows, cols = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0), jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return (cols <= rows).astype(jnp.float32), (cols > rows).astype(jnp.float32)


# ---- the sequential passes: grid (B·H, K blocks, V blocks), chunk by chunk ----

def _carry(dot, backward: bool, x_ref, g_ref, y_ref, s0_ref, h_ref, sT_ref):
    """Carry a state block [BK, BV] over the chunks, writing it to h [N, BK, BV] before each chunk's update and to
    sT after the last; each chunk n updates S ← exp(Σ_chunk log α) · S + (x · exp(E))ᵀ y, E from the chunk's gates:
    forward, the state (x = k, y = v, E_j = Σ_{s>j} log α_s); backward, chunks last to first, its gradient (x = q,
    y = do, E_i = Σ_{s≤i} log α_s)."""
    L, U = _triangles(C)
    N = x_ref.shape[0] // C

    def step(m, S_KV):
        n = N - 1 - m if backward else m
        t = pl.ds(pl.multiple_of(n * C, C), C)
        x_CK, g_CK, y_CV = x_ref[t, :], g_ref[t, :], y_ref[t, :]
        h_ref[n] = S_KV
        E_CK = dot(L if backward else U, g_CK)
        return jnp.exp(jnp.sum(g_CK, axis=0))[:, None] * S_KV + dot((x_CK * jnp.exp(E_CK)).T, y_CV)

    sT_ref[...] = jax.lax.fori_loop(0, N, step, s0_ref[...])


def _states_kernel(dot, k_ref, g_ref, v_ref, s0_ref, h_ref, sT_ref):
    """h [N, BK, BV]: the state at each chunk's start; sT [BK, BV]: the last state."""
    _carry(dot, False, k_ref, g_ref, v_ref, s0_ref, h_ref, sT_ref)


def _state_grads_kernel(dot, q_ref, g_ref, do_ref, dsT_ref, dh_ref, ds0_ref):
    """dh [N, BK, BV]: the gradient of the state after each chunk; ds0 [BK, BV]: that of the initial state."""
    _carry(dot, True, q_ref, g_ref, do_ref, dsT_ref, dh_ref, ds0_ref)


# ---- one chunk per program: grid (B·H, chunks, V blocks) ----

class _Chunk:
    """A chunk's sub-chunks (static slices of its refs) and the sums of log-gates every exponent is made of."""

    def __init__(self, dot, q_ref, k_ref, g_ref):
        self.dot, self.q_ref, self.k_ref = dot, q_ref, k_ref
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
        return self.dot(self.L, self.g[m])

    def from_chunk_start(self, m: int):
        """[c, K] row i: Σ_{C₀≤s≤i} log α_s, from the chunk's start."""
        return self.from_start(m) + self._span(0, m)

    def until(self, p: int, m: int):
        """[c, K] row j of sub-chunk p: Σ_{j<s<m₀} log α_s, up to sub-chunk m's start (p < m; m = C/c: the end)."""
        return self.dot(self.U, self.g[p]) + self._span(p + 1, m)

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
            E_cK = jnp.exp(self.dot(self.L, jnp.where(token > j, self.g[m], 0.0)))  # row i: Σ_{j<s≤i} (0 for i ≤ j)
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


def _output_kernel(dot, q_ref, k_ref, g_ref, v_ref, h_ref, o_ref):
    """o [C, BV] of one chunk from its tokens and h [K, BV], the state at its start."""
    ch = _Chunk(dot, q_ref, k_ref, g_ref)
    for m in range(C // c):
        Q_cK = ch.Q(m)
        A = [(p, dot(Q_cK, ch.K(p, m).T)) for p in range(m)] + [(m, ch.diagonal(m)[0])]
        q_from_chunk_start_cK = q_ref[ch.at(m), :] * jnp.exp(ch.from_chunk_start(m))
        o_cV = dot(q_from_chunk_start_cK, h_ref[...])
        for p, A_cc in A:
            o_cV = o_cV + dot(A_cc, v_ref[ch.at(p), :])
        o_ref[ch.at(m), :] = o_cV


def _grads_kernel(dot, q_ref, k_ref, g_ref, v_ref, do_ref, h_ref, dh_ref, dq_ref, dk_ref, dv_ref):
    """dq, dk [C, K] (this value block's part) and dv [C, BV] of one chunk, from h (the state at its start) and dh
    (the gradient after it)."""
    ch = _Chunk(dot, q_ref, k_ref, g_ref)
    n = C // c
    dA = {(m, p): dot(do_ref[ch.at(m), :], v_ref[ch.at(p), :].T)  # do_i·v_j over this block's value columns
          for m in range(n) for p in range(m + 1)}
    for x in range(n):
        A_xx, dq_cK, dk_cK = ch.diagonal(x, dA[x, x])
        # dq: from earlier sub-chunks, then from earlier chunks
        dQ_cK = sum((dot(dA[x, p], ch.K(p, x)) for p in range(x)), jnp.zeros_like(dq_cK))
        dqS_cK = dot(do_ref[ch.at(x), :], h_ref[...].T)
        dq_ref[ch.at(x), :] = (dq_cK + dQ_cK * jnp.exp(ch.from_start(x))
                               + dqS_cK * jnp.exp(ch.from_chunk_start(x)))
        # dk: from later sub-chunks, then through the state after the chunk
        for m in range(x + 1, n):
            dk_cK = dk_cK + dot(dA[m, x].T, ch.Q(m)) * jnp.exp(ch.until(x, m))
        to_end_cK = jnp.exp(ch.until(x, n))
        dkS_cK = dot(v_ref[ch.at(x), :], dh_ref[...].T)
        dk_ref[ch.at(x), :] = dk_cK + dkS_cK * to_end_cK
        # dv: the scores of every later token (this sub-chunk's and later ones'), then the state after the chunk
        A = [(x, A_xx)] + [(m, dot(ch.Q(m), ch.K(x, m).T)) for m in range(x + 1, n)]
        k_to_end_cK = k_ref[ch.at(x), :] * to_end_cK
        dv_cV = dot(k_to_end_cK, dh_ref[...])
        for m, A_cc in A:
            dv_cV = dv_cV + dot(A_cc.T, do_ref[ch.at(m), :])
        dv_ref[ch.at(x), :] = dv_cV


# ---- the calls ----

def _f32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _launch(kernel) -> plt.CompilerParams:
    warps, stages = LAUNCH[kernel.__name__]
    return plt.CompilerParams(num_warps=warps, num_stages=stages)


def _call(kernel, grid, inputs, outputs, interpret: bool):
    """pallas_call on Triton; `inputs`, `outputs`: (array or shape, block shape, index map) triples."""
    return pl.pallas_call(partial(kernel, DOTS[interpret]), name=kernel.__name__, grid=grid,
                          in_specs=[pl.BlockSpec(b, i) for _, b, i in inputs],
                          out_specs=[pl.BlockSpec(b, i) for _, b, i in outputs], out_shape=[o for o, _, _ in outputs],
                          interpret=interpret, compiler_params=_launch(kernel))(
                              *(a for a, _, _ in inputs))


def _sequential(kernel, keys, values, state, interpret: bool):
    """A pass over the chunks, one program per (B·H, K block, V block): `keys` [BH, T, K], `values` [BH, T, V],
    `state` [BH, K, V]. Returns one state per chunk [BH, N, K, V] and the pass's last state."""
    BH, T, K = keys[0].shape
    V, N = state.shape[-1], T // C
    bk, bv = min(K, BK), min(V, BV)
    ins = ([(a, (None, T, bk), lambda i, r, s: (i, 0, r)) for a in keys]
           + [(a, (None, T, bv), lambda i, r, s: (i, 0, s)) for a in values]
           + [(state, (None, bk, bv), lambda i, r, s: (i, r, s))])
    outs = [(_f32(BH, N, K, V), (None, N, bk, bv), lambda i, r, s: (i, 0, r, s)),
            (_f32(BH, K, V), (None, bk, bv), lambda i, r, s: (i, r, s))]
    return _call(kernel, (BH, K // bk, V // bv), ins, outs, interpret)


def _chunked(kernel, keys, values, states, widths: str, interpret: bool):
    """One program per (B·H, chunk, V block): `keys` [BH, T, K] whole, `values` [BH, T, V] and `states`
    [BH, N, K, V] (one per chunk) by V block. Outputs [BH, T, K or V] as `widths` says ("KKV": dq, dk, dv); a
    K-wide output is a sum over the V blocks, each block's part kept apart [BH, N, V blocks, C, K] and added here."""
    BH, T, K = keys[0].shape
    V, N = values[0].shape[-1], T // C
    bv = min(V, BV)
    chunk = lambda a: (a.reshape(BH, N, C, K), (None, None, C, K), lambda i, n, s: (i, n, 0, 0))  # noqa: E731
    columns = lambda a: (a.reshape(BH, N, C, V), (None, None, C, bv), lambda i, n, s: (i, n, 0, s))  # noqa: E731
    ins = ([chunk(a) for a in keys] + [columns(a) for a in values]
           + [(h, (None, None, K, bv), lambda i, n, s: (i, n, 0, s)) for h in states])
    outs = [(_f32(BH, N, V // bv, C, K), (None, None, None, C, K), lambda i, n, s: (i, n, s, 0, 0)) if w == "K"
            else (_f32(BH, N, C, V), (None, None, C, bv), lambda i, n, s: (i, n, 0, s)) for w in widths]
    results = _call(kernel, (BH, N, V // bv), ins, outs, interpret)
    return [(o.sum(axis=2) if o.ndim == 5 else o).reshape(BH, T, -1) for o in results]


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
