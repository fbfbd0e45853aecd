"""What a new user meets on the command line: every option of every command explained in --help with its
default, descriptions that are whole sentences, generate.py --attention naming every kernel, --quiet on every
long-running command, plain progress lines (no carriage returns) when stderr is not a terminal, and a missing
optional dependency reported before any work with what to install."""

from __future__ import annotations

import importlib.util
import io
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

import jax_model.attention
import torch_model.attention
from shared_config import cli
import shared_config.progress
from shared_config.files import atomic_write
from shared_config.progress import advance, progress, restart_clock, writing

from ..support.common import ROOT, load_script

COMMANDS = sorted((ROOT / "scripts").glob("*.py")) + [ROOT / "bench" / "compare.py", ROOT / "bench" / "profile_step.py"]
LONG_RUNNING = {"train", "compare_norms", "compare_routing", "parity_report", "compare", "profile_step", "prepare_data",
                "init_checkpoint", "convert"}  # a llama-1b draw, write or conversion takes a minute


class Parsed(Exception):
    """Raised in place of parsing: carries the command's parser out of its main()."""


def parser_of(path, monkeypatch) -> cli.Parser:
    """The argparse parser a command builds, caught where it would parse (no work done)."""
    def grab(self, *args, **kwargs):
        raise Parsed(self)

    monkeypatch.setattr(cli.Parser, "parse_args", grab)
    monkeypatch.syspath_prepend(str(path.parent))
    module_spec = importlib.util.spec_from_file_location(f"cli_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    with pytest.raises(Parsed) as e:
        module.main([])
    return e.value.args[0]


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: p.stem)
def test_every_option_is_explained_with_its_default(path, monkeypatch):
    parser = parser_of(path, monkeypatch)
    assert parser.description.rstrip().endswith("."), parser.description
    assert not [a.option_strings or a.dest for a in parser._actions if not a.help]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not cli.no_default(action.default) and action.option_strings:  # a default of 0 too: `0 in (False,)` is true
            assert "default" in formatter._get_help_string(action), action.dest
    if path.stem in LONG_RUNNING:
        assert "--quiet" in parser._option_string_actions, path.stem


def test_generate_help_names_every_attention_kernel(monkeypatch):
    help_text = parser_of(ROOT / "scripts" / "generate.py", monkeypatch)._option_string_actions["--attention"].help
    for name in {*jax_model.attention.ATTENTION, *torch_model.attention.ATTENTION}:
        assert name in help_text, name


def test_progress_off_a_terminal_is_plain_lines_and_quiet_is_silent():
    stream = io.StringIO()  # not a terminal
    with progress(range(50), desc="steps", stream=stream, interval=0) as bar:
        for _ in bar:
            pass
    text = stream.getvalue()
    assert "\r" not in text and text.endswith("\n") and "50/50" in text.splitlines()[-1]
    stream = io.StringIO()
    with progress(range(5), quiet=True, stream=stream) as bar:
        list(bar)
    assert stream.getvalue() == ""


def test_progress_with_a_changing_postfix_keeps_to_its_interval():
    """train.py shows loss, lr and tokens/s beside its bar at every log step: off a terminal that must still be
    one line per interval (the first and the last here), not one per step."""
    stream = io.StringIO()
    with progress(total=50, desc="steps", stream=stream, interval=60) as bar:
        for step in range(1, 51):
            advance(bar, step, loss=f"{1 / step:.4f}")
    lines = stream.getvalue().splitlines()
    assert len(lines) <= 3 and "50/50" in lines[-1] and "loss=0.0200" in lines[-1], lines


def test_progress_off_a_terminal_shows_the_last_position_once():
    """tqdm shows the bar again when it closes: off a terminal that was a second 100% line."""
    for interval in (0, 60):
        stream = io.StringIO()
        with progress(range(5), desc="steps", stream=stream, interval=interval) as bar:
            list(bar)
        assert ([line.split("|")[-1].split()[0] for line in stream.getvalue().splitlines()].count("5/5")
                == 1), stream.getvalue()


def test_restart_clock_leaves_a_compiling_first_step_out_of_the_eta(monkeypatch):
    """A first step of 600 s (compilation), then 1 s per step: the ETA after step 2 is 99 steps of 1 s."""
    now = [0.0]
    monkeypatch.setattr("tqdm.std.time", lambda: now[0])
    monkeypatch.setattr(shared_config.progress, "time", type("Clock", (), {"time": staticmethod(lambda: now[0])}))
    stream = io.StringIO()
    with progress(total=101, desc="steps", stream=stream, interval=0) as bar:
        now[0] += 600.0
        restart_clock(bar, 1, loss="1.0")
        for step in range(2, 4):
            now[0] += 1.0
            advance(bar, step, loss="1.0")
    lines = stream.getvalue().splitlines()
    assert "1/101 [00:00<?, ?it/s, loss=1.0]" in lines[1], lines
    assert "2/101 [00:01<01:39," in lines[2] and "3/101 [00:02<01:38," in lines[3], lines


def test_a_write_in_one_call_shows_its_bytes_as_they_land(tmp_path, monkeypatch, capsys):
    """torch.save, safetensors and Orbax write a checkpoint in one silent call (40 s for llama-1b's 5.6 GB): `writing`
    reads the bytes off the temporary file the atomic writer fills. A quick or quiet write shows nothing."""
    def slow_write(tmp):
        with open(tmp, "wb") as f:
            for _ in range(4):
                f.write(b"x" * 1000)
                f.flush()
                time.sleep(0.2)

    monkeypatch.setattr(shared_config.progress, "QUICK_S", 0.0)  # show at once, each position as a line
    monkeypatch.setattr(shared_config.progress, "progress", lambda *a, **k: progress(*a, interval=0, **k))
    with writing(tmp_path / "w.bin", 4000, poll=0.02):
        atomic_write(tmp_path / "w.bin", slow_write)
    lines = capsys.readouterr().err.splitlines()
    assert all(line.startswith("write w.bin:") for line in lines) and "4.00k/4.00k" in lines[-1], lines
    assert any(f"{k}.00k/4.00k" in line for line in lines for k in (1, 2, 3)), lines  # seen while writing
    monkeypatch.undo()
    for quiet in (False, True):
        with writing(tmp_path / "w.bin", 4000, quiet=quiet):
            atomic_write(tmp_path / "w.bin", lambda tmp: tmp.write_bytes(b"x" * 4000))
    assert capsys.readouterr().err == "" and (tmp_path / "w.bin").read_bytes() == b"x" * 4000


def test_prepare_data_counts_the_bytes_it_has_read_exactly(tmp_path, monkeypatch, capsys):
    """The BPE passes' bars count the file's bytes: non-ASCII text, CRLF and a lone CR included (the lines are decoded
    without newline translation, so their UTF-8 is the file's), ending at the file's size."""
    prepare = load_script("prepare_data")
    bars = []
    monkeypatch.setattr(prepare, "progress", lambda *a, **k: bars.append(progress(*a, **k)) or bars[-1])
    monkeypatch.setattr(prepare, "LINES_PER_CHUNK", 3)
    path = tmp_path / "in.txt"
    path.write_bytes("héllo wörld\r\nüber\rnaïve ☃\n".encode() * 7 + b"no newline at the end")
    chunks = list(prepare.line_chunks(path, "encode", quiet=False))
    assert "".join(line for chunk in chunks for line in chunk).encode() == path.read_bytes()
    assert bars[0].n == bars[0].total == path.stat().st_size
    assert capsys.readouterr().err == ""  # quick: under QUICK_S, no bar


def test_prepare_data_encodes_a_long_line_in_pieces_to_the_lines_own_tokens(tmp_path, monkeypatch):
    """A file of one long line was encoded whole: 4 GB for a 20 MB line. Lines past MAX_LINE_CHARS are now cut before
    a whitespace that a non-whitespace follows (where the byte-level pre-tokenizer splits): the pieces are the text,
    each bounded, and encode to the tokens of the whole line; a "word" longer than the bound is cut where it ends."""
    prepare = load_script("prepare_data")
    monkeypatch.setattr(prepare, "MAX_LINE_CHARS", 64)
    monkeypatch.setattr(prepare, "CHARS_PER_CHUNK", 200)
    story = "the cat  sat\ton über naïve ☃ it's 123 ! " * 40 + "\nshort line\n" + "the end" * 3
    path = tmp_path / "in.txt"
    path.write_text(story + "\n" + "x" * 300 + " tail")
    with open(path, encoding="utf-8", newline="") as f:
        pieces = list(prepare.lines(f))
    assert "".join(pieces) == path.read_text() and max(map(len, pieces)) < 2 * 64 and len(pieces) > 20
    path.write_text(story)
    tokenizer = prepare.train_bpe(path, 300)
    whole = [i for line in story.splitlines(keepends=True) for i in tokenizer.encode(line).ids]
    assert prepare.bpe_tokens(tokenizer, path).tolist() == whole


def test_a_missing_optional_dependency_fails_before_any_work(monkeypatch, capsys):
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name,
                        *a: None if name == "transformers" else found(name, *a))
    from bench import compare

    for backend in ("hf", "all"):
        with pytest.raises(SystemExit) as e:
            cli.run(compare.main, ["--backend", backend, "--steps", "1"])
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and "transformers" in line and "pip install -e '.[hf]'" in line, line


README_OUTPUTS = ["tiny.safetensors", "tiny-dyt.safetensors", "tiny.pt", "state_dict.pt", "tiny-flax/state",
                  "tiny-hf/config.json", "from-jax.safetensors", "input.txt", "data/text/train.bin",
                  "runs/dyt/metrics.jsonl", "mid.json", "report.json", "p.json", "norms.png", "curves.png",
                  "dyt.png", "tiny-bf16.safetensors", "tiny-from-bare.safetensors", "decode-context.png"]


def test_what_the_readme_commands_write_is_git_ignored():
    """A walkthrough of the README and docs/ leaves `git status` clean: every file their commands write is ignored."""
    readme = "\n".join(path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    for path in README_OUTPUTS:
        assert path.split("/")[0].removesuffix("/") in readme, path  # still an output of the README or docs/
        result = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", path])
        assert result.returncode == 0, f"{path} is not git-ignored"


def test_under_torchrun_rank_zero_alone_prints_a_usage_error(monkeypatch, capsys):
    """Every rank hits the same bad argument, non-finite loss or signal: one `error:` line, not one per rank
    (environment errors, which can differ by rank, still print everywhere). Another rank waits for rank 0 to print
    a usage error or a non-finite loss and exit, when torchrun ends it: exiting at once, it had torchrun stop a rank 0
    that had not yet met the error (`--set batch_size=3` over 2 ranks, about one run in four on 2 busy cores), whose
    line was 'interrupted by SIGTERM; partial outputs removed'. A wait that ends (no torchrun here): rank 0 did not
    meet the error, and this rank prints it."""
    import shared_config.parallel as parallel
    from shared_config.cli import fail

    waits = []
    monkeypatch.setattr(parallel, "time", SimpleNamespace(sleep=waits.append))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for code, waited in ((2, [parallel.PEER_GRACE_S]), (1, [parallel.PEER_GRACE_S]), (143, [])):
        # a usage error, a non-finite loss, SIGTERM (torchrun sends it to every rank: rank 0 says it)
        for rank, printed in (("1", "" if code == 143 else "error: bad --x\n"), ("0", "error: bad --x\n")):
            monkeypatch.setenv("RANK", rank)
            with pytest.raises(SystemExit) as exit_:
                fail("bad --x", code)
            assert exit_.value.code == code and capsys.readouterr().err == printed
            assert waits == (waited if rank == "1" else []), (code, rank, waits)
            waits.clear()
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        fail("disk full", 3)
    assert capsys.readouterr().err == "error: disk full\n"


TORCHRUN = {"WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "1"}


@pytest.mark.parametrize("env,says", [
    ({"WORLD_SIZE": "abc"}, "environment variable WORLD_SIZE='abc' must be an integer >= 0"),
    ({"RANK": "x"}, "environment variable RANK='x' must be an integer >= 0"),  # it exited 2 without a word
    ({"JAX_PROCESS_ID": "²"}, "environment variable JAX_PROCESS_ID='²' must be an integer >= 0"),
    # a KeyError's traceback, after run.json
    ({"RANK": "0"}, "RANK is set but WORLD_SIZE and LOCAL_RANK and MASTER_ADDR and MASTER_PORT not"),
    # torch's ValueError's traceback, run.json left behind
    ({"RANK": "0", **TORCHRUN, "MASTER_ADDR": None}, "RANK is set but MASTER_ADDR not"),
    ({"WORLD_SIZE": "0"}, "environment variable WORLD_SIZE=0 must be >= 1"),  # a ZeroDivisionError's traceback
    ({"RANK": "0", **TORCHRUN, "WORLD_SIZE": "0"}, "environment variable WORLD_SIZE=0 must be >= 1"),
    # it waited for a rank 0 forever, and would have exited without a word: rank 0 prints the errors
    ({"RANK": "1", **TORCHRUN}, "environment variable RANK=1 must be below WORLD_SIZE=1"),
    ({"RANK": "1"}, "environment variable RANK=1 must be below WORLD_SIZE=1"),  # exit 2 without a word
    # taken for a torchrun's: "parallel='ddp' needs a process group", a --parallel never passed
    ({"WORLD_SIZE": "2"}, "environment variable WORLD_SIZE=2 is set but RANK not"),
], ids=["world-size-abc", "rank-x", "jax-process-id", "rank-alone", "no-master-addr", "world-size-0",
        "rank-world-size-0", "rank-1-of-1", "rank-1-alone", "world-size-alone"])
def test_a_launcher_variable_that_is_no_rank_is_one_error_line(tmp_path, monkeypatch, capsys, env, says):
    """torchrun's RANK and WORLD_SIZE and JAX's JAX_PROCESS_ID set by hand to a non-number were int()'s traceback;
    the run directory made before it stays unmade."""
    from shared_config.cli import run

    for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "JAX_PROCESS_ID", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(variable, raising=False)
    for name, value in env.items():
        if value is not None:
            monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as e:
        run(load_script("train").main, ["--backend", "torch", "--out", str(tmp_path / "new" / "run"), "--steps", "1",
                                        "--set", "n_layers=1", "--set", "batch_size=2", "--set", "seq_len=16",
                                        "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {says}") and err.count("\n") == 1, err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("env, says", [
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_COORDINATOR_ADDRESS is set but JAX_PROCESS_ID not"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "-1"}, "JAX_PROCESS_ID='-1' must be an integer >= 0"),  # was taken
    # jax.distributed's ValueError's traceback
    ({"JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "1"}, "JAX_PROCESS_ID=1 must be below JAX_NUM_PROCESSES=1"),
    ({"JAX_NUM_PROCESSES": "0", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES=0 must be >= 1"),
])
def test_jax_s_launcher_variables_are_read_as_torchrun_s_are(monkeypatch, env, says):
    """jax_model.distributed.init_distributed reads JAX_NUM_PROCESSES and JAX_PROCESS_ID as the torch twin reads
    RANK and WORLD_SIZE (shared_config.parallel.env_int), before jax.distributed starts."""
    from jax_model import distributed
    from shared_config import SpecError

    for variable in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SpecError, match=re.escape(says)):
        distributed.init_distributed()
