"""The model spec: one flat, frozen dataclass whose fields are exactly the YAML keys.

Both twins, the converters and the tests read a `ModelSpec`; no other place defines a default.
Derived values (`K`, `E`, ...) are read-only properties, never written back into the fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .config_file import (FLOAT32_MAX, FLOAT32_NORMAL, INT32_MAX, SpecError, check_float32, check_type,
                          from_mapping, load_preset_or_file, yaml_names)
from .limits import spelled
from .mixer_rules import check_gla_rules
from .routing_rules import check_routing_rules

SPECS_DIR = Path(__file__).parent / "specs"


# Accepted values of each enum field; aliases map to the name used everywhere in the code.
CHOICES = {
    "norm_type": ("rms", "layernorm", "dyt", "derf"),
    # shared_config/placement.py
    "norm_placement": ("pre", "peri", "post", "deepnorm", "hybrid", "hybrid_star", "pre_post"),
    "embed_scale": ("none", "learnable", "constant"),
    "position": ("rope", "learned", "none"),
    "rope_scaling": ("none", "llama3"),
    "mlp": ("swiglu", "gelu", "gelu_tanh", "relu2"),
    "init_scheme": ("normal", "xavier_uniform", "xavier_normal"),
    "param_dtype": ("float32", "bfloat16"),
    "compute_dtype": ("float32", "bfloat16"),
    # token mixer (Gated Linear Attention fields below)
    "mixer": ("attention", "gla"),
    "gla_output_norm": ("rms", "same"),
    # conditional computation (routing.py)
    "routing": ("none", "mod", "dtf"),
    "routing_layers": ("every_other", "all"),
    "routing_gate": ("raw", "sigmoid"),
}
ALIASES = {"norm_type": {"tanh": "dyt", "shifterf": "derf"}}
# How the twins compute, not what a checkpoint holds: a spec given beside a file may differ from the file's in these
COMPUTE_FIELDS = ("compute_dtype", "fused_qkv")


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """The architecture, field for field the YAML keys of a spec file (shared_config/specs/*.yaml; docs/spec.md):
    both twins build from it and neither adds a default of its own. Frozen; every field is type-checked and every
    rule between fields enforced on construction (SpecError naming the field and what was expected). Two specs are
    equal when they describe the same architecture (`to_dict`, defaults resolved). The one-letter properties are
    the sizes in the model files' notation: V vocab, D model width, L layers, H query heads, K kv heads, E head
    dim, F MLP width; d_k, d_v, Kh, Vh are GLA's key and value widths (all heads, per head)."""

    # sizes
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_seq_len: int
    n_kv_heads: int | None = None  # None: n_heads (plain multi-head attention)
    head_dim: int | None = None  # None: d_model // n_heads
    # normalization
    norm_type: str = "rms"
    norm_eps: float = 1e-6
    norm_placement: str = "pre"
    norm_bias: bool = False
    attn_alpha_init: float = 0.5
    ffn_alpha_init: float = 0.5
    final_alpha_init: float = 0.5
    shift_init: float = 0.0
    embed_scale: str = "none"
    embed_norm: bool = False  # a norm of the embeddings' output (Peri-LN's, OLMo-core's embedding_norm; docs/spec.md)
    qk_norm: bool = False
    # positions
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # "llama3": Llama 3.x frequency scaling with the four fields below
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    # blocks
    fused_qkv: bool = True
    mlp: str = "swiglu"
    tie_embeddings: bool = False
    # init
    init_scheme: str = "normal"
    init_std: float = 0.02
    embed_init_std: float = 0.02
    residual_scaling: bool | None = None  # None: on, except under deepnorm (whose β init replaces it)
    # dtypes
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    # token mixer: softmax attention, or Gated Linear Attention (Yang et al. 2023, arXiv 2312.06635) in every layer
    # but the softmax attention layers gla_attention_every asks for (mixer_of; shared_config/mixer_rules.py)
    mixer: str = "attention"
    gla_expand_k: float = 0.5  # d_k = gla_expand_k · d_model (keys and queries, all heads)
    gla_expand_v: float = 1.0  # d_v = gla_expand_v · d_model (values and output gate, all heads)
    gla_gate_rank: int = 16  # rank of the forget-gate projection (x W_gk0) W_gk1 + b
    gla_gate_normalizer: float = 16.0  # log α = logsigmoid(gk) / gla_gate_normalizer
    gla_output_norm: str = "rms"  # per-head output norm: "rms" (flash-linear-attention's) or "same" (norm_type)
    # mixer gla: 0 every layer GLA; k >= 2 a hybrid stack, layers i with (i + 1) % k == 0 softmax attention (MiniMax-01
    # k 8, Qwen3-Next and Kimi Linear k 4), the others GLA; attention layers take position rope or none
    gla_attention_every: int = 0
    # --- conditional computation (routing.py; docs/routing.md) ---
    routing: str = "none"  # "mod": Mixture-of-Depths (Raposo et al. 2024); "dtf": surprise-based routing
    routing_capacity: float = 0.125  # γ: a routed block runs floor(γ·T) tokens per sequence
    routing_layers: str = "every_other"  # which blocks are routed: the odd-indexed ones, or all (mod only)
    routing_gate: str = "raw"  # mod: what multiplies a routed block's update, the router score or its sigmoid
    dtf_prior_factor: float = 0.25  # dtf: the prior FFN's width is max(2, ceil(D·f)) rounded up to even
    dtf_window: int = 100  # dtf: positions in the causal moving average of D_st

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, check_type(f, getattr(self, f.name), CHOICES, ALIASES))
        _check_rules(self)

    # Derived sizes, in the notation of the model files.
    @property
    def V(self) -> int:
        return self.vocab_size

    @property
    def D(self) -> int:
        return self.d_model

    @property
    def L(self) -> int:
        return self.n_layers

    @property
    def H(self) -> int:
        return self.n_heads

    @property
    def K(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def E(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def F(self) -> int:
        return self.d_ff

    # GLA sizes: d_k and d_v over all heads, K' and V' per head (read only when mixer == "gla").
    @property
    def d_k(self) -> int:
        return round(self.gla_expand_k * self.d_model)

    @property
    def d_v(self) -> int:
        return round(self.gla_expand_v * self.d_model)

    @property
    def Kh(self) -> int:
        return self.d_k // self.n_heads

    @property
    def Vh(self) -> int:
        return self.d_v // self.n_heads

    def mixer_of(self, i: int) -> str:
        """The token mixer of layer i: the one place the hybrid pattern lives (`gla_attention_every`; everything else,
        the layout, both twins' blocks, the FLOPs, the conversions, asks here)."""
        k = self._attention_period
        return "attention" if k and (i + 1) % k == 0 else self.mixer

    @property
    def _attention_period(self) -> int:
        """Layers i with (i + 1) % k == 0 are softmax attention: k = 1 for mixer attention, gla_attention_every for
        mixer gla, 0 (none) for any other mixer (its layers are its own, not counted as attention)."""
        return self.gla_attention_every if self.mixer == "gla" else int(self.mixer == "attention")

    @property
    def attention_layers(self) -> range:
        """Indices of the softmax attention layers (a range: lazy, whatever n_layers): every layer for mixer attention,
        a hybrid stack's every k-th (`mixer_of`), else none."""
        k = self._attention_period
        return range(k - 1, self.L, k) if k else range(0)

    @property
    def layer_mixers(self) -> dict[str, int]:
        """{mixer: how many layers have it}, the mixers with none left out; counted, not walked (`len` of a range
        past 2**63 raises OverflowError, and a loop over a claimed 10**400 layers never ends)."""
        k = self._attention_period
        attention = self.L // k if k else 0
        return {m: n for m, n in (("attention", attention), (self.mixer, self.L - attention)) if n}

    @property
    def residual_scaled(self) -> bool:
        """`residual_scaling` resolved: unset means on, except under deepnorm (its β init takes the place)."""
        return self.norm_placement != "deepnorm" if self.residual_scaling is None else self.residual_scaling

    @property
    def routed_layers(self) -> tuple[int, ...]:
        """Indices of the routed blocks: none, every odd index (dtf: the dynamic block of each pair), or all."""
        if self.routing == "none":
            return ()
        return tuple(range(self.L)) if self.routing_layers == "all" else tuple(range(1, self.L, 2))

    def routed_tokens(self, seq_len: int) -> int:
        """k = floor(routing_capacity · seq_len): the tokens of a `seq_len`-token sequence that each routed block runs
        (Mixture-of-Depths' capacity; every routed block and DTF's dynamic blocks alike). 0 is possible: see
        TrainConfig.model_spec, which refuses it for training."""
        return math.floor(self.routing_capacity * seq_len)

    @property
    def dtf_prior_dim(self) -> int:
        """The DTF prior FFN's hidden width: max(2, ceil(D·f)), rounded up to even."""
        p = max(2, math.ceil(self.D * self.dtf_prior_factor))
        return p + p % 2

    def to_dict(self) -> dict[str, Any]:
        """The YAML keys, with `n_kv_heads`, `head_dim` and `residual_scaling` resolved so that equal
        architectures give equal dicts."""
        d = dataclasses.asdict(self)
        d["n_kv_heads"], d["head_dim"], d["residual_scaling"] = self.K, self.E, self.residual_scaled
        return d

    def to_json(self) -> str:
        """`to_dict` as canonical JSON (sorted keys): how a checkpoint's metadata stores the spec."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def __eq__(self, other) -> bool:  # equal architectures are equal specs, however defaults were written
        return isinstance(other, ModelSpec) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def differences(self, required: Mapping[str, Any]) -> list[str]:
        """`key=value` for each field whose value is not the one `required` gives it (what another
        implementation, Hugging Face's Llama or flash-linear-attention's GLA, cannot compute)."""
        return [f"{k}={spelled(getattr(self, k))}" for k, v in required.items() if getattr(self, k) != v]

    def replace(self, **changes) -> ModelSpec:
        """The spec with `changes`; `n_kv_heads` and `head_dim` left unset stay derived (n_heads=4 changes head_dim)."""
        return ModelSpec.from_dict({**dataclasses.asdict(self), **changes})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        """The spec of a mapping of YAML keys; SpecError for an unknown key (with the nearest known one), a wrong
        type or a broken rule."""
        return from_mapping(cls, d, "spec")


def _check_rules(s: ModelSpec) -> None:
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "rope_original_max_seq_len"):
        if getattr(s, name) <= 0:
            raise SpecError(f"{name}={getattr(s, name)} must be > 0")
    for name in ("max_seq_len", "rope_original_max_seq_len"):  # context lengths: 400 digits were rope_inv_freq's
        # OverflowError, or the RoPE angles' error naming rope_theta
        if getattr(s, name) > INT32_MAX:
            raise SpecError(f"{name}={getattr(s, name)} must be <= {INT32_MAX:,} (positions are int32 in the twins)")
    for name in ("n_kv_heads", "head_dim"):
        if getattr(s, name) is not None and getattr(s, name) <= 0:
            raise SpecError(f"{name}={getattr(s, name)} must be > 0")
    if s.n_heads % s.K:
        raise SpecError(f"n_kv_heads={s.K} must divide n_heads={s.n_heads}")
    if s.head_dim is None and s.d_model % s.n_heads:
        raise SpecError(f"d_model={s.d_model} must be divisible by n_heads={s.n_heads} when head_dim is not given")
    if s.position == "rope" and s.E % 2:  # named by the key given: a derived head_dim by d_model, which the user gave
        raise SpecError(f"head_dim={s.E} must be even when position=rope" if s.head_dim is not None else
                        f"d_model={s.d_model} must be an even multiple of n_heads={s.n_heads} when position=rope: "
                        "head_dim = d_model / n_heads, whose dimensions RoPE rotates in pairs")
    for name in ("norm_eps", "init_std", "embed_init_std", "rope_theta", "rope_scaling_factor"):
        if getattr(s, name) <= 0:
            raise SpecError(f"{name}={getattr(s, name)} must be > 0")
    if s.rope_scaling == "llama3":
        if s.position != "rope":
            raise SpecError(f"rope_scaling=llama3 needs position=rope, got position={s.position}")
        if s.rope_scaling_factor < 1:  # llama3 stretches long wavelengths; a factor < 1 would compress them
            raise SpecError(f"rope_scaling_factor={s.rope_scaling_factor} must be >= 1 when rope_scaling=llama3 "
                            "(it divides the long-wavelength frequencies)")
        if not 0 < s.rope_low_freq_factor < s.rope_high_freq_factor:
            raise SpecError(
                f"rope_low_freq_factor={s.rope_low_freq_factor} must be > 0 and < "
                f"rope_high_freq_factor={s.rope_high_freq_factor}"
            )
    _check_float32_range(s)
    check_gla_rules(s)
    _check_placement_rules(s)
    check_routing_rules(s)


def _check_float32_range(s: ModelSpec) -> None:
    """Values the twins hold or compute with in float32 (initial parameters, the init draws' std, norm_eps, GLA's gate
    normalizer, RoPE's angles) must be normal float32 numbers: past its range a spec gave inf weights with only a numpy
    warning, or NaN logits in JAX alone (RoPE); 1e-320 as init_std started every weight at 0."""
    for name in ("attn_alpha_init", "ffn_alpha_init", "final_alpha_init", "shift_init"):
        check_float32(name, getattr(s, name), "it initialises a float32 parameter", zero=True)
    for name in ("init_std", "embed_init_std"):
        if getattr(s, name) > FLOAT32_MAX / 16:  # normal draws stay within 16 std
            raise SpecError(f"{name}={getattr(s, name)} must be <= 2.1e37: its draws must fit float32")
        check_float32(name, getattr(s, name), "the std of float32 weights")
    if s.init_scheme == "normal":  # the residual scaling or DeepNorm's gain shrinks init_std for some weights
        _check_scaled_std(s)
    check_float32("norm_eps", s.norm_eps, "it is added to float32 statistics")
    check_float32("gla_gate_normalizer", s.gla_gate_normalizer, "float32 gates are divided by it")
    # the largest angle: the last position times the largest inverse frequency, theta^(-(E-2)/E) when theta < 1
    # (llama3 scaling only divides frequencies, by a factor >= 1)
    # (1 - 2/E, not (E-2)/E: a 400-digit head_dim was float()'s OverflowError)
    log_angle = max(0.0, -math.log(s.rope_theta) * (1 - 2 / s.E)) + math.log(max(1, s.max_seq_len - 1))
    if s.position == "rope" and log_angle > math.log(FLOAT32_MAX):
        raise SpecError(f"rope_theta={s.rope_theta} gives RoPE angles past float32's range (position · "
                        f"theta^(-2j/head_dim) up to 1e{log_angle / math.log(10):.0f})")


def deepnorm_alpha(n_layers: int) -> float:
    """DeepNet's decoder-only residual weight α = (2N)^(1/4), N = n_layers (N = 2: √2); placement.residual_alpha."""
    return (2 * n_layers) ** 0.25


def deepnorm_beta(n_layers: int) -> float:
    """DeepNet's decoder-only init gain β = (8N)^(-1/4), N = n_layers (N = 2: 1/2); init.init_rule, and the spec's
    check of the std it scales (here, as placement.py imports this module)."""
    return (8 * n_layers) ** -0.25


def _check_scaled_std(s: ModelSpec) -> None:
    """The std init_rule draws o_proj and down_proj with (init_std / sqrt(2·n_layers), the residual scaling), or v, o
    and the MLP under DeepNorm (init_std · β), must be a normal float32 number too: init_std=2e-38 of 50 layers drew
    them with a std of 2e-39, subnormal (XLA flushes such weights to 0, torch keeps them)."""
    deep = s.norm_placement == "deepnorm"  # placement.PLACEMENTS' one `deep` row (as residual_scaled reads it)
    if not deep and not s.residual_scaled:
        return
    try:
        factor = deepnorm_beta(s.L) if deep else 1 / math.sqrt(2 * s.L)
    except OverflowError:  # layers past float's range: the memory check names that size (a std rule here would not)
        return
    which, how = (("v_proj, o_proj and the MLP", "DeepNorm's β") if deep
                  else ("o_proj and down_proj", "1/sqrt(2·n_layers)"))
    check_float32(f"init_std · {how}", s.init_std * factor, f"the std of {which}, from init_std={s.init_std}; at "
                  f"n_layers={s.L}, init_std must be at least {least_std(factor):.2g}")


def least_std(factor: float) -> float:
    """The least init_std of two significant digits whose std scaled by `factor` float32 holds as a normal number:
    the bound rounded up (`:.2g` rounded 2.6018e-38 down, and init_std=2.6e-38 was refused "at least 2.6e-38")."""
    exponent = math.floor(math.log10(FLOAT32_NORMAL / factor)) - 1
    digits = math.ceil(FLOAT32_NORMAL / factor / 10.0**exponent)
    while abs(np.float32(float(f"{digits}e{exponent}") * factor)) < FLOAT32_NORMAL:  # check_float32's test
        digits += 1
    return float(f"{digits}e{exponent}")


# --- norm placements (shared_config/placement.py) ------------------------------------------------------
def _check_placement_rules(s: ModelSpec) -> None:
    if s.norm_placement == "deepnorm" and s.residual_scaling:
        raise SpecError(
            "residual_scaling=true is not allowed with norm_placement=deepnorm: DeepNorm's init gain β replaces "
            "the 1/sqrt(2L) scaling (leave residual_scaling unset or false)"
        )
    if s.norm_placement in ("hybrid", "hybrid_star") and s.qk_norm:
        raise SpecError(
            f"qk_norm=true is not allowed with norm_placement={s.norm_placement}: HybridNorm already normalises "
            "Q, K and V per head (leave qk_norm false)"
        )


def load_spec(source: str | Path | Mapping[str, Any] | ModelSpec) -> ModelSpec:
    """A spec from a preset name (`tiny`), a YAML path, a dict, or a spec."""
    if isinstance(source, ModelSpec):
        return source
    if isinstance(source, Mapping):
        return ModelSpec.from_dict(source)
    return load_preset_or_file(source, SPECS_DIR, "spec", ModelSpec.from_dict)


def preset_names() -> list[str]:
    """The spec presets shipped in shared_config/specs (`tiny`, `small`, `llama-1b`, ...)."""
    return yaml_names(SPECS_DIR)


