"""Files on disk, written so that a crash or a kill never leaves half of one (stdlib only, and safetensors' error type).

`atomic_write` (one file) and `atomic_dir` (a directory) build under a temporary name beside the target and
rename into place; `deferred_signals` holds SIGTERM/SIGINT over the steps that must not be cut; `recover` and
`restore_old` undo what a killed write left; `write_errors` turns a full disk into one ResourceError naming the
file. `read_json` reads the small JSON files beside the weights (config.json, an index, a run's state.json);
`json_text` is the JSON every file and stdout report is written as.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import math
import os
import resource
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from safetensors import SafetensorError

from .limits import MAX_JSON_BYTES, parse_json, quote, read_capped
from .resources import ResourceError
from .config_file import SpecError


class CheckpointError(ValueError):
    """A checkpoint (or a JSON file beside one: config.json, an index, a run's state.json) that cannot be used as
    asked; the message names the file and every problem. Defined here, below the format readers, because
    `read_json` raises it and `write_errors` lets it through."""


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


def save_figure(fig, path: str | Path, dpi: float | None = None) -> None:
    """A matplotlib figure written atomically in the format its name ends in (.png, .pdf, .svg, any case): the bench's
    plots wrote PNG bytes under whatever name they were given (a .pdf or .svg that no viewer opened)."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix[1:].lower(), dpi=dpi))


def atomic_write(path: str | Path, write: Callable[[Path], None], follow_links: bool = True) -> None:
    """Run `write(tmp)` on a temp file beside `path`, fsync, then rename it into place: through a symbolic link
    at `path`, onto its target; with `follow_links=False` onto the link itself, which the file replaces in the one
    rename (the target left as it was: a run's own file that a user linked elsewhere, metrics.jsonl or
    tokenizer.json, is never written through).

    On any failure the temp file is removed and `path` is left exactly as it was; a failure while
    writing (a full disk, a file size limit) is a ResourceError naming `path`. Temp files that a killed
    earlier write to `path` left behind are removed first. The file gets the umask's permissions.
    """
    path = Path(path) if not follow_links and os.path.islink(path) else destination(path, directory=False)
    remove_stale(path)
    tmp = None
    try:
        with deferred_signals(), named(path):  # the temp file exists only once `tmp` names it for the cleanup below
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
    path = destination(path, directory=True)
    recover(path)
    tmp, old, placed = None, _old(path), False
    try:
        with deferred_signals(), named(path):  # the temp directory exists only once `tmp` names it for the cleanup
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
                placed = True
                shutil.rmtree(old, ignore_errors=True)  # only now that the new directory is in place
    except ResourceError as e:  # name the destination, not the temporary directory the user never sees
        raise ResourceError(str(e).replace(str(tmp), str(path))) from e
    finally:
        if tmp is not None:
            with deferred_signals():  # a signal during the cleanup waits for it
                # a failed write's threads may still be writing: it must stay gone a moment (placed: nothing writes)
                remove_tree(tmp, settle=0 if placed else 0.25)


def remove_tree(path: Path, seconds: float = 5.0, settle: float = 0.0) -> None:
    """Delete directory `path`, again while it still exists, for up to `seconds`: a writer's threads may still add
    files to it as it goes (Orbax's, after a save failed on a full disk, left the directory behind 1 time in 16).
    `settle`: once deleted, it must stay gone this long (seconds), for a writer that makes its paths' parents again
    (tensorstore's makedirs recreated it in the instant after one deletion: the test saw it 1 run in ~10 under load)."""
    deadline, gone_since = time.monotonic() + seconds, None
    while True:
        shutil.rmtree(path, ignore_errors=True)
        now = time.monotonic()
        if os.path.lexists(path):
            gone_since = None
        elif gone_since is None:
            gone_since = now
        if (gone_since is not None and now - gone_since >= settle) or now >= deadline:
            return
        time.sleep(0.05)


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


MAX_STEM = 200  # characters of a destination's name in its temp names: `.NAME.PID.XXXXXXXX.tmp` stays within 255


def destination(path: str | Path, directory: bool) -> Path:
    """Where a write to `path` lands: through a symbolic link, its target (a rename onto the link would replace the
    link itself). An existing path of the other kind, or neither a file nor a directory (a device such as
    /dev/stdout, a pipe), is refused: the write would replace it. A path of another type (None, 5) is a TypeError, an
    empty one a FileNotFoundError (as `open("")`), one with a NUL byte a ValueError, each naming what was given: `Path`
    made "." of an empty path, and a write to it failed as "is a directory"."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a path to write to is a str or an os.PathLike, not {type(path).__name__} {path!r:.80}")
    if not str(path):
        raise FileNotFoundError(errno.ENOENT, "an empty path names no file to write", "")
    if "\0" in str(path):
        raise ValueError(f"{str(path)!r:.200}: a path to write to cannot hold a NUL character")
    path = Path(path)
    if path.exists() and not (path.is_dir() if directory else path.is_file()):
        what = "a directory" if path.is_dir() else "a file" if path.is_file() else "neither a file nor a directory"
        raise FileExistsError(errno.EEXIST, f"is {what}; a {'directory' if directory else 'file'} is written here",
                              str(path))
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def resolved(path: str | Path) -> Path:
    """`path` made absolute through its symbolic links. A `~` is a name, as every reader and writer takes it (the shell
    expands an unquoted one): expanded here alone, a quoted `'~/r.png'` passed the output checks as the home
    directory's file and was then read and written as ./~/r.png, so `replot.py '~/r.png' --out '~/r.png'` replaced its
    report. A loop of links (`ln -s x x`) is OSError ELOOP, one line from every tool (exit 2), as Python 3.13's resolve
    raises it: 3.11's is a RuntimeError, a traceback."""
    try:
        return Path(path).resolve()
    except RuntimeError:
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path)) from None


def first_missing(path: str | Path) -> Path | None:
    """The outermost directory that making `path` (resolved: a link's target) creates, None where it exists: what to
    remove so that a stopped job that made it leaves nothing behind."""
    path = resolved(path)
    return next((d for d in reversed([path, *path.parents]) if not d.exists()), None)


@contextlib.contextmanager
def named(path: Path) -> Iterator[None]:
    """An OSError of making a temp file or directory beside `path` names `path`, not the temp name it never sees."""
    try:
        yield
    except OSError as e:
        raise type(e)(e.errno, e.strerror, str(path)) from e


def _stem(path: Path) -> str:
    return path.name[:MAX_STEM]


def _old(path: Path) -> Path:
    return path.with_name(f".{_stem(path)}.old")


def temp_prefix(path: Path) -> str:
    """`.NAME.PID.`: the temp names of a write to `path` carry the writer's process id (see `remove_stale`); a long
    NAME is cut to MAX_STEM characters, so that a name the file system takes has temp names it takes too."""
    return f".{_stem(path)}.{os.getpid()}."


def remove_stale(path: Path) -> None:
    """Delete the temp files and directories of earlier writes to `path` whose process is gone (killed)."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for tmp in path.parent.glob(f".{glob.escape(_stem(path))}.*.tmp"):
        pid = tmp.name[len(_stem(path)) + 2 :].split(".", 1)[0]
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
    (the destination is never found missing). A path without a name ("/", "."; Path.with_name raised ValueError)
    exists: nothing to put back."""
    if not Path(path).name:
        return
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
        space = _space(path) if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else ""  # else: not the cause
        raise ResourceError(f"{path}: cannot write: {e.strerror or e}{space}") from e
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


# --- reading -----------------------------------------------------------------------------------


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
        raise CheckpointError(f"{path}: must hold a JSON object, got {quote(data)}")
    return data


# --- writing JSON ----------------------------------------------------------------------------------


def json_text(data: Any, indent: int | None = None) -> str:
    """`data` as strict JSON text (RFC 8259), the one way the project writes JSON (reports, metrics.jsonl, state.json,
    config.json, what a command prints): a non-finite float (NaN, +-inf: a diverged loss, a kernel's NaN error)
    is written as null. Python's `json.dumps` writes them as the bare words NaN and Infinity, which JSON does not
    have, so jq, JavaScript's `JSON.parse` and most other parsers refuse the whole file; `read_metrics` reads null
    back as NaN. Raises TypeError for a value JSON cannot hold (as `json.dumps` does)."""
    return json.dumps(_finite(data), indent=indent, allow_nan=False)


def _finite(x: Any) -> Any:
    """`x` with every non-finite float in it (nested in dicts, lists and tuples) replaced by None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x
