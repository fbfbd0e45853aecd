"""scripts/train.py scaled out: the JAX step over a device mesh and the torch step under torchrun
(DDP, FSDP2) train exactly as one device does, write checkpoints either twin resumes, and resume their own."""

import math
import subprocess
import sys

import pytest

from shared_config.cli import run
from shared_config.metrics import read_metrics

from ..support.common import ROOT, TORCHRUN, load_script, one_line_error, quick_first, run_main, run_python, run_script
from ..support.compile_caches import cache_settings, restore_cache_settings
from ..support.parallel_common import free_port

# A validation pass before each save: FSDP2 leaves the root's parameters gathered after a forward
# without backward, which once made the saved AdamW moments of the root's tensors zero.
ARGS = ["--steps", "8", "--set", "batch_size=4", "--set", "seq_len=32", "--set", "warmup_steps=2", "--log-every", "1",
        "--eval-every", "2", "--eval-batches", "1", "--save-every", "4", "--quiet"]


def train_records(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]


def losses(out):
    return [r["loss"] for r in train_records(out)]


SCALE_OUT_LOSS_TOL = 1e-5  # |Δloss| / |loss| of a scaled-out or resumed run's steps against one process's


def close(a, b, tol=SCALE_OUT_LOSS_TOL):
    return len(a) == len(b) and all(abs(x - y) <= tol * abs(y) for x, y in zip(a, b))


def val_losses(out):
    """{step: val_loss} of the evaluations in metrics.jsonl."""
    return {r["step"]: r["val_loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """8 steps of the torch twin in one process, this one (train.main; a module fixture, so the compile caches it
    turns on are put back here): what every scaled-out run must reproduce; its output directory."""
    out, before = tmp_path_factory.mktemp("one") / "run", cache_settings()
    try:
        with pytest.raises(SystemExit) as e:
            run(load_script("train").main, ["--backend", "torch", "--out", str(out), *ARGS])
    finally:
        restore_cache_settings(before)
    assert e.value.code == 0
    return out


@pytest.fixture(scope="module")
def reference(reference_run):
    return losses(reference_run)


def torchrun(*args):
    return run_python(*TORCHRUN, ROOT / "scripts" / "train.py", "--backend", "torch", *args, OMP_NUM_THREADS="1")


@pytest.mark.slow
def test_jax_over_a_mesh_trains_as_one_device_and_resumes_there(tmp_path, reference, capsys):
    """The mesh's 4 host devices need a process of their own; the resume on one device runs in this one."""
    out = tmp_path / "mesh"
    r = run_script("train", "--backend", "jax", "--mesh", "data=2,fsdp=2", "--out", out, *ARGS, "--stop-at", "4")
    assert r.returncode == 0, r.stderr
    run_main(load_script("train").main, "--backend", "jax", "--out", out, "--resume", "--quiet", "--log-every", "1",
             capsys=capsys)
    assert close(losses(out), reference), (losses(out), reference)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_torchrun_trains_as_one_process_and_resumes(tmp_path, capsys, reference, reference_run, parallel):
    """Losses step for step, and the validation losses (each rank evaluating its rows of the validation batches,
    torch_model.distributed.make_eval_step) at every evaluation, before and after the resume."""
    out = tmp_path / parallel
    r = torchrun("--parallel", parallel, "--out", out, *ARGS, "--stop-at", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('"step": 4') == 1  # rank 0 alone reports
    r = torchrun("--parallel", parallel, "--out", out, "--resume", "--quiet", "--log-every", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert close(losses(out), reference), (losses(out), reference)
    got, want = val_losses(out), val_losses(reference_run)
    assert list(got) == list(want) == [2, 4, 6, 8] and close(list(got.values()), list(want.values())), (got, want)
    if parallel == "fsdp2":  # and its checkpoint continues on one JAX device
        run_main(load_script("train").main, "--backend", "jax", "--out", out, "--resume", "--steps", "10", "--quiet",
                 "--log-every", "1", capsys=capsys)  # in this process: one JAX device
        records = train_records(out)
        assert [x["step"] for x in records] == list(range(1, 11)), [x["step"] for x in records]
        assert close(losses(out)[:8], reference) and all(math.isfinite(x) for x in losses(out)[8:]), losses(out)


@pytest.mark.slow
def test_torchrun_of_one_process_takes_parallel(tmp_path, reference):
    """torchrun --nproc_per_node=1 (its environment, without the launcher) with --parallel fsdp2: FSDP2 over one rank
    trains as one process; it was refused with "--parallel fsdp2 needs torchrun"."""
    out = tmp_path / "one"
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="localhost", MASTER_PORT=str(free_port()))
    r = run_python(ROOT / "scripts" / "train.py", "--backend", "torch", "--parallel", "fsdp2", "--out", out, *ARGS,
                   "--stop-at", "2", OMP_NUM_THREADS="1", **env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert close(losses(out), reference[:2]), (losses(out), reference[:2])


@pytest.mark.slow
def test_torchrun_rank_failing_mid_run_gives_error_lines_only(tmp_path):
    """Rank 1 runs out of memory at step 3 (planted: support/failing_rank.py) while rank 0 waits in the step's
    all-reduce: rank 1's error line, and rank 0's saying that a rank left (it was a traceback of gloo's "Connection
    closed by peer"); step 2's checkpoint stays."""
    out = tmp_path / "run"
    r = run_python(*TORCHRUN, ROOT / "parity_tests" / "support" / "failing_rank.py", "--backend", "torch", "--parallel",
                   "ddp", "--out", out, *ARGS, "--save-every", "2", OMP_NUM_THREADS="1")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode != 0 and "[rank0]: Traceback" not in r.stderr, r.stderr[-3000:]
    assert any("ran out of memory" in line for line in errors), r.stderr[-3000:]
    ours = ("ran out of memory", "another rank of this torchrun left", "interrupted by SIGTERM")  # rank 0: either
    assert all(any(s in line for s in ours) for line in errors), errors
    assert (out / "step-00000002" / "model.safetensors").is_file()


@pytest.mark.slow
def test_torchrun_ranks_end_at_once_when_rank_0_fails_alone(tmp_path):
    """Rank 0 alone holds the run directory's lock: when another process holds it, rank 0 fails with its error line
    while rank 1 waits in the process group's rendezvous. torchrun then sends SIGTERM to rank 1, which must die of it
    at once (rank 1 writes nothing): a Python handler would run only when the blocking call returned, and torchrun
    SIGKILLs it after 30 s."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); os.pwrite(fd, b'4242', 0); "
                               "print('held', flush=True); time.sleep(120)", str(out / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = torchrun("--parallel", "ddp", "--out", out, "--steps", "2", "--quiet")
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode != 0
    assert r.stderr.count("error: ") == 1 and "is being written by another process (PID 4242)" in r.stderr, r.stderr
    assert "(SIGKILL)" not in r.stderr and "exitcode  : -15" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize(
    "args,message",
    quick_first([
        (["--backend", "jax", "--devices", "2", "--mesh", "data=1"], "--devices N and --mesh: pass one"),
        (["--backend", "torch", "--mesh", "data=2"], "--devices/--mesh scale the JAX twin"),
        (["--backend", "torch", "--parallel", "ddp"], "--parallel ddp needs torchrun"),
        (["--backend", "jax", "--devices", "3", "--set", "batch_size=4"], "batch_size=4 must be divisible by the 3"),
        (["--backend", "jax", "--mesh", "data=2,model=2"], "unknown axis 'model'"),
        # each device's 1 row cannot be 2 micro-batches: refused before the run directory is made (it was left behind)
        (["--backend", "jax", "--devices", "2", "--set", "batch_size=2", "--set", "grad_accum_steps=2"],
         "grad_accum_steps=2 must divide the 1 rows of a batch"),
    ], 1, multi=True),
)
def test_bad_scale_out_arguments(tmp_path, args, message):
    one_line_error(run_script("train", *args, "--out", tmp_path / "x", "--steps", "2", "--quiet"), message)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("launched", [False, True], ids=["alone", "torchrun-of-one"])
def test_parallel_with_the_jax_twin_names_its_scale_out(monkeypatch, capsys, tmp_path, launched):
    """--backend jax --parallel ddp was told it needs torchrun (where torchrun then refuses JAX), and under a torchrun
    of one process the JAX trainer read 'ddp' as a mesh: "unknown axis 'ddp' (did you mean 'fsdp'?)"."""
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value) if launched else monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as e:
        run(load_script("train").main, ["--backend", "jax", "--parallel", "ddp", "--out", str(tmp_path / "x"),
                                        "--steps", "1", "--quiet"])
    assert e.value.code == 2 and capsys.readouterr().err == (
        "error: --parallel ddp scales the torch twin's training under torchrun: pass --backend torch (the JAX twin "
        "scales out with --devices/--mesh)\n")
    assert not (tmp_path / "x").exists()


def test_a_resume_note_is_printed_once_under_torchrun(monkeypatch, capsys, tmp_path):
    """A resume that changes --steps notes the new lr schedule: every rank printed the note (twice over 2 ranks)."""
    from shared_config.run import resolve_run

    train = load_script("train")
    out, small = tmp_path / "run", ["--set", "n_layers=1", "--set", "batch_size=2", "--set", "seq_len=16"]
    with pytest.raises(SystemExit) as e:
        run(train.main, ["--backend", "torch", "--out", str(out), "--steps", "1", *small, "--quiet"])
    assert e.value.code == 0
    capsys.readouterr()
    for rank, notes in (("0", 1), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        resolve_run(train.parse_args(["--backend", "torch", "--out", str(out), "--resume", "--steps", "2", "--quiet"]))
        assert capsys.readouterr().err.count("note: steps 1 -> 2: the lr schedule changes") == notes, rank
