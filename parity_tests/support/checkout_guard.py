"""Which files a test writes into the checkout, seen from inside the test process: Python's audit hooks report
every open for writing, rename, mkdir, removal and copy with its path. Only this process's own calls are seen,
so a file the user's own commands write into the checkout while the suite runs is never blamed on a test.

Subprocesses that tests start run in a scratch directory (`common.run_python`), so their default outputs land
there, not here. A writer below Python (a C library opening its own files) is not seen.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CACHES = ("__pycache__", ".pytest_cache", ".hypothesis", ".egg-info")
# audit event -> the positions of its path arguments that are written (created, replaced or removed)
EVENTS = {
    "open": (0,), "os.rename": (1,), "os.mkdir": (0,), "os.remove": (0,), "os.rmdir": (0,), "os.truncate": (0,),
    "os.symlink": (1,), "os.link": (1,), "shutil.copyfile": (1,), "shutil.copytree": (1,), "shutil.rmtree": (0,),
    "os.chmod": (0,), "os.utime": (0,),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class CheckoutGuard:
    """Records the paths under `root` that this process writes while `recording`. `skip`: directories where
    writing is fine (pytest's base temp, the temp dir), should a user have put them inside the checkout; those
    outside it are dropped, so that a checkout cloned under /tmp stays guarded."""

    def __init__(self, root: str | Path, skip: tuple[str | Path, ...] = (), hook: bool = True):
        self.root = str(Path(root).resolve())
        self.skip = [s for s in (str(Path(p).resolve()) for p in skip) if s.startswith(self.root + os.sep)]
        self.written: list[str] = []
        self.recording = False
        if hook:
            sys.addaudithook(self._hook)  # for the life of the process: audit hooks cannot be removed

    def take(self) -> list[str]:
        """The paths written since the last take, relative to `root`, sorted; then forgotten."""
        written, self.written = self.written, []
        return sorted({os.path.relpath(p, self.root) for p in written})

    def _hook(self, event: str, args: tuple) -> None:
        if not self.recording or event not in EVENTS:
            return
        if event == "open" and not _writes(args):
            return
        for i in EVENTS[event]:
            if i < len(args) and (path := _path(args[i])) is not None and self._guarded(path):
                self.written.append(path)

    def _guarded(self, path: str) -> bool:
        inside = path == self.root or path.startswith(self.root + os.sep)
        return inside and not any(c in path for c in CACHES) and not any(
            path == s or path.startswith(s + os.sep) for s in self.skip)


def _writes(args: tuple) -> bool:
    """Whether an `open` audit event (path, mode, flags) opens for writing."""
    mode, flags = (args + (None, None))[1:3]
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & WRITE_FLAGS)


def _path(arg) -> str | None:
    """An absolute path for a path argument (relative ones against the working directory), None for a file
    descriptor or anything else."""
    if isinstance(arg, (str, bytes, os.PathLike)):
        try:
            return os.path.realpath(os.fsdecode(arg))
        except (TypeError, ValueError):
            return None
    return None
