"""Canonical checkpoint files (safetensors, numpy only): read, check everything, write atomically.

A checkpoint is one `.safetensors` file of the tensors in `layout(spec)`, with the spec's JSON in
`__metadata__["spec"]`. Loading reports every problem at once, grouped by layer.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import math
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator, Mapping

import ml_dtypes
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .layout import group_names, layout
from .limits import MAX_JSON_BYTES, LimitError, open_regular, parse_json, quote, read_capped
from .resources import GB, ResourceError, layout_size
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


def umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` on a temp file beside `path`, fsync, then rename it into place.

    On any failure the temp file is removed and `path` is left exactly as it was; a failure while
    writing (a full disk, a file size limit) is a ResourceError naming `path`. Temp files that a killed
    earlier write to `path` left behind are removed first. The file gets the umask's permissions.
    """
    path = Path(path)
    remove_stale(path)
    tmp = None
    try:
        with deferred_signals():  # the temp file exists only once `tmp` names it for the cleanup below
            fd, name = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmp = Path(name)
        with write_errors(path):
            write(tmp)
            # after writing: some writers (safetensors' save_file) replace the file, dropping earlier modes;
            # mkstemp's 0600 would make the result private to its writer
            os.chmod(tmp, 0o666 & ~umask())
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp is not None:
            with deferred_signals():  # a signal during the cleanup waits for it
                tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name beside `path`; rename it into place on success.

    A replace (`overwrite`) swaps the new directory and the old one in one rename (Linux's renameat2
    RENAME_EXCHANGE), then deletes the old one: a kill at any instant, -9 included, leaves the old or the
    new directory at `path`. Where the exchange is not supported it moves the old directory aside to
    `.NAME.old` first and deletes it once the new one is in place; a kill between those two renames leaves
    `.NAME.old` alone, which the next write to `path`, and any reader (`recover`), puts back.
    """
    path = Path(path)
    recover(path)
    tmp, old = None, _old(path)
    try:
        with deferred_signals():  # the temp directory exists only once `tmp` names it for the cleanup below
            tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent))
        with write_errors(path, library=False):  # the body's own errors pass; what it writes maps its own
            os.chmod(tmp, 0o777 & ~umask())  # as for files: mkdtemp's 0700 is for scratch space
            yield tmp
            with deferred_signals():  # a SIGTERM/SIGINT now lands after the renames, never between them
                if not (overwrite and path.exists() and _exchange(tmp, path)):  # exchanged: tmp holds the old copy
                    if path.exists() and overwrite:
                        os.replace(path, old)
                    try:
                        os.replace(tmp, path)
                    except BaseException:
                        if old.exists():  # put the previous directory back rather than delete it below
                            os.replace(old, path)
                        raise
                _fsync_dir(path.parent)
                shutil.rmtree(old, ignore_errors=True)  # only now that the new directory is in place
    except ResourceError as e:  # name the destination, not the temporary directory the user never sees
        raise ResourceError(str(e).replace(str(tmp), str(path))) from e
    finally:
        if tmp is not None:
            with deferred_signals():  # a signal during the cleanup waits for it
                shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the existing paths `a` and `b` in one atomic rename (renameat2 RENAME_EXCHANGE, Linux >= 3.15);
    False where the C library or the file system does not offer it."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGTERM and SIGINT until the block ends, then act on the first that came (its handler runs then:
    cli.run's one line and exit 143 or 130). For the steps that must not be cut: a rename pair, a write run by
    native threads (Orbax's), which a Python exception raised meanwhile turns into a native abort. Outside the
    main thread (where handlers cannot be set) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        if caught:
            signal.raise_signal(caught[0])


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def temp_prefix(path: Path) -> str:
    """`.NAME.PID.`: the temp names of a write to `path` carry the writer's process id (see `remove_stale`)."""
    return f".{path.name}.{os.getpid()}."


def remove_stale(path: Path) -> None:
    """Delete the temp files and directories of earlier writes to `path` whose process is gone (killed)."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def recover(path: str | Path) -> None:
    """Undo what a write to `path` killed midway left: put a directory moved aside by a replace back (or delete
    it if the new one made it into place), and delete stale temps."""
    path, old = Path(path), _old(Path(path))
    if old.is_dir() and not old.is_symlink():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)  # the replace finished; only the deletion was cut short
        else:
            os.replace(old, path)  # cut between the two renames: the old copy is the only one
    remove_stale(path)


def restore_old(path: str | Path) -> None:
    """For readers: where a replace killed between its two renames left only `.NAME.old`, put it back at `path`
    (the destination is never found missing)."""
    path, old = Path(path), _old(Path(path))
    if not path.exists() and old.is_dir() and not old.is_symlink():
        with contextlib.suppress(FileNotFoundError):  # another reader or the writer put it back first
            os.rename(old, path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextlib.contextmanager
def write_errors(path: Path, library: bool = True) -> Iterator[None]:
    """Errors while writing `path` as one ResourceError naming it: OSError (a full disk, a file size limit) and,
    with `library`, what the writers raise for them (SafetensorError, torch's RuntimeError, Orbax's ValueError).
    The project's own errors pass through."""
    try:
        yield
    except (CheckpointError, ResourceError, SpecError):
        raise
    except OSError as e:
        raise ResourceError(f"{path}: cannot write: {e.strerror or e}{_space(path)}") from e
    except (SafetensorError, RuntimeError, ValueError) as e:
        if not library:
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ResourceError(f"{path}: cannot write: {first[:300]}{_space(path)}") from e


def _space(path: Path) -> str:
    """Why a write may have failed, in words a library's message does not give ("unexpected pos 164672")."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        return f" (this process may write files of at most {limit:,} bytes, RLIMIT_FSIZE)"
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(next(p for p in [path, *path.parents] if p.exists())).free
        if free < 64 * 2**20:
            return f" (the disk has {free:,} bytes free)"
    return ""


# --- reading and checking -----------------------------------------------------------------------


MAX_HEADER = 100_000_000  # bytes; the safetensors library's own limit
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
# dtypes safetensors knows that its numpy reader cannot load (numpy has no such type): refused by name
UNREADABLE = {d: "numpy has no float8; convert the weights to F32, F16 or BF16 first" for d in
              ("F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ")}
UNREADABLE.update({d: "numpy has no 4- or 6-bit floats" for d in ("F4", "F6_E2M3", "F6_E3M2")})


def read_json(path: str | Path) -> dict:
    """A JSON object from a file (config.json, an index, a run's state.json); a missing or bad one is a
    CheckpointError naming it."""
    try:
        data = parse_json(read_capped(path, MAX_JSON_BYTES, "JSON file"), path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a JSON file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror}") from None
    except ValueError as e:  # bad or too deep JSON, bytes that are not UTF-8, a file over the limit
        raise CheckpointError(str(e)) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


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
        e = e if isinstance(e, dict) else {}
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        name = quote(name)[1:-1]
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


def safetensors_header(path: str | Path) -> dict:
    """The checked JSON header of a safetensors file (`read_header`), no tensor read; a bad file is a
    CheckpointError."""
    path = Path(path)
    if not path.exists() or path.is_dir():
        raise CheckpointError(f"{path}: no such file")
    try:
        return read_header(path)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file: {' '.join(str(e).split())}") from None


def read_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors and the string metadata of a safetensors file; a bad file is a CheckpointError."""
    path = Path(path)
    if not path.exists() or path.is_dir():
        raise CheckpointError(f"{path}: no such file")
    try:
        meta = read_header(path).get("__metadata__") or {}  # a FIFO or device is refused here, never opened by load_file
        weights = load_file(path)
    except (SafetensorError, ValueError, OSError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"{path}: not a valid safetensors file: {msg}") from None
    return weights, meta


def spec_from_json(text: str | bytes, path: str | Path, what: str = "spec") -> ModelSpec:
    """A spec stored as JSON (file metadata, `spec.json`); a bad one is a CheckpointError naming `path`."""
    try:
        return ModelSpec.from_dict(parse_json(text))  # a mapping only: not a preset name or a path
    except ValueError as e:  # JSON, UTF-8, limit and spec errors are all ValueErrors
        raise CheckpointError(f"{path}: invalid {what}: {e}") from None


def spec_from_metadata(meta: Mapping[str, str], path: str | Path) -> ModelSpec | None:
    return spec_from_json(meta["spec"], path, "spec in metadata") if "spec" in meta else None


def resolve_spec(file_spec: ModelSpec | None, given, path: str | Path) -> ModelSpec:
    """The spec to use: the given one must agree with the file's; one of them must exist."""
    if given is None:
        if file_spec is None:
            raise CheckpointError(f"{path}: the file carries no spec; pass one (--spec on the command line; spec= in Python: "
                                  "a preset name, YAML path or dict)")
        return file_spec
    spec = load_spec(given)
    if file_spec is not None and file_spec != spec:  # equal architectures, however their defaults were written
        a, b = file_spec.to_dict(), spec.to_dict()
        diff = "; ".join(f"{k}: file {a[k]!r} vs given {b[k]!r}" for k in a if a[k] != b[k])
        raise CheckpointError(f"{path}: spec in the file disagrees with the given spec: {diff}")
    return spec


def check_size(found: int, spec: ModelSpec, path: str | Path, fused: bool = False) -> None:
    """Refuse a spec that implies far more tensors than the `found` ones, before its layout table is built: a
    spec claiming 10^7 layers is refused in microseconds, where listing its missing keys would take minutes."""
    tensors, params, _ = layout_size(spec)
    if fused and spec.fused_qkv:
        tensors -= 2 * spec.L
    if tensors > 2 * found + 64:
        raise CheckpointError(
            f"{path}: the spec implies {tensors:,} tensors ({spec.L:,} layers, {params:,} parameters, "
            f"{params * np_dtype(spec.param_dtype).itemsize / GB:,.1f} GiB) but the file holds {found:,}"
        )


# Tensors some writers save that are computed from the spec, never learned: ignored on load with a note, as
# transformers ignores them (transformers < 4.31 saved each Llama layer's RoPE `inv_freq`; later ones one copy).
DERIVED_BUFFERS = re.compile(r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")


def without_derived(tensors: dict, path: str | Path) -> dict:
    """`tensors` less the known derived buffers (`DERIVED_BUFFERS`), with a one-line note on stderr naming them;
    every other unexpected tensor is left for the layout check to refuse."""
    if not (derived := [n for n in tensors if DERIVED_BUFFERS.fullmatch(n)]):
        return tensors
    print(f"note: {path}: ignoring {len(derived)} derived buffer(s) recomputed from the spec: {group_names(derived)}",
          file=sys.stderr)
    return {n: x for n, x in tensors.items() if n not in derived}


def layout_problems(weights: Mapping, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches of `weights` (any array type), grouped by layer."""
    problems = []
    if missing := [n for n in shapes if n not in weights]:
        problems.append(f"missing keys: {group_names(missing)}")
    if unexpected := [n for n in weights if n not in shapes]:
        problems.append(f"unexpected keys: {group_names(unexpected)}")
    wrong = [
        f"{n} expected {list(s)} found {list(weights[n].shape)}"
        for n, s in shapes.items()
        if n in weights and tuple(weights[n].shape) != tuple(s)
    ]
    if wrong:
        problems.append("shape mismatches: " + ", ".join(wrong))
    return problems


def check_layout(weights: Mapping, shapes: Mapping[str, tuple[int, ...]], path: str | Path) -> None:
    """Check a framework's in-memory layout (names and shapes) before converting it to the canonical one."""
    if problems := layout_problems(weights, shapes):
        raise CheckpointError(f"{path}: " + "; ".join(problems))


def check_tensors(
    tensors: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], path: str | Path,
    allow_nonfinite: bool = False,
) -> None:
    """Check numpy `tensors` against the expected names and shapes, float dtypes and (unless allowed) finite
    values; every problem in one error naming `path`."""
    problems = layout_problems(tensors, shapes)
    if not_float := [n for n in shapes if n in tensors and not is_float(tensors[n])]:
        problems.append(f"non-float dtypes: {', '.join(f'{n} ({tensors[n].dtype})' for n in not_float)}")
    elif not allow_nonfinite:
        with np.errstate(over="ignore", invalid="ignore"):  # a float64 past float32's range: reported below, not warned
            bad = [n for n in shapes if n in tensors and not np.isfinite(tensors[n].astype(np.float32)).all()]
        if bad:
            problems.append(f"non-finite values (NaN/Inf) in: {group_names(bad)}")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))


def check_weights(
    weights: Mapping[str, np.ndarray], spec: ModelSpec, path: str | Path, allow_nonfinite: bool = False
) -> None:
    """Check canonical `weights` against `layout(spec)` (check_tensors), their count first (check_size)."""
    check_size(len(weights), spec, path)
    check_tensors(weights, {t.name: t.shape for t in layout(spec)}, path, allow_nonfinite)


def load_checkpoint(
    path: str | Path, spec=None, allow_nonfinite: bool = False
) -> tuple[dict[str, np.ndarray], ModelSpec]:
    """Canonical weights (cast to the spec's param dtype) and the spec, everything checked; the spec and the
    tensor count (`check_size`) from the header, before any tensor is read."""
    header = safetensors_header(path)
    spec = resolve_spec(spec_from_metadata(header.get("__metadata__") or {}, path), spec, path)
    check_size(len(header) - ("__metadata__" in header), spec, path)
    weights = without_derived(read_safetensors(path)[0], path)
    check_weights(weights, spec, path, allow_nonfinite)
    dtype = np_dtype(spec.param_dtype)
    with np.errstate(over="ignore"):  # allow_nonfinite: a float64 past float32's range becomes inf, as asked
        return {t.name: weights[t.name].astype(dtype, copy=False) for t in layout(spec)}, spec


def save_checkpoint(
    path: str | Path, weights: Mapping[str, np.ndarray], spec: ModelSpec, file_format: str = "twinlm"
) -> None:
    """Write the canonical file atomically, in layout order, with the spec in the metadata.

    `file_format` is the metadata's "format"; transformers loads only "pt" files, see `shared_config.hf`.
    """
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
