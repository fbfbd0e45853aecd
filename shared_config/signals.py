"""How a command stops on SIGINT or SIGTERM: the signal becomes an exception (KeyboardInterrupt, or Terminated),
raised where Python code can take it, so that the `with` blocks remove partial outputs; shared_config.cli.run installs
these handlers and turns the exception into its `error:` line and exit code (130 / 143)."""

from __future__ import annotations

import _thread
import atexit
import contextlib
import os
import signal
import sys
import threading

REDELIVER_S = 0.05  # seconds after a Ctrl-C or SIGTERM swallowed in a callback until it is delivered again


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same cleanup (temp files, half-built directories) runs."""


def interrupt(signum, frame):
    """The SIGINT and SIGTERM handler that shared_config.cli.run installs: raise KeyboardInterrupt or Terminated,
    except while a module is being imported (`frame`'s stack runs importlib): there the exception was raised in
    whatever Python code the import ran, and an extension module's init that ran it (jaxlib's nanobind modules, during
    any `import jax`) aborted the process (exit 134) or cleared the exception, and the run went on to exit 0. The
    signal is then delivered again (_redeliver) until it lands past the import."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            _redeliver(signum)
            return
        frame = frame.f_back
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def redeliver_interrupts(unraisable) -> None:
    """sys.unraisablehook: a Ctrl-C or SIGTERM whose exception was raised where Python can only print it (jax's
    `_xla_gc_callback`, run by the garbage collector at any allocation; a `__del__`) was swallowed there, and the run
    went on (jax-ml/jax#18246: "3-4 keyboard interrupts are needed"). It is delivered to the main thread again
    (_thread.interrupt_main) from a timer thread, REDELIVER_S later: the main thread, by then past the callback,
    raises it (delivered at once, the hook itself, Python code, raised it and was swallowed in turn); a swallowed
    redelivery is redelivered again. Any other unraisable exception goes to Python's own hook."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        _redeliver(signal.SIGTERM if isinstance(unraisable.exc_value, Terminated) else signal.SIGINT)
    else:
        sys.__unraisablehook__(unraisable)


def _redeliver(signum: int) -> None:
    timer = threading.Timer(REDELIVER_S, _thread.interrupt_main, (signum,))
    timer.daemon = True  # never waited for at exit
    timer.start()


def exit_interrupted(code: int) -> None:
    """End an interrupted run with `code` after the atexit handlers, without the interpreter's finalization: a
    Ctrl-C or SIGTERM that cut an XLA compilation left objects whose teardown at exit segfaults (exit 139 after the
    `error:` line; a plain jax.jit in a script does it). The partial outputs are already removed (the `with` blocks
    the exception passed through)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    atexit._run_exitfuncs()
    os._exit(code)
