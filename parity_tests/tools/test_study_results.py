"""What the research tools report matches what ran: the norm and routing studies' criteria and files, the plotted
curves' labels, the parity report's trained-tensor row, train.py's summary and resume. In process, on made-up
records or a stand-in trainer: no training, each test a few seconds at most."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ..support.common import load_script


def norm_row(val_ppl: float | None, grad_norm_var: float | None, stopped_at: int | None = None) -> dict:
    """One norm-study row as summarize writes it (a stopped run has no final numbers and no histograms)."""
    done = stopped_at is None
    return {"val_loss": None, "val_ppl": val_ppl if done else None, "alpha_min": None, "alpha_max": None,
            "grad_norm_var": grad_norm_var, "nonfinite_steps": 0 if done else 1, "stopped_at": stopped_at,
            "losses": [], "entropy": 2.59, "outputs": {"a": [1.0, 0.0]} if done else None}


def test_the_norm_study_judges_no_criterion_on_a_run_that_stopped_early():
    """A run a NaN/Inf stopped at step 2 had the gradient-norm variance of its one finite step, 0, and was reported as
    the study's lowest; its perplexity and output criteria were left out of the table without a word. Now a stopped
    run competes for no "lowest", its own criteria FAIL, and those it is the reference of are undecided."""
    study = load_script("compare_norms")
    results = {"rms-pre": {"jax": norm_row(15.0, 0.03)}, "rms-peri": {"jax": norm_row(None, 0.0, stopped_at=2)},
               "dyt-pre": {"jax": norm_row(None, 0.0, stopped_at=3)}, "dyt-peri": {"jax": norm_row(16.0, 0.05)}}
    judged = {name: (passed, detail) for name, passed, detail in study.criteria(results, "jax")}
    assert judged["dyt-pre within 0.5 perplexity of rms-pre"] == (False, "dyt-pre stopped at step 3 (non-finite)")
    assert judged["dyt-peri within 0.5 perplexity of rms-peri"] == (
        None, "no reference: rms-peri stopped at step 2 (non-finite)")
    assert judged["dyt-pre outputs distributed like rms-pre's (mean TV ≤ 0.25)"][0] is False
    assert judged["dyt-peri outputs distributed like rms-peri's (mean TV ≤ 0.25)"][0] is None
    assert judged["lowest gradient-norm variance overall"] == (
        None, "rms-pre (0.03); left out, stopped early: rms-peri, dyt-pre")
    assert judged["no NaN/Inf in any run"][0] is False
    assert not any(name.startswith(("rms:", "dyt:")) for name in judged)  # one finished placement each: no choice


def test_a_gradient_norm_variance_needs_two_steps_after_warmup():
    """One step after warmup was a variance of exactly 0, the lowest any run could have."""
    study = load_script("compare_norms")
    run_ = SimpleNamespace(cfg=SimpleNamespace(warmup_steps=2), data=SimpleNamespace(entropy=None))
    records = [{"kind": "train", "step": s, "loss": 3.0, "grad_norm": g} for s, g in ((1, 1.0), (2, 2.0), (3, 0.5))]
    study.norm_output_histograms = lambda run_: {}  # no checkpoint here: the histograms are another test's
    assert study.summarize(run_, records, None)["grad_norm_var"] is None
    records.append({"kind": "train", "step": 4, "loss": 3.0, "grad_norm": 1.5})
    assert study.summarize(run_, records, None)["grad_norm_var"] == 0.25


def test_the_norm_tables_non_finite_steps_are_each_backends():
    """The table's numbers are the first backend's, but its non-finite steps were summed over the backends: a torch
    run that diverged put its 1 on the row of jax's finite numbers. Each backend's count is shown, named in the
    header."""
    study = load_script("compare_norms")
    results = {"rms-pre": {"jax": norm_row(15.0, 0.03), "torch": norm_row(None, 0.0, stopped_at=4)},
               "dyt-pre": {"jax": norm_row(None, 0.0, stopped_at=3), "torch": norm_row(16.0, 0.05)}}
    table = study.markdown(results, ["jax", "torch"], 10, "python scripts/compare_norms.py")
    assert "numbers from jax but the non-finite steps (jax / torch) and the twins' loss gap" in table
    assert "| grad-norm var | non-finite steps jax / torch | max rel. Δloss jax-torch |" in table
    assert "| rms | pre | — | 15.00 | — | — | 0.03 | 0 / 1 |" in table
    assert "| dyt | pre | — | — | — | — | 0 | 1 / 0 |" in table
    assert "| non-finite steps torch |" in study.markdown(results, ["torch"], 10, "c")


def test_the_routing_table_says_which_run_stopped_early():
    """A run a NaN/Inf stopped showed "-" for its val ppl, as a dense run shows for top-k: the stop went unsaid."""
    study = load_script("compare_routing")
    row = {"val_loss": None, "val_ppl": None, "val_ppl_topk": None, "tokens_per_s": 1000.0, "flops_per_token": 3e5,
           "predictor_acc": None, "stopped_at": None}
    results = {"dense": {"jax": {**row, "val_ppl": 16.0}}, "mod-0.5": {"jax": {**row, "stopped_at": 7}}}
    table = study.markdown(results, ["jax"], 10, "python scripts/compare_routing.py")
    assert "| dense | jax | 16.000 | - |" in table
    assert "| mod-0.5 | jax | stopped at step 7 (non-finite) | - |" in table


def test_the_norm_tables_loss_gap_says_which_twin_stopped():
    """A run a NaN/Inf stopped put `nan` in the loss-gap column (its last loss is the non-finite one): the cell says
    which twin stopped at which step, with the gap over the steps before."""
    study = load_script("compare_norms")

    def row(losses, stopped_at=None):
        return {**norm_row(15.0 if stopped_at is None else None, 0.03, stopped_at), "losses": losses}

    results = {"rms-pre": {"jax": row([3.0, 2.5, 2.0]), "torch": row([3.0, 2.0, float("nan")], stopped_at=3)},
               "dyt-pre": {"jax": row([3.0, float("nan")], stopped_at=2), "torch": row([3.0, float("nan")], 2)},
               "rms-peri": {"jax": row([float("nan")], stopped_at=1), "torch": row([3.0, 2.0, 1.0])},
               "dyt-peri": {"jax": row([3.0, 2.0, 1.0]), "torch": row([3.0, 2.0, 2.0])}}
    table = study.markdown(results, ["jax", "torch"], 3, "c")
    assert "nan" not in table
    assert "| 0 / 1 | torch stopped at step 3 (non-finite); 2.5e-01 up to step 2 |" in table
    assert "| 1 / 1 | jax and torch stopped at step 2 (non-finite); 0.0e+00 up to step 1 |" in table
    assert "| 1 / 0 | jax stopped at step 1 (non-finite) |" in table
    assert "| 0 / 0 | 5.0e-01 |" in table
    single = study.markdown({"rms-pre": {"jax": results["rms-pre"]["torch"]}}, ["jax"], 3, "c")
    assert single.splitlines()[6].endswith("| 1 | — |")  # one twin: no gap to give


def test_plot_curves_labels_runs_of_one_name_apart(tmp_path, monkeypatch):
    """`plot_curves.py a/run run`: the second run was labelled by its path, "run", which was the first one's label,
    so its records replaced the first run's, one run drawn under the other's name. Runs of one name are labelled
    by their paths, each its own."""
    plot_curves = load_script("plot_curves")
    monkeypatch.chdir(tmp_path)
    for d, loss in (("a/run", 3.0), ("run", 2.0), ("b/other", 1.0)):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": loss}) + "\n")
    runs = plot_curves.load_runs([Path("a/run"), Path("run"), Path("b/other")])
    assert {name: records[0]["loss"] for name, records in runs.items()} == {"a/run": 3.0, "run": 2.0, "other": 1.0}


def test_the_parity_reports_trained_row_shows_a_twins_nan_weights():
    """A tensor one twin's training left NaN was passed over by max() (NaN > x is false) when a finite tensor came
    before it: the report's "trained ... (worst)" row named the finite one, PASS, and the report passed."""
    report = load_script("parity_report")
    cfg = SimpleNamespace(batch_size=2, seq_len=8)
    torch_w = {"a": np.ones(3, np.float32), "b": np.ones(3, np.float32)}
    jax_w = {"a": np.ones(3, np.float32), "b": np.array([1, np.nan, 1], np.float32)}
    runs = {"jax": ([3.0, 2.9], jax_w), "torch": ([3.0, 2.9], torch_w), "floor": ([3.0, 2.9], torch_w)}
    loss, trained = report.train_rows(runs, False, cfg)
    assert loss.passed and trained.stage == "trained b (worst)" and not trained.passed


class CountingTrainer:
    """A stand-in for a twin's Trainer: step s has loss 10 − s, and nothing runs but the loop."""

    name = "fake"

    def __init__(self, state: dict):
        self.done, self.state = state["step"], state

    def step(self, tokens_BN):
        self.done += 1
        return {"loss": 10.0 - self.done, "grad_norm": 1.0, "lr": 1e-3}

    def eval_loss(self, tokens_BN):
        return {"loss": 5.0}

    def scalars(self):
        return {}

    def fetch(self, tree):
        return tree

    def train_state(self):
        return {**self.state, "step": self.done}


def test_the_train_summarys_loss_is_the_last_steps(tmp_path, monkeypatch):
    """train.py's JSON summary gave, beside "step": 5, the mean loss of the steps since the loop last fetched metrics
    (steps 4 and 5 at --log-every 3), a number no step had and that --log-every/--eval-every/--save-every changed;
    metrics.jsonl has the step's own."""
    from shared_config import load_spec, load_train_config
    from shared_config.data import synthetic_corpus
    from shared_config.loop import Loop
    from shared_config.run import Run

    monkeypatch.setattr(Loop, "save", lambda self, trainer, step: None)  # no weights: the summary is under test
    data = synthetic_corpus(0)
    run = Run(load_spec("tiny").replace(vocab_size=data.vocab_size), load_train_config("cpu"), data, tmp_path,
              lambda: {"step": 0}, 5, log_every=3, eval_every=0, save_every=0, eval_batches=1)
    summary = Loop(run, CountingTrainer, progress=False)()
    assert summary["step"] == 5 and summary["loss"] == 5.0  # step 5's, not (6 + 5) / 2


def test_the_gla_norm_study_runs_the_configs_it_is_given():
    """--mixer gla's own default (four configs) replaced a --configs that spelled out the attention study's seven."""
    study = load_script("compare_norms")
    given = ",".join(study.CONFIGS)
    assert study.parse_args(["--mixer", "gla", "--configs", given]).configs == study.CONFIGS
    assert study.parse_args(["--mixer", "gla"]).configs == study.GLA_CONFIGS
    assert study.parse_args([]).configs == study.CONFIGS


def test_a_studys_json_says_what_was_run(tmp_path, monkeypatch):
    """routing.json held the steps, the backends and the numbers, not the --set changes nor the command: a study of
    n_layers=4 read like one of tiny's 3. Both studies' JSON carry the command and the changes."""
    routing = load_script("compare_routing")
    row = {"val_loss": 2.8, "val_ppl": 16.0, "val_ppl_topk": None, "tokens_per_s": 1.0, "flops_per_token": 3e5,
           "predictor_acc": None, "stopped_at": None}
    monkeypatch.setattr(routing, "study", lambda configs, backends, *args: {c: {"jax": row} for c in configs})
    routing.main(["--steps", "2", "--configs", "dense", "--backends", "jax", "--set", "n_layers=4", "--set",
                  "lr=2e-3", "--set", "norm_type=tanh", "--set", "grad_clip=2", "--out", str(tmp_path), "--quiet"])
    report = json.loads((tmp_path / "routing.json").read_text())
    # the values the runs used: YAML 1.1 read `2e-3` as the string "2e-3", and the alias tanh (dyt) and the int 2
    # (2.0) were recorded as given
    assert report["changes"] == {"spec": {"n_layers": 4, "norm_type": "dyt"},
                                 "train_config": {"lr": 0.002, "grad_clip": 2.0}}
    assert type(report["changes"]["train_config"]["grad_clip"]) is float
    assert report["command"].endswith("--set n_layers=4 --set lr=2e-3 --set norm_type=tanh --set grad_clip=2 --out "
                                      f"{tmp_path} --quiet")
    assert report["steps"] == 2 and report["results"] == {"dense": {"jax": row}}


def test_the_parity_report_json_names_its_weights_and_seed():
    """Two reports of one spec, drawn from different seeds (or one from a file), had the same header."""
    from shared_config import load_spec

    report = load_script("parity_report")
    args = SimpleNamespace(weights=None, seed=3, batch=2, seq=8)
    out = report.report_json(load_spec("tiny"), args, [])
    assert out["seed"] == 3 and out["weights"] is None and out["passed"] is True


def test_a_resumed_run_evaluates_on_the_validation_set_it_started_with(tmp_path, capsys):
    """A run started with --eval-batches 1 and resumed without it evaluated on the default's 8 batches: its later
    val_loss on another validation set than its earlier ones, unsaid. The resume takes the checkpoint's, and a
    --eval-batches that differs is refused."""
    from shared_config.cli import UsageError
    from shared_config.files import CheckpointError
    from shared_config.loop import Loop
    from shared_config.run import resolve_run

    train = load_script("train")
    small = ["--set", "n_layers=1", "--set", "batch_size=2", "--set", "seq_len=16", "--quiet"]
    run = resolve_run(train.parse_args(["--backend", "jax", "--out", str(tmp_path), "--steps", "2",
                                        "--eval-batches", "1", *small]))
    Loop(run, CountingTrainer, progress=False)()
    assert resolve_run(train.parse_args(["--backend", "torch", "--out", str(tmp_path), "--resume", "--steps",
                                         "4"])).eval_batches == 1
    with pytest.raises(UsageError, match="--eval-batches 8: the run in .* evaluates on 1 batches"):
        resolve_run(train.parse_args(["--backend", "torch", "--out", str(tmp_path), "--resume", "--eval-batches",
                                      "8"]))
    state = tmp_path / "step-00000002" / "state.json"
    stored = json.loads(state.read_text())
    for change, error in (({"eval_batches": "all"}, "'eval_batches' must be an integer >= 1, got 'all'"),
                          ({"cadence": {**stored["cadence"], "keep": -1}}, "'cadence keep' must be an integer >= 0"),
                          ({"cadence": [10]}, "cadence must be a JSON object, got \\[10\\]"),
                          ({"data_dtype": "int8"}, "'data_dtype' must be one of uint8, uint16, uint32, got 'int8'")):
        state.write_text(json.dumps({**stored, **change}))  # the resume's cadence comes from it (test_train_loop)
        with pytest.raises(CheckpointError, match=error):
            resolve_run(train.parse_args(["--backend", "torch", "--out", str(tmp_path), "--resume"]))


def test_a_resume_refuses_a_state_json_without_the_config_it_reads_naming_the_file(tmp_path):
    """state.json without train_config, its steps or the data's source was a KeyError's traceback (source 5 a
    TypeError's), and a train_config steps of "8" an error naming no file: each is one CheckpointError naming it."""
    from shared_config.files import CheckpointError
    from shared_config.loop import Loop
    from shared_config.run import resolve_run

    train = load_script("train")
    small = ["--set", "n_layers=1", "--set", "batch_size=2", "--set", "seq_len=16", "--eval-batches", "1", "--quiet"]
    Loop(resolve_run(train.parse_args(["--backend", "jax", "--out", str(tmp_path), "--steps", "2", *small])),
         CountingTrainer, progress=False)()
    state = tmp_path / "step-00000002" / "state.json"
    stored = json.loads(state.read_text())
    config, data = stored["train_config"], stored["data"]
    for change, error in (({"train_config": None}, "missing train_config"),
                          ({"train_config": {k: v for k, v in config.items() if k != "steps"}},
                           "train_config has no steps"),
                          ({"train_config": {**config, "steps": "8"}}, "train_config: steps='8' must be an integer"),
                          ({"data": {k: v for k, v in data.items() if k != "source"}},
                           "data has no source"),
                          ({"data": {**data, "source": 5}}, "data source must be a string .*, got 5")):
        state.write_text(json.dumps({k: v for k, v in {**stored, **change}.items() if v is not None}))
        with pytest.raises(CheckpointError, match=f"{state}: {error}"):
            resolve_run(train.parse_args(["--backend", "torch", "--out", str(tmp_path), "--resume"]))
    # validation batches past this machine's memory, the run's own: "lower --eval-batches" led to its refusal
    from shared_config.resources import ResourceError

    state.write_text(json.dumps({**stored, "eval_batches": 10**12}))
    with pytest.raises(ResourceError, match=r"the resumed run's eval_batches \(state.json of .*\) 1,000,000,000,000 .* "
                                            "resume it on a "
                                            "machine with more memory"):
        resolve_run(train.parse_args(["--backend", "torch", "--out", str(tmp_path), "--resume"]))


def test_a_resume_reads_raw_tokens_as_the_run_did(tmp_path):
    """A run on a raw .bin of uint32 tokens (--data-dtype uint32), resumed without --data-dtype, read them as uint16:
    twice the tokens, refused as other data ("train_tokens: checkpoint 3600, now 7200"), --data-dtype unnamed. The
    resume reads them as the run did (state.json's data_dtype); a .npy, which carries its dtype, takes none."""
    from shared_config.data import TokenData
    from shared_config.loop import Loop
    from shared_config.run import resolve_run
    from shared_config.run_dir import latest_checkpoint, read_state

    train = load_script("train")
    np.random.default_rng(0).integers(0, 300, 4000).astype(np.uint32).tofile(tmp_path / "tokens.bin")
    small = ["--set", "n_layers=1", "--set", "batch_size=2", "--set", "seq_len=16", "--eval-batches", "1", "--quiet"]
    for data, dtype in ((tmp_path / "tokens.bin", ["--data-dtype", "uint32"]), (tmp_path / "tokens.npy", [])):
        np.save(tmp_path / "tokens.npy", np.fromfile(tmp_path / "tokens.bin", np.uint32))
        out = tmp_path / data.suffix[1:]
        run = resolve_run(train.parse_args(["--backend", "jax", "--out", str(out), "--data", str(data), "--steps", "2",
                                            *dtype, *small]))
        Loop(run, CountingTrainer, progress=False)()
        resumed = resolve_run(train.parse_args(["--backend", "torch", "--out", str(out), "--resume", "--steps", "4"]))
        assert resumed.data.train.dtype == np.uint32 and len(resumed.data.train) == 3600
    # tokens made in Python, of a dtype no token file holds: none recorded, and the checkpoint resumes
    made = TokenData(*(np.asarray(x, np.int32) for x in (run.data.train, run.data.val)), run.data.vocab_size, "made")
    Loop(dataclasses.replace(run, data=made, out=tmp_path / "made"), CountingTrainer, progress=False)()
    assert read_state(latest_checkpoint(tmp_path / "made"))["data_dtype"] is None


def test_a_study_run_replaces_an_earlier_result_whole(tmp_path):
    """A study's run directory was removed with errors ignored: one it could not remove (here a link to another
    directory, which rmtree refuses) kept an earlier run's checkpoints, the run wrote beside them and, keeping one,
    pruned its own step 2 for the older run's step 300, which the study read as this run's (the norm study's output
    histograms). The link goes, its target stays."""
    from shared_config import load_spec
    from shared_config.data import synthetic_corpus
    from shared_config.run_dir import list_checkpoints
    from shared_config.study import study_run, train_one

    data = synthetic_corpus(0)
    spec = load_spec("tiny").replace(vocab_size=data.vocab_size, n_layers=1)
    run = study_run(spec, {"batch_size": 2, "seq_len": 16}, 2, data, tmp_path, "rms-pre", "jax")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "step-00000300").mkdir(parents=True)
    run.out.parent.mkdir()
    run.out.symlink_to(elsewhere)
    run.eval_batches = 1
    records, stopped_at = train_one(run, CountingTrainer)
    assert not run.out.is_symlink() and [p.name for p in list_checkpoints(run.out)] == ["step-00000002"]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2] and stopped_at is None
    assert (elsewhere / "step-00000300").is_dir()


class InterruptedTrainer(CountingTrainer):
    def step(self, tokens_BN):
        if self.done == 1:
            raise KeyboardInterrupt  # Ctrl-C after the first step: run.json and metrics.jsonl written
        return super().step(tokens_BN)


def test_a_stopped_study_leaves_no_unfinished_run_nor_the_out_it_made(tmp_path):
    """Ctrl-C midway through a study said "partial outputs removed" and left the unfinished run's run.json and
    metrics (beside no checkpoint) and the --out it had made; in a --out given, what was there before stays."""
    from shared_config import load_spec
    from shared_config.data import synthetic_corpus
    from shared_config.study import study_dir, study_run, train_one

    data = synthetic_corpus(0)
    spec = load_spec("tiny").replace(vocab_size=data.vocab_size, n_layers=1)
    for out in (tmp_path / "new" / "study", tmp_path):
        run = study_run(spec, {"batch_size": 2, "seq_len": 16}, 2, data, out, "rms-pre", "jax")
        run.eval_batches = 1
        with pytest.raises(KeyboardInterrupt), study_dir(out, "norms"):
            train_one(run, InterruptedTrainer)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_a_norm_study_whose_reader_left_keeps_its_results(tmp_path, monkeypatch):
    """`compare_norms.py ... | head -1`: the table was printed inside the study's hold on --out, where a stop removes
    the --out the study made: the closed pipe (BrokenPipeError) took the finished results with it."""
    study, out = load_script("compare_norms"), tmp_path / "new"

    def report(*args):
        (out / "norms.md").write_text("table")
        return "table"

    def closed_pipe(*args):
        raise BrokenPipeError

    monkeypatch.setattr(study, "study", lambda *a, **k: (None, None))
    monkeypatch.setattr(study, "write_report", report)
    monkeypatch.setattr(study, "print", closed_pipe, raising=False)
    with pytest.raises(BrokenPipeError):
        study.main(["--steps", "1", "--configs", "rms-pre", "--backends", "torch", "--out", str(out), "--quiet"])
    assert (out / "norms.md").read_text() == "table"


def test_a_users_own_file_where_a_study_writes_is_refused_not_replaced(tmp_path, monkeypatch, capsys):
    """A curves.png of the user's own on the norm study's --out was deleted as the study started, then replaced by
    the study's plot. A study's file there without an earlier study's report (norms.json) beside it is refused in
    one line, exit 2, before any run; beside one it is that study's, and replaced."""
    from shared_config.cli import run

    study = load_script("compare_norms")

    def report(*args):
        (tmp_path / "curves.png").write_bytes(b"plot")
        return "table"

    trained = []
    monkeypatch.setattr(study, "study", lambda *a, **k: trained.append(a) or (None, None))
    monkeypatch.setattr(study, "write_report", report)
    argv = ["--steps", "1", "--configs", "rms-pre", "--backends", "torch", "--out", str(tmp_path), "--quiet"]
    (tmp_path / "curves.png").write_bytes(b"mine")
    with pytest.raises(SystemExit) as e:
        run(study.main, argv)
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"error: --out {tmp_path}: curves.png there is no earlier study's (no norms.json beside it), and the study "
        "writes its own curves.png; move it away or pass another --out\n")
    assert (tmp_path / "curves.png").read_bytes() == b"mine" and not trained
    (tmp_path / "norms.json").write_text("{}")  # an earlier study's report
    with pytest.raises(SystemExit) as e:
        run(study.main, argv)
    assert e.value.code == 0 and (tmp_path / "curves.png").read_bytes() == b"plot" and len(trained) == 1
