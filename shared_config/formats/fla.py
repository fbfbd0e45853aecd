"""flash-linear-attention GLA directories <-> canonical weights and spec (numpy only).

flash-linear-attention (fla-org/flash-linear-attention, `fla/models/gla`) saves a `GLAForCausalLM` as a Hugging
Face-style directory: `config.json` (`model_type: gla`) + `model.safetensors`. Its block is Pre-LN RMSNorm with
the GLA layer and a SwiGLU MLP; the tensor names differ from ours by the literal table below. The spec fields
config.json cannot hold (compute and init choices) travel in `model.safetensors`' metadata, as in `hf`.
Its package needs Triton to import; this module reads and writes its documented layout without it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..files import CheckpointError, atomic_dir, atomic_write, json_text, read_json
from ..layout import layout
from ..limits import quote, spelled
from ..config_file import SpecError
from ..spec import ModelSpec, load_spec
from .checks import (check_not_pickled, check_size, check_weights, held_params, resolve_spec, spec_from_metadata,
                     without_tied_copy)
from .config_json import ConfigValueError, config_value
from .safetensors import read_safetensors, safetensors_header, save_safetensors

# spec field <- config.json key
CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_heads",
    "d_ff": "intermediate_size",
    "max_seq_len": "max_position_embeddings",
    "norm_eps": "norm_eps",
    "tie_embeddings": "tie_word_embeddings",
    "gla_expand_k": "expand_k",
    "gla_expand_v": "expand_v",
}
# An omitted key is read with GLAConfig's default (shared_config.formats.config_json.DEFAULTS["gla"]).
# The only values we implement of keys that change the computation (an absent key means this value).
CONFIG_REQUIRED = {
    "num_kv_heads": None, "feature_map": None, "use_short_conv": False, "use_output_gate": True, "clamp_min": None,
    "hidden_act": "swish", "elementwise_affine": True, "use_gk": True, "use_gv": False,
}
# What every flash-linear-attention GLA computes, as spec values. Its block builds the layer without passing
# gate_low_rank_dim or gate_logit_normalizer: they are always the layer's defaults, 16 and 16.
FLA_SPEC = {
    "mixer": "gla", "norm_type": "rms", "norm_placement": "pre", "norm_bias": False, "embed_scale": "none",
    "embed_norm": False, "position": "none", "mlp": "swiglu", "qk_norm": False, "gla_output_norm": "rms",
    "gla_gate_rank": 16, "gla_gate_normalizer": 16.0,
}

# canonical name pattern -> flash-linear-attention name ({i}: the layer). The per-head output norm is
# `g_norm_swish_gate` when config.fuse_norm (the default), else `g_norm`: the same weight.
NAMES = [
    (r"model\.embed_tokens\.weight", "model.embeddings.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"model.layers.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.g_norm\.weight", r"model.layers.\1.attn.{g_norm}.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.(.*)", r"model.layers.\1.attn.\2"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"model.layers.\1.mlp_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(.*)", r"model.layers.\1.mlp.\2"),
    (r"(model\.norm\.weight|lm_head\.weight)", r"\1"),
]


def fla_name(name: str, fuse_norm: bool = True) -> str:
    """The flash-linear-attention name of a canonical tensor."""
    for pattern, repl in NAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name).replace("{g_norm}", "g_norm_swish_gate" if fuse_norm else "g_norm")
    raise KeyError(name)


def fla_spec(spec: ModelSpec) -> dict[str, Any]:
    """FLA_SPEC for `spec`: a hybrid stack (gla_attention_every) as fla's GLAConfig `attn` layers, which always rotate
    q/k (fla.layers.attn.Attention's RotaryEmbedding, Hugging Face's rotate_half pairs) with plain RoPE."""
    if not spec.gla_attention_every:
        return FLA_SPEC
    return {**FLA_SPEC, "position": "rope", "rope_scaling": "none"}


def unsupported_options(spec: ModelSpec) -> list[str]:
    """The spec options flash-linear-attention's GLA does not compute, as `key=value`: a hybrid's attention layers'
    head dim is fla's hidden_size // num_heads."""
    bad = spec.differences(fla_spec(spec))
    if spec.gla_attention_every and spec.E * spec.H != spec.D:
        bad.append(f"head_dim={spec.E}")
    return bad


def attn_config(spec: ModelSpec) -> dict[str, Any] | None:
    """GLAConfig's `attn` of a hybrid stack (None for a GLA in every layer): its attention layers' indices, query heads
    as GLA's, `num_kv_heads` = n_kv_heads (grouped keys), no qkv bias, no window, RoPE's theta."""
    if not spec.gla_attention_every:
        return None
    return {"layers": list(spec.attention_layers), "num_heads": spec.H, "num_kv_heads": spec.K, "qkv_bias": False,
            "window_size": None, "rope_theta": spec.rope_theta, "max_position_embeddings": spec.max_seq_len}


def config_from_spec(spec: ModelSpec, path: str | Path) -> dict[str, Any]:
    """config.json of the `GLAForCausalLM` computing exactly `spec`; refuses what it cannot compute, by name."""
    if bad := unsupported_options(spec):
        need = ", ".join(f"{k}={spelled(v)}" for k, v in fla_spec(spec).items())
        hybrid = (f", head_dim={spec.D // spec.H}: fla's attention layers always rotate q/k by plain RoPE, with "
                  "hidden_size // num_heads per head" if spec.gla_attention_every else "")
        raise CheckpointError(f"{path}: no flash-linear-attention GLA equivalent for {', '.join(bad)} "
                              f"(it needs {need}{hybrid})")
    d = spec.to_dict()
    return {
        "architectures": ["GLAForCausalLM"],
        "model_type": "gla",
        **{key: d[field] for field, key in CONFIG_KEYS.items()},
        **CONFIG_REQUIRED,
        "attn": attn_config(spec),
        "attn_mode": "chunk",
        "fuse_norm": True,
        "initializer_range": spec.init_std,
        "dtype": spec.param_dtype,
    }


def spec_from_config(config: Mapping[str, Any], path: str | Path, base: Mapping[str, Any] | None = None) -> ModelSpec:
    """The spec of a flash-linear-attention GLA config.json; `base` supplies the fields it has no key for."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{path}: must hold a JSON object")
    if config.get("model_type") != "gla":
        raise CheckpointError(f"{path}: model_type {quote(config.get('model_type'))} is not supported (only 'gla')")
    for key, value in CONFIG_REQUIRED.items():
        if key == "num_kv_heads" and config.get(key) in (None, config.get("num_heads")):
            continue  # as many kv heads as heads: plain multi-head
        if config.get(key, value) != value:
            raise CheckpointError(f"{path}: {key}={quote(config[key])} is not supported (only {quote(value)})")
    try:
        fields = {field: config_value(config, "gla", key, path) for field, key in CONFIG_KEYS.items()}
        if fields["d_ff"] is None:  # fla's GatedMLP: 2/3 · hidden_ratio · hidden_size, rounded up to 256
            ratio, d = config_value(config, "gla", "hidden_ratio", path), fields["d_model"]
            if ratio is None or not 0 < d < 2**62 or not 0 < ratio * d < 2**62:  # before float(d) can overflow
                raise ConfigValueError(f"{path}: without intermediate_size, hidden_ratio × hidden_size must be in "
                                       f"(0, 2^62), got {quote(ratio)} × {quote(d)}")
            fields["d_ff"] = 256 * ((int(fields["d_model"] * ratio * 2 / 3) + 255) // 256)
    except ConfigValueError as e:
        raise CheckpointError(str(e)) from None
    fields.update(hybrid_fields(config.get("attn"), fields, path))
    try:
        # head_dim: unread by a GLA, kept from `base` (our metadata) so that a round trip keeps the spec; a hybrid's
        # attention layers' is fla's hidden_size // num_heads (derived)
        return load_spec({"head_dim": None, **(base or {}), **FLA_SPEC, "n_kv_heads": None, **fields})
    except SpecError as e:
        raise CheckpointError(f"{path}: gives an invalid spec: {e}") from None


def hybrid_fields(attn: Any, fields: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    """The spec fields of GLAConfig's `attn` (None: a GLA in every layer): a hybrid stack whose attention layers are
    every k-th (layers k-1, 2k-1, ...; `gla_attention_every`), with GLA's query heads, `num_kv_heads` a divisor of them
    (n_kv_heads), no qkv bias, no window; anything else is refused by name (a pattern the spec cannot say, or an option
    our attention lacks)."""
    if attn is None:
        return {"gla_attention_every": 0}
    refuse = lambda why: CheckpointError(f"{path}: attn={quote(attn)} is not supported ({why})")  # noqa: E731
    layers = attn.get("layers") if isinstance(attn, Mapping) else None
    if not isinstance(layers, list) or not layers or not all(type(i) is int for i in layers):
        raise refuse("a hybrid's attn must hold `layers`, a list of layer indices")
    k, L = layers[0] + 1, fields["n_layers"]
    # counted, then compared: L may claim 10^12 layers (a list of them), or 10^30 (len of a range: OverflowError)
    if k < 2 or len(layers) != L // k or layers != [k - 1 + j * k for j in range(len(layers))]:
        raise refuse(f"its layers must be every k-th layer, k-1, 2k-1, ... below num_hidden_layers={L}, for a k >= 2 "
                     "(gla_attention_every)")
    heads = fields["n_heads"]
    try:  # typed as fla reads them (GLAConfig's defaults; num_kv_heads null: as many as heads, as fla's Attention)
        got = {key: config_value({"num_heads": heads, **attn}, "gla-attn", key, f"{path}: attn")
               for key in ("num_heads", "num_kv_heads", "qkv_bias", "window_size", "rope_theta")}
    except ConfigValueError as e:
        raise CheckpointError(str(e)) from None
    for key, want in (("num_heads", heads), ("qkv_bias", False), ("window_size", None)):
        if got[key] != want:
            raise refuse(f"{key} must be {quote(want)}: attention layers with GLA's heads, no qkv bias, no sliding "
                         "window")
    kv = heads if got["num_kv_heads"] is None else got["num_kv_heads"]
    if kv <= 0 or heads % kv:
        raise refuse(f"num_kv_heads must divide num_heads={quote(heads)}: each key/value head serves a whole group "
                     "of query heads")
    theta = got["rope_theta"]
    if not theta > 0:
        raise refuse("rope_theta must be a number > 0")
    return {"gla_attention_every": k, "position": "rope", "rope_theta": float(theta), "rope_scaling": "none",
            "head_dim": None, "n_kv_heads": None if kv == heads else kv}


def read_fla(path: str | Path, spec=None) -> tuple[dict[str, np.ndarray], ModelSpec]:
    """Canonical weights and the spec of a flash-linear-attention GLA directory; `spec` must agree with it.
    config.json and the safetensors header are checked before any tensor is read."""
    path = Path(path)
    config = read_json(path / "config.json")
    check_not_pickled(path)
    header = safetensors_header(path / "model.safetensors")
    meta = header.get("__metadata__") or {}
    base = spec_from_metadata(meta, path / "model.safetensors") or (load_spec(spec) if spec is not None else None)
    dtypes = [e.get("dtype") for n, e in header.items() if n != "__metadata__"]
    bf16 = bool(dtypes) and all(d == "BF16" for d in dtypes)
    base = {**(base.to_dict() if base else {}), "param_dtype": "bfloat16" if bf16 else "float32"}
    spec = resolve_spec(spec_from_config(config, path / "config.json", base), spec, path)
    try:
        fuse_norm = config_value(config, "gla", "fuse_norm", path / "config.json")
    except ConfigValueError as e:
        raise CheckpointError(str(e)) from None
    shapes = [e.get("shape") for n, e in header.items() if n != "__metadata__"]
    check_size(len(dtypes), spec, path, held=held_params(shapes))  # before the layout table of 10^7 layers
    names = {fla_name(t.name, fuse_norm): t.name for t in layout(spec)}
    stored, _ = read_safetensors(path / "model.safetensors")
    stored = without_tied_copy(stored, spec, path / "model.safetensors", fla_name("model.embed_tokens.weight"))
    if unknown := sorted(set(stored) - set(names)):
        raise CheckpointError(f"{path / 'model.safetensors'}: tensors a {spec.L}-layer GLA does not have: "
                              f"{', '.join(unknown[:5])}")
    weights = {names[n]: w for n, w in stored.items()}
    return weights, spec


def write_fla(path: str | Path, weights: Mapping[str, np.ndarray], spec: ModelSpec, overwrite: bool = False) -> None:
    """Write `config.json` + `model.safetensors` in flash-linear-attention's names, as one directory, atomically."""
    config = config_from_spec(spec, path)
    check_weights(weights, spec, path, allow_nonfinite=True)
    tensors = {fla_name(t.name): np.ascontiguousarray(weights[t.name]) for t in layout(spec)}
    meta = {"spec": spec.to_json(), "format": "pt"}  # transformers loads only "pt" files
    with atomic_dir(path, overwrite) as tmp:
        (tmp / "config.json").write_text(json_text(config, indent=2) + "\n")
        atomic_write(tmp / "model.safetensors", lambda f: save_safetensors(tensors, f, meta))
