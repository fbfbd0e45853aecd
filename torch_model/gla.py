"""Gated Linear Attention, the second token mixer of the PyTorch twin; jax_model/gla.py is the same file in JAX.

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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared_config import ModelSpec
from shared_config.hardware import resolve_gla_kernel
from shared_config.layout import GLA_CHUNK, GLA_SUB, state_layout

from .attention import device_platform
from .gla_kernel import GATE_FLOOR, fla_gla, fla_installed
from .layers import DTYPES, Linear, RMSNorm, linear, make_norm

CHUNK, SUB = GLA_CHUNK, GLA_SUB  # tokens per chunk (`set_chunk`) and per sub-chunk: shared_config/layout.py's


class GLAState(NamedTuple):
    """One GLA layer's decoding state, in place of an attention layer's keys and values: constant in T."""

    S_BHKV: torch.Tensor  # float32 [B, H, K, V]: the recurrent state after every token fed so far
    length: torch.Tensor  # int64 []: tokens fed so far (padding included), the same in every row
    slots_0S: torch.Tensor  # [0, S]: holds no data; its shape carries the cache size S (static under jit)

    @property
    def size(self) -> int:
        return self.slots_0S.shape[1]

    @classmethod
    def empty(cls, spec: ModelSpec, batch: int, size: int, w: torch.Tensor) -> GLAState:
        """`w`: any tensor on the model's device (the JAX twin needs none)."""
        shape, dtype = state_layout(spec, "gla", batch, size)  # [batch, H, K', V'] float32
        S_BHKV = w.new_zeros(shape, dtype=DTYPES[dtype])
        return cls(S_BHKV, w.new_zeros((), dtype=torch.int64), w.new_zeros((0, size), dtype=torch.int8))


class GateLinear(Linear):
    """x · W + b with the bias added in float32: the forget gate's second projection, read in float32."""

    def __init__(self, d_in: int, d_out: int, spec: ModelSpec):
        super().__init__(d_in, d_out, spec)
        self.bias = nn.Parameter(torch.zeros(d_out, dtype=DTYPES[spec.param_dtype]))

    def forward(self, x):
        return linear(x, self.weight, self.compute_dtype).to(torch.float32) + self.bias.to(torch.float32)


def head_norm(spec: ModelSpec):
    """The per-head output norm over V, one weight shared by all heads: RMSNorm, or the spec's norm_type ("same")."""
    if spec.gla_output_norm == "rms":
        # flash-linear-attention's g_norm: a weight, no bias
        return RMSNorm(spec.Vh, spec.norm_eps, False, spec.param_dtype)
    return make_norm(spec, dim=spec.Vh)


def recurrent_gla(q_BHTK, k_BHTK, v_BHTV, g_BHTK, S_BHKV):
    """The recurrence token by token (decoding; the reference form of the tests): outputs [B, H, T, V], last state."""
    outputs = []
    for t in range(q_BHTK.shape[2]):  # jax.lax.scan in the JAX twin
        q_BHK, k_BHK, v_BHV, g_BHK = q_BHTK[:, :, t], k_BHTK[:, :, t], v_BHTV[:, :, t], g_BHTK[:, :, t]
        S_BHKV = torch.exp(g_BHK)[..., None] * S_BHKV + k_BHK[..., None] * v_BHV[..., None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q_BHK, S_BHKV))
    return torch.stack(outputs, dim=2), S_BHKV


def as_float(mask, x):
    """A numpy 0/1 mask as a float32 tensor on x's device (the JAX twin passes numpy arrays as they are)."""
    return torch.as_tensor(mask, dtype=torch.float32, device=x.device)


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
    pad = (0, 0, 0, N * C - T)
    g_BHTK = torch.clamp(g_BHTK, min=GATE_FLOOR)
    q, k, v, g = (F.pad(x, pad).reshape(B, H, N, C, x.shape[-1]) for x in (q_BHTK, k_BHTK, v_BHTV, g_BHTK))
    b_BHNCK = torch.cumsum(g, dim=3)  # Σ_{s ≤ i} log α_s from the chunk's start
    # E[m, j] = Σ_{j<s<m·c} log α_s, from token j to the start of sub-chunk m (m = 1..n; m = n: the chunk's end),
    # and below D[p] = Σ_{j<s≤i} log α_s: sums of gates as 0/1 matmuls (full float32 unless TF32 is switched on)
    s_C, s_c, i_P, j_P = np.arange(C), np.arange(c), *np.tril_indices(c)
    before_nCC = (s_C[:, None] < s_C) & (s_C < c * np.arange(1, n + 1)[:, None, None])
    E_BHNnCK = torch.einsum("mjs,bhnsk->bhnmjk", as_float(before_nCC, g), g)
    # sub-chunk I ≥ 1 from sub-chunks J < I, through I's start
    q_BHNncK, k_BHNncK, g_BHNncK = (x.reshape(B, H, N, n, c, K) for x in (q, k, g))
    r_BHNncK = torch.cumsum(g_BHNncK, dim=4)  # Σ_{I·c ≤ s ≤ i} log α_s from the sub-chunk's start
    Q_BHNncK = q_BHNncK * torch.exp(r_BHNncK)
    A_BHNncC = torch.einsum("bhnick,bhnijk->bhnicj", Q_BHNncK[:, :, :, 1:],
                            k[:, :, :, None] * torch.exp(E_BHNnCK[:, :, :, :-1]))
    earlier_nC = s_C < c * np.arange(1, n)[:, None]
    A_BHNncC = torch.where(torch.as_tensor(earlier_nC[:, None], device=q.device), A_BHNncC, 0.0)
    o_BHNncV = F.pad(torch.einsum("bhnicj,bhnjv->bhnicv", A_BHNncC, v), (0, 0, 0, 0, 1, 0))
    # within each sub-chunk: only the P = c(c+1)/2 pairs j ≤ i (i_P, j_P), so no exponent of a pair j > i exists
    between_Pc = (j_P[:, None] < s_c) & (s_c <= i_P[:, None])
    D_BHNnPK = torch.einsum("ps,bhnmsk->bhnmpk", as_float(between_Pc, g), g_BHNncK)
    a_BHNnP = torch.sum(q_BHNncK[..., i_P, :] * k_BHNncK[..., j_P, :] * torch.exp(D_BHNnPK), dim=-1)
    A_BHNncc = a_BHNnP.new_zeros((B, H, N, n, c, c))
    A_BHNncc[..., i_P, j_P] = a_BHNnP
    o_BHNncV = o_BHNncV + torch.einsum("bhnmij,bhnmjv->bhnmiv", A_BHNncc, v.reshape(B, H, N, n, c, V))
    # the state: each chunk's own part, carried chunk by chunk
    U_BHNKV = torch.einsum("bhnck,bhncv->bhnkv", k * torch.exp(E_BHNnCK[:, :, :, -1]), v)
    last_BHNK = b_BHNCK[:, :, :, -1]

    S0_NBHKV = []
    # the state at each chunk's start, chunk by chunk (jax.lax.scan in the JAX twin); unbind, not [:, :, m]: one
    # backward for all chunks instead of a zero-filled [B, H, N, K, V] gradient per chunk
    for last_BHK, U_BHKV in zip(last_BHNK.unbind(2), U_BHNKV.unbind(2)):
        S0_NBHKV.append(S_BHKV)
        S_BHKV = torch.exp(last_BHK)[..., None] * S_BHKV + U_BHKV
    S0_NBHKV = torch.stack(S0_NBHKV)
    o_BHNCV = o_BHNncV.reshape(B, H, N, C, V) + torch.einsum("bhnck,nbhkv->bhncv", q * torch.exp(b_BHNCK), S0_NBHKV)
    return o_BHNCV.reshape(B, H, N * C, V)[:, :, :T], S_BHKV


class GLA(nn.Module):
    """The GLA token mixer in the block's `self_attn` slot; the same interface as `Attention`."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        D, dk, dv, R = spec.D, spec.d_k, spec.d_v, spec.gla_gate_rank
        self.H, self.K, self.V = spec.H, spec.Kh, spec.Vh
        self.normalizer, self.chunk, self.kernel = spec.gla_gate_normalizer, CHUNK, "pure"
        self.q_proj = Linear(D, dk, spec)
        self.k_proj = Linear(D, dk, spec)
        self.v_proj = Linear(D, dv, spec)
        self.g_proj = Linear(D, dv, spec)
        self.gk_proj = nn.ModuleList([Linear(D, R, spec), GateLinear(R, dk, spec)])
        self.o_proj = Linear(dv, D, spec)
        self.g_norm = head_norm(spec)

    def forward(self, x_BTD, cos_BTE=None, sin_BTE=None, state: GLAState | None = None, mask_BTS=None):
        """Output [B, T, D] and the updated state (None without one). Positions are unused (position: none); with
        a state, `mask_BTS` marks padding (a token reading no slot), whose key and gate are zeroed: it leaves the
        state unchanged."""
        B, T, _ = x_BTD.shape
        H, K, V = self.H, self.K, self.V
        heads = lambda x, E: x.to(torch.float32).reshape(B, T, H, E).transpose(1, 2)  # recurrence in float32  # noqa: E731
        q_BHTK = heads(self.q_proj(x_BTD), K) * K**-0.5
        k_BHTK, v_BHTV = heads(self.k_proj(x_BTD), K), heads(self.v_proj(x_BTD), V)
        gk_BTK = self.gk_proj[1](self.gk_proj[0](x_BTD))  # float32
        g_BHTK = heads(F.logsigmoid(gk_BTK), K) / self.normalizer  # log α ≤ 0, stable logsigmoid
        if mask_BTS is not None:
            valid_BHT1 = torch.any(mask_BTS, dim=-1)[:, None, :, None]
            k_BHTK, g_BHTK = torch.where(valid_BHT1, k_BHTK, 0.0), torch.where(valid_BHT1, g_BHTK, 0.0)
        S_BHKV = x_BTD.new_zeros((B, H, K, V), dtype=torch.float32) if state is None else state.S_BHKV
        if self.chunk and T > 1 and self.kernel == "fla":
            o_BHTV, S_BHKV = fla_gla(q_BHTK, k_BHTK, v_BHTV, g_BHTK, S_BHKV)
        elif self.chunk and T > 1:
            o_BHTV, S_BHKV = chunked_gla(q_BHTK, k_BHTK, v_BHTV, g_BHTK, S_BHKV, self.chunk)
        else:
            o_BHTV, S_BHKV = recurrent_gla(q_BHTK, k_BHTK, v_BHTV, g_BHTK, S_BHKV)
        gate_BTHV = F.silu(self.g_proj(x_BTD).to(torch.float32)).reshape(B, T, H, V)  # swish in float32
        o_BTHV = self.g_norm(o_BHTV.transpose(1, 2)) * gate_BTHV
        y_BTD = self.o_proj(o_BTHV.reshape(B, T, H * V).to(x_BTD.dtype))
        if state is not None:
            state = GLAState(S_BHKV, state.length + T, state.slots_0S)
        return y_BTD, state


def set_chunk(model: nn.Module, chunk: int) -> None:
    """Use `chunk` tokens per chunk in every GLA layer of `model` (0: the token-by-token recurrence)."""
    for module in model.modules():
        if isinstance(module, GLA):
            module.chunk = chunk


def set_kernel(model: nn.Module, gla_kernel: str) -> str:
    """Run every GLA layer of `model` with `gla_kernel` (the train config's key: auto, pure, pallas or fla),
    resolved for this twin and machine (shared_config.hardware.resolve_gla_kernel, which raises HardwareError for
    a kernel not here); returns the kernel that runs. Decoding (one token at a time) stays the recurrence."""
    kernel = resolve_gla_kernel(gla_kernel, "torch", device_platform(), fla_installed())
    for module in model.modules():
        if isinstance(module, GLA):
            module.kernel = kernel
    return kernel
