"""The spec's rules of the token mixers other than attention: Gated Linear Attention (`mixer: gla`) and its hybrid
stacks (`gla_attention_every`). Called from spec.py's `_check_rules` with the spec; one SpecError per broken rule,
naming the field, its value and what was expected (docs/gla.md, "Spec keys" and "Hybrid stacks")."""

from __future__ import annotations

from .config_file import SpecError


def check_gla_rules(s) -> None:
    """The rules of `mixer: gla` (flash-linear-attention's GatedLinearAttention without its optional extras) on `s`, a
    ModelSpec (not imported: spec.py imports this module), whole stacks or hybrids: the GLA rules hold for the whole
    spec, attention layers included, except grouped keys (n_kv_heads), which a hybrid's attention layers take."""
    for name in ("gla_expand_k", "gla_expand_v", "gla_gate_normalizer"):
        if getattr(s, name) <= 0:
            raise SpecError(f"{name}={getattr(s, name)} must be > 0")
    if s.gla_gate_rank <= 0:
        raise SpecError(f"gla_gate_rank={s.gla_gate_rank} must be > 0")
    _check_hybrid(s)
    if s.mixer != "gla":
        return
    for name, dim in (("gla_expand_k", "d_k"), ("gla_expand_v", "d_v")):
        size = getattr(s, name) * s.d_model  # 1e-12 gave d_k 0: heads of no width
        if abs(size - round(size)) > 1e-9 or round(size) % s.n_heads or round(size) == 0:
            raise SpecError(f"{name}={getattr(s, name)} gives {dim}={size:g} = {name}·d_model, which must be a whole "
                            f"multiple of n_heads={s.n_heads}, above 0")
    if s.gla_attention_every and s.position not in ("rope", "none"):
        # learned positions are added to the embeddings, so they would reach the GLA layers too (fla's hybrid rotates
        # q/k in its attention layers and gives GLA no positions)
        raise SpecError(f"mixer=gla with gla_attention_every={s.gla_attention_every} needs position=rope (its "
                        "attention layers rotate q/k; GLA layers take no positions) or none (NoPE attention), got "
                        f"position={s.position}: learned positions would be added to the GLA layers' input too")
    if not s.gla_attention_every and s.position != "none":
        raise SpecError(f"mixer=gla needs position=none (the recurrence carries order), got position={s.position} "
                        "(a hybrid stack, gla_attention_every >= 2, takes rope or none)")
    if not s.gla_attention_every and s.K != s.n_heads:
        # a hybrid's attention layers take any divisor of n_heads (spec.py's rule, as mixer=attention); GLA layers
        # read no n_kv_heads
        raise SpecError(f"mixer=gla has no grouped keys: n_kv_heads={s.K} must equal n_heads={s.n_heads} (a hybrid "
                        "stack's attention layers, gla_attention_every >= 2, take any divisor of n_heads)")
    if s.qk_norm:
        raise SpecError("qk_norm=true is an attention option; mixer=gla (hybrid stacks included) has none")
    if s.norm_placement in ("deepnorm", "hybrid", "hybrid_star"):
        # HybridNorm normalises attention's Q/K/V and DeepNorm's β gain targets attention's v/o: neither is
        # defined for the GLA layer
        raise SpecError(f"norm_placement={s.norm_placement} is defined for attention; mixer=gla (hybrid stacks "
                        "included) takes pre, peri, post or pre_post")


def _check_hybrid(s) -> None:
    """`gla_attention_every`: 0, or k in [2, n_layers] with mixer gla (k = 1 would be an attention model)."""
    k = s.gla_attention_every
    if k < 0:
        raise SpecError(f"gla_attention_every={k} must be >= 0 (0: every layer GLA; k: every k-th layer attention)")
    if k == 0:
        return
    if s.mixer != "gla":
        raise SpecError(f"gla_attention_every={k} puts attention layers in a GLA stack and is read with mixer=gla; "
                        f"mixer={s.mixer} must leave it 0")
    if k == 1:
        raise SpecError("gla_attention_every=1 makes every layer softmax attention: use mixer: attention "
                        "(gla_attention_every must be 0 or >= 2)")
    if k > s.n_layers:
        raise SpecError(f"gla_attention_every={k} must be <= n_layers={s.n_layers}: layer k-1 is the first attention "
                        "layer, so a larger value gives none")
