"""Softmax attention for the JAX twin (Flax NNX): RoPE, the attention kernels, the KV cache and the `Attention`
mixer; torch_model/attention.py is the same file in PyTorch.

Notation: B batch, T query tokens, S key tokens (cache slots when decoding), D model dim,
H query heads, K kv heads, G = H/K query heads per kv head, E head dim.
RoPE and softmax computed in float32 and cast back.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from shared_config import ModelSpec, did_you_mean
from shared_config.hardware import check_kernel, jax_platforms_error
from shared_config.placement import has_qk_norm, has_v_norm

from .layers import Linear, RMSNorm

ATTENTION = ("auto", "einsum", "blocked", "xla", "cudnn", "pallas")  # attention kernels this twin offers


def rope_cos_sin(inv_freq_E2, positions_BT):
    """cos and sin of every (position, frequency) angle, [..., T, E] for positions [..., T], float32, halves repeated
    (HF)."""
    angles_BTE2 = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_E2, jnp.float32)
    angles_BTE = jnp.concatenate([angles_BTE2, angles_BTE2], axis=-1)
    return jnp.cos(angles_BTE), jnp.sin(angles_BTE)


def apply_rope(x_BTHE, cos_BTE, sin_BTE):
    """Rotate pairs (i, i + E/2) (Hugging Face `rotate_half`), in float32."""
    x32 = x_BTHE.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos_BTE[..., None, :] + rotated * sin_BTE[..., None, :]).astype(x_BTHE.dtype)


def einsum_attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS=None):
    """softmax(q·kᵀ/sqrt(E))·v over the keys `mask_BTS` allows (None: causal); query head h reads kv head h // G."""
    B, T, H, E = q_BTHE.shape
    S = k_BSKE.shape[1]
    if mask_BTS is None:  # causal: the queries are the last T of the S keys
        mask_BTS = jnp.tril(jnp.ones((T, S), dtype=bool), k=S - T)[None]
    q_BKGTE, k_BKSE, v_BKSE = heads_first(q_BTHE, k_BSKE, v_BSKE)
    o_BKGTE = softmax_attention(q_BKGTE, k_BKSE, v_BKSE, mask_BTS[:, None, None])
    return o_BKGTE.transpose(0, 3, 1, 2, 4).reshape(B, T, H, E)


def blocked_attention(q_BTHE, k_BTKE, v_BTKE, block: int):
    """Causal attention by blocks of `block` queries, each reading only the keys up to its last query.

    The masked half of q·kᵀ is never computed: on CPU this runs about 5x faster than one masked
    product (XLA materialises every score). The same math as `einsum_attention`.
    """
    B, T, H, E = q_BTHE.shape
    q_BKGTE, k_BKTE, v_BKTE = heads_first(q_BTHE, k_BTKE, v_BTKE)
    outputs = []
    for start in range(0, T, block):
        end = min(start + block, T)
        # queries start..end-1, keys 0..end-1
        causal_QS = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
        outputs.append(softmax_attention(q_BKGTE[:, :, :, start:end], k_BKTE[:, :, :end], v_BKTE[:, :, :end],
                                         causal_QS))
    return jnp.concatenate(outputs, axis=3).transpose(0, 3, 1, 2, 4).reshape(B, T, H, E)


def attention_block(T: int) -> int:
    """Queries per block: 32 (fastest measured on CPU at T=256), at most 16 blocks so compilation stays short."""
    return max(32, -(-T // 16))


def heads_first(q_BTHE, k_BSKE, v_BSKE):
    """[B, K, G, T, E] queries and [B, K, S, E] keys and values: batch dims leading, so each product is one batched
    matmul."""
    B, T, H, E = q_BTHE.shape
    K = k_BSKE.shape[2]
    q_BKGTE = q_BTHE.reshape(B, T, K, H // K, E).transpose(0, 2, 3, 1, 4)
    return q_BKGTE, k_BSKE.transpose(0, 2, 1, 3), v_BSKE.transpose(0, 2, 1, 3)


def softmax_attention(q_BKGTE, k_BKSE, v_BKSE, mask):
    """softmax(q·kᵀ/sqrt(E))·v where `mask` (broadcast to [B, K, G, T, S]) allows, softmax in float32."""
    scores_BKGTS = jnp.einsum("bkgte,bkse->bkgts", q_BKGTE, k_BKSE).astype(jnp.float32) / math.sqrt(q_BKGTE.shape[-1])
    scores_BKGTS = jnp.where(mask, scores_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BKSE.dtype)  # softmax in float32
    return jnp.einsum("bkgts,bkse->bkgte", probs_BKGTS, v_BKSE)


PALLAS_BLOCK = 128  # the Pallas TPU flash kernel tiles queries and keys in blocks of 128


def pallas_fits(E: int, T: int = PALLAS_BLOCK) -> bool:
    """Whether the Pallas TPU flash kernel takes T tokens of head dim E: whole blocks, E up to 128 or a multiple of
    128."""
    return T % PALLAS_BLOCK == 0 and (E <= PALLAS_BLOCK or E % PALLAS_BLOCK == 0)


def pallas_attention(q_BTHE, k_BTKE, v_BTKE):
    """Causal attention by the Pallas TPU flash-attention kernel shipped with JAX (torch_xla wraps the same
    kernel); T a multiple of PALLAS_BLOCK. The kernel has no GQA: kv head h // G is repeated for query head h."""
    from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention

    G = q_BTHE.shape[2] // k_BTKE.shape[2]
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q_BTHE, jnp.repeat(k_BTKE, G, axis=2), jnp.repeat(v_BTKE, G, axis=2)))
    o_BHTE = flash_attention(q, k, v, causal=True, sm_scale=1 / math.sqrt(q.shape[-1]))  # softmax in float32 inside
    return o_BHTE.transpose(0, 2, 1, 3)


def attend(q_BTHE, k_BSKE, v_BSKE, attention: str, mask_BTS=None):
    """Attention by the named kernel over the keys `mask_BTS` allows (None: causal); softmax in float32 in every
    kernel."""
    if attention == "pallas":
        if mask_BTS is None and pallas_fits(q_BTHE.shape[3], q_BTHE.shape[1]):
            return pallas_attention(q_BTHE, k_BSKE, v_BSKE)
        attention = "xla"  # no explicit mask (decoding), whole blocks, E the kernel takes: else XLA computes it
    if attention == "einsum" or (attention == "blocked" and mask_BTS is not None):
        return einsum_attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS)
    if attention == "blocked":
        return blocked_attention(q_BTHE, k_BSKE, v_BSKE, block=attention_block(q_BTHE.shape[1]))
    if mask_BTS is None:
        return jax.nn.dot_product_attention(q_BTHE, k_BSKE, v_BSKE, is_causal=True, implementation=attention)
    # cuDNN's fused kernel takes causal and length masks, not an arbitrary one: an explicit mask runs on XLA.
    return jax.nn.dot_product_attention(q_BTHE, k_BSKE, v_BSKE, mask=mask_BTS[:, None], implementation="xla")


class LayerCache(NamedTuple):
    """One attention layer's keys (after qk-norm and RoPE) and values in S preallocated slots: K heads, not H."""

    k_BSKE: jax.Array
    v_BSKE: jax.Array
    length: jax.Array  # int32 []: slots written so far, the same in every row
    # bool [B, T]: which of the next T tokens write their slot (routing.py); None: all
    keep_BT: jax.Array | None = None

    @property
    def size(self) -> int:
        return self.k_BSKE.shape[1]

    def keeping(self, keep_BT) -> LayerCache:
        """The cache whose next write leaves out the tokens `keep_BT` [B, T] (bool) does not keep."""
        return LayerCache(self.k_BSKE, self.v_BSKE, self.length, keep_BT)

    def write(self, k_BTKE, v_BTKE) -> LayerCache:
        """The cache with the next T slots written; `length` is traced, so one compiled step serves every position.
        A token `keep_BT` leaves out (one a routed layer skipped) writes nothing: its slot keeps what it held."""
        at = (0, self.length, 0, 0)
        if self.keep_BT is not None:
            keep_BT11 = self.keep_BT[:, :, None, None]
            k_BTKE = jnp.where(keep_BT11, k_BTKE, jax.lax.dynamic_slice(self.k_BSKE, at, k_BTKE.shape))
            v_BTKE = jnp.where(keep_BT11, v_BTKE, jax.lax.dynamic_slice(self.v_BSKE, at, v_BTKE.shape))
        # A new array, which XLA writes in place when the jitted step donates the cache.
        k_BSKE = jax.lax.dynamic_update_slice(self.k_BSKE, k_BTKE, at)
        v_BSKE = jax.lax.dynamic_update_slice(self.v_BSKE, v_BTKE, at)
        return LayerCache(k_BSKE, v_BSKE, self.length + k_BTKE.shape[1])


def device_platform() -> str:
    """"cpu", "gpu" or "tpu": where this twin runs (JAX's default backend). JAX failing to start the platform
    JAX_PLATFORMS names is a HardwareError (shared_config.hardware), not JAX's bare AssertionError."""
    try:
        return jax.default_backend()
    except (AssertionError, RuntimeError) as e:
        raise jax_platforms_error(e) from None


def resolve_attention(attention: str, spec: ModelSpec) -> str:
    """The kernel `attention` names on this machine: `auto` is cuDNN on GPU and Pallas on TPU when eligible, else
    XLA; `blocked` on CPU. A kernel this machine cannot run is a HardwareError (shared_config.hardware)."""
    if attention not in ATTENTION:
        raise ValueError(f"attention={attention!r} is not offered by the JAX twin (one of {', '.join(ATTENTION)})"
                         f"{did_you_mean(attention, ATTENTION)}")
    platform = device_platform()
    check_kernel(attention, platform, f"the JAX twin's attention={attention!r}")
    if attention == "pallas" and not pallas_fits(spec.E):
        return "xla"  # a head dim the kernel does not take: named as what runs
    if attention != "auto":
        return attention
    # cuDNN flash attention needs 16-bit inputs and a head dim that is a multiple of 8, at most 128.
    cudnn_ok = spec.compute_dtype == "bfloat16" and spec.E % 8 == 0 and spec.E <= 128
    if platform == "tpu":  # XLA cannot partition a Pallas kernel: on one device only (several: a mesh?)
        return "pallas" if pallas_fits(spec.E) and jax.device_count() == 1 else "xla"
    if platform != "gpu":
        return "blocked"  # XLA:CPU would compute and exponentiate the masked half of every score matrix
    return "cudnn" if cudnn_ok else "xla"


class Attention(nnx.Module):
    """Causal softmax self-attention, the block's `self_attn` slot: q/k/v projections (or one fused qkv), optional
    per-head RMSNorms (qk-norm before RoPE; HybridNorm's on V), RoPE, grouped-query attention by the named kernel
    (`attention`, resolved per machine by `resolve_attention`), o_proj. Input and output [B, T, D]; softmax in
    float32 in every kernel."""

    def __init__(self, spec: ModelSpec, attention: str, *, rngs: nnx.Rngs):
        D, H, K, E = spec.D, spec.H, spec.K, spec.E
        self.H, self.K, self.E = H, K, E
        self.fused_qkv, self.attention = spec.fused_qkv, attention
        if spec.fused_qkv:
            self.qkv_proj = Linear(D, (H + 2 * K) * E, spec, rngs)
        else:
            self.q_proj = Linear(D, H * E, spec, rngs)
            self.k_proj = Linear(D, K * E, spec, rngs)
            self.v_proj = Linear(D, K * E, spec, rngs)
        self.o_proj = Linear(H * E, D, spec, rngs)
        # Per-head norms over E are RMSNorm whatever norm_type says; HybridNorm adds one on V.
        self.q_norm = RMSNorm(E, spec.norm_eps, False, spec.param_dtype) if has_qk_norm(spec) else None
        self.k_norm = RMSNorm(E, spec.norm_eps, False, spec.param_dtype) if has_qk_norm(spec) else None
        self.v_norm = RMSNorm(E, spec.norm_eps, False, spec.param_dtype) if has_v_norm(spec) else None

    def __call__(self, x_BTD, cos_BTE, sin_BTE, state: LayerCache | None = None, mask_BTS=None):
        """Output [B, T, D] and the updated state (this mixer's decoding cache, None without one): with a `state`,
        this call's keys and values are written into it and the queries read every slot `mask_BTS` allows (None:
        causal over this call's tokens)."""
        B, T, _ = x_BTD.shape
        H, K, E = self.H, self.K, self.E
        if self.fused_qkv:
            q, k, v = jnp.split(self.qkv_proj(x_BTD), [H * E, (H + K) * E], axis=-1)
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
