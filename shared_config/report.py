"""A bench's JSON report on disk, rewritten whole after every completed row, so that a stopped run keeps what it
measured (docs/bench.md: reports on disk)."""

from __future__ import annotations

import json
from pathlib import Path

from .files import atomic_write


def write_report(path: str | Path | None, report: dict, *, complete: bool) -> None:
    """Write `report` as JSON to `path` (nothing when `path` is None), atomically (io.atomic_write: the file on disk
    is always a whole report, the previous or this one), with `"complete": complete` added: false while rows are
    still to come, true once the run has finished. Raises ResourceError when the write fails (a full disk)."""
    if path is None:
        return
    body = {**report, "complete": complete}
    atomic_write(Path(path), lambda tmp: tmp.write_text(json.dumps(body, indent=2) + "\n"))
