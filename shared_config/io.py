"""Canonical checkpoint files (safetensors, numpy only): read, check everything, write atomically.

A checkpoint is one `.safetensors` file of the tensors in `layout(spec)`, with the spec's JSON in
`__metadata__["spec"]`. Loading reports every problem at once, grouped by layer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping

import ml_dtypes
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .layout import group_names, layout
from .spec import ModelSpec, SpecError, load_spec

FLOAT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the file and every problem."""


def np_dtype(name: str) -> np.dtype:
    return FLOAT_DTYPES[name]


def is_float(a: np.ndarray) -> bool:
    return a.dtype in FLOAT_DTYPES.values() or np.issubdtype(a.dtype, np.floating)


# --- atomic writes ------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` on a temp file beside `path`, fsync, then rename it into place.

    On any failure the temp file is removed and `path` is left exactly as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name beside `path`; rename it into place on success."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = path.with_name(f".{path.name}.old")
    try:
        yield tmp
        if path.exists() and overwrite:
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


# --- reading and checking -----------------------------------------------------------------------


def read_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors and the string metadata of a safetensors file; a bad file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        weights = load_file(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            meta = json.loads(f.read(n)).get("__metadata__") or {}
    except (SafetensorError, ValueError, OSError, UnicodeDecodeError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"{path}: not a valid safetensors file: {msg}") from None
    return weights, meta


def spec_from_metadata(meta: Mapping[str, str], path: str | Path) -> ModelSpec | None:
    if "spec" not in meta:
        return None
    try:
        return load_spec(json.loads(meta["spec"]))
    except (json.JSONDecodeError, SpecError) as e:
        raise CheckpointError(f"{path}: invalid spec in metadata: {e}") from None


def resolve_spec(file_spec: ModelSpec | None, given, path: str | Path) -> ModelSpec:
    """The spec to use: the given one must agree with the file's; one of them must exist."""
    if given is None:
        if file_spec is None:
            raise CheckpointError(f"{path}: the file carries no spec; pass one (a preset name, YAML path or dict)")
        return file_spec
    spec = load_spec(given)
    if file_spec is not None and file_spec.to_dict() != spec.to_dict():
        a, b = file_spec.to_dict(), spec.to_dict()
        diff = "; ".join(f"{k}: file {a[k]!r} vs given {b[k]!r}" for k in a if a[k] != b[k])
        raise CheckpointError(f"{path}: spec in the file disagrees with the given spec: {diff}")
    return spec


def check_weights(
    weights: Mapping[str, np.ndarray], spec: ModelSpec, path: str | Path, allow_nonfinite: bool = False
) -> None:
    """Check `weights` against `layout(spec)` and report every problem in one error."""
    table = {t.name: t for t in layout(spec)}
    problems = []
    if missing := [n for n in table if n not in weights]:
        problems.append(f"missing keys: {group_names(missing)}")
    if unexpected := [n for n in weights if n not in table]:
        problems.append(f"unexpected keys: {group_names(unexpected)}")
    shapes = [
        f"{n} expected {list(t.shape)} found {list(weights[n].shape)}"
        for n, t in table.items()
        if n in weights and tuple(weights[n].shape) != t.shape
    ]
    if shapes:
        problems.append("shape mismatches: " + ", ".join(shapes))
    if not_float := [n for n in table if n in weights and not is_float(weights[n])]:
        problems.append(f"non-float dtypes: {', '.join(f'{n} ({weights[n].dtype})' for n in not_float)}")
    elif not allow_nonfinite:
        bad = [n for n in table if n in weights and not np.isfinite(weights[n].astype(np.float32)).all()]
        if bad:
            problems.append(f"non-finite values (NaN/Inf) in: {group_names(bad)}")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))


def load_checkpoint(
    path: str | Path, spec=None, allow_nonfinite: bool = False
) -> tuple[dict[str, np.ndarray], ModelSpec]:
    """Canonical weights (cast to the spec's param dtype) and the spec, everything checked."""
    weights, meta = read_safetensors(path)
    spec = resolve_spec(spec_from_metadata(meta, path), spec, path)
    check_weights(weights, spec, path, allow_nonfinite)
    dtype = np_dtype(spec.param_dtype)
    return {t.name: weights[t.name].astype(dtype, copy=False) for t in layout(spec)}, spec


def save_checkpoint(path: str | Path, weights: Mapping[str, np.ndarray], spec: ModelSpec) -> None:
    """Write the canonical file atomically, in layout order, with the spec in the metadata."""
    check_weights(weights, spec, path, allow_nonfinite=True)
    tensors = {t.name: np.ascontiguousarray(weights[t.name]) for t in layout(spec)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"spec": spec.to_json(), "format": "twinlm"}))
