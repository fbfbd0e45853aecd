"""A Ctrl-C or SIGTERM at any moment of a command-line tool: one `error:` line, exit 130 / 143, nothing half-written,
whatever the tool had set up (the libraries it quieted) or not set up yet (its imports)."""

from __future__ import annotations

import signal
import sys
import types

import pytest

from shared_config import twins
from shared_config.formats import quiet_libraries

from ..support.common import run_python


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


SWALLOWED_ON_ITS_WAY = """
import signal, time
from shared_config.cli import run

def main(argv):
    try:  # as an extension module's init (jax's MLIR bindings) clears the exception of the Python code it calls
        signal.raise_signal(getattr(signal, argv[0]))
    except KeyboardInterrupt:
        pass
    for _ in range(100):
        time.sleep(0.05)
    print("ran on")

run(main)
"""


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_whose_exception_is_swallowed_on_its_way_is_delivered_again(name):
    """A Ctrl-C during `import jax` can land in the Python code an extension module's init runs, which clears the
    exception: generate.py then ran to the end and exited 0. cli.run watches the exception it raised; freed before
    run caught it, the signal is delivered again."""
    r = run_python("-c", SWALLOWED_ON_ITS_WAY, name)
    assert (r.returncode, r.stdout) == (128 + getattr(signal, name), ""), r.stderr
    assert r.stderr == f"error: interrupted by {name}; partial outputs removed\n"


def test_a_signal_while_a_twin_imports_lands_once_the_import_is_done(monkeypatch):
    """A Ctrl-C during `import jax` (generate.py, train.py, the bench in their first second) raised in the Python
    code that jaxlib's extension modules run as they load: the process aborted (nanobind's error in a noexcept
    function, exit 134) or the interrupt was cleared. The twin's import is held whole; the signal comes after."""
    imported = []

    def import_module(name):
        signal.raise_signal(signal.SIGINT)
        imported.append(name)
        return types.ModuleType(name)

    monkeypatch.setattr(twins.importlib, "import_module", import_module)
    with pytest.raises(KeyboardInterrupt):
        twins.twin("jax", "generate")
    assert imported == ["jax_model.generate"]
