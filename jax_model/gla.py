"""Gated Linear Attention, the second token mixer of the JAX twin; torch_model/gla.py is the same file in PyTorch.

Yang et al. 2023, "Gated Linear Attention Transformers with Hardware-Efficient Training" (arXiv 2312.06635), as
flash-linear-attention's `GatedLinearAttention` computes it. Per head, with S_0 = 0:
    log α_t = logsigmoid((x_t W_gk0) W_gk1 + b_gk1) / gla_gate_normalizer
    S_t = diag(α_t) S_{t-1} + k_tᵀ v_t,    o_t = (q_t / sqrt(K)) S_t
    y_t = W_o · concat_h(norm(o_t) · swish(x_t W_g))
Notation: B batch, T tokens, D model dim, H heads, K key dim per head (K'), V value dim per head (V'), R gate
rank, N chunks of C tokens. Gates, the state and the recurrence are float32; the projections run in `compute_dtype`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from shared_config import ModelSpec
from shared_config.hardware import resolve_gla_kernel
from shared_config.layout import GLA_CHUNK, GLA_SUB, state_layout
from shared_config.parallel import AXES, splits_rows

from .attention import device_platform
from .gla_kernel import GATE_FLOOR, pallas_gla
from .layers import DTYPES, Linear, RMSNorm, gathered, linear, make_norm, split_rows

HIGHEST = jax.lax.Precision.HIGHEST

CHUNK, SUB = GLA_CHUNK, GLA_SUB  # tokens per chunk (`set_chunk`) and per sub-chunk: shared_config/layout.py's


class GLAState(NamedTuple):
    """One GLA layer's decoding state, in place of an attention layer's keys and values: constant in T."""

    S_BHKV: jax.Array  # float32 [B, H, K, V]: the recurrent state after every token fed so far
    length: jax.Array  # int32 []: tokens fed so far (padding included), the same in every row
    slots_0S: jax.Array  # [0, S]: holds no data; its shape carries the cache size S (static under jit)

    @property
    def size(self) -> int:
        return self.slots_0S.shape[1]

    @classmethod
    def empty(cls, spec: ModelSpec, batch: int, size: int) -> GLAState:
        shape, dtype = state_layout(spec, "gla", batch, size)  # [batch, H, K', V'] float32
        S_BHKV = jnp.zeros(shape, DTYPES[dtype])
        return cls(S_BHKV, jnp.zeros((), jnp.int32), jnp.zeros((0, size), jnp.int8))


class GateLinear(Linear):
    """x · W + b with the bias added in float32: the forget gate's second projection, read in float32."""

    def __init__(self, d_in: int, d_out: int, spec: ModelSpec, rngs: nnx.Rngs):
        super().__init__(d_in, d_out, spec, rngs)
        self.bias = nnx.Param(jnp.zeros((d_out,), DTYPES[spec.param_dtype]))

    def __call__(self, x):
        w = gathered(self.kernel[...], self.mesh)
        return linear(x, w, self.compute_dtype).astype(jnp.float32) + self.bias[...].astype(jnp.float32)


def head_norm(spec: ModelSpec):
    """The per-head output norm over V, one weight shared by all heads: RMSNorm, or the spec's norm_type ("same")."""
    if spec.gla_output_norm == "rms":
        # flash-linear-attention's g_norm: a weight, no bias
        return RMSNorm(spec.Vh, spec.norm_eps, False, spec.param_dtype)
    return make_norm(spec, dim=spec.Vh)


def recurrent_gla(q_BHTK, k_BHTK, v_BHTV, g_BHTK, S_BHKV):
    """The recurrence token by token (decoding; the reference form of the tests): outputs [B, H, T, V], last state."""
    def step(S_BHKV, qkvg):
        q_BHK, k_BHK, v_BHV, g_BHK = qkvg
        S_BHKV = jnp.exp(g_BHK)[..., None] * S_BHKV + k_BHK[..., None] * v_BHV[..., None, :]
        return S_BHKV, jnp.einsum("bhk,bhkv->bhv", q_BHK, S_BHKV)

    S_BHKV, o_TBHV = jax.lax.scan(step, S_BHKV,
                                  tuple(x.transpose(2, 0, 1, 3) for x in (q_BHTK, k_BHTK, v_BHTV, g_BHTK)))
    return o_TBHV.transpose(1, 2, 0, 3), S_BHKV


def chunked_gla(q_BHTK, k_BHTK, v_BHTV, g_BHTK, S_BHKV, chunk: int):
    """The two-level chunkwise-parallel form (GLA paper, sec. 4; flash-linear-attention's chunk_gla): the same
    outputs [B, H, T, V] and last state [B, H, K, V] as `recurrent_gla`, all float32.

    Chunks of C tokens carry the state; each chunk is split into n sub-chunks of c = 16 tokens. The decay from
    token j to token i ≥ j is exp(Σ_{j<s≤i} log α_s); every exponent is a sum of log-gates taken directly, never
    the difference of two cumulative sums (which cancels after one very negative gate: github.com/fla-org/
    flash-linear-attention/issues/20), and every exponent is ≤ 0, so nothing overflows for any gate down to −inf:
      - sub-chunk I from an earlier sub-chunk J: matmuls of q_i·exp(b_i − b_ref) and k_j·exp(b_ref − b_j), b_ref
        the cumulative gate at I's start;
      - within a sub-chunk: the exponents of the c(c+1)/2 pairs j ≤ i only [P, K] (the masked-before-exp form
        with the masked pairs never formed: masking after exp gives inf·0 = NaN gradients);
      - from earlier chunks: q_i·exp(b_i) times the state at the chunk's start.
    Log-gates below GATE_FLOOR act as it. T is padded to whole chunks with zero keys and gates, which change
    neither the outputs nor the state; a chunk that is not a multiple of 16 (or shorter) is one sub-chunk. No
    [.., C, C, K] tensor: memory O(B·H·T·((c+1)/2·K + n·K + C + V)), n = C/c.
    """
    B, H, T, K = q_BHTK.shape
    V, c = v_BHTV.shape[-1], SUB if chunk % SUB == 0 else chunk
    C = min(chunk, c * -(-T // c))
    N, n = -(-T // C), C // c
    pad = ((0, 0), (0, 0), (0, N * C - T), (0, 0))
    g_BHTK = jnp.maximum(g_BHTK, GATE_FLOOR)
    q, k, v, g = (jnp.pad(x, pad).reshape(B, H, N, C, x.shape[-1]) for x in (q_BHTK, k_BHTK, v_BHTV, g_BHTK))
    b_BHNCK = jnp.cumsum(g, axis=3)  # Σ_{s ≤ i} log α_s from the chunk's start
    # E[m, j] = Σ_{j<s<m·c} log α_s, from token j to the start of sub-chunk m (m = 1..n; m = n: the chunk's end),
    # and below D[p] = Σ_{j<s≤i} log α_s: sums of gates as 0/1 matmuls (full float32: HIGHEST, not TF32)
    s_C, s_c, i_P, j_P = np.arange(C), np.arange(c), *np.tril_indices(c)
    before_nCC = (s_C[:, None] < s_C) & (s_C < c * np.arange(1, n + 1)[:, None, None])
    E_BHNnCK = jnp.einsum("mjs,bhnsk->bhnmjk", before_nCC.astype(np.float32), g, precision=HIGHEST)
    # sub-chunk I ≥ 1 from sub-chunks J < I, through I's start
    q_BHNncK, k_BHNncK, g_BHNncK = (x.reshape(B, H, N, n, c, K) for x in (q, k, g))
    r_BHNncK = jnp.cumsum(g_BHNncK, axis=4)  # Σ_{I·c ≤ s ≤ i} log α_s from the sub-chunk's start
    Q_BHNncK = q_BHNncK * jnp.exp(r_BHNncK)
    A_BHNncC = jnp.einsum("bhnick,bhnijk->bhnicj", Q_BHNncK[:, :, :, 1:],
                          k[:, :, :, None] * jnp.exp(E_BHNnCK[:, :, :, :-1]))
    earlier_nC = s_C < c * np.arange(1, n)[:, None]
    A_BHNncC = jnp.where(earlier_nC[:, None], A_BHNncC, 0.0)
    o_BHNncV = jnp.pad(jnp.einsum("bhnicj,bhnjv->bhnicv", A_BHNncC, v), ((0, 0),) * 3 + ((1, 0), (0, 0), (0, 0)))
    # within each sub-chunk: only the P = c(c+1)/2 pairs j ≤ i (i_P, j_P), so no exponent of a pair j > i exists
    between_Pc = (j_P[:, None] < s_c) & (s_c <= i_P[:, None])
    D_BHNnPK = jnp.einsum("ps,bhnmsk->bhnmpk", between_Pc.astype(np.float32), g_BHNncK, precision=HIGHEST)
    a_BHNnP = jnp.sum(q_BHNncK[..., i_P, :] * k_BHNncK[..., j_P, :] * jnp.exp(D_BHNnPK), axis=-1)
    A_BHNncc = jnp.zeros((B, H, N, n, c, c), jnp.float32).at[..., i_P, j_P].set(a_BHNnP)
    o_BHNncV = o_BHNncV + jnp.einsum("bhnmij,bhnmjv->bhnmiv", A_BHNncc, v.reshape(B, H, N, n, c, V))
    # the state: each chunk's own part, carried chunk by chunk
    U_BHNKV = jnp.einsum("bhnck,bhncv->bhnkv", k * jnp.exp(E_BHNnCK[:, :, :, -1]), v)
    last_BHNK = b_BHNCK[:, :, :, -1]

    def carry(S_BHKV, lu):  # the state at each chunk's start, chunk by chunk
        last_BHK, U_BHKV = lu
        return jnp.exp(last_BHK)[..., None] * S_BHKV + U_BHKV, S_BHKV

    S_BHKV, S0_NBHKV = jax.lax.scan(carry, S_BHKV, (last_BHNK.transpose(2, 0, 1, 3), U_BHNKV.transpose(2, 0, 1, 3, 4)))
    o_BHNCV = o_BHNncV.reshape(B, H, N, C, V) + jnp.einsum("bhnck,nbhkv->bhncv", q * jnp.exp(b_BHNCK), S0_NBHKV)
    return o_BHNCV.reshape(B, H, N * C, V)[:, :, :T], S_BHKV


class GLA(nnx.Module):
    """The GLA token mixer in the block's `self_attn` slot; the same interface as `Attention`."""

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        D, dk, dv, R = spec.D, spec.d_k, spec.d_v, spec.gla_gate_rank
        self.H, self.K, self.V = spec.H, spec.Kh, spec.Vh
        self.normalizer, self.chunk, self.kernel = spec.gla_gate_normalizer, CHUNK, "pure"
        self.mesh: Mesh | None = None  # the mesh a sharded step runs on (model.set_mesh): the kernel runs per device
        self.q_proj = Linear(D, dk, spec, rngs)
        self.k_proj = Linear(D, dk, spec, rngs)
        self.v_proj = Linear(D, dv, spec, rngs)
        self.g_proj = Linear(D, dv, spec, rngs)
        self.gk_proj = nnx.List([Linear(D, R, spec, rngs), GateLinear(R, dk, spec, rngs)])
        self.o_proj = Linear(dv, D, spec, rngs)
        self.g_norm = head_norm(spec)

    def __call__(self, x_BTD, cos_BTE=None, sin_BTE=None, state: GLAState | None = None, mask_BTS=None):
        """Output [B, T, D] and the updated state (None without one). Positions are unused (position: none); with
        a state, `mask_BTS` marks padding (a token reading no slot), whose key and gate are zeroed: it leaves the
        state unchanged."""
        B, T, _ = x_BTD.shape
        H, K, V = self.H, self.K, self.V
        # heads [B, H, T, E] in float32 (the recurrence's dtype); on a mesh, split by rows as the state (split_rows)
        heads = lambda x, E: split_rows(x.astype(jnp.float32).reshape(B, T, H, E).transpose(0, 2, 1, 3), self.mesh)  # noqa: E731
        q_BHTK = heads(self.q_proj(x_BTD), K) * K**-0.5
        k_BHTK, v_BHTV = heads(self.k_proj(x_BTD), K), heads(self.v_proj(x_BTD), V)
        gk_BTK = self.gk_proj[1](self.gk_proj[0](x_BTD))  # float32
        g_BHTK = heads(jax.nn.log_sigmoid(gk_BTK), K) / self.normalizer  # log α ≤ 0, stable logsigmoid
        if mask_BTS is not None:
            valid_BHT1 = jnp.any(mask_BTS, axis=-1)[:, None, :, None]
            k_BHTK, g_BHTK = jnp.where(valid_BHT1, k_BHTK, 0.0), jnp.where(valid_BHT1, g_BHTK, 0.0)
        S_BHKV = split_rows(jnp.zeros((B, H, K, V), jnp.float32) if state is None else state.S_BHKV, self.mesh)
        if self.chunk and T > 1 and self.kernel == "pallas":
            o_BHTV, S_BHKV = per_device(pallas_gla, self.mesh, B)(q_BHTK, k_BHTK, v_BHTV, g_BHTK, S_BHKV)
        elif self.chunk and T > 1:
            o_BHTV, S_BHKV = chunked_gla(q_BHTK, k_BHTK, v_BHTV, g_BHTK, S_BHKV, self.chunk)
        else:
            o_BHTV, S_BHKV = recurrent_gla(q_BHTK, k_BHTK, v_BHTV, g_BHTK, S_BHKV)
        gate_BTHV = jax.nn.silu(self.g_proj(x_BTD).astype(jnp.float32)).reshape(B, T, H, V)  # swish in float32
        o_BTHV = self.g_norm(o_BHTV.transpose(0, 2, 1, 3)) * split_rows(gate_BTHV, self.mesh)
        y_BTD = self.o_proj(o_BTHV.reshape(B, T, H * V).astype(x_BTD.dtype))
        if state is not None:
            state = GLAState(S_BHKV, state.length + T, state.slots_0S)
        return y_BTD, state


def set_chunk(model: nnx.Module, chunk: int) -> None:
    """Use `chunk` tokens per chunk in every GLA layer of `model` (0: the token-by-token recurrence)."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, GLA):
            module.chunk = chunk


def set_kernel(model: nnx.Module, gla_kernel: str) -> str:
    """Run every GLA layer of `model` with `gla_kernel` (the train config's key: auto, pure, pallas or fla),
    resolved for this twin and machine (shared_config.hardware.resolve_gla_kernel, which raises HardwareError for
    a kernel not here); returns the kernel that runs. Decoding (one token at a time) stays the recurrence."""
    kernel = resolve_gla_kernel(gla_kernel, "jax", device_platform())
    for _, module in nnx.iter_modules(model):
        if isinstance(module, GLA):
            module.kernel = kernel
    return kernel


def per_device(kernel, mesh: Mesh | None, rows: int):
    """`kernel` of [B, ...] arrays (pallas_gla), run by each device of `mesh` on its own batch rows (jax.shard_map
    over the batch axes, as distributed.py splits a batch): XLA cannot partition a Pallas call, and would gather
    every row onto every device. No mesh, one device, or `rows` that the devices do not divide: `kernel` itself."""
    if mesh is None or not splits_rows(rows, mesh.size):
        return kernel
    rows_spec = PartitionSpec(AXES)
    return jax.shard_map(kernel, mesh=mesh, in_specs=rows_spec, out_specs=rows_spec, check_vma=False)

