"""Progress on stderr for the long-running commands: a tqdm bar on a terminal; when stderr is a file or a
pipe, plain lines, at most one per `interval` seconds and one per position, with no carriage returns; nothing
when quiet. The rate is the average since the bar's clock started, which `restart_clock` moves past a first
step that compiled."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from .files import temp_prefix

LINE_INTERVAL_S = 10.0  # seconds between two plain progress lines


class Lines:
    """A stream for tqdm that writes each redraw of the bar as one plain line (tqdm redraws with `\\r`)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        if line := text.replace("\r", "").strip():  # a bar cleared for tqdm.write is blank: nothing to show
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class PlainBar(tqdm):
    """tqdm off a terminal: each position shown at most once. (tqdm shows the bar again when it closes, and
    again after a `tqdm.write` to the same stream: the final 100% line came two or three times.)"""

    shown = None  # the position of the last line written

    def display(self, msg=None, pos=None):
        if msg is None and self.n == self.shown:
            return True
        if msg is None:
            self.shown = self.n
        return super().display(msg, pos)


def progress(iterable=None, *, quiet: bool = False, interval: float = LINE_INTERVAL_S, stream=None, **kwargs) -> tqdm:
    """`tqdm(iterable, **kwargs)` on `stream` (default stderr): a bar on a terminal, plain periodic lines
    otherwise, disabled when `quiet`."""
    stream = sys.stderr if stream is None else stream
    kwargs.setdefault("smoothing", 0)  # the average since the clock started: an EMA would keep a compile step
    if quiet:
        return tqdm(iterable, disable=True, **kwargs)
    if stream.isatty():
        return tqdm(iterable, file=stream, **kwargs)
    kwargs.pop("dynamic_ncols", None)
    return PlainBar(iterable, file=Lines(stream), mininterval=interval, ncols=100, ascii=True, **kwargs)


QUICK_S = 2.0  # `progress(delay=QUICK_S)`: a command whose work ends sooner shows no bar at all
POLL_S = 0.5  # seconds between two looks at a file being written


@contextlib.contextmanager
def writing(path: str | Path, total: int, quiet: bool = False, poll: float = POLL_S) -> Iterator[None]:
    """A bar of the bytes written so far to `path` by one call that reports nothing itself (torch.save, safetensors'
    save_file, Orbax): the size of the temporary file or directory the atomic writers fill beside `path`
    (files.temp_prefix), polled every `poll` seconds by a thread. `total`: the bytes expected (the weights'); the
    bar shows only once the write has taken QUICK_S seconds, so a small checkpoint is written silently."""
    path = Path(path)
    prefix, done = temp_prefix(path), threading.Event()
    with progress(total=total, desc=f"write {path.name}", unit="B", unit_scale=True, delay=QUICK_S,
                  quiet=quiet) as bar:
        def watch():
            while not done.wait(poll):
                size = sum(_size(p) for p in path.parent.iterdir() if p.name.startswith(prefix))
                bar.update(min(size, total) - bar.n)

        watcher = threading.Thread(target=watch, name="write-progress", daemon=True)
        if not quiet:
            watcher.start()
        try:
            yield
        finally:
            done.set()
            if watcher.is_alive():
                watcher.join()
        bar.update(total - bar.n)  # written: the file's own size differs from the weights' by its header


def _size(path: Path) -> int:
    """Bytes in the file `path`, or in every file under the directory `path`; 0 for what vanished meanwhile."""
    try:
        if not path.is_dir():
            return path.stat().st_size
        return sum((Path(root) / f).stat().st_size for root, _, files in os.walk(path) for f in files)
    except FileNotFoundError:  # renamed into place, or a writer's own temp file gone, between two looks
        return 0


def advance(bar: tqdm, to: int, **postfix) -> None:
    """Move `bar` to position `to`, showing `postfix` (name=value) beside it, in one redraw that tqdm
    rate-limits like any update. (`set_postfix` alone redraws at once: off a terminal, a plain line on
    every call.)"""
    bar.set_postfix(refresh=False, **postfix)
    bar.update(to - bar.n)


def restart_clock(bar: tqdm, to: int, **postfix) -> None:
    """`advance` to position `to`, shown at once, and count the bar's elapsed time, rate and ETA from here on.
    For the end of a first step that compiled: counted as a step, it made the ETA of a 50 s run 10 minutes
    (tqdm's rate is then the steps since over the time since: `smoothing=0`, progress' default)."""
    if bar.disable:
        return
    bar.set_postfix(refresh=False, **postfix)
    bar.n = bar.last_print_n = bar.initial = to
    bar.start_t = bar.last_print_t = time.time()  # tqdm's clock
    bar.refresh()
