"""Progress on stderr for the long-running commands: a tqdm bar on a terminal; when stderr is a file or a
pipe, plain lines, at most one per `interval` seconds, with no carriage returns; nothing when quiet."""

from __future__ import annotations

import sys

from tqdm import tqdm

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


def progress(iterable=None, *, quiet: bool = False, interval: float = LINE_INTERVAL_S, stream=None, **kwargs) -> tqdm:
    """`tqdm(iterable, **kwargs)` on `stream` (default stderr): a bar on a terminal, plain periodic lines
    otherwise, disabled when `quiet`."""
    stream = sys.stderr if stream is None else stream
    if quiet:
        return tqdm(iterable, disable=True, **kwargs)
    if stream.isatty():
        return tqdm(iterable, file=stream, **kwargs)
    kwargs.pop("dynamic_ncols", None)
    return tqdm(iterable, file=Lines(stream), mininterval=interval, ncols=100, ascii=True, **kwargs)



def advance(bar: tqdm, to: int, **postfix) -> None:
    """Move `bar` to position `to`, showing `postfix` (name=value) beside it, in one redraw that tqdm
    rate-limits like any update. (`set_postfix` alone redraws at once: off a terminal, a plain line on
    every call.)"""
    bar.set_postfix(refresh=False, **postfix)
    bar.update(to - bar.n)
