"""The keys of a Hugging Face-style config.json (Llama, Qwen3, flash-linear-attention's GLA), read as their
libraries read them (stdlib only): an omitted key takes the default its config class declares, from the one
table below, and every value is type-checked before any arithmetic is done with it.

Sources: transformers 5.23 `LlamaConfig` / `Qwen3Config` (`models/{llama,qwen3}/configuration_*.py`; Qwen3's
`head_dim` defaults to 128 and `num_key_value_heads` to 32, where Llama derives both), flash-linear-attention's
`GLAConfig` (`fla/models/gla/configuration_gla.py`). `None` means "derived", as in those classes.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Mapping

from ..limits import quote

_LLAMA = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
    "mlp_bias": False, "rope_theta": 10000.0,
}
# model_type -> config.json key -> the default of its config class
DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA,
    "qwen3": {**{k: v for k, v in _LLAMA.items() if k != "mlp_bias"}, "vocab_size": 151936, "intermediate_size": 22016,
              "num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 32768,
              "use_sliding_window": False},
    "gla": {
        "vocab_size": 32000, "hidden_size": 2048, "expand_k": 0.5, "expand_v": 1, "hidden_ratio": 4,
        "intermediate_size": None, "num_hidden_layers": 24, "num_heads": 4, "num_kv_heads": None,
        "max_position_embeddings": 2048, "norm_eps": 1e-6, "tie_word_embeddings": False, "fuse_norm": True,
        "feature_map": None, "use_short_conv": False, "use_output_gate": True, "clamp_min": None,
        "hidden_act": "swish", "elementwise_affine": True, "use_gk": True, "use_gv": False, "attn": None,
    },
    # GLAConfig's `attn` (a hybrid's attention layers): the defaults GLAConfig.__init__ fills in; num_heads has none
    # (GLAConfig raises without it; ours: the GLA's heads), num_kv_heads None is fla's Attention's "as many as heads"
    "gla-attn": {"num_heads": None, "num_kv_heads": None, "qkv_bias": False, "window_size": None,
                 "rope_theta": 10000.0},
    # RoPE parameters (`rope_parameters`, 4.x's `rope_scaling`): llama3's four have no default (missing is refused)
    "rope": {"rope_theta": 10000.0, "factor": None, "low_freq_factor": None, "high_freq_factor": None,
             "original_max_position_embeddings": None},
}

# the type each numeric or boolean key must have (others are compared with the values we implement)
INTEGERS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "num_heads", "num_kv_heads", "window_size",
            "original_max_position_embeddings")
NUMBERS = ("rms_norm_eps", "norm_eps", "expand_k", "expand_v", "hidden_ratio", "rope_theta", "factor",
           "low_freq_factor", "high_freq_factor")
BOOLEANS = ("tie_word_embeddings", "fuse_norm", "qkv_bias")
# null: derived, as in our spec (window_size: no window)
NULLABLE = ("num_key_value_heads", "head_dim", "num_kv_heads", "intermediate_size", "window_size")


class ConfigValueError(ValueError):
    """A config.json value of the wrong type; the message names the file and the key."""


def config_value(config: Mapping[str, Any], model_type: str, key: str, path: str | Path) -> Any:
    """`config[key]`, or its library's default for `model_type` when omitted, type-checked: integers are ints
    (not bools), numbers finite ints or floats, booleans bools; `None` (derived) for the NULLABLE keys.
    Raises ConfigValueError naming `path` and `key`."""
    default = DEFAULTS[model_type][key]
    value = config.get(key, default)
    if value is None and key in NULLABLE:
        return None
    if key in INTEGERS:
        ok = isinstance(value, int) and not isinstance(value, bool)
        kind = "an integer"
    elif key in NUMBERS:
        # an int is compared, not converted: math.isfinite(10**400) raises OverflowError
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
            math.isfinite(value) if isinstance(value, float) else abs(value) <= sys.float_info.max)
        kind = "a finite number"
    elif key in BOOLEANS:
        ok, kind = isinstance(value, bool), "true or false"
    else:
        return value
    if not ok:
        raise ConfigValueError(f"{path}: {key} must be {kind}{' or null' if key in NULLABLE else ''}, got "
                               f"{quote(value)}")
    return value
