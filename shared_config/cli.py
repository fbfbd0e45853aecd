"""What every command-line tool shares: one-line errors on stderr, no traceback unless --debug, exit codes:

    0  success
    1  the job ran and failed on its own terms (train.py: a non-finite loss or gradient)
    2  bad input: arguments, a spec, a config, a checkpoint or data file that breaks a rule
    3  the environment: out of memory (or a job estimated not to fit), a full disk or a write that failed,
       a run directory locked by another process
    130 / 143  interrupted by SIGINT / SIGTERM, after the partial outputs were removed (a bench's report, whole as
               of its last row and marked "complete": false, is kept, and the line names it)
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
import signal
import sys
import traceback
from pathlib import Path
from typing import Callable

from .data import DataError
from .files import CheckpointError, resolved
from .hardware import HardwareError, jax_backend_failure
from .report import partial_report
from .limits import LimitError, quote, shorten_numbers, spelled
from .resources import ResourceError, is_out_of_memory
from .config_file import SpecError, did_you_mean
from .parallel import leaves_error_to_rank_zero, rank_zero
from .signals import Terminated, exit_interrupted, interrupt, redeliver_interrupts

BAD_INPUT, ENVIRONMENT = 2, 3
# a negative number is a value, not an option (argparse's own rule), and so is a comma-separated list that starts
# with one (`--tokens -1,2` was "unrecognized option -1,2", not the id it is)
NUMBER = re.compile(r"-\d+(,\s*-?\d+)*|-\d*\.\d+")
MAX_MESSAGE = 2000  # characters of an error line; the rest is cut (a message quoting a hostile file stays short)


class UsageError(ValueError):
    """Bad command-line input that argparse itself cannot see (a bad combination, a missing file)."""


USER_ERRORS = (
    SpecError, CheckpointError, DataError, UsageError, LimitError, HardwareError, FileNotFoundError, FileExistsError,
    IsADirectoryError, NotADirectoryError, PermissionError,
)


def no_default(default) -> bool:
    """Whether an option's default says nothing worth showing: None, a store_true's False, an empty list, SUPPRESS.
    By identity: `0 in (None, False)` is true in Python, which hid every default of 0 (--seed, --train-steps)."""
    return default is None or default is False or default is argparse.SUPPRESS or (isinstance(default, list)
                                                                                    and not default)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, unless its help text already speaks of it or it has none."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or no_default(action.default):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one `error:` line (exit 2), every tool has --debug and --help shows defaults,
    and a misspelt option or choice gets the closest valid one suggested. An unknown option is the error named
    first: it is why a required option looks missing (`--spce tiny`: "--spec is required")."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.register("type", Path, path)  # every `type=Path` argument: an empty one is refused, not read as "."
        self._negative_number_matcher = re.compile(f"^(?:{NUMBER.pattern})$")  # argparse's test of a value: NUMBER
        self.add_argument("--debug", action="store_true", help="show the full traceback on errors")
        self.argv: list[str] = []

    def parse_known_args(self, args=None, namespace=None):
        self.argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
        return super().parse_known_args(args, namespace)

    def error(self, message):
        if unknown := self.unknown_option():
            longs = [o for o in self._option_string_actions if o.startswith("--")]
            message = f"unrecognized option {quote(unknown)[1:-1]}{did_you_mean(unknown, longs, 0.6)}; see --help"
        fail(message)

    def unknown_option(self) -> str | None:
        """The first option in the command line that names no option (nor abbreviates one), or None."""
        known = self._option_string_actions
        for token in self.argv:
            if token == "--":
                return None
            if not token.startswith("-") or token == "-" or NUMBER.fullmatch(token):
                continue
            name = token.split("=", 1)[0]
            if name in known or (not token.startswith("--") and token[:2] in known):  # `-n5` is `-n 5`
                continue
            if not (self.allow_abbrev and token.startswith("--") and any(o.startswith(name) for o in known)):
                return name
        return None

    def _get_option_tuples(self, option_string):
        # An abbreviation of one option's several spellings (--bat: --batch-size, --batch) names that option: not
        # ambiguous (argparse before Python 3.12.7 said it was).
        tuples, actions = [], set()
        for t in super()._get_option_tuples(option_string):
            if id(t[0]) not in actions:
                actions.add(id(t[0]))
                tuples.append(t)
        return tuples

    def key_item(self, keys, what: str) -> Callable[[str], str]:
        """An argparse `type` for --set KEY=VALUE and --sweep KEY=V1,V2: the item as given, refused at parse time in
        one line where KEY is none of `keys` (the `what` keys) but spells one of this command's options
        (`compare.py --set batch_size=16` was "unknown spec key 'batch_size' (did you mean 'vocab_size'?)", where
        --batch-size sets it). Any other unknown key is the spec's or train config's error, with its suggestion."""
        keys = set(keys)

        def item(text: str) -> str:
            key = text.partition("=")[0].strip()
            option = "--" + key.replace("_", "-")
            if key not in keys and option in self._option_string_actions:
                raise argparse.ArgumentTypeError(f"{quote(key)[1:-1]} is no {what} key: this command takes it as "
                                                 f"{option}")
            return text

        return item

    def _check_value(self, action, value):
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as e:  # an invalid choice: add the closest valid one
            if action.choices is None or not (hint := did_you_mean(value, action.choices)):
                raise
            raise argparse.ArgumentError(action, f"{e.message}{hint}") from None


def at_least(minimum: float, kind: type = int) -> Callable[[str], float]:
    """An argparse `type`: a finite `kind` (int or float) >= `minimum`; anything else (nan, inf, a smaller number,
    not a number) is refused at parse time in one `error: argument --flag: ...` line, exit 2."""
    return _bounded(minimum, kind, lambda value: value >= minimum, f">= {minimum}")


def above(minimum: float, kind: type = float) -> Callable[[str], float]:
    """An argparse `type`: a finite `kind` (int or float) > `minimum`, refused like at_least otherwise."""
    return _bounded(minimum, kind, lambda value: value > minimum, f"> {minimum}")


def _bounded(minimum, kind, ok, bound: str) -> Callable[[str], float]:
    noun = "an integer" if kind is int else "a finite number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {noun} {bound}, got {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {noun} {bound}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} {bound}"  # what argparse names the type in its own messages
    return parse


PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def path(text: str) -> Path:
    """argparse's type for a path argument (registered for `type=Path`): an empty string is refused, where Path("")
    would be the current directory (`--out ''` wrote a run into it)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return Path(text)


def nonempty(text: str) -> str:
    """argparse's type for a name or path given as text (--spec, --weights, --train-config, --compile-cache): an empty
    string is refused, where a truthiness test read it as "not given" (`--train-config ''` ran the defaults,
    `--compile-step ''` timed the kernels instead) and a path read it as "." (`--compile-cache ''` filled the current
    directory with cache folders)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a name or a path, got an empty string")
    return text


def check_outputs(json_path=None, plot_path=None, plot_flag: str = "--plot", cache=None, inputs=()) -> None:
    """Refuse, before any work, a --json/--plot whose directory does not exist or is not writable, that names a
    directory or a device (/dev/stdout: the atomic write would replace it), or a --plot matplotlib cannot write (by its
    extension), or the `cache` directory (--compile-cache, which the run makes a directory): the error a long run
    would otherwise raise at its end (or after its first job), or never. `plot_flag`: the image's option, where not
    --plot. `inputs`: (flag, path) pairs of the files the tool reads (a preset's name is no file), none of which an
    output may be (check_not_inputs)."""
    for flag, path in (("--json", json_path), (plot_flag, plot_path)):
        if path is None or (flag == "--json" and str(path) == "-"):  # `--json -`: stdout (shared_config.report)
            continue
        if cache not in (None, "none") and resolved(path) == resolved(cache):
            raise UsageError(f"{flag} {path} and --compile-cache {cache} name the same path: the cache is a "
                             "directory; give the report another name")
        # where the file goes: a link's target's folder, named as such (a dangling link said ". is not a directory")
        parent = resolved(path).parent
        where = Path(path).parent if parent == resolved(Path(path).parent) else f"{parent}, where the link leads,"
        if not parent.is_dir():
            raise UsageError(f"{flag} {path}: {where} is not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):  # else refused at the first write
            raise UsageError(f"{flag} {path}: {where} is not writable")
        if Path(path).exists() and not Path(path).is_file():
            raise UsageError(f"{flag} {path}: exists and is not a regular file (a directory or a device); "
                             "give the path of a file to write")
    if plot_path is not None and Path(plot_path).suffix.lower() not in PLOT_SUFFIXES:
        raise UsageError(f"{plot_flag} {plot_path}: the file must end in {', '.join(PLOT_SUFFIXES)}")
    if json_path is not None and plot_path is not None and resolved(json_path) == resolved(plot_path):
        raise UsageError(f"--json and {plot_flag} name the same file {plot_path}: the image would replace the report")
    check_not_inputs([("--json", json_path), (plot_flag, plot_path)], inputs)


def check_not_inputs(outputs, inputs, dirs=("--weights",)) -> None:
    """Refuse (UsageError) an output that is one of the input files, by name, link or hard link (`parity_report.py
    --weights w.safetensors --json w.safetensors` replaced the checkpoint with its report), or lies in a directory
    read by a flag of `dirs` (`--weights hf --json hf/config.json` replaced the checkpoint's config; `--spec tiny`
    beside a folder tiny names the preset). `outputs`, `inputs`: (flag, path) pairs; a path None or `-` is skipped."""
    given = [(flag, path) for flag, path in inputs if path is not None and str(path) != "-"]
    for out_flag, out in [(flag, path) for flag, path in outputs if path is not None and str(path) != "-"]:
        for in_flag, path in given:  # `~` a name, as read; where the write lands, through links
            if in_flag in dirs and Path(path).is_dir() and resolved(path) in resolved(out).parents:
                raise UsageError(f"{out_flag} {out} lies in the directory {in_flag} {path} that this run reads: the "
                                 "output would change it; write it elsewhere")
            if Path(out).is_file() and Path(path).is_file() and os.path.samefile(out, path):
                raise UsageError(f"{out_flag} {out} is the file {in_flag} {path} that this run reads: the output "
                                 "would replace it; give the output another name")


def check_shorthands(changes, given: dict[str, tuple[str, object]]) -> None:
    """Refuse (UsageError) an option given beside the `--set` of the key it is shorthand for: `train.py --steps 3
    --set steps=4` ran 3 steps, `parity_report.py --dtype float32 --set compute_dtype=bfloat16` float32, without a
    word. `changes`: the --set items parsed; `given`: {key: (option, value)} of the shorthand options set."""
    for key, (flag, value) in given.items():
        if key in changes:
            raise UsageError(f"{flag} {value} and --set {key}={changes[key]}: {flag} is shorthand for --set "
                             f"{key}=VALUE; pass one of them")


def check_out_dir(flag: str, path) -> None:
    """Refuse, before any work and without creating anything, an output directory that cannot be made: its nearest
    existing ancestor must be a directory this process may write into."""
    ancestor = resolved(path)
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{flag} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {ancestor} is not writable")


def check_input_outside(flag: str, out, input_flag: str, given) -> None:
    """Refuse (UsageError) an output directory that holds the input file the tool reads: replacing the directory
    (--force) deleted it (`prepare_data.py d/corpus.txt --out d --force`, `convert.py d/m.pt d --to hf --force`).
    By where the input's name leads: a link in the directory to a file elsewhere goes, its file stays."""
    out_dir, source = resolved(out), resolved(given)
    if out_dir in source.parents:
        raise UsageError(f"{flag} {out} holds {input_flag} {given}, which replacing it would delete; move the input "
                         f"out of it or pick another {flag}")


def names(flag: str, text: str) -> list[str]:
    """The comma-separated names of option `flag` (--configs, --backends, --only), refused (UsageError) where one is
    empty (`rms-pre,,dyt-pre`, ''): its error line showed nothing where the name should be."""
    items = text.split(",")
    if "" in items:
        raise UsageError(f"{flag}: {quote(text)} holds an empty name; give names separated by single commas")
    return items


def no_repeats(flag: str, items: list) -> list:
    """`items` of a list-valued option, refused (UsageError) when one is given twice: the job ran twice, and its
    rows, labelled alike, overwrote or shadowed each other in the report. Linear: a list scanned for each item took
    8 s over 20,000 seeds."""
    seen, unhashable = set(), []  # any value, also a false one (0, ''); a list or dict value (a --sweep's) by ==
    for x in items:
        try:
            repeated = x in seen
            seen.add(x)
        except TypeError:
            repeated = x in unhashable
            unhashable.append(x)
        if repeated:
            raise UsageError(f"{flag}: {quote(spelled(x))[1:-1]} is given twice")  # `true`, as typed
    return items


def printable(text: str) -> str:
    """Command-line text as UTF-8 that can be printed and written: bytes that are not UTF-8 (a Latin-1 terminal, a
    file name from another system), which Python keeps as lone surrogates and no UTF-8 writer accepts, as `\\xNN`."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def utf8_argument(flag: str, text: str) -> str:
    """`text` of option `flag`, refused (UsageError) when it holds bytes that are not UTF-8, naming the first."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = text.encode("utf-8", "surrogateescape")[len(text[:e.start].encode("utf-8"))]
        raise UsageError(f"{flag}: byte 0x{byte:02x} at character {e.start} is not UTF-8; pass UTF-8 text") from None
    return text


def fail(message: str, code: int = BAD_INPUT):
    """Print one `error:` line and exit with `code`. Under torchrun a usage error, a non-finite loss (its checks
    read values every rank shares) and a signal (torchrun sends it to every rank) are every rank's alike: rank 0
    alone prints them (the others exit with the same code, silently, a usage error's or a non-finite loss's once
    rank 0 has: leaves_error_to_rank_zero). An error of the machine (ENVIRONMENT: memory,
    disk) may be one rank's own: every rank that meets it prints it. Numbers past limits.MAX_DIGITS digits are cut
    (`shorten_numbers`), the line past MAX_MESSAGE characters."""
    if code != ENVIRONMENT and leaves_error_to_rank_zero(signal=code > 128):
        sys.exit(code)
    text = shorten_numbers(" ".join(str(message).split()))  # any error's: argparse's, an OSError's, a UsageError's
    if len(text) > MAX_MESSAGE:
        text = f"{text[:MAX_MESSAGE]}... ({len(text) - MAX_MESSAGE:,} more characters)"
    print(f"error: {text}", file=sys.stderr)
    sys.exit(code)


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run `main`; errors become one `error:` line and an exit code from the table above (traceback with --debug).
    Ends with SystemExit. Without `argv`, run is the program's entry point (a script's `run(main)`) and owns the
    process to its exit: it keeps its signal handlers, ignores signals once the work is done, and leaves an
    interrupted process without the interpreter's teardown. With `argv` (a caller that goes on: a test, a notebook)
    it puts the caller's SIGINT and SIGTERM handlers and unraisable hook back as it ends, and an interrupt ends it
    with SystemExit(130 / 143) alone: a suite that had called run once ignored Ctrl-C from then on."""
    if argv is not None:
        saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), sys.unraisablehook
        try:
            return _run(main, argv, owner=False)
        finally:
            for signum, handler in zip((signal.SIGINT, signal.SIGTERM), saved):
                if handler is not None:  # None: a handler not set from Python, which Python cannot set back
                    signal.signal(signum, handler)
            sys.unraisablehook = saved[2]
    _run(main, sys.argv[1:], owner=True)


def _run(main: Callable[[list[str] | None], int | None], argv: list[str], owner: bool) -> None:
    if hasattr(sys.stdout, "reconfigure"):
        # a path that is not UTF-8 (kept by Python as surrogates) prints as the bytes it is, as `ls` shows it: a
        # strict stdout (a UTF-8 locale other than C.UTF-8) raised after the work, `print(args.out)` a traceback
        sys.stdout.reconfigure(errors="surrogateescape")
    sys.unraisablehook = redeliver_interrupts
    partial_report(forget=True)  # a report of an earlier run in this process (a test's) is not this run's
    signal.signal(signal.SIGINT, interrupt)
    if rank_zero():
        signal.signal(signal.SIGTERM, interrupt)
    # else a torchrun rank other than 0, which writes no file: SIGTERM's default ends it at once, also inside a
    # blocking collective or rendezvous (where a Python handler would wait for the call to return: torchrun, on one
    # rank's error, gives the others 30 s before SIGKILL)
    try:
        code = main(argv) or 0
        for done in (signal.SIGTERM, signal.SIGINT):  # the job is done: Python's shutdown would die of it silently
            signal.signal(done, signal.SIG_IGN)
        sys.exit(code)
    except BrokenPipeError:  # `| head`: the reader left; end quietly, as Unix tools do, with SIGPIPE's exit code
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would fail again
        sys.exit(128 + signal.SIGPIPE)
    except USER_ERRORS as e:
        _debug(argv)
        msg = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.filename}: {e.strerror}"
        fail(msg)
    except ResourceError as e:
        _debug(argv)
        fail(str(e), ENVIRONMENT)
    except OSError as e:  # the rest of the OS's refusals (a name too long, a loop of links, a full disk)
        _debug(argv)
        machine = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM, errno.EMFILE, errno.ENFILE)
        fail(f"{e.filename}: {e.strerror}" if e.filename else str(e), ENVIRONMENT if machine else BAD_INPUT)
    except KeyboardInterrupt as e:
        _debug(argv)
        name = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
        try:
            kept = partial_report()
            fail(f"interrupted by {name}; " + (f"{kept} keeps the rows done so far (\"complete\": false)" if kept
                                                else "partial outputs removed"), 128 + getattr(signal, name))
        except SystemExit as done:
            if owner:
                exit_interrupted(done.code)
            raise
    except Exception as e:
        if (hardware := jax_backend_failure()) is not None:  # JAX_PLATFORMS=cuda on a machine without CUDA
            _debug(argv)
            fail(str(hardware))
        if not is_out_of_memory(e):
            raise
        _debug(argv)
        fail(f"out of memory ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]})", ENVIRONMENT)


def _debug(argv) -> None:
    if "--debug" in argv:
        traceback.print_exc()
