"""The PyTorch twin's decoder; jax_model/model.py is the same file in JAX.

Notation: B batch, T tokens, D model dim, V vocab. Attribute paths follow the canonical names
(`model.layers.0.self_attn.q_proj`), so `state_dict()` keys are the canonical names.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from shared_config import ModelSpec, load_spec, rope_inv_freq

from .layers import DTYPES, Block, Linear, make_norm, resolve_attention, rope_cos_sin
from .weights import draw_weights


class TransformerModel(nn.Module):
    """Embeddings, blocks and the final norm (Hugging Face's `LlamaModel`)."""

    def __init__(self, spec: ModelSpec, attention: str):
        super().__init__()
        self.spec = spec
        D, dtypes = spec.D, dict(dtype=DTYPES[spec.param_dtype])
        self.embed_tokens = nn.Embedding(spec.V, D, **dtypes)
        learned = spec.position == "learned"
        self.embed_positions = nn.Embedding(spec.max_seq_len, D, **dtypes) if learned else None
        learnable = spec.embed_scale == "learnable"
        self.embed_scale = nn.Parameter(torch.full((1,), math.sqrt(D), dtype=DTYPES[spec.param_dtype])) if learnable else None
        self.layers = nn.ModuleList([Block(spec, attention) for _ in range(spec.L)])
        self.norm = make_norm(spec, spec.final_alpha_init) if spec.norm_placement != "post" else None
        self.compute_dtype = DTYPES[spec.compute_dtype]

    def forward(self, tokens_BT, taps: dict | None = None):
        spec, T = self.spec, tokens_BT.shape[1]
        if T > spec.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={spec.max_seq_len}")
        positions_T = torch.arange(T, device=tokens_BT.device)
        x_BTD = self.embed_tokens(tokens_BT).to(self.compute_dtype)
        if self.embed_positions is not None:
            x_BTD = x_BTD + self.embed_positions(positions_T).to(self.compute_dtype)
        if spec.embed_scale == "learnable":
            x_BTD = x_BTD * self.embed_scale.to(x_BTD.dtype)
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


class Transformer(nn.Module):
    """Decoder-only LM (Hugging Face's `LlamaForCausalLM`): int tokens [B, T] -> float32 logits [B, T, V].

    Weights are drawn natively from the layout table's init rules with `generator`; load a canonical
    file with `from_safetensors` for bit-identical weights across the twins.
    """

    def __init__(self, spec, *, generator: torch.Generator | None = None, attention: str = "auto"):
        super().__init__()
        spec = load_spec(spec)
        self.spec = spec
        attention = resolve_attention(attention, spec)
        self.model = TransformerModel(spec, attention)
        self.lm_head = None if spec.tie_embeddings else Linear(spec.D, spec.V, spec)
        draw_weights(self, generator)

    def forward(self, tokens_BT, taps: dict | None = None):
        x_BTD = self.model(tokens_BT, taps)
        if self.lm_head is None:
            logits_BTV = x_BTD @ self.model.embed_tokens.weight.to(x_BTD.dtype).T
        else:
            logits_BTV = self.lm_head(x_BTD)
        logits_BTV = logits_BTV.to(torch.float32)  # logits in float32
        record(taps, "logits", logits_BTV)
        return logits_BTV


def record(taps: dict | None, name: str, x) -> None:
    """Keep an intermediate activation for the parity report."""
    if taps is not None:
        taps[name] = x
