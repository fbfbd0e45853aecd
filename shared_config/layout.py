"""The canonical weight layout: one table of every tensor a spec has, read by both twins, the
loaders and savers, the init code, the converters and the tests.

Names follow Hugging Face Llama (`model.layers.{i}.self_attn.q_proj.weight`), extended for the
norm variants. Linear weights are stored [out, in] (torch orientation); the JAX twin's
`nnx.Linear` keeps its kernel [in, out], so its leaf is named `kernel` and transposed.
Fused QKV is a compute choice: the file always holds q/k/v separately; `fuse_qkv` and
`split_qkv` convert between the file layout and the in-memory one.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .placement import PLACEMENTS, block_placement, has_qk_norm, has_v_norm
from .spec import ModelSpec, load_spec


@dataclass(frozen=True)
class Tensor:
    """One row of the canonical layout (`layout(spec)`): a tensor's Hugging Face-style name, its shape as stored
    ([out, in] for Linear weights), its kind and its init rule (shared_config/init.py reads `init` and `value`)."""

    name: str  # canonical key
    shape: tuple[int, ...]  # torch orientation: Linear weights are [out, in]
    kind: str  # "linear" | "embedding" | "param"
    # "linear" | "residual" | "beta" (DeepNorm's gain) | "embedding" | "ones" | "zeros" | "constant" | "normal"
    # (init_std, any shape)
    init: str
    value: float | None = None  # the constant, for init == "constant"

    @property
    def jax_name(self) -> str:
        """Path of the leaf in the JAX twin's NNX state, joined with dots."""
        leaf = {"linear": "kernel", "embedding": "embedding"}.get(self.kind)
        return self.name if leaf is None else self.name.removesuffix("weight") + leaf

    @property
    def jax_shape(self) -> tuple[int, ...]:
        """The shape in the JAX twin: a Linear kernel is [in, out], the transpose of the stored [out, in]."""
        return self.shape[::-1] if self.transposed else self.shape

    @property
    def transposed(self) -> bool:
        """True where the JAX leaf is stored [in, out]."""
        return self.kind == "linear"


def _norm(prefix: str, spec: ModelSpec, dim: int, alpha_init: float) -> list[Tensor]:
    """The tensors of one norm slot, in module order."""
    alpha = Tensor(f"{prefix}.alpha", (1,), "param", "constant", alpha_init)
    if spec.norm_type in ("rms", "layernorm"):
        out = []
    elif spec.norm_type == "dyt":
        out = [alpha]
    elif spec.norm_type == "derf":
        out = [alpha, Tensor(f"{prefix}.shift", (1,), "param", "constant", spec.shift_init)]
    else:  # a value new to CHOICES and not written here is refused, not given RMSNorm's tensors
        raise ValueError(f"layout: no tensors for norm_type={spec.norm_type!r} (docs/extending.md)")
    out.append(Tensor(f"{prefix}.weight", (dim,), "param", "ones"))
    if spec.norm_bias:
        out.append(Tensor(f"{prefix}.bias", (dim,), "param", "zeros"))
    return out


def _block(i: int, spec: ModelSpec) -> list[Tensor]:
    """Block i's tensors; its placement (shared_config/placement.py) decides which norm slots exist."""
    p, D, H, K, E, F = f"model.layers.{i}", spec.D, spec.H, spec.K, spec.E, spec.F
    place = block_placement(spec, i)
    # DeepNorm draws v, o and the MLP matrices at gain β, q and k as usual (DeepNet, decoder-only).
    gain, residual = ("beta", "beta") if place.deep else ("linear", "residual")
    out = _norm(f"{p}.input_layernorm", spec, D, spec.attn_alpha_init) if place.input_norm else []
    mixer = spec.mixer_of(i)  # a hybrid stack's layers differ (gla_attention_every)
    if mixer == "attention":
        out += [
            Tensor(f"{p}.self_attn.q_proj.weight", (H * E, D), "linear", "linear"),
            Tensor(f"{p}.self_attn.k_proj.weight", (K * E, D), "linear", "linear"),
            Tensor(f"{p}.self_attn.v_proj.weight", (K * E, D), "linear", gain),
            Tensor(f"{p}.self_attn.o_proj.weight", (D, H * E), "linear", residual),
        ]
    elif mixer == "gla":
        out += _gla(f"{p}.self_attn", spec)
    else:  # a value added to the spec's CHOICES alone would otherwise get attention's tensors
        raise ValueError(f"layout: no tensors for mixer={mixer!r} (docs/extending.md)")
    if has_qk_norm(spec):  # RMSNorm over head_dim whatever norm_type says
        out.append(Tensor(f"{p}.self_attn.q_norm.weight", (E,), "param", "ones"))
        out.append(Tensor(f"{p}.self_attn.k_norm.weight", (E,), "param", "ones"))
    if has_v_norm(spec):
        out.append(Tensor(f"{p}.self_attn.v_norm.weight", (E,), "param", "ones"))
    if place.output_norms:
        out += _norm(f"{p}.attn_output_norm", spec, D, spec.attn_alpha_init)
    out += _norm(f"{p}.post_attention_layernorm", spec, D, spec.ffn_alpha_init)
    if spec.mlp == "swiglu":
        out.append(Tensor(f"{p}.mlp.gate_proj.weight", (F, D), "linear", gain))
    out.append(Tensor(f"{p}.mlp.up_proj.weight", (F, D), "linear", gain))
    out.append(Tensor(f"{p}.mlp.down_proj.weight", (D, F), "linear", residual))
    if place.output_norms:
        out += _norm(f"{p}.mlp_output_norm", spec, D, spec.ffn_alpha_init)
    return out


# --- Gated Linear Attention (mixer: gla) -------------------------------------------------------------
# flash-linear-attention's GatedLinearAttention under the block's `self_attn` slot: q/k [d_k, D], v/g [d_v, D],
# the low-rank forget gate gk_proj.0 [r, D] then gk_proj.1 [d_k, r] with a bias, o [D, d_v], and one per-head
# output norm over V' shared by all heads (RMSNorm, or the spec's norm_type when gla_output_norm is "same").
def _gla(p: str, spec: ModelSpec) -> list[Tensor]:
    D, dk, dv, r = spec.D, spec.d_k, spec.d_v, spec.gla_gate_rank
    out = [
        Tensor(f"{p}.q_proj.weight", (dk, D), "linear", "linear"),
        Tensor(f"{p}.k_proj.weight", (dk, D), "linear", "linear"),
        Tensor(f"{p}.v_proj.weight", (dv, D), "linear", "linear"),
        Tensor(f"{p}.g_proj.weight", (dv, D), "linear", "linear"),
        Tensor(f"{p}.gk_proj.0.weight", (r, D), "linear", "linear"),
        Tensor(f"{p}.gk_proj.1.weight", (dk, r), "linear", "linear"),
        Tensor(f"{p}.gk_proj.1.bias", (dk,), "param", "zeros"),
        Tensor(f"{p}.o_proj.weight", (D, dv), "linear", "residual"),
    ]
    if spec.gla_output_norm == "rms":
        return out + [Tensor(f"{p}.g_norm.weight", (spec.Vh,), "param", "ones")]
    return out + _norm(f"{p}.g_norm", spec, spec.Vh, spec.attn_alpha_init)


def fuses_qkv(spec: ModelSpec, i: int) -> bool:
    """Whether the twins hold layer i's q/k/v fused: `fused_qkv` is an attention compute choice; GLA keeps them apart
    (in a hybrid stack, its attention layers fuse and its GLA layers do not)."""
    return spec.fused_qkv and spec.mixer_of(i) == "attention"


# GLA's chunkwise-parallel form, read by both twins' gla.py and resources.layer_values: tokens per chunk (a compute
# choice, `set_chunk`, not a spec field) and per sub-chunk (the diagonal blocks' size, as flash-linear-attention's
# chunk_gla)
GLA_CHUNK, GLA_SUB = 64, 16


def state_layout(spec: ModelSpec, mixer: str, batch: int, size: int) -> tuple[tuple[int, ...], str]:
    """The decoding state a layer of `mixer` (`spec.mixer_of(i)`) keeps for `batch` rows of `size` slots, as (shape,
    dtype name) of
    its state array: attention's keys (and values alike) [batch, size, K, E] in the compute dtype, GLA's recurrent
    state [batch, H, K', V'] in float32. The twins' `block.empty_state` makes it, `tokens.check_cache_fits` checks a
    cache against it. Raises ValueError for a mixer with no state here."""
    if mixer == "attention":
        return (batch, size, spec.K, spec.E), spec.compute_dtype
    if mixer == "gla":
        return (batch, spec.H, spec.Kh, spec.Vh), "float32"
    raise ValueError(f"state_layout: no decoding state for mixer={mixer!r} (docs/extending.md)")


def state_arrays(mixer: str) -> int:
    """How many arrays of `state_layout`'s shape and dtype a layer of `mixer` keeps: attention 2 (keys and values),
    GLA 1 (its recurrent state). Raises ValueError for a mixer with no state here."""
    if mixer == "attention":
        return 2
    if mixer == "gla":
        return 1
    raise ValueError(f"state_arrays: no decoding state for mixer={mixer!r} (docs/extending.md)")
# --- end of Gated Linear Attention ----------------------------------------------------------------------


# --- conditional computation (routing.py) ---------------------------------------------------------


def _routing(i: int, spec: ModelSpec) -> list[Tensor]:
    """The router tensors of block i, after the block's own: none unless block i is routed.

    mod: the router's [D] score weight (no bias). dtf (block i is the dynamic block of the pair i−1, i):
    the prior's RMSNorm weight, its SwiGLU FFN (width `spec.dtf_prior_dim`) and the four gate scalars.
    Both: the causal predictor Linear(D, D/2) → SiLU → Linear(D/2, 1), no biases.
    """
    if i not in spec.routed_layers:
        return []
    p, D = f"model.layers.{i}", spec.D
    if spec.routing == "mod":
        out = [Tensor(f"{p}.router.weight", (D,), "param", "normal")]
    elif spec.routing == "dtf":
        P = spec.dtf_prior_dim
        out = [
            Tensor(f"{p}.router.prior_norm.weight", (D,), "param", "ones"),
            Tensor(f"{p}.router.prior_ffn.gate_proj.weight", (P, D), "linear", "linear"),
            Tensor(f"{p}.router.prior_ffn.up_proj.weight", (P, D), "linear", "linear"),
            Tensor(f"{p}.router.prior_ffn.down_proj.weight", (D, P), "linear", "linear"),
            Tensor(f"{p}.router.beta_ce", (1,), "param", "constant", -0.3),
            Tensor(f"{p}.router.beta_cu", (1,), "param", "constant", -0.6),
            Tensor(f"{p}.router.o_ce", (1,), "param", "constant", 1.025),
            Tensor(f"{p}.router.m_cu", (1,), "param", "constant", 1.1),
        ]
    else:
        raise ValueError(f"layout: no router tensors for routing={spec.routing!r} (docs/extending.md)")
    return out + [
        Tensor(f"{p}.router_predictor.fc1.weight", (D // 2, D), "linear", "linear"),
        Tensor(f"{p}.router_predictor.fc2.weight", (1, D // 2), "linear", "linear"),
    ]


def layout(spec: ModelSpec) -> list[Tensor]:
    """Every canonical tensor of `spec` (a spec, or what `load_spec` takes), in module order: the contents of a
    checkpoint file."""
    spec = load_spec(spec)
    out = [Tensor("model.embed_tokens.weight", (spec.V, spec.D), "embedding", "embedding")]
    if spec.position == "learned":
        out.append(Tensor("model.embed_positions.weight", (spec.max_seq_len, spec.D), "embedding", "embedding"))
    if spec.embed_scale == "learnable":
        out.append(Tensor("model.embed_scale", (1,), "param", "constant", math.sqrt(spec.D)))
    if spec.embed_norm:  # a model-level norm outside every block, as model.norm: DyT's "other" layers' alpha
        out += _norm("model.embed_norm", spec, spec.D, spec.final_alpha_init)
    for i in range(spec.L):
        out += _block(i, spec) + _routing(i, spec)
    if PLACEMENTS[spec.norm_placement].final_norm:
        out += _norm("model.norm", spec, spec.D, spec.final_alpha_init)
    if not spec.tie_embeddings:
        out.append(Tensor("lm_head.weight", (spec.V, spec.D), "linear", "linear"))
    return out


QKV = ("q_proj", "k_proj", "v_proj")


def layer_of(name: str) -> int | None:
    """The layer index in a canonical name (`model.layers.3.self_attn.q_proj.weight`: 3), None outside the blocks."""
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    return None if m is None else int(m[1])


def _fused_here(name: str, spec: ModelSpec, leaf: str) -> bool:
    """Whether `name` is `self_attn.{leaf}` of a layer whose q/k/v the twins fuse (`fuses_qkv`)."""
    return name.endswith(f".self_attn.{leaf}") and fuses_qkv(spec, layer_of(name))


def model_layout(spec: ModelSpec) -> list[Tensor]:
    """The tensors the twins hold in memory: `layout(spec)` with q/k/v fused in the layers `fuses_qkv` names."""
    out = []
    for t in layout(spec):
        if _fused_here(t.name, spec, "q_proj.weight"):
            fused = t.name.replace("q_proj", "qkv_proj")
            out.append(Tensor(fused, ((spec.H + 2 * spec.K) * spec.E, spec.D), "linear", "linear"))
        elif not (_fused_here(t.name, spec, "k_proj.weight") or _fused_here(t.name, spec, "v_proj.weight")):
            out.append(t)
    return out


def fuse_qkv(weights: dict, spec: ModelSpec, concat: Callable = np.concatenate) -> dict:
    """File layout -> in-memory layout: rows of q, then k, then v, in one [(H+2K)E, D] matrix per fused layer.

    Works on any array type whose `concat` joins a list along axis 0 (numpy, jnp, torch).
    """
    out = {}
    for name, x in weights.items():  # the fused matrix where q was: module order kept
        if _fused_here(name, spec, "q_proj.weight"):
            p = name.removesuffix(".q_proj.weight")
            out[f"{p}.qkv_proj.weight"] = concat([weights[f"{p}.{n}.weight"] for n in QKV])
        elif not (_fused_here(name, spec, "k_proj.weight") or _fused_here(name, spec, "v_proj.weight")):
            out[name] = x
    return out


def split_qkv(weights: dict, spec: ModelSpec) -> dict:
    """In-memory layout -> file layout (the inverse of `fuse_qkv`; slicing, so any array type)."""
    out, q, k = {}, spec.H * spec.E, spec.K * spec.E
    for name, w in weights.items():  # q, k, v where the fused matrix was: module order kept
        if _fused_here(name, spec, "qkv_proj.weight"):
            p = name.removesuffix(".qkv_proj.weight")
            (out[f"{p}.q_proj.weight"], out[f"{p}.k_proj.weight"],
             out[f"{p}.v_proj.weight"]) = w[:q], w[q : q + k], w[q + k :]
        else:
            out[name] = w
    return out


def flat_taps(taps: dict, prefix: str = "") -> dict:
    """Nested taps ({"model.layers.0": {"attn_out": ...}}) as {"model.layers.0.attn_out": ...}, in the order they
    were recorded: the order the model computes them (a pytree map would sort the names: layers.10 before layers.2)."""
    flat = {}
    for name, x in taps.items():
        flat.update(flat_taps(x, f"{prefix}{name}.") if isinstance(x, dict) else {f"{prefix}{name}": x})
    return flat


def group_names(names) -> str:
    """`model.layers.{0..15}.mlp.up_proj.weight, lm_head.weight`: names differing only by layer folded."""
    groups: dict[str, list[int]] = defaultdict(list)
    for name in names:
        m = re.match(r"^(.*\.layers\.)(\d+)(\..*)$", name)
        groups[f"{m[1]}{{}}{m[3]}" if m else name].append(int(m[2]) if m else -1)
    parts = []
    for pattern, idx in groups.items():
        if "{}" not in pattern:
            parts.append(pattern)
            continue
        idx = sorted(set(idx))
        rng = f"{idx[0]}" if len(idx) == 1 else (
            f"{idx[0]}..{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) else ",".join(map(str, idx))
        )
        parts.append(pattern.replace("{}", "{" + rng + "}") if len(idx) > 1 else pattern.replace("{}", rng))
    return ", ".join(parts)
