"""Framework-neutral half of twinlm: the spec, the canonical layout, init, checkpoint I/O, the train config and data
(numpy only)."""

from .data import synthetic_batch
from .files import CheckpointError, atomic_dir, atomic_write
from .formats import fla, hf
from .formats.checks import (check_layout, check_size, check_train_state, check_weights, np_dtype, resolve_spec,
                             spec_from_json)
from .formats.safetensors import load_checkpoint, read_safetensors, save_checkpoint, save_safetensors
from .init import InitRule, init_rule, init_weights
from .layout import Tensor, flat_taps, fuse_qkv, group_names, layout, model_layout, split_qkv
from .rope import rope_inv_freq
from .config_file import SpecError, did_you_mean, parse_overrides
from .spec import ModelSpec, load_spec, preset_names
from .train_config import TrainConfig, decays, load_train_config, lr_factor, train_preset_names

__all__ = [
    "CheckpointError", "InitRule", "ModelSpec", "SpecError", "Tensor", "TrainConfig", "atomic_dir", "atomic_write",
    "check_layout", "check_size", "check_train_state", "check_weights", "decays", "did_you_mean", "fla", "flat_taps",
    "fuse_qkv", "group_names", "hf", "init_rule", "init_weights", "layout",
    "load_checkpoint", "load_spec", "load_train_config", "lr_factor", "model_layout", "np_dtype", "parse_overrides",
    "preset_names", "read_safetensors", "resolve_spec", "rope_inv_freq", "save_checkpoint", "save_safetensors",
    "spec_from_json", "split_qkv", "synthetic_batch", "train_preset_names",
]
