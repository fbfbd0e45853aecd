"""Checkpoint files <-> the JAX twin: canonical safetensors, and Orbax directories of the NNX state."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

from shared_config import (
    CheckpointError,
    ModelSpec,
    atomic_dir,
    check_layout,
    check_size,
    check_weights,
    load_checkpoint,
    load_spec,
    model_layout,
    resolve_spec,
    save_checkpoint,
    spec_from_json,
)
from shared_config.formats import read_checkpoint

from shared_config.io import deferred_signals, write_errors
from shared_config.limits import MAX_JSON_BYTES, read_capped

from .model import Transformer
from .weights import get_weights, set_weights, to_canonical, to_pure_dict


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


def from_pretrained(path: str | Path, spec=None, *, attention: str = "auto", allow_nonfinite: bool = False) -> Transformer:
    """A model from a checkpoint in any format convert.py reads: a canonical .safetensors file, a run's step
    directory, a Hugging Face or Orbax directory, a .pt file (shared_config.formats). `spec=None`: the file's own
    (a bare state dict needs one). Raises CheckpointError naming the file and what is wrong."""
    return from_weights(*read_checkpoint(path, spec, allow_nonfinite), attention)


def to_safetensors(model: Transformer, path: str | Path) -> None:
    """Write the canonical file (q/k/v split back), atomically, with the spec in the metadata."""
    save_checkpoint(path, get_weights(model), model.spec)


def save_orbax(path: str | Path, weights: dict, spec: ModelSpec, overwrite: bool = False) -> None:
    """A directory of `state/` (Orbax, the pure dict of the twin's `nnx.state(model, nnx.Param)`) and `spec.json`.

    Built under a temporary name and renamed into place when complete.
    """
    check_weights(weights, spec, path, allow_nonfinite=True)
    state = to_pure_dict(weights, spec)
    with atomic_dir(path, overwrite) as tmp:
        (tmp / "spec.json").write_text(spec.to_json() + "\n")
        # SIGTERM/SIGINT wait for Orbax's threads: an exception raised meanwhile ends in a native abort
        with deferred_signals(), write_errors(path), ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp.absolute() / "state", state)  # leaving the checkpointer waits for the async save


def read_spec_file(path: Path) -> bytes:
    """spec.json's bytes, refused past the JSON size limit; unreadable is a CheckpointError."""
    try:
        return read_capped(path, MAX_JSON_BYTES, "spec file")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror}") from None
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def load_orbax(path: str | Path, spec=None) -> tuple[dict[str, np.ndarray], ModelSpec]:
    """Canonical weights (as stored) and spec of a `save_orbax` directory; without `spec.json`, `spec` is required."""
    path = Path(path)
    spec_file = path / "spec.json"
    file_spec = spec_from_json(read_spec_file(spec_file), spec_file) if spec_file.is_file() else None
    spec = resolve_spec(file_spec, spec, path)
    state_dir = (path / "state").absolute()
    try:  # SIGTERM/SIGINT wait for Orbax's reading threads too (an exception meanwhile is a native abort)
        with deferred_signals(), ocp.StandardCheckpointer() as checkpointer:
            stored = checkpointer.metadata(state_dir).item_metadata
            if stored is None:
                raise CheckpointError(f"{state_dir}: not a readable Orbax checkpoint: no tree metadata")
            stored = stored.tree
            flat = traverse_util.flatten_dict(dict(stored), sep=".")
            check_size(len(flat), spec, state_dir, fused=True)  # before the layout table of a spec claiming 10^7 layers
            check_layout(flat, {t.jax_name: t.jax_shape for t in model_layout(spec)}, state_dir)
            # restore as stored (dtype included), on this host's default device
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), stored)
            flat = traverse_util.flatten_dict(checkpointer.restore(state_dir, target), sep=".")
    except CheckpointError:
        raise
    except Exception as e:  # Orbax and TensorStore raise many types for a damaged directory
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{state_dir}: not a readable Orbax checkpoint: {first}") from None
    return to_canonical(flat, spec), spec
