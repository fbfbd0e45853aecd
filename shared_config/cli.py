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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, unless its help text already speaks of it or it has none."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, False, [], argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one `error:` line (exit 2), every tool has --debug and --help shows defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
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
