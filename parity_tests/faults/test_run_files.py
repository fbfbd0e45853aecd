"""A run's, a checkpoint's and a data directory's files as found (docs/checkpoints.md, "Bad input, limits and
failures"): every copy of the spec and config in a checkpoint agrees; a FIFO or a broken tokenizer where a file is
expected is refused in one line, without blocking."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from shared_config import CheckpointError, init_weights, metrics, run_dir
from shared_config.train_config import load_train_config

from ..support.common import fla_dir, load_script, make_spec, one_line, run_script

convert = load_script("convert").convert


# --- every copy of the spec and config in a checkpoint agrees --------------------------------------------------------


def _run_with_checkpoint(tmp_path) -> Path:
    spec = make_spec()
    weights = init_weights(spec, 0)
    state = {"step": 3, "weights": weights, **{k: {n: np.zeros_like(w) for n, w in weights.items()} for k in "mv"}}
    cfg, data = load_train_config("cpu").to_dict(), {"source": "synthetic", "vocab_size": 97}
    info = {"backend": "jax", "data_position": {"seed": cfg["seed"], "step": 3}, "spec": spec.to_dict(),
            "train_config": cfg, "data": data}
    run_dir.write_json(tmp_path / "run.json", {"spec": spec.to_dict(), "train_config": cfg, "data": data})
    return run_dir.save_train_checkpoint(tmp_path, state, spec, info)


@pytest.mark.parametrize("edit, says", [
    (lambda s: s["spec"].update(norm_type="layernorm"), "norm_type: state.json 'layernorm' vs model.safetensors 'rms'"),
    (lambda s: s["spec"].update(rope_theta=500000.0), "rope_theta: state.json 500000.0 vs model.safetensors 10000.0"),
    (lambda s: s["data_position"].update(step=2), "state.json data_position is at step 2, state.json at 3"),
    (lambda s: s["data_position"].update(seed=7), "data_position seed 7 vs train_config seed 0"),
    (lambda s: s["train_config"].update(lr=1.0), "train_config lr: run.json 0.001 vs state.json 1.0"),
], ids=["norm_type", "rope_theta", "position-step", "position-seed", "lr-vs-run.json"])
def test_an_edited_copy_in_a_checkpoint_is_refused_naming_both_values(tmp_path, edit, says):
    path = _run_with_checkpoint(tmp_path)
    run_dir.read_state(path)  # intact: agrees
    state = json.loads((path / "state.json").read_text())
    edit(state)
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError) as e:
        run_dir.load_train_checkpoint(path)
    assert says in str(e.value), str(e.value)


def test_a_checkpoint_directory_named_for_another_step_is_refused(tmp_path):
    """step-00000002 holding step 3's checkpoint (a copy renamed) was resumed as the run's newest, and its name was
    what the pruning and the choice of the newest went by."""
    path = _run_with_checkpoint(tmp_path)
    path.rename(tmp_path / "step-00000002")
    with pytest.raises(CheckpointError, match="step-00000002: its name is at step 2, state.json at 3$"):
        run_dir.load_train_checkpoint(tmp_path / "step-00000002")


def test_a_negative_second_moment_is_refused_naming_the_optimizer_file(tmp_path):
    """v < 0 (a damaged optimizer.safetensors) passed every check: the resumed run's first update took its square
    root, and stopped as "non-finite ... parameter lm_head.weight", exit 1, blaming the weights."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    path = _run_with_checkpoint(tmp_path) / "optimizer.safetensors"
    with safe_open(path, "np") as f:
        metadata = f.metadata()
    moments = load_file(path)
    moments["v.model.norm.weight"] = moments["v.model.norm.weight"] - 1
    save_file(moments, path, metadata)
    with pytest.raises(CheckpointError, match="optimizer.safetensors: v.model.norm.weight has negative values"):
        run_dir.load_train_checkpoint(path.parent)


@pytest.mark.parametrize("changes", [{"grad_accum_steps": 2}, {"remat": "full"}, {"loss_chunk": 7},
                                     {"grad_accum_steps": 4, "remat": "block", "loss_chunk": 1}])
def test_memory_options_changed_by_a_resume_are_not_a_disagreement_with_run_json(tmp_path, changes):
    # run.json keeps the first invocation's train config; a resume may change the memory options each time
    path = _run_with_checkpoint(tmp_path)
    state = json.loads((path / "state.json").read_text())
    state["train_config"].update(changes)
    (path / "state.json").write_text(json.dumps(state))
    assert run_dir.read_state(path)["train_config"] == state["train_config"]


def test_train_resume_refuses_an_edited_state_json_in_one_line(tmp_path):
    path = _run_with_checkpoint(tmp_path)
    state = json.loads((path / "state.json").read_text())
    state["spec"]["norm_type"] = "layernorm"
    (path / "state.json").write_text(json.dumps(state))
    result = run_script("train", "--backend", "torch", "--out", tmp_path, "--resume", "--quiet")
    one_line(result, 2, "state.json and model.safetensors record different specs",
             "norm_type: state.json 'layernorm' vs model.safetensors 'rms'")


def _refused_without_blocking(read, fifo: Path):
    """What `read()` raised, run in a thread; a read still blocked on the writer-less FIFO after 20 s fails the
    test (the FIFO is then opened for writing and closed, so the blocked open returns and the thread ends)."""
    import threading

    raised = []

    def target():
        try:
            read()
        except BaseException as e:  # noqa: BLE001 (returned to the test)
            raised.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(20)
        pytest.fail(f"blocked opening the FIFO {fifo}")
    return raised[0] if raised else None


@pytest.mark.parametrize("name", ["state.json", "model.safetensors", "optimizer.safetensors", "../run.json",
                                  "../metrics.jsonl"])
def test_a_fifo_where_a_run_file_is_expected_is_refused_without_blocking(tmp_path, name):
    path = _run_with_checkpoint(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    fifo = (path / name).resolve()
    fifo.unlink()
    os.mkfifo(fifo)
    read = metrics.read_metrics if name.endswith("jsonl") else run_dir.load_train_checkpoint
    raised = _refused_without_blocking(lambda: read(fifo if name.endswith("jsonl") else path), fifo)
    assert isinstance(raised, CheckpointError) and f"{fifo}: is a FIFO, not a regular" in str(raised), raised


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
@pytest.mark.parametrize("fmt", ["hf", "fla"])
def test_a_fifo_in_a_checkpoint_directory_is_refused_without_blocking(tmp_path, canonical, fmt, name):
    src = fla_dir(tmp_path) if fmt == "fla" else tmp_path / "hf"
    if fmt == "hf":
        convert(canonical, src, to="hf")
    from shared_config import fla, hf

    (src / name).unlink()
    os.mkfifo(src / name)
    raised = _refused_without_blocking(lambda: {"hf": hf.read_hf, "fla": fla.read_fla}[fmt](src), src / name)
    assert isinstance(raised, CheckpointError) and f"{src / name}: is a FIFO" in str(raised), raised


@pytest.mark.parametrize("name", ["meta.json", "tokenizer.json"])
def test_a_fifo_in_a_data_directory_is_refused_without_blocking(tmp_path, name):
    from shared_config.data import DataError, load_data

    for split in ("train", "val"):
        (tmp_path / f"{split}.bin").write_bytes(np.arange(100, dtype=np.uint16).tobytes())
    os.mkfifo(tmp_path / name)
    raised = _refused_without_blocking(lambda: load_data(str(tmp_path)), tmp_path / name)
    assert isinstance(raised, DataError) and str(raised).startswith(f"{tmp_path / name}: "), raised
    assert "FIFO" in str(raised) or "not a regular file" in str(raised)


@pytest.mark.parametrize("vocab_size, says", [(10, "vocab_size is 10 but train.bin holds token id 255"),
                                               ("x", "vocab_size must be an integer >= 1, got 'x'")])
def test_train_refuses_a_meta_json_vocab_size_the_tokens_exceed(tmp_path, vocab_size, says):
    """The ids would index past the embedding (torch: IndexError; JAX: a non-finite loss): one line, before --out."""
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val"):
        (data / f"{split}.bin").write_bytes((np.arange(4096) % 256).astype(np.uint16).tobytes())
    (data / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": vocab_size, "tokenizer": "byte"}))
    result = run_script("train", "--backend", "torch", "--steps", "2", "--data", data, "--out", tmp_path / "out",
                        "--quiet")
    one_line(result, 2, f"{data / 'meta.json'}: {says}")
    assert not (tmp_path / "out").exists()


def test_train_resume_with_a_fifo_for_state_json_is_one_line(tmp_path):
    path = _run_with_checkpoint(tmp_path)
    (path / "state.json").unlink()
    os.mkfifo(path / "state.json")
    result = run_script("train", "--backend", "torch", "--out", tmp_path, "--resume", "--quiet")  # 600 s timeout
    one_line(result, 2, f"{path / 'state.json'}: is a FIFO, not a regular JSON file")


BAD_TOKENIZERS = [
    (b'{"version": "1.0", "model": {"type": "BPE"', "not a valid tokenizers file: EOF while parsing"),
    (b'{"version": "1.0", "model": {"type": "BPE", "vocab": "x"}}', "not a valid tokenizers file: invalid type"),
    (b"\xff\xfe{}", "not a valid tokenizers file: not UTF-8"),
]


@pytest.mark.parametrize("content, says", [*BAD_TOKENIZERS, (None, "is a FIFO, not a regular tokenizer file")],
                         ids=["truncated", "wrong-type", "not-utf8", "fifo"])
def test_a_bad_tokenizer_beside_the_weights_is_one_line(tmp_path, canonical, content, says):
    tokenizer = tmp_path / "tokenizer.json"
    os.mkfifo(tokenizer) if content is None else tokenizer.write_bytes(content)
    generate = load_script("generate")
    raised = _refused_without_blocking(lambda: generate.load_tokenizer(canonical, make_spec()), tokenizer)
    assert isinstance(raised, CheckpointError) and str(raised).startswith(f"{tokenizer}: {says}"), raised


@pytest.mark.slow
@pytest.mark.parametrize("content, says", BAD_TOKENIZERS, ids=["truncated", "wrong-type", "not-utf8"])
def test_a_bad_tokenizer_in_a_data_directory_is_refused_before_a_run_copies_it(tmp_path, content, says):
    """A run copies its data's tokenizer.json into every checkpoint: a broken one was copied without a word and
    refused only by generate.py --prompt. (A FIFO there: test_a_fifo_in_a_data_directory_is_refused_...)"""
    from shared_config.data import DataError, load_data

    for split in ("train", "val"):
        (tmp_path / f"{split}.bin").write_bytes(np.arange(100, dtype=np.uint16).tobytes())
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(DataError) as e:
        load_data(str(tmp_path))
    assert str(e.value).startswith(f"{tmp_path / 'tokenizer.json'}: {says}"), e.value


def test_a_resume_replaces_a_metrics_link_never_writing_through_it(tmp_path):
    """OUT/metrics.jsonl a symbolic link to a file elsewhere: a resume rewrote that file (cut back to the checkpoint)
    and appended its steps to it. The link is replaced by a file of the run's records, the target left as it was."""
    from shared_config.loop import Loop
    from shared_config.run import resolve_run

    from ..tools.test_study_results import CountingTrainer

    train, out, elsewhere = load_script("train"), tmp_path / "run", tmp_path / "mine.jsonl"
    small = ["--set", "n_layers=1", "--set", "batch_size=2", "--set", "seq_len=16", "--eval-batches", "1", "--quiet"]
    Loop(resolve_run(train.parse_args(["--backend", "jax", "--out", str(out), "--steps", "2", *small])),
         CountingTrainer, progress=False)()
    (out / "metrics.jsonl").rename(elsewhere)
    elsewhere.write_text(elsewhere.read_text() + '{"step": 3, "kind": "train", "loss": 0.5}\n')
    before = elsewhere.read_bytes()
    (out / "metrics.jsonl").symlink_to(elsewhere)
    Loop(resolve_run(train.parse_args(["--backend", "torch", "--out", str(out), "--resume", "--steps", "4"])),
         CountingTrainer, progress=False)()
    assert elsewhere.read_bytes() == before and not (out / "metrics.jsonl").is_symlink()
    steps = [r["step"] for r in metrics.read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]  # the link's records up to the checkpoint's step 2, then the resume's
