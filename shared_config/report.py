"""A bench's JSON report on disk, rewritten whole after every completed row, so that a stopped run keeps what it
measured (docs/bench.md: reports on disk); or, with `--json -`, the finished report alone on stdout."""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import sys
from pathlib import Path

from .files import atomic_write, json_text

STDOUT = "-"  # `--json -`: the report goes to stdout, as Unix tools read "-"
_stdout = None  # the real stdout while report_on_stdout sends printing to stderr
_partial: Path | None = None  # the report last written incomplete: what an interrupted run keeps (cli.run says so)


def write_report(path: str | Path | None, report: dict, *, complete: bool) -> None:
    """Write `report` as JSON to `path` (nothing when `path` is None), atomically (io.atomic_write: the file on disk
    is always a whole report, the previous or this one), with `"complete": complete` added: false while rows are
    still to come, true once the run has finished. Raises ResourceError when the write fails (a full disk).
    `path` "-": the complete report once on stdout (the partial ones a file gets would be several documents)."""
    global _partial
    if path is None:
        return
    body = {**report, "complete": complete}
    if str(path) == STDOUT:
        if complete:
            out = _stdout or sys.stdout
            out.write(json_text(body, indent=2) + "\n")
            out.flush()
        return
    atomic_write(Path(path), lambda tmp: tmp.write_text(json_text(body, indent=2) + "\n"))
    _partial = None if complete else Path(path)


def partial_report(forget: bool = False) -> Path | None:
    """The report this process last wrote with `"complete": false` and has not completed since, or None: an
    interrupted bench keeps it, whole as of its last row (cli.run's interrupt line names it). `forget`: clear it
    (a new run in the same process)."""
    global _partial
    kept = _partial
    if forget:
        _partial = None
    return kept


@contextlib.contextmanager
def report_on_stdout(path: str | Path | None):
    """With `--json -`, stdout carries the JSON report and nothing else: what the command prints for people (its
    table, notes) goes to stderr meanwhile; `--json -` once wrote a file named "-". Any other path: no change."""
    global _stdout
    if path is None or str(path) != STDOUT:
        yield
        return
    _stdout = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _stdout = None


def versions(*distributions: str) -> dict[str, str | None]:
    """Python's version and each installed distribution's (None: not installed), read from package metadata: no
    package is imported for it. What run.json's invocations and the bench's reports record."""
    found = {"python": platform.python_version()}
    for dist in distributions:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    return found
