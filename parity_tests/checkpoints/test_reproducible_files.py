"""Canonical files are byte-reproducible: the same inputs written twice give the same bytes, whichever writer
(save_checkpoint, init_checkpoint.py, convert.py to safetensors / Hugging Face / flash-linear-attention, a
training run's checkpoint). safetensors writes its metadata in a hash map's order, which changes from one
write to the next even within a process: each test writes several times, so an unsorted header cannot pass."""

import numpy as np
import pytest

from shared_config import init_weights, read_safetensors, save_checkpoint, save_safetensors
from shared_config import run_dir
from shared_config.formats.safetensors import read_header

from ..support.common import load_script, make_spec

WRITES = 6  # two metadata orders: an unsorted writer gives the same bytes 6 times with odds 1/32
convert = load_script("convert").convert
init_checkpoint = load_script("init_checkpoint").main


def same_bytes(paths) -> bytes:
    """The one content of all `paths` (they must be byte-identical), checked to carry sorted metadata."""
    contents = {p.read_bytes() for p in paths}
    assert len(contents) == 1, f"{len(contents)} different contents among {len(paths)} writes of the same inputs"
    meta = list(read_header(paths[0])["__metadata__"])
    assert meta == sorted(meta), meta
    return contents.pop()


def test_save_safetensors_sorts_the_metadata_and_keeps_the_file_valid(tmp_path):
    tensors = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(3, np.float16)}
    meta = {k: f"value of {k}" for k in ("spec", "format", "step", "zeta", "alpha")}
    paths = [tmp_path / f"{i}.safetensors" for i in range(WRITES)]
    for p in paths:
        save_safetensors(tensors, p, meta)
    same_bytes(paths)
    weights, read_meta = read_safetensors(paths[0])
    assert read_meta == meta and all(np.array_equal(weights[k], v) for k, v in tensors.items())


def test_save_checkpoint_is_byte_reproducible(tmp_path):
    spec = make_spec()
    weights = init_weights(spec, 0)
    paths = [tmp_path / f"{i}.safetensors" for i in range(WRITES)]
    for p in paths:
        save_checkpoint(p, weights, spec)
    same_bytes(paths)


def test_init_checkpoint_is_byte_reproducible(tmp_path, capsys):
    paths = [tmp_path / f"{i}.safetensors" for i in range(WRITES)]
    for p in paths:
        init_checkpoint(["--spec", "tiny", "--set", "n_layers=1", "--out", str(p)])
    same_bytes(paths)


@pytest.mark.parametrize("target, changes", [("safetensors", {}), ("hf", {}), ("fla", dict(
    mixer="gla", position="none", n_kv_heads=None, n_heads=4, gla_gate_rank=16, gla_expand_v=1.25))])
def test_conversions_are_byte_reproducible(tmp_path, target, changes):
    spec = make_spec(**changes)
    save_checkpoint(tmp_path / "src.safetensors", init_weights(spec, 0), spec)
    outs = [tmp_path / f"out{i}{'.safetensors' if target == 'safetensors' else ''}" for i in range(WRITES)]
    for out in outs:
        convert(tmp_path / "src.safetensors", out, to=target)
    files = [out / "model.safetensors" if out.is_dir() else out for out in outs]
    same_bytes(files)
    if target != "safetensors":
        assert len({(out / "config.json").read_bytes() for out in outs}) == 1


def test_train_checkpoints_are_byte_reproducible(tmp_path):
    spec = make_spec()
    weights = init_weights(spec, 0)
    state = {"step": 3, "weights": weights, **{k: {n: np.full_like(w, 0.5) for n, w in weights.items()} for k in "mv"}}
    dirs = []
    for i in range(WRITES):
        (tmp_path / f"run{i}").mkdir()
        dirs.append(run_dir.save_train_checkpoint(tmp_path / f"run{i}", state, spec, {"backend": "jax"}))
    for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
        assert len({(d / name).read_bytes() for d in dirs}) == 1, name
    same_bytes([d / "model.safetensors" for d in dirs])
    same_bytes([d / "optimizer.safetensors" for d in dirs])
