"""The JAX twin (Flax NNX). Mirrors torch_model file for file; both read shared_config."""

# this twin's own checkpoint format, read and written in the core
from shared_config.formats.orbax import load_orbax, save_orbax

from .checkpoint import from_pretrained, from_safetensors, from_weights, to_safetensors
from .model import Transformer, TransformerModel
from .weights import get_weights, set_weights

__all__ = [
    "Transformer", "TransformerModel", "from_pretrained", "from_safetensors", "from_weights", "get_weights",
    "load_orbax", "save_orbax", "set_weights", "to_safetensors",
]
