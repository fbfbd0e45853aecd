"""Norm placements as data: which norm slots a block has, and which half-functions of the twins' `Block`
combine them (jax_model/block.py, torch_model/block.py). Read by the layout table, both twins and the init.

The float64 reference (parity_tests/support/reference.py) writes each placement from its equations instead.
Sources: Pre-/Post-LN (Xiong et al. 2020), Peri-LN (Kim et al. 2025), DeepNorm (Wang et al. 2022,
"DeepNet", decoder-only constants), HybridNorm / HybridNorm* (Zhuo et al. 2025), and the "hybrid
approach" of the normalization survey (Pre-Norm attention, Post-Norm FFN), here `pre_post`.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass

from .spec import ModelSpec, deepnorm_alpha


@dataclass(frozen=True)
class Placement:
    """Where one block's norms sit. n1 = `input_layernorm`, n2 = `post_attention_layernorm`, α = `residual_alpha`."""

    attention: str  # "pre": x + n_out(attn(n1(x))), absent slots skipped | "post": n1(α·x + attn(x))
    mlp: str  # "pre": x + n_out(mlp(n2(x))) | "post": n2(α·x + mlp(x)) | "hybrid": y = n2(x); y + mlp(y)
    _: KW_ONLY  # the slots and terms beyond the two halves, by keyword: Pre-LN's unless a placement says otherwise
    input_norm: bool = True  # slot n1 exists
    output_norms: bool = False  # Peri-LN's `attn_output_norm` and `mlp_output_norm` exist
    qkv_norm: bool = False  # Q, K and V each RMS-normalised per head over head_dim, before RoPE (HybridNorm)
    final_norm: bool = True  # `model.norm` before the head
    deep: bool = False  # DeepNorm: residual weight α = (2N)^(1/4), init gain β = (8N)^(-1/4) on v, o and the MLP


PLACEMENTS = {
    "pre": Placement("pre", "pre"),
    "peri": Placement("pre", "pre", output_norms=True),  # the paper's embedding norm too: the spec's embed_norm
    "post": Placement("post", "post", final_norm=False),
    "deepnorm": Placement("post", "post", final_norm=False, deep=True),
    "pre_post": Placement("pre", "post"),
    "hybrid": Placement("pre", "hybrid", input_norm=False, qkv_norm=True),
    # HybridNorm*: HybridNorm's blocks but block 0, which is HYBRID_STAR_FIRST (block_placement)
    "hybrid_star": Placement("pre", "hybrid", input_norm=False, qkv_norm=True),
}
# HybridNorm*'s block 0: Pre-Norm attention (with its input norm, Q/K/V still normed) and a Pre-Norm FFN.
HYBRID_STAR_FIRST = Placement("pre", "pre", qkv_norm=True)


def block_placement(spec: ModelSpec, i: int) -> Placement:
    """The placement of block `i` (0-based) of `spec`."""
    if spec.norm_placement == "hybrid_star" and i == 0:
        return HYBRID_STAR_FIRST
    return PLACEMENTS[spec.norm_placement]


def residual_alpha(spec: ModelSpec) -> float:
    """The weight of the residual stream in a post-norm half: α under DeepNorm, 1 otherwise."""
    return deepnorm_alpha(spec.L) if PLACEMENTS[spec.norm_placement].deep else 1.0


def has_qk_norm(spec: ModelSpec) -> bool:
    """Whether attention RMS-normalises Q and K per head: `qk_norm`, or a HybridNorm placement."""
    return spec.qk_norm or PLACEMENTS[spec.norm_placement].qkv_norm


def has_v_norm(spec: ModelSpec) -> bool:
    """Whether attention RMS-normalises V per head (HybridNorm's third QKV norm)."""
    return PLACEMENTS[spec.norm_placement].qkv_norm
