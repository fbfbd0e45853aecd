"""What a training run records and says: a resume's errors name the option given and the run's own value it meets,
and run.json lists every invocation. In process, on a stand-in trainer: no training."""

from __future__ import annotations

import json
import re
import shutil
from datetime import datetime
from types import SimpleNamespace

import numpy as np
import pytest

from ..support.common import load_script
from .test_study_results import CountingTrainer

SMALL = ["--set", "n_layers=1", "--set", "batch_size=2", "--set", "seq_len=16", "--eval-batches", "1", "--quiet"]


def at(path) -> str:
    """`path` as a regular expression that matches it alone."""
    return re.escape(str(path))


def started(tmp_path, *more: str):
    """A run of 10 steps (warmup 8) stopped after 2 by the stand-in trainer: (train.py's module, its state.json)."""
    from shared_config.loop import Loop
    from shared_config.run import resolve_run

    train = load_script("train")
    run = resolve_run(train.parse_args(["--backend", "jax", "--out", str(tmp_path), "--steps", "10", "--set",
                                        "warmup_steps=8", "--stop-at", "2", *SMALL, *more]))
    Loop(run, CountingTrainer, progress=False)()
    return train, tmp_path / "step-00000002" / "state.json"


def test_a_resume_names_the_option_given_and_the_runs_value_it_meets(tmp_path):
    """`--resume --steps 4` of a run whose warmup is 8 was "warmup_steps=8 must be <= steps=4": neither --steps nor
    where the 8 came from named. A change the resume refuses (`--set warmup_steps=20`, of a run of 10 steps) was that
    rule's error, not the refusal; a refusal named the keys, not the options that changed them."""
    from shared_config.cli import UsageError
    from shared_config.run import resolve_run

    train, state = started(tmp_path)
    resume = ["--backend", "torch", "--out", str(tmp_path), "--resume"]
    for given in (["--steps", "4"], ["--set", "steps=4"]):
        with pytest.raises(UsageError) as e:
            resolve_run(train.parse_args([*resume, *given]))
        assert str(e.value) == (f"{' '.join(given)}: warmup_steps=8 must be <= steps=4 (warmup_steps 8: the resumed "
                                f"run's, from {state}); --stop-at N ends this invocation after update N without "
                                "changing the schedule")
    with pytest.raises(UsageError, match=f"^--set grad_accum_steps=3: .* divide batch_size=2 \\(batch_size 2: the "
                                         f"resumed run's, from {at(state)}\\)$"):
        resolve_run(train.parse_args([*resume, "--set", "grad_accum_steps=3"]))
    with pytest.raises(UsageError, match="but warmup_steps: checkpoint 8, now 20 \\(--set warmup_steps=20\\); start"):
        resolve_run(train.parse_args([*resume, "--set", "warmup_steps=20"]))
    with pytest.raises(UsageError, match="but spec n_layers: checkpoint 1, now 2 \\(--set n_layers=2\\); lr: "
                                         "checkpoint 0.001, now 1.0 \\(--set lr=1\\); seed: checkpoint 0, now 3 "
                                         "\\(--seed 3\\); "):
        resolve_run(train.parse_args([*resume, "--set", "lr=1", "--seed", "3", "--set", "n_layers=2"]))
    with pytest.raises(UsageError, match="^--set steps=1: the run in .* has done 2 steps"):
        resolve_run(train.parse_args([*resume, "--set", "steps=1"]))
    with pytest.raises(UsageError, match="data sha256: checkpoint '[0-9a-f]+', now '[0-9a-f]+' "
                                         "\\(--data synthetic:1\\)"):
        resolve_run(train.parse_args([*resume, "--data", "synthetic:1"]))
    assert resolve_run(train.parse_args([*resume, "--steps", "12", "--set", "remat=full"])).cfg.steps == 12


def test_a_resume_given_null_for_a_derived_spec_key_compares_the_value_it_resolves_to(tmp_path):
    """`--set n_kv_heads=null` (or head_dim, residual_scaling) names the value the spec derives from its other keys:
    a resume given the run's own command again compares the resolved value, as it did before the early check that
    refuses changes, which compared the None itself ("spec head_dim: checkpoint 16, now None")."""
    from shared_config.cli import UsageError
    from shared_config.run import resolve_run

    train, _ = started(tmp_path)
    resume = ["--backend", "jax", "--out", str(tmp_path), "--resume"]
    run = resolve_run(train.parse_args([*resume, "--set", "head_dim=null", "--set", "residual_scaling=null"]))
    assert [run.spec.to_dict()[k] for k in ("head_dim", "residual_scaling")] == [16, True]
    with pytest.raises(UsageError, match="but spec n_kv_heads: checkpoint 2, now 6 \\(--set n_kv_heads=null\\); "):
        resolve_run(train.parse_args([*resume, "--set", "n_kv_heads=null"]))


def test_a_resume_given_the_compute_dtype_it_computes_in_is_no_change(tmp_path):
    """`--resume --set compute_dtype=float32` of a float32 run (its train config's compute_dtype null, the spec's) was
    refused, "compute_dtype: checkpoint None, now 'float32'", where an unchanged lr is accepted: the dtype the run
    computes in is compared, and kept as the run recorded it, so that the resume resumes again (run.json and the next
    state.json agree); another dtype is refused, naming the run's."""
    from shared_config.cli import UsageError
    from shared_config.loop import Loop
    from shared_config.run import resolve_run

    train, state = started(tmp_path)
    config = tmp_path / "train.yaml"
    config.write_text(json.dumps({**json.loads(state.read_text())["train_config"], "compute_dtype": "float32"}))
    resume = ["--backend", "torch", "--out", str(tmp_path), "--resume"]
    for given in (["--set", "compute_dtype=float32"], ["--set", "compute_dtype=null"], ["--train-config", str(config)]):
        run = resolve_run(train.parse_args([*resume, *given, "--stop-at", "4"]))
        assert (run.cfg.compute_dtype, run.spec.compute_dtype) == (None, "float32"), given
    Loop(run, CountingTrainer, progress=False)()
    assert resolve_run(train.parse_args(resume)).cfg.compute_dtype is None  # step 4's state.json agrees with run.json
    with pytest.raises(UsageError, match="but compute_dtype: checkpoint 'float32', now 'bfloat16' \\(--set "
                                         "compute_dtype=bfloat16\\); start a new --out"):
        resolve_run(train.parse_args([*resume, "--set", "compute_dtype=bfloat16"]))


def test_a_resume_refuses_a_files_change_before_a_rule_it_breaks(tmp_path):
    """`--resume --train-config parity --steps 4` (the run's warmup 8, parity's 10) was the rule's error, "warmup_steps
    =10 must be <= steps=4" with --stop-at offered, and --stop-at then met the refusal of parity's other values; a
    --spec file's change likewise. The refusal comes first, naming the file; the run's own file again is no change."""
    from shared_config import load_spec
    from shared_config.cli import UsageError
    from shared_config.run import resolve_run

    train, state = started(tmp_path)
    resume = ["--backend", "jax", "--out", str(tmp_path), "--resume", "--steps", "4"]
    with pytest.raises(UsageError, match="^--resume continues .* but .*warmup_steps: checkpoint 8, now 10; .* "
                                         "\\(--train-config parity\\); start a new --out"):
        resolve_run(train.parse_args([*resume, "--train-config", "parity"]))
    with pytest.raises(UsageError, match="^--resume continues .* but .*spec n_layers: checkpoint 1, now 3 "
                                         "\\(--spec tiny\\); start a new --out"):
        resolve_run(train.parse_args([*resume, "--spec", "tiny"]))
    spec, config = tmp_path / "spec.yaml", tmp_path / "train.yaml"
    stored = json.loads(state.read_text())
    spec.write_text(json.dumps(stored["spec"]))
    config.write_text(json.dumps(stored["train_config"]))
    resumed = ["--backend", "jax", "--out", str(tmp_path), "--resume", "--spec", str(spec), "--train-config",
               str(config)]
    assert resolve_run(train.parse_args(resumed)).spec == load_spec(stored["spec"])
    with pytest.raises(UsageError, match=f"^--train-config {at(config)}, --steps 4: warmup_steps=8 must be <= "
                                         "steps=4; --stop-at N"):  # the files' own values: the rule, as without
        resolve_run(train.parse_args([*resumed, "--steps", "4"]))


def test_a_resume_refuses_a_spec_files_change_with_set_items_and_a_train_configs_fewer_steps(tmp_path):
    """`--resume --spec F --set n_heads=5` was the rule F's values break ("n_kv_heads=2 must divide n_heads=5"),
    where `--set n_heads=5` alone was the refusal; a --train-config file whose steps are fewer than the run has done
    was "nothing to do", exit 0, after a note that the schedule changed (`--set steps=N` was refused)."""
    from shared_config.cli import UsageError
    from shared_config.run import resolve_run

    train, state = started(tmp_path)
    stored = json.loads(state.read_text())
    spec, config = tmp_path / "spec.yaml", tmp_path / "train.yaml"
    spec.write_text(json.dumps(stored["spec"]))
    config.write_text(json.dumps({**stored["train_config"], "steps": 1, "warmup_steps": 1}))
    resume = ["--backend", "torch", "--out", str(tmp_path), "--resume"]
    with pytest.raises(UsageError, match="^--resume continues .* but spec n_heads: checkpoint 6, now 5 \\(--set "
                                         "n_heads=5\\); start a new --out"):
        resolve_run(train.parse_args([*resume, "--spec", str(spec), "--set", "n_heads=5"]))
    derived = tmp_path / "derived"  # n_kv_heads derived (6); the file's 2, then `--set n_kv_heads=null`: the run's
    state = started(derived, "--set", "n_kv_heads=null")[1]
    spec.write_text(json.dumps({**json.loads(state.read_text())["spec"], "n_kv_heads": 2}))
    assert resolve_run(train.parse_args(["--backend", "jax", "--out", str(derived), "--resume", "--spec", str(spec),
                                         "--set", "n_kv_heads=null"])).spec.to_dict()["n_kv_heads"] == 6
    stored = json.loads(state.read_text())["spec"]  # the file's head_dim derived from its d_model, 192 / 6
    spec.write_text(json.dumps({**stored, "d_model": 192, "head_dim": None}))  # ... and from the run's 96 as given
    assert resolve_run(train.parse_args(["--backend", "jax", "--out", str(derived), "--resume", "--spec", str(spec),
                                         "--set", "d_model=96"])).spec.to_dict()["head_dim"] == 16
    from shared_config.loop import Loop

    short = tmp_path / "short"  # a warmup that steps=1 meets: the file's steps is refused, not a rule
    Loop(resolve_run(train.parse_args(["--backend", "jax", "--out", str(short), "--steps", "4", "--set",
                                       "warmup_steps=1", "--stop-at", "2", *SMALL])), CountingTrainer,
         progress=False)()
    stored = json.loads((short / "step-00000002" / "state.json").read_text())
    config.write_text(json.dumps({**stored["train_config"], "steps": 1}))
    with pytest.raises(UsageError, match=f"^--train-config {at(config)}: steps 1, but the run in {at(short)} has "
                                         "done 2 steps; "):
        resolve_run(train.parse_args(["--backend", "torch", "--out", str(short), "--resume", "--train-config",
                                      str(config)]))


def test_a_resume_too_large_for_the_machine_is_told_what_a_resume_may_lower(tmp_path, monkeypatch):
    """A resume that did not fit was told to lower batch_size (--set batch_size=N), which the resume then refused;
    so was one that ran out of memory as it trained. It is told to lower the memory options, which a resume may
    change (a fresh run still lowers its batch)."""
    from shared_config import resources
    from shared_config.resources import ResourceError
    from shared_config.run import resolve_run

    train, _ = started(tmp_path)
    resume = ["--backend", "torch", "--out", str(tmp_path), "--resume"]

    class OutOfMemory(CountingTrainer):
        def __init__(self, spec, cfg, state):
            super().__init__(state)

        def step(self, tokens_BN):
            raise MemoryError

    monkeypatch.setattr(train, "twin", lambda backend, module: SimpleNamespace(Trainer=OutOfMemory))
    with pytest.raises(ResourceError, match="at batch 2 x seq 16: resume it on a machine with more memory, or lower "
                                            "the step's memory, which a resume may change \\(--set grad_accum_steps"):
        train.main(resume)
    monkeypatch.setattr(resources, "machine_memory", lambda: (10**6, "of memory here"))
    with pytest.raises(ResourceError, match="of memory here; resume it on a machine with more memory, or lower the "
                                            "step's memory"):
        resolve_run(train.parse_args(resume))
    with pytest.raises(ResourceError, match="of memory here; lower batch_size/seq_len"):
        resolve_run(train.parse_args(["--backend", "torch", "--out", str(tmp_path / "new"), *SMALL]))


def test_a_resume_names_the_data_dtype_it_read_the_tokens_as(tmp_path):
    """state.json's data_dtype edited (uint32 tokens read as uint16) was refused as other data, the key unnamed; one
    that meta.json beside the tokens contradicts was refused naming a --data-dtype never given, and one whose size
    does not divide the file named nothing of where the dtype came from."""
    from shared_config.cli import UsageError
    from shared_config.data import DataError
    from shared_config.loop import Loop
    from shared_config.run import resolve_run

    train = load_script("train")
    tokens = np.random.default_rng(0).integers(0, 300, 4000).astype(np.uint32)
    (tmp_path / "data").mkdir()
    tokens.tofile(tmp_path / "tokens.bin")
    for split in ("train", "val"):
        tokens.tofile(tmp_path / "data" / f"{split}.bin")
    (tmp_path / "data" / "meta.json").write_text('{"dtype": "uint32"}')
    tokens[:1001].astype(np.uint16).tofile(tmp_path / "odd.bin")  # 2,002 bytes: no whole number of uint32
    for data in ("tokens.bin", "data"):
        run = resolve_run(train.parse_args(["--backend", "jax", "--out", str(tmp_path / f"run-{data}"), "--data",
                                            str(tmp_path / data), "--steps", "2", "--data-dtype", "uint32", *SMALL]))
        Loop(run, CountingTrainer, progress=False)()
    resume = ["--backend", "torch", "--resume", "--steps", "4"]
    state = tmp_path / "run-tokens.bin" / "step-00000002" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "data_dtype": "uint16"}))
    with pytest.raises(UsageError, match=f"data train_tokens: checkpoint 3600, now 7200; .*; data sha256: .* \\(read "
                                         f"as uint16: {at(state)}'s data_dtype\\); start a new --out"):
        resolve_run(train.parse_args([*resume, "--out", str(tmp_path / "run-tokens.bin")]))
    state.write_text(json.dumps({**json.loads(state.read_text()), "data_dtype": "uint32"}))
    with pytest.raises(DataError, match=f"odd.bin: 2002 bytes is not a whole number of uint32 tokens .* \\(read as "
                                        f"uint32: {at(state)}'s data_dtype; --data-dtype reads them as "
                                        "another\\)"):
        resolve_run(train.parse_args([*resume, "--out", str(tmp_path / "run-tokens.bin"), "--data",
                                      str(tmp_path / "odd.bin")]))
    state = tmp_path / "run-data" / "step-00000002" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "data_dtype": "uint16"}))
    with pytest.raises(UsageError, match=f"^{at(state)}: data_dtype uint16 \\(how the run read .*data\\), "
                                         "but .*meta.json says dtype 'uint32': if they are uint32, pass --data-dtype "
                                         "uint32 \\(.*\\); if uint16, correct meta.json's dtype \\(a --data-dtype "
                                         "that it contradicts is refused\\)$"):
        resolve_run(train.parse_args([*resume, "--out", str(tmp_path / "run-data")]))
    with pytest.raises(DataError, match="--data-dtype uint16, but .*meta.json says dtype uint32"):  # as it says
        resolve_run(train.parse_args([*resume, "--out", str(tmp_path / "run-data"), "--data-dtype", "uint16"]))
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    (tmp_path / "data" / "meta.json").write_text(json.dumps({**meta, "dtype": 16}))  # no dtype to pass
    with pytest.raises(UsageError, match="meta.json says dtype 16: correct meta.json's dtype \\(a --data-dtype "):
        resolve_run(train.parse_args([*resume, "--out", str(tmp_path / "run-data")]))
    (tmp_path / "data" / "meta.json").write_text(json.dumps({**meta, "vocab_size": 10}))  # meta.json's dtype read:
    # state.json's was no cause, nor is --data-dtype a way out (meta.json refuses another)
    state.write_text(json.dumps({**json.loads(state.read_text()), "data_dtype": "uint32"}))
    with pytest.raises(DataError, match="vocab_size is 10 but .* \\(the largest id \\+ 1\\)$"):
        resolve_run(train.parse_args([*resume, "--out", str(tmp_path / "run-data")]))
    (tmp_path / "data" / "meta.json").write_text(json.dumps(meta))
    assert resolve_run(train.parse_args([*resume, "--out", str(tmp_path / "run-data"), "--data-dtype", "uint32"]))


def test_run_json_lists_every_invocation(tmp_path, monkeypatch, capsys):
    """run.json kept the first invocation's command and backend alone: a resume, in the other twin too, left no trace
    there. Each invocation is listed (arguments, twin, start step, stop, time, versions), the first one's kept at the
    top; a run.json from before the list gets its first entry from them, and a lost one is made again."""
    train = load_script("train")
    made = []

    def trainer(spec, cfg, state):
        made.append(state["step"])
        return CountingTrainer(state)

    monkeypatch.setattr(train, "twin", lambda backend, module: SimpleNamespace(Trainer=trainer))
    first = ["--backend", "torch", "--out", str(tmp_path), "--steps", "6", "--stop-at", "2", *SMALL]
    second = ["--backend", "jax", "--out", str(tmp_path), "--resume", "--stop-at", "4"]
    third = ["--backend", "torch", "--out", str(tmp_path), "--resume"]
    train.main(first)
    train.main(second)
    run = json.loads((tmp_path / "run.json").read_text())
    assert (run["argv"], run["backend"]) == (first, "torch")  # the readers' keys, as they were
    assert [(i["argv"], i["backend"], i["start_step"], i["stop"]) for i in run["invocations"]] == [
        (first, "torch", 0, 2), (second, "jax", 2, 4)]
    assert {"python", "numpy", "torch"} <= run["invocations"][0]["versions"].keys()
    assert {"python", "numpy", "jax", "flax"} <= run["invocations"][1]["versions"].keys()
    assert datetime.fromisoformat(run["invocations"][1]["time"]).utcoffset().total_seconds() == 0
    del run["invocations"]  # a run.json written before the list
    (tmp_path / "run.json").write_text(json.dumps(run))
    train.main(third)
    run = json.loads((tmp_path / "run.json").read_text())
    assert [(i["argv"], i.get("start_step")) for i in run["invocations"]] == [(first, 0), (third, 4)]
    (tmp_path / "run.json").unlink()  # lost: made again, of this invocation, with what a resume checks it against
    fourth = [*third, "--steps", "8"]
    train.main(fourth)
    run = json.loads((tmp_path / "run.json").read_text())
    assert [i["argv"] for i in run["invocations"]] == [fourth] and run["train_config"]["steps"] == 8
    assert made == [0, 2, 4, 6] and json.loads(capsys.readouterr().out.splitlines()[-1])["step"] == 8


def test_a_refused_resume_leaves_run_json_as_it_was(tmp_path, monkeypatch):
    """A resume's invocation was appended to run.json before its checkpoint was loaded: one refused then (NaN
    weights, exit 2), or stopped by Ctrl-C while its trainer was made, left run.json listing an invocation that never
    ran. It is recorded once the checkpoint is loaded and the trainer made; a resume with nothing to do trains
    nothing and records nothing."""
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    from shared_config.files import CheckpointError

    train = load_script("train")
    interrupt = []

    def trainer(spec, cfg, state):
        if interrupt:
            raise KeyboardInterrupt
        return CountingTrainer(state)

    monkeypatch.setattr(train, "twin", lambda backend, module: SimpleNamespace(Trainer=trainer))
    train.main(["--backend", "torch", "--out", str(tmp_path), "--steps", "4", "--stop-at", "2", *SMALL])
    before = (tmp_path / "run.json").read_text()
    resume = ["--backend", "jax", "--out", str(tmp_path), "--resume"]
    train.main([*resume, "--stop-at", "2"])  # nothing to do
    interrupt.append(True)
    with pytest.raises(KeyboardInterrupt):
        train.main(resume)
    path = tmp_path / "step-00000002" / "model.safetensors"
    with safe_open(path, "np") as f:
        metadata = f.metadata()
    weights = load_file(path)
    weights["lm_head.weight"][0, 0] = np.nan
    save_file(weights, path, metadata=metadata)
    interrupt.clear()
    with pytest.raises(CheckpointError, match="non-finite values"):
        train.main(resume)
    assert (tmp_path / "run.json").read_text() == before


def test_a_fresh_run_refuses_an_out_holding_an_earlier_runs_files(tmp_path, monkeypatch, capsys):
    """A fresh run in a --out holding the files of a run that wrote no checkpoint (a non-finite step or a kill before
    its first) wrote its run.json over that run's and cut its metrics.jsonl, the earlier record lost without a word.
    It is refused, naming --out and the files, as a --out holding checkpoints is; files that another fresh run wrote
    while this one started (after its checks, before its lock) are refused as well. Nothing is touched."""
    from shared_config.cli import UsageError, run
    from shared_config.run import resolve_run

    train = load_script("train")
    monkeypatch.setattr(train, "twin", lambda backend, module: SimpleNamespace(
        Trainer=lambda spec, cfg, state: CountingTrainer(state)))
    out = tmp_path / "run"
    train.main(["--backend", "jax", "--out", str(out), "--steps", "4", *SMALL])
    for checkpoint in out.glob("step-*"):
        shutil.rmtree(checkpoint)
    kept = {p.name: p.read_bytes() for p in out.iterdir()}
    fresh = ["--backend", "torch", "--out", str(out), "--steps", "2", *SMALL]
    with pytest.raises(UsageError, match=f"^{at(out)} holds run.json and metrics.jsonl of an earlier run, which wrote "
                                         "no checkpoint \\(nothing to --resume\\): pass another --out, or delete them "
                                         "to start a new run there$"):
        resolve_run(train.parse_args(fresh))
    with pytest.raises(UsageError, match=f"^{at(out)}: no checkpoint to resume: it holds run.json and metrics.jsonl of "
                                         "a run that wrote none; delete them to start a new run there"):
        resolve_run(train.parse_args([*fresh, "--resume"]))  # "run without --resume to start" led to the above
    with monkeypatch.context() as m:  # a torchrun's other rank starts while rank 0 writes this run's own run.json
        m.setenv("RANK", "1"), m.setenv("WORLD_SIZE", "2")
        assert resolve_run(train.parse_args(fresh)).out == out
    (out / "run.json").unlink()
    with pytest.raises(UsageError, match="holds metrics.jsonl of an earlier run, .* or delete it to start"):
        resolve_run(train.parse_args(fresh))

    other = tmp_path / "other"  # only what no run leaves behind as its record: a fresh run's to use
    other.mkdir()
    (other / ".lock").write_text("")
    resolve = train.resolve_run

    def raced(args):  # another fresh run wrote its metrics once this one had checked its --out
        checked = resolve(args)
        (other / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 3.0}\n')
        return checked

    monkeypatch.setattr(train, "resolve_run", raced)
    with pytest.raises(SystemExit) as e:
        run(train.main, ["--backend", "torch", "--out", str(other), "--steps", "2", *SMALL])
    assert e.value.code == 2 and f"error: {other} holds metrics.jsonl of an earlier run" in capsys.readouterr().err
    assert (other / "metrics.jsonl").read_text() == '{"kind": "train", "step": 1, "loss": 3.0}\n'
    assert sorted(p.name for p in other.iterdir()) == [".lock", "metrics.jsonl"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {k: v for k, v in kept.items() if k != "run.json"}
