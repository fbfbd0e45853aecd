"""A Ctrl-C or SIGTERM at any moment of a command-line tool: one `error:` line, exit 130 / 143, nothing half-written,
whatever the tool had set up (the libraries it quieted) or not set up yet (its imports)."""

from __future__ import annotations

import sys
import types

from shared_config.formats import quiet_libraries


def test_quieted_libraries_still_pass_a_swallowed_interrupt_to_the_hook_that_delivers_it_again():
    """generate.py, convert.py, parity_report.py and train.py quiet the libraries' unraisable exceptions; a Ctrl-C
    landing in jax's gc callback (during the imports, the compile) was silenced with them, and the interrupted run
    went on to exit 0. It reaches the hook set before (cli.run's); the rest stays silent, and a second call does
    not chain the wrapper."""
    seen, before = [], sys.unraisablehook
    sys.unraisablehook = lambda unraisable: seen.append(type(unraisable.exc_value).__name__)
    try:
        quiet_libraries()
        quiet_libraries()
        for exc in (KeyboardInterrupt(), RuntimeError("event loop is closed"), SystemExit(0)):
            sys.unraisablehook(types.SimpleNamespace(exc_value=exc, exc_type=type(exc), object=None))
    finally:
        sys.unraisablehook = before
    assert seen == ["KeyboardInterrupt"]
