"""A Ctrl-C or SIGTERM at any moment of a command-line tool: one `error:` line, exit 130 / 143, nothing half-written,
whatever the tool had set up (the libraries it quieted) or not set up yet (its imports)."""

from __future__ import annotations

import signal
import sys
import types

import pytest

from shared_config.cli import UsageError, run
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


CLEARED_IN_AN_IMPORT = """
import signal, sys, time
from shared_config.cli import run

def main(argv):
    sys.path.insert(0, argv[0])
    import native  # a signal while it loads
    print("imported" if native.LOADED else "cut", flush=True)
    for _ in range(100):
        time.sleep(0.05)
    print("ran on")

run(main)
"""

NATIVE = """
import signal
try:  # as an extension module's init (jaxlib's, during import jax) treats the Python code it runs: an exception
    signal.raise_signal(signal.{name})  # there is cleared, or aborts the process
except KeyboardInterrupt:
    pass
LOADED = True
"""


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_during_an_import_lands_once_the_import_is_done(tmp_path, name):
    """A Ctrl-C during `import jax` (every tool imports jax or torch lazily, in its first seconds) was raised in the
    Python code that jaxlib's extension modules run as they load: the process aborted (exit 134) or the exception was
    cleared there and the run went on to exit 0 (generate.py, bench/compare.py). cli.run's handler delivers a signal
    that comes during an import again once the import is done."""
    (tmp_path / "native.py").write_text(NATIVE.format(name=name))
    r = run_python("-c", CLEARED_IN_AN_IMPORT, tmp_path)
    assert (r.returncode, r.stdout) == (128 + getattr(signal, name), "imported\n"), r.stderr
    assert r.stderr == f"error: interrupted by {name}; partial outputs removed\n"


KEEPS_A_REPORT = """
import signal, sys
from shared_config.cli import run
from shared_config.report import write_report

def main(argv):
    write_report(argv[0], {{"rows": [1]}}, complete=False)
    {then}
    signal.raise_signal(signal.SIGINT)

run(main)
"""


@pytest.mark.parametrize("then, says", [
    ("", "error: interrupted by SIGINT; {path} keeps the rows done so far (\"complete\": false)\n"),
    ('write_report(argv[0], {"rows": [1, 2]}, complete=False)', "error: interrupted by SIGINT; {path} keeps the rows "
                                                                "done so far (\"complete\": false)\n"),
    ('write_report(argv[0], {"rows": [1, 2]}, complete=True)', "error: interrupted by SIGINT; partial outputs "
                                                               "removed\n"),
], ids=["partial", "partial again", "completed"])
def test_an_interrupted_bench_names_the_report_it_keeps(tmp_path, then, says):
    """A stopped bench keeps its report, whole as of its last row (docs/bench.md), but its interrupt line said
    "partial outputs removed": a user deleted nothing and looked for nothing. The line names the kept report."""
    path = tmp_path / "r.json"
    r = run_python("-c", KEEPS_A_REPORT.format(then=then), str(path))
    assert (r.returncode, r.stdout, r.stderr) == (130, "", says.format(path=path))
    assert path.exists()


def refused(argv):
    raise UsageError("--steps: expected a number")


@pytest.mark.parametrize("main", [lambda argv: 0, refused], ids=["done", "usage error"])
def test_a_caller_of_run_gets_its_signal_handlers_and_unraisable_hook_back(main):
    """run(main, argv) called by a program that goes on (a test, a notebook) puts the caller's SIGINT and SIGTERM
    handlers and unraisable hook back as it ends: it left SIGINT ignored after a success (this suite, once it had run
    a tool in-process, no longer stopped at Ctrl-C) and its own handler after an error."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), sys.unraisablehook
    with pytest.raises(SystemExit):
        run(main, [])
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), sys.unraisablehook) == before


INTERRUPTED_CALL = """
import signal, sys
from shared_config.cli import run

def main(argv):
    signal.raise_signal(signal.SIGINT)

before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler; SIG_IGN under pytest-xdist, inherited
try:
    run(main, [])
except SystemExit as e:
    print("the caller goes on", e.code, signal.getsignal(signal.SIGINT) is before)
"""


def test_an_interrupted_run_called_with_argv_ends_with_system_exit_and_the_caller_goes_on():
    """Only a script's run(main) ends an interrupted process at once (os._exit, past the teardown that segfaulted
    after a cut XLA compile); a caller that passed argv gets SystemExit(130) and goes on."""
    r = run_python("-c", INTERRUPTED_CALL)
    assert (r.returncode, r.stdout) == (0, "the caller goes on 130 True\n"), r.stderr
    assert r.stderr == "error: interrupted by SIGINT; partial outputs removed\n"
