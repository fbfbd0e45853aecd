"""The suite's checkout guard (conftest.py, checkout_guard.py): a test that writes into the checkout fails,
naming the files; files the user's own commands write there meanwhile never fail anybody; tests run in an
empty scratch directory."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .. import conftest
from ..support.checkout_guard import CheckoutGuard
from ..support.common import ROOT


@pytest.fixture(scope="module")
def guard(tmp_path_factory):
    """One guard over a stand-in checkout for this module (audit hooks live as long as the process)."""
    checkout = tmp_path_factory.mktemp("checkout")
    (checkout / "README.md").write_text("tracked\n")
    return CheckoutGuard(checkout, skip=(checkout / "scratch",))


@pytest.fixture
def recording(guard):
    root = Path(guard.root)
    guard.take()
    guard.recording = True
    yield root
    guard.recording = False
    guard.take()


def test_every_way_of_writing_is_recorded(guard, recording):
    root = recording
    (root / "runs").mkdir()
    (root / "runs" / "a.json").write_text("{}")
    with open(root / "b.bin", "ab") as f:
        f.write(b"x")
    fd = os.open(root / "c.txt", os.O_WRONLY | os.O_CREAT)
    os.close(fd)
    os.replace(root / "c.txt", root / "d.txt")
    shutil.copyfile(root / "README.md", root / "e.md")
    os.remove(root / "b.bin")
    assert guard.take() == ["b.bin", "c.txt", "d.txt", "e.md", "runs", "runs/a.json"]


def test_relative_paths_count_against_the_working_directory(guard, recording, monkeypatch):
    monkeypatch.chdir(recording)
    Path("curves.png").write_bytes(b"")
    assert guard.take() == ["curves.png"]


def test_reads_caches_scratch_and_paths_outside_are_not_writes(guard, recording, tmp_path):
    root = recording
    (root / "README.md").read_text()
    with open(root / "README.md", "rb") as f:
        f.read()
    for d in ("__pycache__", "scratch"):
        (root / d).mkdir(exist_ok=True)
        (root / d / "x").write_text("")
    (tmp_path / "elsewhere.txt").write_text("")
    assert guard.take() == []


def test_a_users_own_files_written_meanwhile_are_never_blamed(guard, recording):
    """What another process writes (the user's README commands in a second terminal) is not this process's."""
    root = recording
    subprocess.run([sys.executable, "-c", f"open({str(root / 'converted.safetensors')!r}, 'wb').write(b'x')"],
                   check=True, timeout=60)
    assert (root / "converted.safetensors").exists() and guard.take() == []


def test_a_checkout_under_the_temp_directory_stays_guarded(tmp_path):
    """Scratch directories are skipped only inside the checkout: a checkout cloned under /tmp is still guarded."""
    inner = tmp_path / "clone"
    guard = CheckoutGuard(inner, skip=(tmp_path, inner / "tmp"), hook=False)
    assert guard.skip == [str((inner / "tmp").resolve())]
    assert guard._guarded(str((inner / "runs").resolve())) and not guard._guarded(str((inner / "tmp" / "x").resolve()))


def test_nothing_is_recorded_outside_a_test_phase(guard):
    guard.take()
    (Path(guard.root) / "between-tests.txt").write_text("")
    assert guard.take() == []


def test_a_phase_that_writes_into_the_checkout_fails_naming_the_files(guard, monkeypatch):
    """conftest's hook wrapper around each phase: a clean phase passes its result through, a writing one fails."""
    monkeypatch.setattr(conftest, "GUARD", guard)
    clean = conftest._guarded(None, "call")
    next(clean)
    with pytest.raises(StopIteration) as e:
        clean.send("result")
    assert e.value.value == "result"
    writing = conftest._guarded(None, "teardown")
    next(writing)
    (Path(guard.root) / "runs-tiny").mkdir()
    with pytest.raises(AssertionError, match=r"this test's teardown wrote into the checkout .*: runs-tiny$"):
        writing.send(None)
    assert not guard.recording


def test_every_test_runs_in_an_empty_scratch_directory():
    cwd = Path.cwd()
    assert cwd != ROOT and ROOT not in cwd.parents and list(cwd.iterdir()) == []
