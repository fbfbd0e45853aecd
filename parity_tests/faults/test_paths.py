"""Paths and streams at the edges of every command: a write goes through a symbolic link (never replaces it),
refuses a directory or a device where a file goes, takes any name the file system takes (temp names included) and
names the user's path in its errors; an empty path argument is refused, not read as "."; an OS refusal is one
error line; a reader that closes the pipe ends the command quietly; a signal after the work is done is ignored."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shared_config.cli import Parser, UsageError, check_outputs, run
from shared_config import init_weights, save_checkpoint
from shared_config.files import atomic_dir, atomic_write
from shared_config.data import DataError, load_data

from ..support.common import ROOT, checkout_env, load_script, make_spec, one_line_error, run_python, run_script


def write_text(text):
    return lambda tmp: tmp.write_text(text)


def test_a_write_goes_through_a_symbolic_link(tmp_path):
    (tmp_path / "target.json").write_text("old")
    (tmp_path / "link.json").symlink_to("target.json")
    atomic_write(tmp_path / "link.json", write_text("new"))
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "target.json").read_text() == "new"
    (tmp_path / "run").mkdir()
    (tmp_path / "run-link").symlink_to("run")
    with atomic_dir(tmp_path / "run-link", overwrite=True) as tmp:
        (tmp / "a.txt").write_text("a")
    assert (tmp_path / "run-link").is_symlink() and (tmp_path / "run" / "a.txt").read_text() == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "run", "run-link", "target.json"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
def test_a_write_refuses_a_device_a_pipe_or_the_other_kind(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("keep")
    for path, writer in ((tmp_path / "pipe", "file"), (tmp_path / "adir", "file"), (tmp_path / "afile", "dir")):
        with pytest.raises(FileExistsError, match="is (neither a file nor a directory|a directory|a file)"):
            if writer == "file":
                atomic_write(path, write_text("x"))
            else:
                with atomic_dir(path, overwrite=True):
                    pass
    assert (tmp_path / "afile").read_text() == "keep" and (tmp_path / "adir").is_dir()
    with pytest.raises(UsageError, match="exists and is not a regular file"):
        check_outputs(json_path=tmp_path / "pipe")
    with pytest.raises(UsageError, match="exists and is not a regular file"):
        check_outputs(json_path=tmp_path / "adir")


def test_an_output_that_is_an_input_file_is_refused_before_any_work(tmp_path):
    """`parity_report.py --weights w.safetensors --json w.safetensors` replaced the checkpoint with its report, and
    `replot.py r.png --out r.png` the report with its image: an output is no input, by name, symbolic or hard link.
    A preset's name and `--json -` (stdout) name no file."""
    from bench import compare, plot_context, replot

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"weights")
    (tmp_path / "link").symlink_to(weights)
    os.link(weights, tmp_path / "hard")
    for out in (weights, tmp_path / "link", tmp_path / "hard"):
        with pytest.raises(UsageError, match=f"--json {out} is the file --weights {weights} that this run reads"):
            check_outputs(json_path=out, inputs=[("--spec", "tiny"), ("--weights", weights)])
    check_outputs(json_path="-", inputs=[("--weights", weights)])
    # an input directory (a Hugging Face or run checkpoint): an output in it, new or not, would change what it holds
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "hf-link").symlink_to(tmp_path / "hf")
    for out in (tmp_path / "hf" / "config.json", tmp_path / "hf" / "new.json", tmp_path / "hf-link" / "r.json"):
        with pytest.raises(UsageError, match=f"--json {out} lies in the directory --weights {tmp_path}/hf"):
            check_outputs(json_path=out, inputs=[("--weights", tmp_path / "hf")])
    with pytest.raises(UsageError, match="lies in the directory --weights"):
        check_outputs(json_path=tmp_path / "hf" / "r.json", inputs=[("--weights", tmp_path / "hf-link")])
    check_outputs(json_path=tmp_path / "hf.json", inputs=[("--weights", tmp_path / "hf")])
    check_outputs(json_path=tmp_path / "hf" / "r.json", inputs=[("--spec", tmp_path / "hf")])  # a preset's name
    check_outputs(json_path=tmp_path / "new.json", inputs=[("--spec", "tiny"), ("--weights", None)])
    spec = tmp_path / "s.png"  # the tools pass what they read
    spec.write_text("d_model: 48\n")
    for parse, argv in ((load_script("parity_report").parse_args, ["--weights", str(weights), "--json", str(weights)]),
                        (compare.parse_args, ["--spec", str(spec), "--plot", str(spec)]),
                        (replot.main, [str(spec), "--out", str(spec)]),
                        (plot_context.main, [str(spec), "--out", str(spec)])):
        with pytest.raises(UsageError, match="that this run reads"):
            parse(argv)
    assert weights.read_bytes() == b"weights" and spec.read_text() == "d_model: 48\n"


def test_a_tilde_is_a_name_in_the_checks_as_in_the_writes(tmp_path, monkeypatch):
    """The shell expands an unquoted `~`; every reader and writer takes a quoted one as a name, and so must the output
    checks: they read `'~/r.png'` as $HOME/r.png, so `replot.py '~/r.png' --out '~/r.png'` passed them (no such file
    at home) and replaced the report ./~/r.png with its image, and `--out '~/x.png'` with no ./~ ran, then failed."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    with pytest.raises(UsageError, match="--out ~/x.png: ~ is not a directory"):
        check_outputs(plot_path="~/x.png", plot_flag="--out")
    (work / "~").mkdir()
    (work / "~" / "r.png").write_text("{}")
    with pytest.raises(UsageError, match="--out ~/r.png is the file REPORT ~/r.png that this run reads"):
        check_outputs(plot_path="~/r.png", plot_flag="--out", inputs=[("REPORT", "~/r.png")])
    assert list(home.iterdir()) == [] and (work / "~" / "r.png").read_text() == "{}"


def test_plot_curves_and_init_checkpoint_never_write_over_what_they_read(tmp_path):
    """`plot_curves.py run --out x.png`, x.png a link to run/metrics.jsonl, overwrote the run's metrics with the image;
    `init_checkpoint.py --spec s.yaml --out s.safetensors --force`, the .safetensors a link to the spec, the spec."""
    run, metrics = tmp_path / "run", '{"kind": "train", "step": 1, "loss": 2.0}\n'
    run.mkdir()
    (run / "metrics.jsonl").write_text(metrics)
    (tmp_path / "x.png").symlink_to(run / "metrics.jsonl")
    spec = tmp_path / "s.yaml"
    spec.write_bytes((ROOT / "shared_config" / "specs" / "tiny.yaml").read_bytes())
    (tmp_path / "s.safetensors").symlink_to(spec)
    for main, argv in ((load_script("plot_curves").main, [str(run), "--out", str(tmp_path / "x.png")]),
                       (load_script("init_checkpoint").main, ["--spec", str(spec), "--out",
                                                              str(tmp_path / "s.safetensors"), "--force"])):
        with pytest.raises(UsageError, match="that this run reads"):
            main(argv)
    assert (run / "metrics.jsonl").read_text() == metrics
    assert spec.read_bytes() == (ROOT / "shared_config" / "specs" / "tiny.yaml").read_bytes()


def test_init_checkpoint_checks_the_folder_a_linked_out_leads_to_before_the_draws(tmp_path, monkeypatch):
    """An --out link into a folder that does not exist passed the check of the link's own folder; the write failed
    after every tensor was drawn (minutes for llama-1b), "No such file or directory" naming neither --out nor the
    link."""
    init_checkpoint = load_script("init_checkpoint")
    monkeypatch.setattr(init_checkpoint, "iter_init_weights", lambda *a: pytest.fail("drew before the check"))
    (tmp_path / "x.safetensors").symlink_to(tmp_path / "gone" / "x.safetensors")
    with pytest.raises(UsageError, match=f"^--out {tmp_path}/x.safetensors: {tmp_path}/gone, where the link leads, "
                                         "is not a directory$"):
        init_checkpoint.main(["--spec", "tiny", "--out", str(tmp_path / "x.safetensors")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


def test_any_name_the_file_system_takes_is_written(tmp_path):
    """A 250-character name is valid (≤ 255); its temp name, `.NAME.PID.XXXXXXXX.tmp`, must be too."""
    path = tmp_path / ("z" * 245 + ".json")
    atomic_write(path, write_text("x"))
    with atomic_dir(tmp_path / ("d" * 250)) as tmp:
        (tmp / "a").write_text("a")
    assert path.read_text() == "x" and (tmp_path / ("d" * 250) / "a").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, "d" * 250])


def test_os_refusals_are_one_line_naming_the_users_path(tmp_path):
    """A name the file system refuses (ENAMETOOLONG: a plain OSError, no subclass) was a traceback; a temp file that
    cannot be made was named by its temp name."""
    long = tmp_path / ("x" * 300)
    one_line_error(run_script("train", "--backend", "torch", "--out", long, "--steps", "1", "--quiet"),
                   f"{long}: File name too long")
    with pytest.raises(FileNotFoundError) as e:
        atomic_write(tmp_path / "no" / "such" / "r.json", write_text("x"))
    assert e.value.filename == str(tmp_path / "no" / "such" / "r.json")


@pytest.mark.parametrize("tool, argv", [
    ("convert", ["{tmp}/m.safetensors", "{loop}.pt"]),  # a DST (and any --out, --json, --plot, the checks share it)
    ("convert", ["{loop}.pt", "{tmp}/o.safetensors"]),  # a SRC: it was "no such file or directory"
    ("prepare_data", ["{tmp}/t.txt", "--out", "{loop}"]),
    ("plot_curves", ["{loop}"]),  # a run directory read
])
def test_a_loop_of_symbolic_links_is_one_line_naming_it(tool, argv, tmp_path, capsys):
    """`ln -s x x` given as a path: Python 3.11's Path.resolve raised RuntimeError 'Symlink loop', a traceback with
    exit 1 (shared_config.files.resolved makes it the OSError ELOOP that 3.13 raises, one line, exit 2)."""
    (tmp_path / "t.txt").write_text("some text " * 50)
    save_checkpoint(tmp_path / "m.safetensors", init_weights(make_spec(), 0), make_spec())
    loop = tmp_path / "loop"
    for name in ("loop", "loop.pt"):
        (tmp_path / name).symlink_to(tmp_path / name)
    argv = [a.format(tmp=tmp_path, loop=loop) for a in argv]
    with pytest.raises(SystemExit) as e:
        run(load_script(tool).main, argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    named = str(loop) in err or ("..." in err and f"/{loop.name}" in err)  # a long path is shown with its middle cut
    assert err.startswith("error: ") and named and "Too many levels of symbolic links" in err, err


def test_an_empty_path_argument_is_refused():
    """Path("") is "."; `--out ''` wrote a whole run into the current directory."""
    parser = Parser(prog="p")
    parser.add_argument("--out", type=Path)
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--out", ""])
    assert e.value.code == 2
    assert str(parser.parse_args(["--out", "x"]).out) == "x"
    one_line_error(run_script("train", "--backend", "torch", "--out", "", "--steps", "1"),
                   "argument --out: expected a path, got an empty string")
    # --data is a path or synthetic[:SEED]: `--data ''` trained on the files of the current directory
    one_line_error(run_script("train", "--backend", "torch", "--data", "", "--steps", "1"),
                   "argument --data: expected a name or a path, got an empty string")
    with pytest.raises(DataError, match="the data source is an empty string"):
        load_data("")  # the library's own entry, which argparse does not guard


def test_a_write_to_no_path_names_what_it_was_given(tmp_path, monkeypatch):
    """The library's writers (`atomic_write`, `atomic_dir`, and so every save and report) take paths from code, not
    argparse: None was Path's own TypeError, "" became "." and failed as "is a directory", a NUL byte was
    "embedded null byte". Nothing is written."""
    monkeypatch.chdir(tmp_path)
    cases = ((None, TypeError, "a path to write to is a str or an os.PathLike, not NoneType"),
             (5, TypeError, "not int 5"),
             ("", FileNotFoundError, "an empty path names no file to write"),
             ("a\0b", ValueError, "a path to write to cannot hold a NUL character"))
    for path, error, message in cases:
        with pytest.raises(error, match=message):
            atomic_write(path, write_text("x"))
        with pytest.raises(error, match=message):
            with atomic_dir(path):
                pass
    assert list(tmp_path.iterdir()) == []


PRINTS_A_LOT = """
import atexit, os, signal, sys, time
from shared_config.cli import run

def main(argv):
    if argv == ["pipe"]:
        for _ in range(10_000):
            print("x" * 100)
    else:  # a signal once the work is done (here: while the interpreter exits)
        atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.2)))
        print("done", flush=True)

run(main)
"""


def test_a_closed_pipe_ends_quietly_and_a_late_signal_is_ignored():
    """`| head`: the reader leaves; the command ends with SIGPIPE's exit code and says nothing (it had printed a
    BrokenPipeError traceback). A SIGINT after the work (a success printed, files written) is ignored: it had made
    a finished convert exit 130."""
    p = subprocess.Popen([sys.executable, "-c", PRINTS_A_LOT, "pipe"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=checkout_env())
    p.stdout.read(10)
    p.stdout.close()
    assert p.wait(timeout=60) == 128 + signal.SIGPIPE
    assert p.stderr.read() == b""
    r = run_python("-c", PRINTS_A_LOT, "late")
    assert (r.returncode, r.stdout, r.stderr) == (0, "done\n", "")


SWALLOWED_SIGNAL = """
import gc, sys, time
from shared_config.cli import Terminated, run

def main(argv):
    fired = []

    def callback(phase, info):  # as jax's _xla_gc_callback, in which a signal's exception is printed, not raised
        if not fired:
            fired.append(1)
            raise Terminated() if argv == ["SIGTERM"] else KeyboardInterrupt()

    gc.callbacks.append(callback)
    gc.collect()
    for _ in range(200):
        time.sleep(0.05)
    print("ran on")

run(main)
"""


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_landing_in_a_garbage_collector_callback_still_stops_the_run(name):
    """Ctrl-C (or SIGTERM) raises in whatever Python code runs: in jax's gc callback, Python printed the exception
    and the run went on to the end (jax-ml/jax#18246). cli.run delivers it again: one line, 130 or 143."""
    r = run_python("-c", SWALLOWED_SIGNAL, name)
    assert (r.returncode, r.stdout) == (128 + getattr(signal, name), ""), r.stderr
    assert r.stderr == f"error: interrupted by {name}; partial outputs removed\n"


INTERRUPTED_COMPILE = """
import _thread, threading
import jax, jax.numpy as jnp
from jax._src import compiler
from shared_config.cli import run

compile_ = compiler.backend_compile_and_load

def interrupted_compile(*args, **kwargs):  # Ctrl-C while XLA compiles
    compiler.backend_compile_and_load = compile_
    threading.Timer(0.05, _thread.interrupt_main).start()
    return compile_(*args, **kwargs)

def f(x):
    for i in range(60):
        x = jnp.sin(x @ x.T + i)
    return x.sum()

def main(argv):
    x = jnp.ones((8, 8))
    compiler.backend_compile_and_load = interrupted_compile
    jax.jit(jax.grad(f))(x)
    print("compiled")

run(main)
"""


def test_a_run_interrupted_while_xla_compiles_exits_130_not_a_segfault():
    """A Ctrl-C that cut a jax.jit compilation (train.py, the studies, the bench in their first seconds) left
    objects whose teardown at interpreter exit segfaulted: exit 139 after the `error:` line. cli.run ends an
    interrupted run after the atexit handlers, without that teardown."""
    r = run_python("-c", INTERRUPTED_COMPILE)
    assert (r.returncode, r.stdout, r.stderr) == (130, "", "error: interrupted by SIGINT; partial outputs removed\n")


def test_a_failed_directory_write_leaves_nothing_while_a_writer_thread_still_adds_files(tmp_path):
    """A library's threads may still write into the temporary directory after the body failed (Orbax on a full
    disk): the cleanup deletes it again until it is gone, where one rmtree left it behind."""
    import threading
    import time

    def late_writer(directory, until):
        while time.monotonic() < until:
            try:
                os.makedirs(directory / "state" / f"f{time.monotonic_ns()}", exist_ok=True)  # as tensorstore does
            except FileNotFoundError:  # a parent deleted between two of makedirs' steps: the writer fails, as
                return  # tensorstore's would (uncaught, pytest's unhandled-thread warning in every run)
            time.sleep(0.002)

    with pytest.raises(ValueError, match="the save failed"):
        with atomic_dir(tmp_path / "ckpt") as tmp:
            writer = threading.Thread(target=late_writer, args=(tmp, time.monotonic() + 0.3))
            writer.start()
            time.sleep(0.05)
            raise ValueError("the save failed")
    writer.join()
    assert list(tmp_path.iterdir()) == []
