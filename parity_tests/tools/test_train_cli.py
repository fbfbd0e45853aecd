"""The training command lines as a user runs them: bad input is one `error:` line and exit code 2 (before
any framework loads); a short run and its resume in the other twin; plot_curves and the norm study."""

import json

import numpy as np
import pytest

from shared_config.cli import UsageError
from shared_config.run_dir import latest_checkpoint, list_checkpoints, load_train_checkpoint
from shared_config.metrics import read_metrics

from ..support.common import load_script, one_line_error, quick_first, run_main, run_script
from .test_odd_input import error_line

SHORT = ["--set", "n_layers=1", "--set", "d_model=48", "--set", "d_ff=96", "--set", "batch_size=2",
         "--set", "seq_len=16", "--eval-batches", "1", "--quiet"]


@pytest.mark.parametrize("args,fragments", quick_first([
    (["--set", "lrr=1e-3"], ["unknown --set key 'lrr'", "did you mean 'lr'"]),
    (["--set", "norm_tpye=dyt"], ["unknown --set key 'norm_tpye'", "did you mean 'norm_type'"]),
    (["--set", "lr=-1"], ["lr=-1.0 must be > 0"]),
    (["--set", "norm_type=batchnorm"], ["norm_type='batchnorm' must be one of"]),
    (["--data", "no/such/tokens.bin"], ["tokens.bin: no such file"]),
    (["--resume"], ["no checkpoint to resume"]),
    (["--eval-every", "-1"], ["argument --eval-every: must be an integer >= 0, got -1"]),
    (["--log-every", "nan"], ["argument --log-every: must be an integer >= 1, got 'nan'"]),
    (["--stop-at", "0"], ["argument --stop-at: must be an integer >= 1, got 0"]),
    # capped at --steps without a word: the run read as stopped early, and went on to the end
    (["--steps", "3", "--stop-at", "4"], ["--stop-at 4: past the schedule's 3 steps", "at most 3"]),
    # the shorthand won over --set without a word: 3 steps ran
    (["--steps", "3", "--set", "steps=4"], ["--steps 3 and --set steps=4: --steps is shorthand for --set steps=VALUE"]),
    (["--seed", "3", "--set", "seed=4"], ["--seed 3 and --set seed=4"]),
], 2, multi=True))
def test_bad_arguments_are_one_line_errors(tmp_path, args, fragments):
    one_line_error(run_script("train", "--backend", "jax", "--out", tmp_path / "run", *args), *fragments)


def test_corrupt_and_unfitting_data_files(tmp_path):
    # --out holds a checkpoint already (as runs/tiny does after the README's first training command):
    # the inputs are checked first, so the error names the real fault, not the output directory
    out = tmp_path / "run"
    (out / "step-00000001").mkdir(parents=True)
    (out / "step-00000001" / "model.safetensors").write_bytes(b"")
    assert latest_checkpoint(out) is not None
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    one_line_error(run_script("train", "--backend", "torch", "--data", tmp_path / "bad.npy", "--out", out),
                   "bad.npy: not a valid .npy file")
    np.save(tmp_path / "big.npy", np.array([0, 5000] * 2500, np.uint16))
    one_line_error(run_script("train", "--backend", "torch", "--data", tmp_path / "big.npy", "--spec", "tiny", "--out",
                              out),
                   "token ids go up to 5000", "vocab_size is 257", "--set vocab_size=5001")
    one_line_error(run_script("train", "--backend", "torch", "--out", out, "--steps", "1"), "holds checkpoints already")


def test_a_raw_token_file_read_as_the_wrong_dtype_is_named_as_the_cause(tmp_path, capsys):
    """uint16 tokens read with --data-dtype uint32, no meta.json: the vocabulary, the largest id + 1, came out at 13
    million, and the run was refused as needing 224 GiB, with "lower batch_size" as the fix. The line now says where
    the vocabulary came from and that ids that large mean the wrong dtype."""
    from shared_config.cli import run

    (np.arange(4000) % 200).astype(np.uint16).tofile(tmp_path / "tok.bin")
    with pytest.raises(SystemExit) as e:
        run(load_script("train").main, ["--backend", "torch", "--data", str(tmp_path / "tok.bin"), "--data-dtype",
                                        "uint32", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 3 and err.count("\n") == 1, err
    assert (f"the vocabulary is the largest token id in {tmp_path / 'tok.bin'} + 1 (no meta.json vocab_size): ids "
            "that large mean the file does not hold uint32 tokens (--data-dtype)") in err
    assert not (tmp_path / "run").exists()
    # a file of the dtype it says, too big to train at this batch: no word on the dtype (it was blamed)
    (np.arange(4000) % 50_000).astype(np.uint16).tofile(tmp_path / "gpt2.bin")
    np.save(tmp_path / "ids.npy", np.arange(4000, dtype=np.uint32) % 50_000)
    for data in ("gpt2.bin", "ids.npy"):
        with pytest.raises(SystemExit) as e:
            run(load_script("train").main, ["--backend", "torch", "--data", str(tmp_path / data), "--set",
                                            "batch_size=100000", "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert e.value.code == 3 and "needs about" in err and "--data-dtype" not in err, err


@pytest.mark.slow
def test_a_fresh_run_never_writes_into_a_directory_of_other_files(tmp_path):
    """A run written into a Hugging Face directory (or a data directory, or a checkpoint) was deleted with it by the
    other tools' --force, which replace a directory of their own kind. Nothing is written there; a directory holding
    only a lock and temporary files (what an interrupted fresh run leaves) is still a fresh run's to use, one holding
    an earlier run's run.json and metrics.jsonl is not (test_run_records.py)."""
    hf = tmp_path / "tiny-hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    one_line_error(run_script("train", "--backend", "torch", "--out", hf, "--steps", "1"),
                   f"{hf} is not a run directory (it holds 'config.json' and 1 other files): pass a new or empty --out")
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors"]
    from shared_config.run import refuse_used_out

    own = tmp_path / "interrupted"
    own.mkdir()
    for name in (".lock", ".metrics.jsonl.1.x.tmp"):
        (own / name).write_text("")
    refuse_used_out(own)  # no error
    (own / "run.json").write_text("")
    with pytest.raises(UsageError, match="holds run.json of an earlier run"):
        refuse_used_out(own)


@pytest.mark.slow
def test_a_diverging_run_stops_at_its_first_nonfinite_step(tmp_path):
    out = tmp_path / "run"
    result = run_script("train", "--backend", "torch", "--out", out, "--set", "lr=1e30", "--set", "warmup_steps=0",
                        "--steps", "10", "--save-every", "1", *SHORT)
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: non-finite loss at step 2: the first non-finite tensor is activation ")
    assert line.endswith(f"the last good checkpoint is {out / 'step-00000001'}")
    assert [p.name for p in list_checkpoints(out)] == ["step-00000001"]
    load_train_checkpoint(out / "step-00000001")  # complete and finite


@pytest.mark.slow
def test_a_run_resumed_in_the_other_twin_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    first = run_script("train", "--backend", "torch", "--spec", "tiny-dyt", "--set", "vocab_size=256", "--out", out,
                       "--steps", "6", "--stop-at", "3", "--save-every", "3", *SHORT)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["step"] == 3
    one_line_error(run_script("train", "--backend", "jax", "--out", out, "--steps", "6", *SHORT),
                   "holds checkpoints already", "--resume")
    one_line_error(run_script("train", "--backend", "jax", "--out", out, "--resume", "--set", "lr=1", *SHORT),
                   "--resume continues the run as it was checkpointed", "lr: checkpoint 0.001, now 1")
    # fewer steps than done: said as such (it was "warmup_steps: checkpoint 4, now 2", the warmup cut to --steps)
    one_line_error(run_script("train", "--backend", "jax", "--out", out, "--resume", "--steps", "2", *SHORT),
                   f"--steps 2: the run in {out} has done 3 steps")
    # the memory options may change on resume: the same update, less memory
    second = run_script("train", "--backend", "jax", "--out", out, "--resume", "--set", "remat=full", "--set",
                        "loss_chunk=64", *SHORT)
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout)
    assert summary["step"] == 6 and summary["val_loss"] > summary["entropy"] > 0
    assert [p.name for p in list_checkpoints(out)] == ["step-00000003", "step-00000006"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"] == list(range(1, 7))
    plotted = run_script("plot_curves", out, "--out", tmp_path / "curves.png")
    assert plotted.returncode == 0, plotted.stderr
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    one_line_error(run_script("plot_curves", tmp_path, "--out", tmp_path / "c.png"), "no training metrics")


@pytest.mark.slow
def test_the_norm_study_on_a_few_steps(tmp_path):
    small = [f"--set={kv}" for kv in ("n_layers=1", "d_model=48", "d_ff=96", "batch_size=2", "seq_len=16")]
    load_script("compare_norms").main(["--steps", "3", "--configs", "rms-pre,dyt-peri,dyt-hybrid_star", "--out",
                                       str(tmp_path), *small])
    report = json.loads((tmp_path / "norms.json").read_text())
    assert (set(report["results"]) == {"rms-pre", "dyt-peri", "dyt-hybrid_star"}
            and report["backends"] == ["jax", "torch"])
    for rows in report["results"].values():
        jax_losses, torch_losses = np.array(rows["jax"]["losses"]), np.array(rows["torch"]["losses"])
        assert len(jax_losses) == 3 and np.allclose(jax_losses, torch_losses, rtol=1e-5)
        assert rows["jax"]["nonfinite_steps"] == 0 and rows["jax"]["val_loss"] > 0
    assert rows["jax"]["alpha_min"] > 0 and report["results"]["rms-pre"]["jax"]["alpha_min"] is None
    criteria = {c["criterion"]: c["passed"] for c in report["criteria"]}
    assert criteria["no NaN/Inf in any run"] is True
    table = (tmp_path / "norms.md").read_text()
    assert "| dyt | peri |" in table and "| dyt | hybrid_star |" in table and "no NaN/Inf in any run | PASS" in table
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_a_gla_kernel_this_machine_lacks_is_one_error_line(tmp_path, capsys):
    """gla_kernel (the train config's compute choice): the JAX twin's Pallas kernel on this CPU, or flash-linear-
    attention asked of the JAX twin, is refused in one line, naming the kernel and what runs instead. In-process
    (main under cli.run, as the command runs it): a process each cost 5 s of starting and importing."""
    train = load_script("train")
    for kernel, says in (("pallas", "it needs a GPU"), ("fla", "the jax twin runs auto, pure or pallas")):
        error_line(train.main, ["--backend", "jax", "--spec", "gla-tiny", "--out", tmp_path / kernel, "--set",
                                f"gla_kernel={kernel}", *SHORT], capsys, f"gla_kernel={kernel}", says)


def test_the_norm_study_names_the_placements_it_takes():
    with pytest.raises(UsageError,
                       match="rms-sandwich must be NORM-PLACEMENT.*deepnorm, hybrid, hybrid_star, pre_post"):
        load_script("compare_norms").parse_args(["--configs", "rms-deepnorm,rms-sandwich"])


def test_the_norm_study_takes_a_norm_type_new_to_the_spec(monkeypatch):
    """A norm type added to the spec's CHOICES runs in the study without a line of its own there: --configs takes
    it (its run trains from tiny) and its norm modules are hooked, found by their `normalize`, not by class."""
    from torch import nn

    import torch_model
    from shared_config import init_weights, load_spec
    from shared_config.spec import CHOICES

    class ToyNorm(nn.Module):
        def normalize(self, x):
            return x

        def forward(self, x):
            return self.normalize(x)

    study = load_script("compare_norms")
    monkeypatch.setitem(CHOICES, "norm_type", (*CHOICES["norm_type"], "toy"))
    assert list(study.parse_args(["--configs", "toy-pre,rms-pre"]).configs) == ["toy-pre", "rms-pre"]
    spec = load_spec("tiny")
    model = torch_model.from_weights(init_weights(spec, 0), spec)
    model.model.norm = ToyNorm()
    sites = study.norm_modules(model)
    assert "model.norm" in sites and "model.layers.0.input_layernorm" in sites


@pytest.mark.parametrize("script, key, says", [
    ("compare_norms", "norm_type=dyt", "the study sets it per config, NORM in --configs NORM-PLACEMENT"),
    ("compare_norms", "norm_placement=post", "the study sets it per config, PLACEMENT in --configs NORM-PLACEMENT"),
    ("compare_norms", "mixer=gla", "the study sets it from --mixer"),
    ("compare_norms", "vocab_size=300", "the study sets it from its embedded corpus"),
    ("compare_norms", "steps=5", "the study sets it from --steps"),
    ("compare_routing", "vocab_size=300", "the study sets it from its embedded corpus"),
    ("compare_routing", "steps=5", "the study sets it from --steps"),
    ("compare_routing", "routing=dtf", "the study sets it per config, ROUTING in --configs ROUTING-CAPACITY"),
    ("compare_routing", "routing_capacity=0.25", "the study sets it per config, CAPACITY in --configs"),
])
def test_a_study_refuses_a_set_of_a_key_it_sets_itself(tmp_path, capsys, script, key, says):
    """--set of a key the study gives every run itself (its config's norm, the corpus's vocabulary, --steps) would
    collide with it (a TypeError) or be silently overridden: one error line naming the key, exit 2, nothing run."""
    from shared_config.cli import run

    with pytest.raises(SystemExit) as e:
        run(load_script(script).main, ["--steps", "2", "--configs", "rms-pre" if script == "compare_norms" else "dense",
                                       "--set", key, "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: --set {key.split('=')[0]}: {says}"), err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_chain_of_resumes_may_change_the_memory_options_each_time_in_either_twin(tmp_path, capsys):
    """run.json keeps the first invocation's config: every later resume, changed or not, must still be accepted.
    In process (train.main, as a user's command line parses): the command line itself is the resume test's above."""
    train, out = load_script("train"), tmp_path / "run"
    chain = [("torch", []), ("jax", ["--set", "grad_accum_steps=2"]), ("torch", ["--set", "remat=block"]),
             ("jax", ["--set", "remat=none"]), ("torch", ["--set", "loss_chunk=5", "--set", "grad_accum_steps=1"])]
    for step, (backend, changes) in enumerate(chain, 1):
        resume = ["--resume"] if step > 1 else ["--steps", str(len(chain))]
        printed = run_main(train.main, "--backend", backend, "--out", out, *resume, "--stop-at", step, "--save-every",
                           1, *changes, *SHORT, capsys=capsys)
        assert json.loads(printed.out)["step"] == step
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"] == list(range(1, 6))


@pytest.mark.parametrize("script, files, config", [
    ("compare_norms", ["norms.md", "norms.json", "curves.png"], "rms-pre"),
    ("compare_routing", ["routing.md", "routing.json"], "dense"),
])
def test_a_study_stopped_midway_leaves_no_earlier_table(tmp_path, monkeypatch, script, files, config):
    """A study replaces its runs one by one: stopped midway, an earlier study's table (and plot) beside them described
    runs that are gone. It is removed as the new study starts."""
    for name in files:
        (tmp_path / name).write_text("an earlier study's")
    module = load_script(script)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "study", stopped)
    with pytest.raises(KeyboardInterrupt):
        module.main(["--steps", "2", "--configs", config, "--out", str(tmp_path), "--quiet"])
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]  # the study's lock file (run_dir.lock_run), released


@pytest.mark.slow
def test_a_fresh_run_interrupted_before_its_first_checkpoint_leaves_nothing(tmp_path, monkeypatch, capsys):
    """Ctrl-C or SIGTERM ends with "partial outputs removed", and a fresh run's new --out stayed behind with its
    run.json, lock and metrics, no checkpoint to resume. A directory the run did not make stays, without the run's
    files (they stayed there, beside that line), but with a user's tokenizer.json the run did not write (it went)."""
    from shared_config.cli import run

    train = load_script("train")

    class Interrupted:
        def __init__(self, run_, *args, **kwargs):
            self.out = run_.out

        def __call__(self):
            (self.out / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\n')
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "Loop", Interrupted)
    given = tmp_path / "given"
    given.mkdir()
    (given / "tokenizer.json").write_text("{}")  # the user's: the synthetic data has none
    for out in (tmp_path / "new" / "run", given):
        with pytest.raises(SystemExit) as e:
            run(train.main, ["--backend", "torch", "--out", str(out), *SHORT])
        assert e.value.code == 130
        assert capsys.readouterr().err.strip() == "error: interrupted by SIGINT; partial outputs removed"
    assert not (tmp_path / "new").exists()  # --out's parent too: the run made it
    assert sorted(p.name for p in given.iterdir()) == [".lock", "tokenizer.json"]  # the run's files go


@pytest.mark.slow
def test_a_resume_whose_data_moved_says_to_pass_data(tmp_path, capsys):
    """The run records where its data was: moved, the resume said "no such file" and no more (train.main in
    process: the command line's own error contract is the same `run`'s)."""
    train, out = load_script("train"), tmp_path / "run"
    np.save(tmp_path / "tokens.npy", (np.arange(4000) % 200).astype(np.uint16))
    run_main(train.main, "--backend", "torch", "--data", tmp_path / "tokens.npy", "--out", out, "--steps", "2",
             "--stop-at", "1", "--save-every", "1", *SHORT, capsys=capsys)
    (tmp_path / "tokens.npy").rename(tmp_path / "moved.npy")
    error_line(train.main, ["--backend", "torch", "--out", out, "--resume", "--quiet"], capsys,
               f"{tmp_path / 'tokens.npy'}: the data the run in {out} trained on is not there any more; pass "
               "--data where it is now")
    second = run_main(train.main, "--backend", "torch", "--out", out, "--resume", "--data", tmp_path / "moved.npy",
                      "--quiet", capsys=capsys)
    assert json.loads(second.out)["step"] == 2


def test_a_resume_told_to_stop_before_where_the_run_is_is_refused(tmp_path, capsys):
    """`--resume --steps 4 --stop-at 1` on a run at step 2 exited 0 having done nothing, with a note that the lr
    schedule changed (it did not: nothing was written); --steps below the run's step was already refused."""
    from shared_config.cli import run

    train, out = load_script("train"), tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run(train.main, ["--backend", "torch", "--out", str(out), "--steps", "2", *SHORT])
    assert e.value.code == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(train.main, ["--backend", "torch", "--out", str(out), "--resume", "--steps", "4", "--stop-at", "1",
                         "--quiet"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: --stop-at 1: the run in {out} has done 2 steps; --stop-at is the "
                                       "update to stop after (at least 2)\n")
    assert [c.name for c in list_checkpoints(out)] == ["step-00000002"]


def test_a_run_directory_given_as_a_symbolic_link_is_written_through_it(tmp_path, monkeypatch, capsys):
    """--out naming a link whose target is not made yet was "error: runlink: File exists" (convert and prepare_data
    write through such a link); a run stopped by bad input before its first checkpoint removes the target it made."""
    from shared_config.cli import run

    train, link = load_script("train"), tmp_path / "runlink"
    link.symlink_to(tmp_path / "target")
    monkeypatch.setenv("RANK", "0")  # bad input found after the run directory is made
    with pytest.raises(SystemExit) as e:
        run(train.main, ["--backend", "torch", "--out", str(link), "--steps", "1", *SHORT])
    assert e.value.code == 2 and "RANK is set but WORLD_SIZE" in capsys.readouterr().err
    assert link.is_symlink() and not (tmp_path / "target").exists()
    monkeypatch.delenv("RANK")
    with pytest.raises(SystemExit) as e:
        run(train.main, ["--backend", "torch", "--out", str(link), "--steps", "1", *SHORT])
    assert e.value.code == 0, capsys.readouterr().err
    assert link.is_symlink() and [c.name for c in list_checkpoints(tmp_path / "target")] == ["step-00000001"]


def test_a_set_that_reshapes_the_init_from_model_is_named(tmp_path, capsys):
    """`--init-from X --set n_layers=1` on a 2-layer checkpoint said "X: unexpected keys", naming neither the option
    nor the --set that made the tensors differ (parity_report.py's --weights says both too)."""
    from shared_config.cli import run

    train, start = load_script("train"), tmp_path / "start"
    with pytest.raises(SystemExit) as e:
        run(train.main, ["--backend", "torch", "--out", str(start), "--steps", "1",
                         *(a if a != "n_layers=1" else "n_layers=2" for a in SHORT)])
    assert e.value.code == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(train.main, ["--backend", "torch", "--out", str(tmp_path / "next"), "--init-from",
                         str(start / "step-00000001"), "--steps", "1", *SHORT])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: --init-from {start / 'step-00000001'} with --set n_layers=1 "
                                                "--set d_model=48 --set d_ff=96: unexpected keys: model.layers.1."), err
    assert not (tmp_path / "next").exists()


def test_an_error_after_the_first_step_keeps_the_run_s_metrics(tmp_path, monkeypatch, capsys):
    """A fresh run's directory goes when the run stops before its first step (an interrupt, bad input found while
    setting up); one that stepped and then failed to write its first checkpoint (EACCES, as a full disk) keeps its
    run.json and metrics, which say how far it got."""
    from shared_config import loop
    from shared_config.cli import run

    def denied(self, trainer, step):
        raise PermissionError(13, "Permission denied", str(tmp_path / "run" / "step-00000001"))

    monkeypatch.setattr(loop.Loop, "save", denied)
    with pytest.raises(SystemExit) as e:
        run(load_script("train").main, ["--backend", "torch", "--out", str(tmp_path / "run"), "--steps", "1", *SHORT])
    assert e.value.code == 2 and "Permission denied" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", "metrics.jsonl", "run.json"]
