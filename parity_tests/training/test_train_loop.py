"""The training loop (shared_config/loop.py) as scripts/train.py runs it, in process, in both twins: the loss falls
on the synthetic corpus, the metrics carry every alpha/shift/embed_scale, resuming is bit-exact in the same twin and
within the trajectory bounds in the other, and a planted NaN stops the run naming the step and tensor, the last good
checkpoint kept."""

import functools
import math
import re
import time

import numpy as np
import pytest

from shared_config import layout, loop
from shared_config.loop import Loop, NonFiniteError, first_nonfinite, trainer_factory
from shared_config.parity import TRAJ_LOSS_TOL, TRAJ_PARAM_TOL, max_rel
from shared_config.run import resolve_run
from shared_config.run_dir import list_checkpoints, load_train_checkpoint
from shared_config.metrics import read_metrics
from shared_config.twins import twin

from ..support.common import load_script, quick_first

T = load_script("train")
BACKENDS = ["jax", "torch"]
STEPS, HALF = 40, 20
# tiny-derf (alpha, shift and embed_scale all present), shrunk so that a step takes milliseconds
SMALL = ["--spec", "tiny-derf", "--set", "n_layers=2", "--set", "d_model=48", "--set", "d_ff=128",
         "--set", "batch_size=4", "--set", "seq_len=32", "--set", "lr=2e-3", "--set", "warmup_steps=4",
         "--eval-every", "20", "--eval-batches", "2", "--log-every", "5"]
LOG_POINT_ONLY = ("tokens_per_s", "elapsed_s", "scalars")  # a resumed run logs its first step too


def train(out, backend, *extra, make_backend=None, progress=False):
    """Run the loop as `scripts/train.py --backend BACKEND --out OUT ...` would, without a subprocess."""
    run = resolve_run(T.parse_args(["--backend", backend, "--out", str(out), *SMALL, "--steps", str(STEPS), *extra]))
    factory = trainer_factory(twin(backend, "trainer").Trainer, run)
    return Loop(run, make_backend(factory) if make_backend else factory, progress=progress)()


def final_state(out):
    return load_train_checkpoint(list_checkpoints(out)[-1])[0]


def train_losses(out):
    return np.array([r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"])


def per_step(records):
    return [{k: v for k, v in r.items() if k not in LOG_POINT_ONLY} for r in records]


@pytest.fixture(scope="module", params=quick_first(BACKENDS))
def straight(request, tmp_path_factory):
    """(backend, OUT) of an uninterrupted STEPS-step run."""
    out = tmp_path_factory.mktemp(f"straight-{request.param}")
    train(out, request.param, "--save-every", str(HALF))
    return request.param, out


def test_loss_falls_and_metrics_hold_every_scalar(straight):
    backend, out = straight
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert all(list(r)[:5] == ["kind", "step", "loss", "grad_norm", "lr"] for r in steps), "both twins' key order"
    losses = np.array([r["loss"] for r in steps])
    assert losses[-5:].mean() < losses[0] - 0.5, f"{backend}: {losses[0]:.3f} -> {losses[-5:].mean():.3f}"
    assert all(r["nonfinite"] == 0 and math.isfinite(r["grad_norm"]) and r["lr"] > 0 for r in steps)
    spec = load_train_checkpoint(list_checkpoints(out)[-1])[1]
    scalar_names = {t.name for t in layout(spec) if t.shape == (1,)}
    assert any(n.endswith(".alpha") for n in scalar_names) and any(n.endswith(".shift") for n in scalar_names)
    assert "model.embed_scale" in scalar_names
    logged = [r for r in steps if "scalars" in r]
    assert [r["step"] for r in logged] == [1, *range(5, STEPS + 1, 5)]
    assert all(set(r["scalars"]) == scalar_names for r in logged)
    assert logged[-1]["scalars"] != logged[0]["scalars"], "the scalars learn"
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [HALF, STEPS]
    assert all(0 < r["entropy"] < r["val_loss"] and r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
               for r in evals)


@pytest.mark.slow
def test_resume_in_the_same_twin_is_bit_exact(straight, tmp_path):
    backend, whole = straight
    train(tmp_path, backend, "--save-every", str(HALF), "--stop-at", str(HALF))
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"step-{HALF:08d}"]
    train(tmp_path, backend, "--save-every", str(HALF), "--resume")
    a, b = final_state(tmp_path), final_state(whole)
    assert a["step"] == b["step"] == STEPS
    for key in ("weights", "m", "v"):
        assert all(np.array_equal(a[key][k], b[key][k]) for k in b[key]), f"{backend} {key}"
    assert per_step(read_metrics(tmp_path / "metrics.jsonl")) == per_step(read_metrics(whole / "metrics.jsonl"))


@pytest.mark.slow
def test_resume_in_the_other_twin(straight, tmp_path):
    first, whole = straight
    second = BACKENDS[1 - BACKENDS.index(first)]
    train(tmp_path, first, "--save-every", str(HALF), "--stop-at", str(HALF))
    train(tmp_path, second, "--save-every", str(HALF), "--resume")
    resumed, reference = final_state(tmp_path), final_state(whole)
    assert resumed["step"] == STEPS
    losses, reference_losses = (train_losses(out) for out in (tmp_path, whole))
    assert np.all(np.abs(losses - reference_losses) / reference_losses <= TRAJ_LOSS_TOL)
    errors = {k: max_rel(resumed["weights"][k], x) for k, x in reference["weights"].items()}
    assert not {k: e for k, e in errors.items() if not e <= TRAJ_PARAM_TOL}, f"{first} -> {second}: {errors}"
    assert load_train_checkpoint(list_checkpoints(tmp_path)[-1])[2]["backend"] == second


PLANTED = "model.layers.1.mlp.down_proj.weight"


def plant_nan_after(update: int):
    """Wrap a backend factory: after update `update`, one value of PLANTED becomes NaN (replays plant it again)."""

    def wrap(factory):
        def make(state):
            backend, done = factory(state), [state["step"]]
            step = backend.step

            def step_then_plant(tokens_BN):
                metrics = step(tokens_BN)
                done[0] += 1
                if done[0] == update:
                    canonical = backend.train_state()
                    canonical["weights"][PLANTED] = canonical["weights"][PLANTED].copy()
                    canonical["weights"][PLANTED][3, 5] = np.nan
                    backend.set_train_state(canonical)
                return metrics

            backend.step = step_then_plant
            return backend

        return make

    return wrap


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_planted_nan_stops_the_run_and_keeps_the_last_good_checkpoint(backend, tmp_path):
    with pytest.raises(NonFiniteError) as e:
        train(tmp_path, backend, "--save-every", "3", "--keep", "2", make_backend=plant_nan_after(7))
    message = str(e.value)
    assert "non-finite loss at step 8" in message
    assert f"the first non-finite tensor is parameter {PLANTED} (1 of" in message
    assert message.endswith(f"the last good checkpoint is {tmp_path / 'step-00000006'}")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000006"]
    state, _, info = load_train_checkpoint(tmp_path / "step-00000006")  # loads: every tensor checked finite
    assert state["step"] == info["step"] == 6
    last = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert last["step"] == 8 and 0 < last["nonfinite"] <= 1  # the replay counts the NaN/Inf gradient values
    assert math.isnan(last["loss"]) and "NaN" not in (tmp_path / "metrics.jsonl").read_text()  # strict JSON: null
    assert all(r["nonfinite"] == 0 for r in read_metrics(tmp_path / "metrics.jsonl")[:-1] if r["kind"] == "train")


def slow_first_step(seconds: float):
    """A make_backend wrapper whose backend's first step takes `seconds` longer, as a compiling one does."""
    def wrap(factory):
        def make(state):
            backend, taken = factory(state), []
            step = backend.step

            def slow_then_step(tokens):
                if not taken:
                    time.sleep(seconds)
                taken.append(1)
                return step(tokens)

            backend.step = slow_then_step
            return backend

        return make

    return wrap


@pytest.mark.slow
def test_progress_shows_the_end_once_and_an_eta_without_compilation(tmp_path, monkeypatch, capsys):
    """A 3 s first step, then steps of milliseconds: the ETA after step 2 is the 38 steps left at the later
    steps' pace (counting the first step as one, it was about a minute), and the 100% line comes once."""
    monkeypatch.setattr(loop, "progress", functools.partial(loop.progress, interval=0))
    train(tmp_path, "torch", "--log-every", "1", make_backend=slow_first_step(3.0), progress=True)
    lines = capsys.readouterr().err.splitlines()
    shown = {m[1]: m[2] for m in (re.search(r" (\d+)/40 \[\d\d:\d\d<([^,]+),", line) for line in lines) if m}
    assert shown["1"] == "?", lines
    assert re.fullmatch(r"00:[01]\d", shown["2"]), lines  # ETA under 20 s, where counting step 1 gave ~57 s
    assert sum(" 40/40 " in line for line in lines) == 1, lines


def test_the_first_nonfinite_tensor_is_the_first_computed():
    ok, bad = np.ones(3, np.float32), np.array([1, np.nan, np.inf], np.float32)
    taps = {"model.embed": ok, "model.layers.0": {"attn_out": bad, "mlp_out": bad}, "logits": bad}
    first = first_nonfinite({"a": ok, "b": bad}, taps, math.nan, {"a": bad})
    assert first == "the first non-finite tensor is parameter b (2 of 3 values NaN/Inf)"
    assert "activation model.layers.0.attn_out (2 of 3" in first_nonfinite({"a": ok}, taps, math.nan, {"a": bad})
    assert "the loss itself" in first_nonfinite({"a": ok}, {"logits": ok}, math.inf, {"a": bad})
    assert "gradient of a" in first_nonfinite({"a": ok}, {"logits": ok}, 1.0, {"a": bad})
    assert first_nonfinite({"a": ok}, {"logits": ok}, 1.0, {"a": ok}) is None


def test_init_from_a_checkpoint_in_another_format(tmp_path):
    import torch_model
    from shared_config import init_weights, load_spec
    from torch_model.train import loss_and_grads

    spec = load_spec("tiny-derf").replace(n_layers=2, d_model=48, d_ff=128)
    weights = init_weights(spec.replace(init_std=0.05), seed=7)
    torch_model.save_state_dict_file(tmp_path / "start.pt", weights, spec)
    out = tmp_path / "run"
    train(out, "torch", "--init-from", str(tmp_path / "start.pt"), "--stop-at", "1")
    run = resolve_run(T.parse_args(["--backend", "torch", "--out", str(tmp_path / "other"), *SMALL]))
    expected, _ = loss_and_grads(torch_model.from_weights(weights, spec), run.batch(1))
    assert read_metrics(out / "metrics.jsonl")[0]["loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("backend", quick_first(BACKENDS[::-1]))  # jax's ~7 s in the full suite
def test_a_resume_keeps_the_runs_cadence_unless_given_again(backend, tmp_path):
    """A resume without --log-every/--eval-every/--save-every/--keep ran at the defaults (10, 100, 100, 3): a run that
    saved and evaluated every 2 steps and kept 1 checkpoint went on with one evaluation and checkpoint at its end, the
    earlier one kept. The resume takes the checkpoint's; a given one wins (a cadence moves no number)."""
    tiny = ["--spec", "tiny", "--set", "n_layers=1", "--set", "d_model=48", "--set", "d_ff=96", "--set",
            "batch_size=2", "--set", "seq_len=16", "--set", "warmup_steps=0", "--eval-batches", "1", "--steps", "8"]

    def resolve(*extra):
        return resolve_run(T.parse_args(["--backend", backend, "--out", str(tmp_path), *tiny, *extra]))

    factory = twin(backend, "trainer").Trainer
    first = resolve("--log-every", "3", "--eval-every", "2", "--save-every", "2", "--keep", "1", "--stop-at", "4")
    Loop(first, trainer_factory(factory, first), progress=False)()
    resumed = resolve("--resume")
    assert (resumed.log_every, resumed.eval_every, resumed.save_every, resumed.keep) == (3, 2, 2, 1)
    Loop(resumed, trainer_factory(factory, resumed), progress=False)()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "eval"] == [2, 4, 6, 8]
    assert [r["step"] for r in records if "scalars" in r] == [1, 2, 3, 4, 5, 6, 8]  # 5: a resumed run's first
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000008"]
    given = resolve("--resume", "--log-every", "1", "--keep", "0")
    assert (given.log_every, given.eval_every, given.save_every, given.keep) == (1, 2, 2, 0)
