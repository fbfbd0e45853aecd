"""A run's metrics.jsonl (shared_config/run_dir.py's layout): records appended whole, read back line by line within
bounds, and cut back to a checkpoint's step when a run resumes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

from .files import CheckpointError, atomic_write, json_text, write_errors
from .limits import MAX_JSON_BYTES, LimitError, open_regular, parse_json, quote


def append_metrics(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Append one JSON line per record (whole lines, flushed, so a reader never sees half a record)."""
    text = "".join(json_text(r) + "\n" for r in records)
    if text:
        with write_errors(Path(path)), open(path, "a") as f:
            f.write(text)
            f.flush()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, read line by line; a last line cut short by a crash is skipped.

    Any other line that is not a JSON object with an integer "step" is a CheckpointError naming the line:
    a resumed run rewrites the file, and must not drop or choke on what it cannot read. A null (how
    files.json_text writes a non-finite number) reads back as NaN.
    """
    path = Path(path)
    if not path.exists():
        return []
    records, cut = [], None  # cut: the number of a line that is not JSON, allowed only as the last line
    try:
        f = open_regular(path, "metrics file")
    except (OSError, LimitError) as e:
        raise CheckpointError(str(e) if isinstance(e, LimitError) else f"{path}: cannot read: {e.strerror}") from None
    with f:
        # readline with a bound: iterating the file read a hostile line whole (a 10 GB file without a newline)
        for number, line in enumerate(iter(lambda: f.readline(MAX_JSON_BYTES + 1), b""), 1):
            if not line.strip():
                continue
            if cut is not None:
                raise CheckpointError(f"{path}: line {cut}: not valid JSON (and not the last line, cut by a crash)")
            if len(line) > MAX_JSON_BYTES:
                raise CheckpointError(f"{path}: line {number} is over the {MAX_JSON_BYTES:,}-byte limit")
            try:
                record = parse_json(line)
            except LimitError as e:
                raise CheckpointError(f"{path}: line {number}: {e}") from None
            except ValueError:
                cut = number
                continue
            if not isinstance(record, dict):
                raise CheckpointError(f"{path}: line {number}: a JSON object is expected, got {quote(record)}")
            if "step" in record and (not isinstance(record["step"], int) or isinstance(record["step"], bool)):
                raise CheckpointError(f"{path}: line {number}: step must be an integer, got {quote(record['step'])}")
            records.append(_null_to_nan(record))
    return records


def _null_to_nan(record: dict) -> dict:
    """A metrics record with the nulls `json_text` wrote for non-finite numbers read back as NaN (also inside its
    "scalars"), so that a diverged run's record reads as it was logged. "scalars" itself is a mapping, never a
    number: a null there stays null, refused as such (plot_curves said "got nan")."""
    return {k: math.nan if v is None and k != "scalars" else _null_to_nan(v) if isinstance(v, dict) else v
            for k, v in record.items()}


def truncate_metrics(path: str | Path, step: int) -> None:
    """Keep the records up to `step` (a resumed run logs the steps after its checkpoint again). A symbolic link there
    is replaced by a file of those records, never written through (as run_dir.copy_tokenizer's): a resume rewrote
    the link's target, a file outside the run directory, and appended its steps to it; the target stays as it was."""
    path = Path(path)
    if path.exists() or path.is_symlink():  # a FIFO or device there is refused by read_metrics, never appended to
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]  # none through a broken link
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json_text(r) + "\n" for r in kept)),
                     follow_links=False)
