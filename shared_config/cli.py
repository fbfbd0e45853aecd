"""What every command-line tool shares: one-line errors on stderr, exit code 2, no traceback unless --debug."""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable

from .data import DataError
from .io import CheckpointError
from .spec import SpecError


class UsageError(ValueError):
    """Bad command-line input that argparse itself cannot see (a bad combination, a missing file)."""


USER_ERRORS = (SpecError, CheckpointError, DataError, UsageError, FileNotFoundError, IsADirectoryError, PermissionError)


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one `error:` line (exit 2) and every tool has --debug."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show the full traceback on errors")

    def error(self, message):
        fail(message)


def fail(message: str, code: int = 2):
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(code)


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run `main`; user errors become one `error:` line and exit code 2 (traceback with --debug)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        sys.exit(main(argv) or 0)
    except USER_ERRORS as e:
        if "--debug" in argv:
            traceback.print_exc()
        msg = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.filename}: {e.strerror}"
        fail(msg)
