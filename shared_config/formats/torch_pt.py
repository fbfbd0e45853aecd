"""PyTorch `.pt` / `.pth` state-dict files <-> canonical weights and spec (torch imported only when one is read or
written; the layout table is all this module needs of the model).

A file is `torch.save` of {"spec": the spec's JSON, "state_dict": the torch twin's `state_dict()`}, or a bare state
dict, whose spec is then given. A state dict's names and shapes are `model_layout(spec)`'s: the canonical ones, with
q/k/v fused where the spec fuses them; Linear weights are [out, in], as in the canonical file.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np

from ..files import CheckpointError, atomic_write
from ..layout import fuse_qkv, model_layout, split_qkv
from ..limits import quote
from ..spec import ModelSpec
from .checks import (check_layout, check_size, check_weights, held_params, np_dtype, resolve_spec, spec_from_json,
                     stored_fusion, without_derived)

# torch dtypes with a numpy counterpart (bfloat16 through ml_dtypes, see `_numpy`), by name
NUMPY_DTYPES = (
    "float64", "float32", "float16", "bfloat16", "complex64", "complex128", "bool",
    "uint8", "int8", "int16", "int32", "int64",
)


def save_state_dict_file(path: str | Path, weights: dict, spec: ModelSpec) -> None:
    """`torch.save` of {"spec": JSON, "state_dict": the torch twin's `state_dict()` layout}, atomically.

    `weights`: canonical numpy arrays (any float dtype), stored in `spec.param_dtype`.
    """
    import torch

    check_weights(weights, spec, path, allow_nonfinite=True)
    obj = {"spec": spec.to_json(), "state_dict": state_dict(weights, spec)}
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_state_dict_file(path: str | Path, spec=None) -> tuple[dict[str, np.ndarray], ModelSpec]:
    """Canonical weights (as stored) and spec of a `.pt` file: that dict, or a bare state dict plus `spec`.

    Unpickled only with `weights_only=True`: a pickle that would run code is refused, never retried unsafely.
    Raises CheckpointError naming the file and what is wrong.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    check_unpacked_size(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    # KeyError: not a pickle
    except (pickle.UnpicklingError, RuntimeError, ValueError, KeyError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, KeyError):  # the legacy reader's lookup of what it read: "hello" was the bare message "101"
            first = f"not a torch checkpoint: neither a zip file nor a pickle (torch.load's KeyError {first})"
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): {first}") from None
    file_spec, state = _unwrap(obj, path)
    state = without_derived(state, path)
    spec = resolve_spec(file_spec, spec, path)
    stored = stored_fusion(state, spec)  # q/k/v as the file holds them, whatever fusion the spec asks for
    # before the layout table of a spec claiming 10^7 layers
    check_size(len(state), stored, path, fused=True, held=held_params(x.shape for x in state.values()))
    check_layout(state, {t.name: t.shape for t in model_layout(stored)}, path)
    return canonical(state, stored), spec


def state_dict(weights: dict, spec: ModelSpec) -> dict:
    """Canonical weights -> the torch twin's state dict (q/k/v fused), CPU tensors in `spec.param_dtype`."""
    import torch

    weights = {k: v if torch.is_tensor(v) else torch.tensor(np.asarray(v, np.float32)) for k, v in weights.items()}
    weights = fuse_qkv(weights, spec, torch.cat)
    dtype = getattr(torch, spec.param_dtype)
    return {t.name: weights[t.name].to(dtype=dtype) for t in model_layout(spec)}


def canonical(state: dict, spec: ModelSpec) -> dict[str, np.ndarray]:
    """A checked state dict -> canonical numpy weights (q/k/v split back), dtypes as stored."""
    weights = {t.name: state[t.name].detach().cpu() for t in model_layout(spec)}
    return {k: _numpy(v) for k, v in split_qkv(weights, spec).items()}


def _numpy(x) -> np.ndarray:
    """A CPU tensor as a numpy copy; bfloat16 goes through its bits (numpy has no native bfloat16)."""
    import torch

    if x.dtype == torch.bfloat16:
        return x.contiguous().view(torch.int16).numpy().view(np_dtype("bfloat16")).copy()
    return x.contiguous().numpy().copy()


def _unwrap(obj, path: Path) -> tuple[ModelSpec | None, dict]:
    """(spec or None, state dict) of what `torch.load` returned."""
    import torch

    if isinstance(obj, dict) and set(obj) == {"spec", "state_dict"} and isinstance(obj["spec"], str):
        file_spec, obj = spec_from_json(obj["spec"], path), obj["state_dict"]
    else:
        file_spec = None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise CheckpointError(f'{path}: holds neither a state dict (name -> tensor) nor {{"spec", "state_dict"}}')
    odd = [f"{quote(k)[1:-1]} ({_kind(v)})" for k, v in obj.items() if _kind(v)]
    if odd:
        raise CheckpointError(f"{path}: only dense tensors of numpy dtypes are read; not {', '.join(odd[:8])}")
    check_stored_bytes(obj, path)
    return file_spec, obj


def check_unpacked_size(path: Path) -> None:
    """Refuse a zip `.pt` whose members unpack to more bytes than the file holds, before `torch.load` unpacks them:
    torch.save stores members uncompressed, and torch.load inflates deflated ones (a 195 KB file held a 200 MB tensor),
    so a small file could take any amount of memory."""
    if not zipfile.is_zipfile(path):
        return  # torch's legacy format: torch.load checks each storage's size against the file
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            unpacked = sum(info.file_size for info in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable zip file: {e}") from None
    if unpacked > size:
        raise CheckpointError(f"{path}: its zip members unpack to {unpacked:,} bytes, more than the file's {size:,}; "
                              "torch.save stores them uncompressed: a compressed .pt is not read")


def check_stored_bytes(state: dict, path: Path) -> None:
    """Refuse tensors that hold more bytes than the storages the file gave them, before any is copied: a stride-0
    (expand()ed) view or tensors sharing one storage are copied whole by `canonical`, so a 4 KB file asked for 6 GB."""
    need = sum(x.numel() * x.element_size() for x in state.values())
    storages = {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes() for x in state.values()}
    if need > (stored := sum(storages.values())):
        views = [k for k, x in state.items() if x.numel() * x.element_size() > x.untyped_storage().nbytes()]
        names = ", ".join(quote(k)[1:-1] for k in (views or list(state))[:4])
        raise CheckpointError(f"{path}: its tensors hold {need:,} bytes but the file stores {stored:,}: "
                              f"views that repeat stored data (expand()ed or stride 0, or sharing a storage: {names}) "
                              "are not read; save .clone()d tensors")


def _kind(x) -> str | None:
    """What makes a tensor unreadable as a numpy array (sparse, quantized, a float8 dtype, ...), else None."""
    import torch

    if x.layout != torch.strided:
        return f"layout {x.layout}"
    if x.is_quantized or x.is_meta or x.is_nested:
        return "quantized" if x.is_quantized else "meta" if x.is_meta else "nested"
    if str(x.dtype).removeprefix("torch.") not in NUMPY_DTYPES:
        return f"dtype {x.dtype}"
    return None
