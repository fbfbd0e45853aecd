"""Softmax attention for the PyTorch twin: RoPE, the attention kernels, the KV cache and the `Attention`
mixer; jax_model/attention.py is the same file in JAX.

Notation: B batch, T query tokens, S key tokens (cache slots when decoding), D model dim,
H query heads, K kv heads, G = H/K query heads per kv head, E head dim.
RoPE and softmax computed in float32 and cast back.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from shared_config import ModelSpec, did_you_mean
from shared_config.hardware import check_kernel
from shared_config.placement import has_qk_norm, has_v_norm

from .layers import Linear, RMSNorm

ATTENTION = ("auto", "einsum", "blocked", "sdpa", "flash", "cudnn", "pallas")  # attention kernels this twin offers


def rope_cos_sin(inv_freq_E2, positions_BT):
    """cos and sin of every (position, frequency) angle, [..., T, E] for positions [..., T], float32, halves repeated
    (HF)."""
    inv_freq_E2 = torch.as_tensor(inv_freq_E2, dtype=torch.float32, device=positions_BT.device)
    angles_BTE2 = positions_BT.to(torch.float32)[..., None] * inv_freq_E2
    angles_BTE = torch.cat([angles_BTE2, angles_BTE2], dim=-1)
    return torch.cos(angles_BTE), torch.sin(angles_BTE)


def apply_rope(x_BTHE, cos_BTE, sin_BTE):
    """Rotate pairs (i, i + E/2) (Hugging Face `rotate_half`), in float32."""
    x32 = x_BTHE.to(torch.float32)
    x1, x2 = torch.chunk(x32, 2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x32 * cos_BTE[..., None, :] + rotated * sin_BTE[..., None, :]).to(x_BTHE.dtype)


def einsum_attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS=None):
    """softmax(q·kᵀ/sqrt(E))·v over the keys `mask_BTS` allows (None: causal); query head h reads kv head h // G."""
    B, T, H, E = q_BTHE.shape
    S = k_BSKE.shape[1]
    if mask_BTS is None:  # causal: the queries are the last T of the S keys
        mask_BTS = torch.tril(torch.ones(T, S, dtype=torch.bool, device=q_BTHE.device), diagonal=S - T)[None]
    q_BKGTE, k_BKSE, v_BKSE = heads_first(q_BTHE, k_BSKE, v_BSKE)
    o_BKGTE = softmax_attention(q_BKGTE, k_BKSE, v_BKSE, mask_BTS[:, None, None])
    return o_BKGTE.permute(0, 3, 1, 2, 4).reshape(B, T, H, E)


def blocked_attention(q_BTHE, k_BTKE, v_BTKE, block: int):
    """Causal attention by blocks of `block` queries, each reading only the keys up to its last query.

    The masked half of q·kᵀ is never computed (JAX's default on CPU, where XLA would materialise every
    score; here SDPA's fused kernel is the default). The same math as `einsum_attention`.
    """
    B, T, H, E = q_BTHE.shape
    q_BKGTE, k_BKTE, v_BKTE = heads_first(q_BTHE, k_BTKE, v_BTKE)
    outputs = []
    for start in range(0, T, block):
        end = min(start + block, T)
        # queries start..end-1, keys 0..end-1
        causal_QS = (torch.arange(end, device=q_BTHE.device)[None, :]
                     <= torch.arange(start, end, device=q_BTHE.device)[:, None])
        outputs.append(softmax_attention(q_BKGTE[:, :, :, start:end], k_BKTE[:, :, :end], v_BKTE[:, :, :end],
                                         causal_QS))
    return torch.cat(outputs, dim=3).permute(0, 3, 1, 2, 4).reshape(B, T, H, E)


def attention_block(T: int) -> int:
    """Queries per block: 32 (fastest measured on CPU at T=256), at most 16 blocks so compilation stays short."""
    return max(32, -(-T // 16))


def heads_first(q_BTHE, k_BSKE, v_BSKE):
    """[B, K, G, T, E] queries and [B, K, S, E] keys and values: batch dims leading, so each product is one batched
    matmul."""
    B, T, H, E = q_BTHE.shape
    K = k_BSKE.shape[2]
    q_BKGTE = q_BTHE.reshape(B, T, K, H // K, E).permute(0, 2, 3, 1, 4)
    return q_BKGTE, k_BSKE.transpose(1, 2), v_BSKE.transpose(1, 2)


def softmax_attention(q_BKGTE, k_BKSE, v_BKSE, mask):
    """softmax(q·kᵀ/sqrt(E))·v where `mask` (broadcast to [B, K, G, T, S]) allows, softmax in float32."""
    scores_BKGTS = torch.einsum("bkgte,bkse->bkgts", q_BKGTE, k_BKSE).to(torch.float32) / math.sqrt(q_BKGTE.shape[-1])
    scores_BKGTS = torch.where(mask, scores_BKGTS, torch.finfo(torch.float32).min)
    probs_BKGTS = torch.softmax(scores_BKGTS, dim=-1).to(v_BKSE.dtype)  # softmax in float32
    return torch.einsum("bkgts,bkse->bkgte", probs_BKGTS, v_BKSE)


SDPA_BACKENDS = {"sdpa": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
PALLAS_BLOCK = 128  # the Pallas TPU flash kernel tiles queries and keys in blocks of 128


def pallas_fits(E: int, T: int = PALLAS_BLOCK) -> bool:
    """Whether the Pallas TPU flash kernel takes T tokens of head dim E: whole blocks, E up to 128 or a multiple of
    128."""
    return T % PALLAS_BLOCK == 0 and (E <= PALLAS_BLOCK or E % PALLAS_BLOCK == 0)


def pallas_attention(q_BTHE, k_BTKE, v_BTKE):
    """Causal attention by the Pallas TPU flash-attention kernel shipped with JAX, through torch_xla (XLA tensors
    only); T a multiple of PALLAS_BLOCK. The kernel has no GQA: kv head h // G is repeated for query head h."""
    from torch_xla.experimental.custom_kernel import flash_attention

    G = q_BTHE.shape[2] // k_BTKE.shape[2]
    q, k, v = (t.transpose(1, 2)
               for t in (q_BTHE, k_BTKE.repeat_interleave(G, dim=2), v_BTKE.repeat_interleave(G, dim=2)))
    o_BHTE = flash_attention(q, k, v, causal=True, sm_scale=1 / math.sqrt(q.shape[-1]))  # softmax in float32 inside
    return o_BHTE.transpose(1, 2)


def attend(q_BTHE, k_BSKE, v_BSKE, attention: str, mask_BTS=None):
    """Attention by the named kernel over the keys `mask_BTS` allows (None: causal); softmax in float32 in every
    kernel."""
    if attention == "pallas":
        if mask_BTS is None and pallas_fits(q_BTHE.shape[3], q_BTHE.shape[1]):
            return pallas_attention(q_BTHE, k_BSKE, v_BSKE)
        attention = "sdpa"  # no explicit mask (decoding), whole blocks, E the kernel takes: else SDPA computes it
    if attention == "einsum" or (attention == "blocked" and mask_BTS is not None):
        return einsum_attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS)
    if attention == "blocked":
        return blocked_attention(q_BTHE, k_BSKE, v_BSKE, block=attention_block(q_BTHE.shape[1]))
    q, k, v = (t.transpose(1, 2) for t in (q_BTHE, k_BSKE, v_BSKE))  # SDPA wants [B, heads, T, E]
    backend = SDPA_BACKENDS[attention]
    if mask_BTS is not None:
        # The flash and cuDNN kernels take no arbitrary mask: an explicit mask runs on SDPA's own dispatch.
        o_BHTE = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_BTS[:, None], enable_gqa=True)
    elif backend is None:
        o_BHTE = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        with sdpa_kernel(backend):
            o_BHTE = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return o_BHTE.transpose(1, 2)


class LayerCache(NamedTuple):
    """One attention layer's keys (after qk-norm and RoPE) and values in S preallocated slots: K heads, not H."""

    k_BSKE: torch.Tensor
    v_BSKE: torch.Tensor
    length: torch.Tensor  # int64 []: slots written so far, the same in every row
    # bool [B, T]: which of the next T tokens write their slot (routing.py); None: all
    keep_BT: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.k_BSKE.shape[1]

    def keeping(self, keep_BT) -> LayerCache:
        """The cache whose next write leaves out the tokens `keep_BT` [B, T] (bool) does not keep."""
        return LayerCache(self.k_BSKE, self.v_BSKE, self.length, keep_BT)

    def write(self, k_BTKE, v_BTKE) -> LayerCache:
        """The cache with the next T slots written; `length` is a tensor, so one compiled step serves every position.
        A token `keep_BT` leaves out (one a routed layer skipped) writes nothing: its slot keeps what it held."""
        slots_T = self.length + torch.arange(k_BTKE.shape[1], device=k_BTKE.device)
        if self.keep_BT is not None:
            keep_BT11 = self.keep_BT[:, :, None, None]
            k_BTKE = torch.where(keep_BT11, k_BTKE, self.k_BSKE.index_select(1, slots_T))
            v_BTKE = torch.where(keep_BT11, v_BTKE, self.v_BSKE.index_select(1, slots_T))
        # In place, where JAX donates the buffers: the returned cache holds the same K/V tensors.
        self.k_BSKE.index_copy_(1, slots_T, k_BTKE)
        self.v_BSKE.index_copy_(1, slots_T, v_BTKE)
        return LayerCache(self.k_BSKE, self.v_BSKE, self.length + k_BTKE.shape[1])


def device_platform() -> str:
    """"cpu", "gpu" or "tpu": where this twin can run (an XLA default device is a TPU through torch_xla; CUDA or ROCm
    present is a GPU). The machine, not the default device: a model is often built on "meta" or the CPU and moved."""
    if torch.get_default_device().type == "xla":
        return "tpu"
    return "gpu" if torch.cuda.is_available() else "cpu"


def resolve_attention(attention: str, spec: ModelSpec) -> str:
    """The kernel `attention` names on this machine: `auto` is Pallas on a TPU (an XLA default device) when
    eligible, else PyTorch's own SDPA dispatch. A kernel this machine cannot run is a HardwareError
    (shared_config.hardware)."""
    if attention not in ATTENTION:
        raise ValueError(f"attention={attention!r} is not offered by the torch twin (one of {', '.join(ATTENTION)})"
                         f"{did_you_mean(attention, ATTENTION)}")
    platform = device_platform()
    check_kernel(attention, platform, f"the torch twin's attention={attention!r}")
    if attention == "pallas" and not pallas_fits(spec.E):
        return "sdpa"  # a head dim the kernel does not take: named as what runs
    if attention != "auto":
        return attention
    if platform == "tpu":  # a TPU through torch_xla: one device per process
        return "pallas" if pallas_fits(spec.E) else "sdpa"
    return "sdpa"


class Attention(nn.Module):
    """Causal softmax self-attention, the block's `self_attn` slot: q/k/v projections (or one fused qkv), optional
    per-head RMSNorms (qk-norm before RoPE; HybridNorm's on V), RoPE, grouped-query attention by the named kernel
    (`attention`, resolved per machine by `resolve_attention`), o_proj. Input and output [B, T, D]; softmax in
    float32 in every kernel."""

    def __init__(self, spec: ModelSpec, attention: str):
        super().__init__()
        D, H, K, E = spec.D, spec.H, spec.K, spec.E
        self.H, self.K, self.E = H, K, E
        self.fused_qkv, self.attention = spec.fused_qkv, attention
        if spec.fused_qkv:
            self.qkv_proj = Linear(D, (H + 2 * K) * E, spec)
        else:
            self.q_proj = Linear(D, H * E, spec)
            self.k_proj = Linear(D, K * E, spec)
            self.v_proj = Linear(D, K * E, spec)
        self.o_proj = Linear(H * E, D, spec)
        # Per-head norms over E are RMSNorm whatever norm_type says; HybridNorm adds one on V.
        self.q_norm = RMSNorm(E, spec.norm_eps, False, spec.param_dtype) if has_qk_norm(spec) else None
        self.k_norm = RMSNorm(E, spec.norm_eps, False, spec.param_dtype) if has_qk_norm(spec) else None
        self.v_norm = RMSNorm(E, spec.norm_eps, False, spec.param_dtype) if has_v_norm(spec) else None

    def forward(self, x_BTD, cos_BTE, sin_BTE, state: LayerCache | None = None, mask_BTS=None):
        """Output [B, T, D] and the updated state (this mixer's decoding cache, None without one): with a `state`,
        this call's keys and values are written into it and the queries read every slot `mask_BTS` allows (None:
        causal over this call's tokens)."""
        B, T, _ = x_BTD.shape
        H, K, E = self.H, self.K, self.E
        if self.fused_qkv:
            q, k, v = torch.split(self.qkv_proj(x_BTD), [H * E, K * E, K * E], dim=-1)
        else:
            q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        q_BTHE, k_BTKE, v_BTKE = q.reshape(B, T, H, E), k.reshape(B, T, K, E), v.reshape(B, T, K, E)
        if self.q_norm is not None:  # qk-norm (over E) comes before RoPE
            q_BTHE, k_BTKE = self.q_norm(q_BTHE), self.k_norm(k_BTKE)
        if self.v_norm is not None:
            v_BTKE = self.v_norm(v_BTKE)
        if cos_BTE is not None:
            q_BTHE, k_BTKE = apply_rope(q_BTHE, cos_BTE, sin_BTE), apply_rope(k_BTKE, cos_BTE, sin_BTE)
        k_BSKE, v_BSKE = k_BTKE, v_BTKE
        if state is not None:
            state = state.write(k_BTKE, v_BTKE)
            k_BSKE, v_BSKE = state.k_BSKE, state.v_BSKE
        o_BTHE = attend(q_BTHE, k_BSKE, v_BSKE, self.attention, mask_BTS)
        return self.o_proj(o_BTHE.reshape(B, T, H * E)), state
