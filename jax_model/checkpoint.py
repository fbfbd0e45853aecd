"""Checkpoint files <-> the JAX twin: a model from canonical weights or from a checkpoint in any format, and back to
the canonical file. The formats themselves are read and written in shared_config.formats (this twin's own, Orbax:
shared_config/formats/orbax.py)."""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from shared_config import ModelSpec, check_weights, load_checkpoint, load_spec, save_checkpoint
from shared_config.formats import read_checkpoint
from shared_config.generation import check_model

from .model import Transformer
from .weights import get_weights, set_weights


def from_weights(weights: dict, spec, attention: str = "auto") -> Transformer:
    """A model holding `weights` (canonical names); the native init is skipped, not drawn and thrown away."""
    spec: ModelSpec = load_spec(spec)
    check_weights(weights, spec, "weights", allow_nonfinite=True)
    model = nnx.eval_shape(lambda: Transformer(spec, rngs=nnx.Rngs(0), attention=attention))
    set_weights(model, weights)
    return model


def from_safetensors(path: str | Path, spec=None, *, attention: str = "auto", allow_nonfinite: bool = False):
    """Load a canonical checkpoint; `spec=None` reads the spec from the file's metadata."""
    weights, spec = load_checkpoint(path, spec, allow_nonfinite)
    return from_weights(weights, spec, attention)


def from_pretrained(path: str | Path, spec=None, *, attention: str = "auto",
                    allow_nonfinite: bool = False) -> Transformer:
    """A model from a checkpoint in any format convert.py reads: a canonical .safetensors file, a run's step
    directory, a Hugging Face or Orbax directory, a .pt file (shared_config.formats). `spec=None`: the file's own
    (a bare state dict needs one). Raises CheckpointError naming the file and what is wrong."""
    return from_weights(*read_checkpoint(path, spec, allow_nonfinite), attention)


def to_safetensors(model: Transformer, path: str | Path) -> None:
    """Write the canonical file (q/k/v split back), atomically, with the spec in the metadata. TypeError for a
    `model` that is not this twin's Transformer; an OSError or ResourceError where `path` cannot be written."""
    check_model(model, Transformer, TypeError)
    save_checkpoint(path, get_weights(model), model.spec)
