"""The JAX twin's decoder (Flax NNX); torch_model/model.py is the same file in PyTorch.

Notation: B batch, T tokens, D model dim, V vocab. Attribute paths follow the canonical names
(`model.layers.0.self_attn.q_proj`), so the NNX state is the canonical layout up to leaf names.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from shared_config import ModelSpec, load_spec, rope_inv_freq

from .layers import DTYPES, ZEROS, Block, Linear, make_norm, resolve_attention, rope_cos_sin
from .weights import draw_weights


class TransformerModel(nnx.Module):
    """Embeddings, blocks and the final norm (Hugging Face's `LlamaModel`)."""

    def __init__(self, spec: ModelSpec, attention: str, *, rngs: nnx.Rngs):
        self.spec = spec
        D, dtypes = spec.D, dict(dtype=DTYPES[spec.compute_dtype], param_dtype=DTYPES[spec.param_dtype])
        self.embed_tokens = nnx.Embed(spec.V, D, embedding_init=ZEROS, **dtypes, rngs=rngs)
        learned = spec.position == "learned"
        self.embed_positions = nnx.Embed(spec.max_seq_len, D, embedding_init=ZEROS, **dtypes, rngs=rngs) if learned else None
        learnable = spec.embed_scale == "learnable"
        self.embed_scale = nnx.Param(jnp.full((1,), math.sqrt(D), DTYPES[spec.param_dtype])) if learnable else None
        self.layers = nnx.List([Block(spec, attention, rngs=rngs) for _ in range(spec.L)])
        self.norm = make_norm(spec, spec.final_alpha_init) if spec.norm_placement != "post" else None

    def __call__(self, tokens_BT, taps: dict | None = None):
        spec, T = self.spec, tokens_BT.shape[1]
        if T > spec.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={spec.max_seq_len}")
        positions_T = jnp.arange(T)
        x_BTD = self.embed_tokens(tokens_BT)
        if self.embed_positions is not None:
            x_BTD = x_BTD + self.embed_positions(positions_T)
        if spec.embed_scale == "learnable":
            x_BTD = x_BTD * self.embed_scale[...].astype(x_BTD.dtype)
        elif spec.embed_scale == "constant":
            x_BTD = x_BTD * math.sqrt(spec.D)
        cos_TE, sin_TE = rope_cos_sin(rope_inv_freq(spec), positions_T) if spec.position == "rope" else (None, None)
        record(taps, "model.embed", x_BTD)
        for i, layer in enumerate(self.layers):
            x_BTD = layer(x_BTD, cos_TE, sin_TE, taps=None if taps is None else taps.setdefault(f"model.layers.{i}", {}))
        if self.norm is not None:
            x_BTD = self.norm(x_BTD)
        record(taps, "model.norm", x_BTD)
        return x_BTD


class Transformer(nnx.Module):
    """Decoder-only LM (Hugging Face's `LlamaForCausalLM`): int tokens [B, T] -> float32 logits [B, T, V].

    Weights are drawn natively from the layout table's init rules with `rngs`; load a canonical
    file with `from_safetensors` for bit-identical weights across the twins.
    """

    def __init__(self, spec, *, rngs: nnx.Rngs, attention: str = "auto"):
        spec = load_spec(spec)
        self.spec = spec
        attention = resolve_attention(attention, spec)
        self.model = TransformerModel(spec, attention, rngs=rngs)
        self.lm_head = None if spec.tie_embeddings else Linear(spec.D, spec.V, spec, rngs)
        draw_weights(self, rngs)

    def __call__(self, tokens_BT, taps: dict | None = None):
        x_BTD = self.model(tokens_BT, taps)
        if self.lm_head is None:
            logits_BTV = self.model.embed_tokens.attend(x_BTD)
        else:
            logits_BTV = self.lm_head(x_BTD)
        logits_BTV = logits_BTV.astype(jnp.float32)  # logits in float32
        record(taps, "logits", logits_BTV)
        return logits_BTV


def record(taps: dict | None, name: str, x) -> None:
    """Keep an intermediate activation for the parity report."""
    if taps is not None:
        taps[name] = x
