"""A run written before a spec or train config key existed resumes: its records lack the key, which reads as the
key's default (what that run computed with). In process, on a stand-in trainer: no training."""

from __future__ import annotations

import json

from .test_run_records import started
from .test_study_results import CountingTrainer


def without(path, part: str, key: str) -> None:
    """`key` taken out of the JSON file `path`'s `part` (spec, train_config), as a run written before it had it."""
    record = json.loads(path.read_text())
    del record[part][key]
    path.write_text(json.dumps(record))


def older(checkpoint, part: str, key: str) -> None:
    """The checkpoint's state.json (and model.safetensors' metadata, for the spec) written without `key`."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    without(checkpoint / "state.json", part, key)
    if part == "spec":
        weights = checkpoint / "model.safetensors"
        with safe_open(str(weights), "np") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        spec = json.loads(meta["spec"])
        del spec[key]
        save_file(tensors, str(weights), metadata={**meta, "spec": json.dumps(spec)})


def test_a_run_written_before_a_key_existed_resumes_and_resumes_again(tmp_path):
    """A run checkpointed before embed_norm (or a newer train config key) existed was refused by every resume:
    "spec embed_norm: checkpoint null, now false", its state.json's missing key compared as null with the default the
    resume's spec has; and once state.json had the key, run.json (the first invocation's, without it) disagreed."""
    from shared_config.loop import Loop
    from shared_config.run import resolve_run

    train, state = started(tmp_path)
    for part, key in (("spec", "embed_norm"), ("train_config", "grad_clip")):
        without(tmp_path / "run.json", part, key)
        older(state.parent, part, key)
    resume = ["--backend", "torch", "--out", str(tmp_path), "--resume"]
    run = resolve_run(train.parse_args([*resume, "--stop-at", "4"]))
    assert (run.spec.embed_norm, run.cfg.grad_clip) == (False, 1.0)
    Loop(run, CountingTrainer, progress=False)()
    assert resolve_run(train.parse_args(resume)).spec.embed_norm is False  # step 4's state.json has the keys
