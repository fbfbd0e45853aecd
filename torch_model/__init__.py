"""The PyTorch twin. Mirrors jax_model file for file; both read shared_config."""

# this twin's own checkpoint format, read and written in the core
from shared_config.formats.torch_pt import load_state_dict_file, save_state_dict_file

from .checkpoint import from_pretrained, from_safetensors, from_weights, to_safetensors
from .model import Transformer, TransformerModel
from .weights import get_weights, set_weights

__all__ = [
    "Transformer", "TransformerModel", "from_pretrained", "from_safetensors", "from_weights", "get_weights",
    "load_state_dict_file", "save_state_dict_file", "set_weights", "to_safetensors",
]
