"""What writers leave (docs/checkpoints.md, "Bad input, limits and failures"): nothing after a kill, the old copy
after a replace cut between its renames, one writer per run directory, files with the umask's permissions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import shared_config.files
import shared_config.formats.safetensors
from shared_config import init_weights, load_spec, run_dir, save_checkpoint
from shared_config.cli import UsageError
from shared_config.resources import ResourceError

from ..support.common import ROOT, checkout_env, load_script, make_spec, one_line, run_script

convert = load_script("convert").convert


def dead_pid() -> int:
    """The id of a process that has exited (a writer killed with -9)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --- killed writes leave nothing behind, and a replace never loses the old copy --------------------------------------


def test_a_later_write_removes_temps_of_killed_writers_only(tmp_path, canonical):
    dst = tmp_path / "out.safetensors"
    stale, live = (tmp_path / f".out.safetensors.{dead_pid()}.x1.tmp",
                   tmp_path / f".out.safetensors.{os.getppid()}.x2.tmp")
    stale.write_bytes(b"partial")
    live.write_bytes(b"another writer's")  # a live process's write in progress is not touched
    stale_dir = tmp_path / f".out-hf.{dead_pid()}.x3.tmp"
    (stale_dir / "x").mkdir(parents=True)
    convert(canonical, dst)
    convert(canonical, tmp_path / "out-hf", to="hf")
    assert not stale.exists() and not stale_dir.exists() and live.exists()


def test_a_run_directory_is_recovered_from_a_killed_run(tmp_path):
    run = tmp_path / "run"
    (run / f".step-00000200.{dead_pid()}.abc.tmp" / "model.safetensors").parent.mkdir(parents=True)
    (run / ".step-00000100.deleting").mkdir()
    (run / f".metrics.jsonl.{dead_pid()}.q.tmp").write_text("x")
    (run / ".step-00000300.old").mkdir()  # a replace cut between its renames: the only copy
    run_dir.recover_run_dir(run)
    assert sorted(p.name for p in run.iterdir()) == ["step-00000300"]


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, canonical):
    """A write interrupted by SIGTERM removes its temp file and exits 143 with one line."""
    driver = tmp_path / "slow.py"
    driver.write_text(f"""
import sys, time
sys.argv = ["convert", {str(canonical)!r}, {str(tmp_path / 'out.safetensors')!r}]
import shared_config.formats.safetensors as io
from shared_config.cli import run
def slow(tensors, path, metadata=None):
    open(path, "wb").write(b"partial")
    print("writing", flush=True)
    for _ in range(600):  # 60 s in steps: the kernel may hand SIGTERM to another thread (torch's, XLA's), and then
        time.sleep(0.1)   # Python runs its handler once the main thread's current sleep returns, not at once
io.save_file = slow
sys.path.insert(0, {str(ROOT / 'scripts')!r})
import convert
run(convert.main)
""")
    p = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=checkout_env())
    assert p.stdout.readline() == "writing\n"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and err.strip() == "error: interrupted by SIGTERM; partial outputs removed", err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.safetensors", "slow.py"]


def test_a_replace_cut_between_its_renames_is_recovered_never_deleted(tmp_path, canonical, monkeypatch):
    dst = tmp_path / "out-hf"
    convert(canonical, dst, to="hf")
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    os.replace(dst, tmp_path / ".out-hf.old")  # killed after moving the old copy aside, before the new one moved in

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shared_config.formats.safetensors, "save_file", crash)
    with pytest.raises(ResourceError):  # the rerun fails too: the old copy must be back, not deleted
        convert(canonical, dst, to="hf", force=True)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "out-hf"]
    os.replace(dst, tmp_path / ".out-hf.old")
    with pytest.raises(UsageError, match="out-hf exists; pass --force"):  # the recovered copy is DST again
        convert(canonical, dst, to="hf")
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before


def _driver(tmp_path, body: str) -> Path:
    """A Python script that runs `body` (which may patch the library) and then convert.py's main under cli.run."""
    driver = tmp_path / "driver.py"
    driver.write_text(f"""
import os, sys, time
sys.path.insert(0, {str(ROOT / 'scripts')!r})
import convert
from shared_config.cli import run
{body}
run(convert.main)
""")
    return driver


def test_a_replace_killed_at_its_first_rename_still_leaves_the_destination(tmp_path, canonical):
    """kill -9 right after a replace's first rename (where the old directory used to move aside): the destination
    is there, the new copy, because the replace is one rename (an exchange)."""
    dst = tmp_path / "out-hf"
    convert(canonical, dst, to="hf")
    driver = _driver(tmp_path, f"""
real = os.replace
def replace(a, b):
    real(a, b)
    if str(b).endswith(".old"):
        os._exit(137)  # killed between the two renames of a replace
os.replace = replace
sys.argv[1:] = [{str(canonical)!r}, {str(dst)!r}, "--to", "hf", "--force"]
""")
    result = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, env=checkout_env(),
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["driver.py", "m.safetensors", "out-hf"]


def test_a_reader_that_finds_only_the_moved_aside_copy_puts_it_back(tmp_path, canonical):
    import torch_model

    dst = tmp_path / "out-hf"
    convert(canonical, dst, to="hf")
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    os.replace(dst, tmp_path / ".out-hf.old")  # a replace without the exchange, killed between its renames
    torch_model.from_pretrained(dst)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert not (tmp_path / ".out-hf.old").exists()


def test_without_the_exchange_a_replace_falls_back_to_two_renames(tmp_path, canonical, monkeypatch):
    monkeypatch.setattr(shared_config.files, "_exchange", lambda a, b: False)  # a file system without RENAME_EXCHANGE
    dst = tmp_path / "out-hf"
    convert(canonical, dst, to="hf")
    convert(tmp_path / "m.safetensors", dst, to="hf", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "out-hf"]
    convert(dst, tmp_path / "back.safetensors")


WRITES = {"flax": "out-flax", "hf": "out-hf", "fla": "out-fla", "torch": "out.pt", "safetensors": "out.safetensors"}


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3])
@pytest.mark.parametrize("fmt", list(WRITES))
def test_sigterm_at_any_instant_of_a_write_is_exit_143_one_line_and_no_debris(tmp_path, fmt, delay):
    """SIGTERM a fixed delay after a write starts (the first temp name is taken), for every format's writer
    (Orbax's runs native threads): exit 143 with one line and nothing left, or, when the write had finished,
    exit 0 and the complete destination."""
    src = tmp_path / "src.safetensors"
    spec = load_spec("gla-tiny") if fmt == "fla" else make_spec()
    save_checkpoint(src, init_weights(spec, 0), spec)
    dst = tmp_path / WRITES[fmt]
    driver = _driver(tmp_path, f"""
import tempfile
for name in ("mkstemp", "mkdtemp"):
    def started(*args, _real=getattr(tempfile, name), **kwargs):
        made = _real(*args, **kwargs)
        print("writing", flush=True)
        return made
    setattr(tempfile, name, started)
sys.argv[1:] = [{str(src)!r}, {str(dst)!r}, "--to", {fmt!r}]
""")
    p = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=checkout_env())
    assert p.stdout.readline() == "writing\n"
    time.sleep(delay)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    left = sorted(x.name for x in tmp_path.iterdir())
    if p.returncode != 0:
        assert p.returncode == 143 and err.strip() == "error: interrupted by SIGTERM; partial outputs removed", (
            p.returncode, err[-2000:], left)
    if dst.name in left:  # the write had finished (the signal came after its rename): complete
        assert left == sorted(["driver.py", "src.safetensors", dst.name])
        convert(dst, tmp_path / "back.safetensors")
    else:
        assert left == ["driver.py", "src.safetensors"]


# --- one writer per run directory ------------------------------------------------------------------------------------


def test_a_second_writer_of_a_run_directory_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with run_dir.lock_run(run):
        result = run_script("train", "--backend", "torch", "--out", run, "--steps", "2", "--quiet")
        one_line(result, 3, f"{run}: the run directory is being written by another process (PID {os.getpid()})")
        with pytest.raises(ResourceError, match=f"PID {os.getpid()}"):
            with run_dir.lock_run(run):  # a second open file in this very process is refused too
                pass
    with run_dir.lock_run(run):  # released
        pass
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


# --- written files get the umask's permissions, whatever the format --------------------------------------------------


def test_every_written_file_has_the_umasks_permissions(tmp_path, canonical):
    old = os.umask(0o027)
    try:
        for dst, to in [("o.safetensors", None), ("o.pt", None), ("o-hf", "hf"), ("o-flax", "flax")]:
            convert(canonical, tmp_path / dst, to=to)
        spec = make_spec()
        w = init_weights(spec, 0)
        state = {"step": 1, "weights": w, **{k: {n: np.zeros_like(x) for n, x in w.items()} for k in "mv"}}
        (tmp_path / "run").mkdir()
        run_dir.save_train_checkpoint(tmp_path / "run", state, spec, {"backend": "jax"})
    finally:
        os.umask(old)
    for p in tmp_path.rglob("*"):
        if p.name == "m.safetensors" or "o-flax/state" in str(p):  # Orbax's own files: its modes
            continue
        assert p.stat().st_mode & 0o777 == (0o750 if p.is_dir() else 0o640), p
