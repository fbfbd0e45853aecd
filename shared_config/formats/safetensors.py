"""Canonical checkpoint files (safetensors, numpy only): read, check everything, write atomically.

A checkpoint is one `.safetensors` file of the tensors in `layout(spec)`, with the spec's JSON in
`__metadata__["spec"]`. Loading reports every problem at once, grouped by layer; every header entry is checked
against the file before any tensor is read.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from ..files import CheckpointError, atomic_write
from ..config_file import SpecError
from ..layout import layout
from ..limits import LimitError, open_regular, parse_json, quote
from ..resources import layout_size
from ..spec import ModelSpec, load_spec
from .checks import (check_size, check_weights, checkpoint_path, held_params, np_dtype, resolve_spec,
                     spec_from_metadata, without_derived)

MAX_HEADER = 100_000_000  # bytes; the safetensors library's own limit
# tensors in one file: a canonical checkpoint of 1,000 layers holds ~12,000; a header of 10^6 one-byte tensors (78 MB,
# under MAX_HEADER) took a minute and 2 GB to parse and check before the spec refused it
MAX_TENSORS = 100_000
ADAMW_FORMAT = "twinlm-adamw"  # the metadata format of a run's optimizer.safetensors (run_dir)
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
# dtypes safetensors knows that its numpy reader cannot load (numpy has no such type): refused by name
UNREADABLE = {d: "numpy has no float8; convert the weights to F32, F16 or BF16 first" for d in
              ("F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ")}
UNREADABLE.update({d: "numpy has no 4- or 6-bit floats" for d in ("F4", "F6_E2M3", "F6_E3M2")})


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file, every entry checked against the file before any data is read."""
    with open_regular(path, "safetensors file") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER:
            raise ValueError(f"header length {n} is over the {MAX_HEADER}-byte limit")
        if 8 + n > size:
            raise ValueError(f"header length {n} is larger than the file ({size} bytes)")
        raw = f.read(n)
    if (count := raw.count(b'"data_offsets"')) > MAX_TENSORS:  # counted in C before any Python object is built
        raise ValueError(f"header lists {count:,} tensors, over the {MAX_TENSORS:,}-tensor limit")
    try:
        header = parse_json(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("header is not UTF-8") from None
    except LimitError as e:
        raise ValueError(f"header: {e}") from None
    except ValueError as e:
        raise ValueError(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    _check_spans(header, size - 8 - n)
    return header


def _check_spans(header: dict, data_size: int) -> None:
    """Each tensor's bytes match its shape x dtype and lie in the data; together they tile it exactly."""
    spans = []
    for name, e in header.items():
        if name == "__metadata__":
            if not isinstance(e, dict) or not all(isinstance(v, str) for v in e.values()):
                raise ValueError("__metadata__ must map strings to strings")
            continue
        name = quote(name)[1:-1]
        if not isinstance(e, dict):
            raise ValueError(f"tensor '{name}': must be a JSON object of dtype, shape and data_offsets, got {quote(e)}")
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if dtype in UNREADABLE:
            raise ValueError(f"tensor '{name}': dtype {dtype} is not supported ({UNREADABLE[dtype]})")
        if dtype not in DTYPE_SIZES:
            raise ValueError(f"tensor '{name}': unknown dtype {quote(dtype)}")
        if not _naturals(shape) or not _naturals(offsets) or len(offsets) != 2:
            raise ValueError(
                f"tensor '{name}': shape {quote(shape)} and data_offsets {quote(offsets)} must be lists of ints >= 0"
            )
        where = f"tensor '{name}': data_offsets {offsets}"
        (begin, end), nbytes = offsets, math.prod(shape) * DTYPE_SIZES[dtype]
        if end > data_size:
            raise ValueError(f"{where} run past the end of the data ({data_size} bytes)")
        if end - begin != nbytes:
            raise ValueError(f"{where} hold {end - begin} bytes, shape {quote(shape)} {dtype} needs {nbytes}")
        spans.append((begin, end, where))
    covered = 0
    for begin, end, where in sorted(spans):
        if begin != covered:
            raise ValueError(f"{where} overlap the tensor before" if begin < covered else f"{where} leave a gap before")
        covered = end
    if covered != data_size:
        raise ValueError(f"the tensors cover {covered} of the {data_size} data bytes")


def _naturals(x) -> bool:
    return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in x)


def safetensors_path(src) -> Path:
    """`src` as the path of one file (`checkpoint_path`); a directory is refused by name, not as "no such file"."""
    path = checkpoint_path(src)
    if path.is_dir():
        raise CheckpointError(f"{path}: a directory, not a safetensors file (from_pretrained and read_checkpoint "
                              "read checkpoint directories)")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    return path


def safetensors_header(path: str | Path) -> dict:
    """The checked JSON header of a safetensors file (`read_header`), no tensor read; a bad file is a
    CheckpointError."""
    path = safetensors_path(path)
    try:
        return read_header(path)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file: {' '.join(str(e).split())}") from None


def read_safetensors(path: str | Path, header: dict | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors and the string metadata of a safetensors file; a bad file is a CheckpointError. `header`: the
    file's, checked already (`safetensors_header`): not read and checked again."""
    path = safetensors_path(path)
    try:
        # a FIFO or device is refused here, never opened by load_file
        header = header if header is not None else read_header(path)
        meta = header.get("__metadata__") or {}
        if any(isinstance(e, dict) and e.get("dtype") == "BF16" for e in header.values()):
            np_dtype("bfloat16")  # imports ml_dtypes: load_file needs it for BF16 ("data type not understood")
        weights = load_file(path)
    except (SafetensorError, ValueError, OSError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"{path}: not a valid safetensors file: {msg}") from None
    return weights, meta



def metadata(path: str | Path) -> dict[str, str]:
    """A safetensors file's string metadata; {} for a file `load_checkpoint` will refuse with the reason."""
    try:
        return read_header(Path(path)).get("__metadata__") or {}
    except (OSError, ValueError):
        return {}


def load_checkpoint(
    path: str | Path, spec=None, allow_nonfinite: bool = False
) -> tuple[dict[str, np.ndarray], ModelSpec]:
    """Canonical weights (cast to the spec's param dtype) and the spec, everything checked; the spec and the
    tensor count (`check_size`) from the header, before any tensor is read."""
    header = safetensors_header(path)
    if (header.get("__metadata__") or {}).get("format") == ADAMW_FORMAT:  # read as "carries no spec"
        raise CheckpointError(f"{path}: holds a training run's AdamW moments (m.<name>, v.<name>), not model weights; "
                              "the weights are model.safetensors beside it")
    spec = resolve_spec(spec_from_metadata(header.get("__metadata__") or {}, path), spec, path)
    shapes = [e["shape"] for n, e in header.items() if n != "__metadata__"]
    check_size(len(shapes), spec, path, held=held_params(shapes))
    weights = without_derived(read_safetensors(path, header)[0], path)
    check_weights(weights, spec, path, allow_nonfinite)
    dtype = np_dtype(spec.param_dtype)
    with np.errstate(over="ignore"):  # allow_nonfinite: a float64 past float32's range becomes inf, as asked
        return {t.name: weights[t.name].astype(dtype, copy=False) for t in layout(spec)}, spec


def check_tensor_count(spec: ModelSpec, per_tensor: int = 1) -> None:
    """Refuse (SpecError) a spec whose file of `per_tensor` entries a canonical tensor (2: a run's optimizer file, m
    and v) would list more than MAX_TENSORS, which every reader here refuses: checked before anything is drawn
    (init_checkpoint.py --set n_layers=200000 drew for 80 s and 2 GB, then failed to write; at 20,000 it wrote a
    checkpoint no tool could read)."""
    if (n := layout_size(spec)[0] * per_tensor) > MAX_TENSORS:
        file = "a run's optimizer.safetensors" if per_tensor == 2 else "its checkpoint"
        raise SpecError(f"n_layers={spec.n_layers}: {file} would list {n:,} tensors, over the {MAX_TENSORS:,} a "
                        "safetensors file may list here (the readers refuse more); use fewer layers")


def save_checkpoint(
    path: str | Path, weights: Mapping[str, np.ndarray], spec: ModelSpec, file_format: str = "twinlm"
) -> None:
    """Write the canonical file atomically, in layout order, with the spec in the metadata.

    `file_format` is the metadata's "format"; transformers loads only "pt" files, see `shared_config.formats.hf`.
    """
    spec = load_spec(spec)  # a spec, a preset name or a dict
    check_tensor_count(spec)
    check_weights(weights, spec, path, allow_nonfinite=True)
    tensors = {t.name: np.ascontiguousarray(weights[t.name]) for t in layout(spec)}
    atomic_write(path, lambda tmp: save_safetensors(tensors, tmp, {"spec": spec.to_json(), "format": file_format}))


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str | Path, metadata: Mapping[str, str]) -> None:
    """safetensors' `save_file`, byte-reproducible: same tensors and metadata, same bytes.

    `save_file` writes `__metadata__` in a Rust hash map's order, which changes from process to process (two
    identical conversions differed at byte 27); its keys are rewritten here in sorted order, in place. The
    header keeps its length (the same JSON text reordered; safetensors pads headers with spaces anyway).
    Tensors are already in a fixed order (by dtype alignment, then name) with fixed offsets.
    """
    save_file(dict(tensors), path, metadata=dict(metadata))
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header = {"__metadata__": dict(sorted(header.pop("__metadata__", {}).items())), **header}
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(raw) > n:  # cannot happen for the same JSON text; never write a header past the data's start
            raise RuntimeError(f"{path}: the sorted safetensors header grew from {n} to {len(raw)} bytes")
        f.seek(8)
        f.write(raw.ljust(n, b" "))
