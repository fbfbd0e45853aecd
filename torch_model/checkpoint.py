"""Checkpoint files <-> the PyTorch twin: canonical safetensors, and `.pt` state-dict files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from shared_config import (
    CheckpointError,
    ModelSpec,
    atomic_write,
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
from shared_config.io import without_derived

from shared_config.limits import quote

from .model import Transformer
from .weights import get_weights, set_weights, to_canonical, to_state_dict


def from_weights(weights: dict, spec, attention: str = "auto", device=None) -> Transformer:
    """A model holding `weights` (canonical names); the native init is skipped, not drawn and thrown away."""
    spec: ModelSpec = load_spec(spec)
    check_weights(weights, spec, "weights", allow_nonfinite=True)
    with torch.device("meta"):
        model = Transformer(spec, attention=attention)
    set_weights(model, weights)
    return model.to(device) if device is not None else model


def from_safetensors(path: str | Path, spec=None, *, attention: str = "auto", allow_nonfinite: bool = False, device=None):
    """Load a canonical checkpoint; `spec=None` reads the spec from the file's metadata."""
    weights, spec = load_checkpoint(path, spec, allow_nonfinite)
    return from_weights(weights, spec, attention, device)


def from_pretrained(path: str | Path, spec=None, *, attention: str = "auto", allow_nonfinite: bool = False,
                    device=None) -> Transformer:
    """A model from a checkpoint in any format convert.py reads: a canonical .safetensors file, a run's step
    directory, a Hugging Face or Orbax directory, a .pt file (shared_config.formats). `spec=None`: the file's own
    (a bare state dict needs one). Raises CheckpointError naming the file and what is wrong.

    For inference, as transformers' from_pretrained: in eval mode, and without gradients (outputs do not require
    grad); `model.train().requires_grad_(True)` to fine-tune it.
    """
    return from_weights(*read_checkpoint(path, spec, allow_nonfinite), attention, device).eval().requires_grad_(False)


def to_safetensors(model: Transformer, path: str | Path) -> None:
    """Write the canonical file (q/k/v split back), atomically, with the spec in the metadata."""
    save_checkpoint(path, get_weights(model), model.spec)


def save_state_dict_file(path: str | Path, weights: dict, spec: ModelSpec) -> None:
    """`torch.save` of {"spec": JSON, "state_dict": the twin's `state_dict()` layout}, atomically."""
    check_weights(weights, spec, path, allow_nonfinite=True)
    obj = {"spec": spec.to_json(), "state_dict": to_state_dict(weights, spec)}
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_state_dict_file(path: str | Path, spec=None) -> tuple[dict[str, np.ndarray], ModelSpec]:
    """Canonical weights (as stored) and spec of a `.pt` file: that dict, or a bare state dict plus `spec`.

    Unpickled only with `weights_only=True`: a pickle that would run code is refused, never retried unsafely.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, KeyError, EOFError, OSError) as e:  # KeyError: not a pickle
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): {first}") from None
    file_spec, state_dict = _unwrap(obj, path)
    state_dict = without_derived(state_dict, path)
    spec = resolve_spec(file_spec, spec, path)
    check_size(len(state_dict), spec, path, fused=True)  # before the layout table of a spec claiming 10^7 layers
    check_layout(state_dict, {t.name: t.shape for t in model_layout(spec)}, path)
    return to_canonical(state_dict, spec), spec


def _unwrap(obj, path: Path) -> tuple[ModelSpec | None, dict[str, torch.Tensor]]:
    """(spec or None, state dict) of what `torch.load` returned."""
    if isinstance(obj, dict) and set(obj) == {"spec", "state_dict"} and isinstance(obj["spec"], str):
        file_spec, obj = spec_from_json(obj["spec"], path), obj["state_dict"]
    else:
        file_spec = None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise CheckpointError(f'{path}: holds neither a state dict (name -> tensor) nor {{"spec", "state_dict"}}')
    odd = [f"{quote(k)[1:-1]} ({_kind(v)})" for k, v in obj.items() if _kind(v)]
    if odd:
        raise CheckpointError(f"{path}: only dense tensors of numpy dtypes are read; not {', '.join(odd[:8])}")
    return file_spec, obj


def _kind(x: torch.Tensor) -> str | None:
    """What makes a tensor unreadable as a numpy array (sparse, quantized, a float8 dtype, ...), else None."""
    if x.layout != torch.strided:
        return f"layout {x.layout}"
    if x.is_quantized or x.is_meta or x.is_nested:
        return "quantized" if x.is_quantized else "meta" if x.is_meta else "nested"
    if x.dtype not in NUMPY_DTYPES:
        return f"dtype {x.dtype}"
    return None


# torch dtypes with a numpy counterpart (bfloat16 through ml_dtypes, see to_numpy)
NUMPY_DTYPES = (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128, torch.bool,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
)
