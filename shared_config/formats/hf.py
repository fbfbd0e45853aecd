"""Hugging Face Llama / Qwen3 directories <-> canonical weights and spec (numpy only).

The canonical names are Hugging Face's (Qwen3 is Llama plus per-head `q_norm`/`k_norm`), so the
weights pass through unrenamed and the work is the literal config mapping below. A directory is
`config.json` + `model.safetensors` (or shards listed in `model.safetensors.index.json`).
The spec fields config.json cannot hold (compute, init and fusion choices, which do not change
what the model computes) travel in `model.safetensors`' metadata, as in a canonical file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..files import CheckpointError, atomic_dir, json_text, read_json
from ..layout import group_names
from ..limits import quote, spelled
from ..config_file import SpecError
from ..spec import ModelSpec, load_spec
from .checks import (check_not_pickled, check_size, held_params, resolve_spec, spec_from_metadata, without_derived,
                     without_tied_copy)
from .config_json import DEFAULTS, ConfigValueError, config_value
from .safetensors import read_safetensors, safetensors_header, save_checkpoint

# model_type -> architecture; Qwen3 is Llama with qk-norm.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# spec field <- config.json key (the same in Llama and Qwen3).
CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "d_ff": "intermediate_size",
    "max_seq_len": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
}

# An omitted key is read with transformers' default for the model type (shared_config.formats.config_json.DEFAULTS).

# The only values we implement of keys that change the computation (an absent key means this value).
CONFIG_REQUIRED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "use_sliding_window": False}

# What every Llama / Qwen3 computes, as spec values: any other value has no Hugging Face equivalent.
HF_SPEC = {
    "norm_type": "rms",
    "norm_placement": "pre",
    "norm_bias": False,
    "embed_scale": "none",
    "embed_norm": False,  # Llama's embeddings go to block 0 as they are
    "position": "rope",
    "mlp": "swiglu",
    "mixer": "attention",  # a GLA exports to flash-linear-attention's layout instead (shared_config.formats.fla)
    "routing": "none",  # conditional computation (routing.py): no Hugging Face Llama routes tokens past blocks
}

# llama3 RoPE scaling: spec field <- key in `rope_parameters` (5.x) or `rope_scaling` (4.x).
LLAMA3_KEYS = {
    "rope_scaling_factor": "factor",
    "rope_low_freq_factor": "low_freq_factor",
    "rope_high_freq_factor": "high_freq_factor",
    "rope_original_max_seq_len": "original_max_position_embeddings",
}


# --- config.json <-> spec -----------------------------------------------------------------------


def unsupported_options(spec: ModelSpec) -> list[str]:
    """The spec options that no Hugging Face Llama / Qwen3 computes, as `key=value`."""
    return spec.differences(HF_SPEC)


def config_from_spec(spec: ModelSpec, path: str | Path) -> dict[str, Any]:
    """config.json of the Llama (Qwen3 if qk_norm) model computing exactly `spec`; refuses what HF cannot compute."""
    if bad := unsupported_options(spec):
        need = ", ".join(f"{k}={spelled(v)}" for k, v in HF_SPEC.items())
        raise CheckpointError(f"{path}: no Hugging Face equivalent for {', '.join(bad)} (Llama and Qwen3 need {need})")
    d, model_type = spec.to_dict(), "qwen3" if spec.qk_norm else "llama"
    if model_type == "llama" and spec.D % spec.H:  # LlamaConfig.validate_architecture; Qwen3Config has no such rule
        raise CheckpointError(f"{path}: no Hugging Face Llama has d_model={spec.D} (hidden_size) not a multiple of "
                              f"n_heads={spec.H} (num_attention_heads): transformers' LlamaConfig refuses to load it "
                              "(with qk_norm=true the export is a Qwen3, which takes it)")
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": spec.rope_theta, **{k: d[f] for f, k in LLAMA3_KEYS.items()}}
    return {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        **{key: d[field] for field, key in CONFIG_KEYS.items()},
        **CONFIG_REQUIRED,
        "rope_parameters": rope,  # transformers 5.x reads this ...
        "rope_theta": spec.rope_theta,  # ... and 4.x these two
        "rope_scaling": rope if spec.rope_scaling == "llama3" else None,
        "dtype": spec.param_dtype,
    }


def spec_from_config(config: Mapping[str, Any], path: str | Path, base: Mapping[str, Any] | None = None) -> ModelSpec:
    """The spec of a Llama / Qwen3 config.json; `base` supplies the fields config.json has no key for."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{path}: must hold a JSON object")
    model_type = _model_type(config, path)
    for key, value in CONFIG_REQUIRED.items():
        if config.get(key, value) != value:
            raise CheckpointError(f"{path}: {key}={quote(config[key])} is not supported (only {quote(value)})")
    layer_types = config.get("layer_types")
    layer_types = [] if layer_types is None else layer_types
    if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
        raise CheckpointError(f"{path}: layer_types must be a list of strings, got {quote(layer_types)}")
    if other := sorted(set(layer_types) - {"full_attention"}):
        raise CheckpointError(f"{path}: layer_types {quote(other)} are not supported (only full_attention)")
    try:
        fields = {field: config_value(config, model_type, key, path) for field, key in CONFIG_KEYS.items()}
        rope = _rope(config, path, DEFAULTS[model_type]["rope_theta"])
        return load_spec({**(base or {}), **HF_SPEC, **fields, "qk_norm": model_type == "qwen3", **rope})
    except ConfigValueError as e:
        raise CheckpointError(str(e)) from None
    except SpecError as e:
        raise CheckpointError(f"{path}: gives an invalid spec: {e}") from None


def _model_type(config: Mapping[str, Any], path) -> str:
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:  # a list or object: unhashable
        raise CheckpointError(f"{path}: model_type {quote(model_type)} is not supported (only "
                              f"{', '.join(ARCHITECTURES)})")
    # null: transformers' PretrainedConfig default, written by a config saved without a model
    if config.get("architectures") not in (None, [ARCHITECTURES[model_type]]):
        raise CheckpointError(
            f"{path}: architectures {quote(config['architectures'])} is not supported for model_type "
            f"{model_type} (only ['{ARCHITECTURES[model_type]}'])"
        )
    return model_type


def _rope(config: Mapping[str, Any], path, theta: float) -> dict[str, Any]:
    """RoPE spec fields from `rope_parameters` (transformers 5.x) or top-level `rope_theta`/`rope_scaling` (4.x);
    `theta`: the model type's default base."""
    new, scaling = config.get("rope_parameters"), config.get("rope_scaling")
    scaling = {} if scaling is None else scaling  # null: no scaling; 0, "" or false are not read as null
    old = {**_mapping(scaling, "rope_scaling", path), "rope_theta": config.get("rope_theta", theta)}
    fields = _rope_fields(_mapping(new, "rope_parameters", path) if new is not None else old, path, theta)
    if new is not None and ("rope_theta" in config or scaling) and _rope_fields(old, path, theta) != fields:
        # transformers 4.x and 5.x would build different models from this file
        raise CheckpointError(f"{path}: rope_parameters {quote(new)} disagree with rope_theta/rope_scaling "
                              f"{quote(old)}")
    return fields


def _mapping(value: Any, key: str, path) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{path}: {key} must be a JSON object, got {quote(value)}")
    return value


def _rope_fields(params: Mapping[str, Any], path, theta: float) -> dict[str, Any]:
    # an unknown key (partial_rotary_factor, per-layer-type parameters, ...) would change what is computed
    if unknown := sorted(set(params) - {"rope_type", "type", "rope_theta", *LLAMA3_KEYS.values()}):
        raise CheckpointError(f"{path}: RoPE parameters {quote(unknown)} are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))  # "type": older files
    try:  # typed as config.json's own keys: the spec would read "8" as 8.0, where transformers fails on it
        typed = {key: config_value({"rope_theta": theta, **params}, "rope", key, path)
                 for key in ("rope_theta", *LLAMA3_KEYS.values()) if key in params or key == "rope_theta"}
    except ConfigValueError as e:
        raise CheckpointError(f"{e} (in the RoPE parameters)") from None
    fields = {"rope_theta": typed["rope_theta"], "rope_scaling": "none"}
    if rope_type == "default":
        return fields
    if rope_type != "llama3":
        raise CheckpointError(f"{path}: RoPE scaling rope_type={quote(rope_type)} is not supported (only "
                              "default, llama3)")
    if missing := [k for k in LLAMA3_KEYS.values() if k not in params]:
        raise CheckpointError(f"{path}: llama3 RoPE scaling is missing {', '.join(missing)}")
    return {**fields, "rope_scaling": "llama3", **{f: typed[k] for f, k in LLAMA3_KEYS.items()}}


# --- directories --------------------------------------------------------------------------------


def read_hf(path: str | Path, spec=None) -> tuple[dict[str, np.ndarray], ModelSpec]:
    """Canonical weights (as stored) and the spec of a Hugging Face directory; `spec` must agree with it.
    config.json and the safetensors headers are checked before any tensor is read."""
    path = Path(path)
    config = read_json(path / "config.json")
    headers = _headers(path)
    meta = next((m for h in headers.values() if (m := h.get("__metadata__"))), {})
    # Fields config.json has no key for: from our metadata if present, else from the given spec.
    base = spec_from_metadata(meta, path / "model.safetensors") or (load_spec(spec) if spec is not None else None)
    # bfloat16 stays bfloat16; anything else widens to float32 (lossless for float16)
    dtypes = [e.get("dtype") for h in headers.values() for n, e in h.items() if n != "__metadata__"]
    bf16 = bool(dtypes) and all(d == "BF16" for d in dtypes)
    base = {**(base.to_dict() if base else {}), "param_dtype": "bfloat16" if bf16 else "float32"}
    file_spec = spec_from_config(config, path / "config.json", base)
    spec = resolve_spec(file_spec, spec, path)
    shapes = [e.get("shape") for h in headers.values() for n, e in h.items() if n != "__metadata__"]
    check_size(len(dtypes), spec, path, held=held_params(shapes))  # before the tensors of a spec of 10^7 layers
    return without_tied_copy(without_derived(_read_weights(path, headers), path), spec, path), spec


def write_hf(path: str | Path, weights: Mapping[str, np.ndarray], spec: ModelSpec, overwrite: bool = False) -> None:
    """Write `config.json` + `model.safetensors` as one directory, atomically; refuse specs HF cannot represent."""
    config = config_from_spec(spec, path)
    with atomic_dir(path, overwrite) as tmp:
        (tmp / "config.json").write_text(json_text(config, indent=2) + "\n")
        save_checkpoint(tmp / "model.safetensors", weights, spec, file_format="pt")


def _headers(path: Path) -> dict[Path, dict]:
    """The checked safetensors header of `model.safetensors`, or of each shard the index lists, by file."""
    check_not_pickled(path)
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file() or not index.is_file():
        return {path / "model.safetensors": safetensors_header(path / "model.safetensors")}
    weight_map = read_json(index).get("weight_map")
    # shard names must be plain file names: an index must not point outside its directory
    shards = weight_map.values() if isinstance(weight_map, dict) else [None]
    if not all(isinstance(f, str) and f and Path(f).name == f for f in shards):  # "": the directory itself
        raise CheckpointError(f"{index}: weight_map must map tensor names to file names in {path}")
    headers = {path / shard: safetensors_header(path / shard) for shard in sorted(set(weight_map.values()))}
    for shard, header in headers.items():
        if wrong := [n for n in header if n != "__metadata__" and weight_map.get(n) != shard.name]:
            raise CheckpointError(f"{shard}: holds tensors the index places elsewhere: {group_names(wrong)}")
    held = {n for header in headers.values() for n in header}
    if absent := [n for n in weight_map if n not in held]:
        raise CheckpointError(f"{index}: lists tensors that no shard holds: {group_names(absent)}")
    return headers


def _read_weights(path: Path, headers: dict[Path, dict]) -> dict[str, np.ndarray]:
    """The tensors of the files `_headers` checked."""
    weights = {}
    for file in headers:
        weights.update(read_safetensors(file)[0])
    return weights
