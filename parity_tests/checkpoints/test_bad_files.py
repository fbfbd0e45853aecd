"""Bad input to the converter: one-line error naming the file and the problem, and DST exactly as it was."""

import errno
import json
import shutil
import os
import struct
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from safetensors.numpy import save_file

import shared_config.files
import shared_config.formats.safetensors
import torch_model
from shared_config import CheckpointError, SpecError, init_weights, run_dir, save_checkpoint
from shared_config.formats.hf import config_from_spec
from shared_config.resources import ResourceError

from ..support.common import load_script, make_spec, one_line_error, run_script

convert = load_script("convert").convert


def error_line(exc_info, path) -> str:
    """The raised error's message: one line that begins with the offending path."""
    msg = str(exc_info.value)
    assert msg.startswith(str(path)) and "\n" not in msg, msg
    return msg


def listing(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for directories): to prove nothing changed."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


# --- safetensors attacks ------------------------------------------------------------------------

OK_ENTRY = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


def safetensors_bytes(header, data=b"", header_len=None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def f32(shape, offsets):
    return {"dtype": "F32", "shape": shape, "data_offsets": offsets}


# name: (file contents, what the error must say)
ATTACKS = {
    "header_length_larger_than_file": (
        safetensors_bytes({"a": OK_ENTRY}, bytes(16), header_len=10_000),
        "header length 10000 is larger than the file",
    ),
    "huge_header": (
        safetensors_bytes({"a": OK_ENTRY}, bytes(16), header_len=2**40),
        "header length 1099511627776 is over the 100000000-byte limit",
    ),
    "header_not_json": (safetensors_bytes(b"{'a': 1}"), "header is not JSON"),
    "header_not_utf8": (safetensors_bytes(b'{"\xff\xfe": 1}'), "header is not UTF-8"),
    "overlapping_offsets": (
        safetensors_bytes({"a": f32([2], [0, 8]), "b": f32([2], [4, 12])}, bytes(12)),
        "tensor 'b': data_offsets [4, 12] overlap the tensor before",
    ),
    "offsets_past_the_end": (
        safetensors_bytes({"a": f32([4], [0, 16])}, bytes(8)),
        "tensor 'a': data_offsets [0, 16] run past the end of the data (8 bytes)",
    ),
    "offsets_not_shape_x_dtype": (
        safetensors_bytes({"a": f32([3], [0, 16])}, bytes(16)),
        "tensor 'a': data_offsets [0, 16] hold 16 bytes, shape [3] F32 needs 12",
    ),
    "bytes_not_covered": (safetensors_bytes({"a": OK_ENTRY}, bytes(20)), "the tensors cover 16 of the 20 data bytes"),
}


@pytest.mark.parametrize("name", ATTACKS)
def test_safetensors_attacks_are_refused_before_reading_data(tmp_path, name):
    contents, says = ATTACKS[name]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(contents)
    with pytest.raises(CheckpointError) as e:
        convert(bad, tmp_path / "out.pt")
    assert f"not a valid safetensors file: {says}" in error_line(e, bad)
    assert not (tmp_path / "out.pt").exists()


def test_truncated_safetensors_file(tmp_path):
    spec = make_spec()
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, init_weights(spec, 0), spec)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError) as e:
        convert(bad, tmp_path / "out.pt")
    assert "run past the end of the data" in error_line(e, bad)


# --- weights that do not fit the spec -----------------------------------------------------------


@pytest.mark.parametrize("source", ["safetensors", "torch"])
def test_non_finite_values_refused_unless_allowed(tmp_path, source):
    spec = make_spec(n_layers=3)
    w = init_weights(spec, 0)
    w["model.layers.1.mlp.down_proj.weight"][0, 0] = np.nan
    w["model.layers.2.mlp.down_proj.weight"][1, 2] = np.inf
    w["lm_head.weight"][3, 3] = -np.inf
    src = tmp_path / ("m.safetensors" if source == "safetensors" else "m.pt")
    (save_checkpoint if source == "safetensors" else torch_model.save_state_dict_file)(src, w, spec)
    with pytest.raises(CheckpointError) as e:
        convert(src, tmp_path / "out-hf", to="hf")
    msg = error_line(e, src)
    assert msg.endswith("non-finite values (NaN/Inf) in: model.layers.{1..2}.mlp.down_proj.weight, lm_head.weight")
    assert not (tmp_path / "out-hf").exists()
    convert(src, tmp_path / "out-hf", to="hf", allow_nonfinite=True)  # asked for: converted as it is


def test_missing_unexpected_and_misshapen_tensors_reported_together(tmp_path):
    spec = make_spec(n_layers=3, fused_qkv=False)
    w = init_weights(spec, 0)
    for i in range(3):
        del w[f"model.layers.{i}.mlp.up_proj.weight"]
    w["model.layers.1.self_attn.attn_bias"] = np.zeros(4, np.float32)
    w["lm_head.weight"] = np.ascontiguousarray(w["lm_head.weight"].T)
    expected = (
        "missing keys: model.layers.{0..2}.mlp.up_proj.weight; "
        "unexpected keys: model.layers.1.self_attn.attn_bias; "
        "shape mismatches: lm_head.weight expected [97, 48] found [48, 97]"
    )
    torch.save({k: torch.from_numpy(v) for k, v in w.items()}, tmp_path / "bare.pt")  # the torch reader
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config_from_spec(spec, "hf")))
    save_file(w, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})  # the canonical check
    for src in (tmp_path / "bare.pt", tmp_path / "hf"):
        with pytest.raises(CheckpointError) as e:
            convert(src, tmp_path / "out.safetensors", spec=spec)
        assert error_line(e, src).endswith(expected)


def test_spec_disagreeing_with_the_given_one_and_invalid_specs(tmp_path):
    spec = make_spec(n_layers=3)
    src = tmp_path / "m.safetensors"
    save_checkpoint(src, init_weights(spec, 0), spec)
    convert(src, tmp_path / "m-hf", to="hf")
    for path in (src, tmp_path / "m-hf"):
        with pytest.raises(CheckpointError) as e:
            convert(path, tmp_path / "out.pt", spec=make_spec(n_layers=2))
        assert error_line(e, path).endswith("disagrees with the given spec: n_layers: file 3 vs given 2")
    with pytest.raises(SpecError, match="no spec preset or file named 'tiny-typo'"):
        convert(src, tmp_path / "out.pt", spec="tiny-typo")
    (tmp_path / "bad.yaml").write_text(json.dumps({**spec.to_dict(), "n_kv_heads": 4}))
    with pytest.raises(SpecError, match="bad.yaml: n_kv_heads=4 must divide n_heads=6"):
        convert(src, tmp_path / "out.pt", spec=tmp_path / "bad.yaml")
    convert(src, tmp_path / "m-flax", to="flax")
    (tmp_path / "m-flax" / "spec.json").write_text('{"vocab_size": 97')
    with pytest.raises(CheckpointError) as e:
        convert(tmp_path / "m-flax", tmp_path / "out.pt")
    assert "invalid spec: Expecting" in error_line(e, tmp_path / "m-flax" / "spec.json")
    assert not (tmp_path / "out.pt").exists()


def test_damaged_orbax_checkpoint(tmp_path):
    spec = make_spec()
    save_checkpoint(tmp_path / "m.safetensors", init_weights(spec, 0), spec)
    convert(tmp_path / "m.safetensors", tmp_path / "m-flax", to="flax")
    for f in (tmp_path / "m-flax" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"")  # every file of the checkpoint emptied
    with pytest.raises(CheckpointError) as e:
        convert(tmp_path / "m-flax", tmp_path / "out.pt")
    assert "not a readable Orbax checkpoint" in error_line(e, tmp_path / "m-flax" / "state")


def test_orbax_checkpoint_missing_its_data_names_the_array_and_the_file(tmp_path):
    """Orbax wraps TensorStore's error and appends a TensorStore object's repr ("See full TensorStore details:
    <bound method pybind11_...", cut mid-way): the line gives the innermost cause instead."""
    spec = make_spec()
    save_checkpoint(tmp_path / "m.safetensors", init_weights(spec, 0), spec)
    convert(tmp_path / "m.safetensors", tmp_path / "m-flax", to="flax")
    shutil.rmtree(tmp_path / "m-flax" / "state" / "ocdbt.process_0")
    with pytest.raises(CheckpointError) as e:
        convert(tmp_path / "m-flax", tmp_path / "out.pt")
    line = error_line(e, tmp_path / "m-flax" / "state")
    assert "not a readable Orbax checkpoint" in line and "Error reading" in line and "OCDBT" in line, line
    assert "TensorStore details" not in line and "pybind11" not in line, line


# --- pickles --------------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs os.mkdir(marker): a stand-in for any code an attacker would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker, evil = tmp_path / "payload-ran", tmp_path / "evil.pt"
    torch.save({"spec": make_spec().to_json(), "state_dict": {"model.norm.weight": Payload(marker)}}, evil)
    with pytest.raises(CheckpointError) as e:
        convert(evil, tmp_path / "out.safetensors")
    assert "refused by torch.load(weights_only=True)" in error_line(e, evil)
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()
    torch.load(evil, weights_only=False)  # the payload is live: unsafe loading would have run it
    assert marker.is_dir()


# --- Hugging Face directories ---------------------------------------------------------------------

DELETE = "<delete>"
# name: (changes to a valid config.json, what the error must say)
BAD_CONFIGS = {
    "model_type": ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported (only llama, qwen3)"),
    "architectures": (
        {"architectures": ["LlamaForSequenceClassification"]},
        "architectures ['LlamaForSequenceClassification'] is not supported",
    ),
    "activation": ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported (only 'silu')"),
    "attention_bias": ({"attention_bias": True}, "attention_bias=true is not supported (only false)"),
    "mlp_bias": ({"mlp_bias": True}, "mlp_bias=true is not supported (only false)"),
    "sliding_window": ({"use_sliding_window": True}, "use_sliding_window=true is not supported"),
    "layer_types": (
        {"layer_types": ["full_attention", "sliding_attention"]},
        "layer_types ['sliding_attention'] are not supported",
    ),
    "rope_yarn": ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn' is not supported"),
    "rope_4x_linear": (
        {"rope_parameters": DELETE, "rope_scaling": {"type": "linear", "factor": 2.0}},
        "rope_type='linear' is not supported",
    ),
    "llama3_incomplete": (
        {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
        "llama3 RoPE scaling is missing low_freq_factor, high_freq_factor",
    ),
    "rope_unknown_key": (
        {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}},
        "RoPE parameters ['full_attention'] are not supported",
    ),
    "rope_disagreement": ({"rope_theta": 500000.0}, "disagree with rope_theta/rope_scaling"),
    "invalid_value": ({"num_key_value_heads": 4}, "gives an invalid spec: n_kv_heads=4 must divide n_heads=6"),
    "wrong_type": ({"intermediate_size": "80"}, "intermediate_size must be an integer or null, got '80'"),
}


@pytest.fixture
def hf_dir(tmp_path):
    spec = make_spec()
    save_checkpoint(tmp_path / "m.safetensors", init_weights(spec, 0), spec)
    convert(tmp_path / "m.safetensors", tmp_path / "hf", to="hf")
    return tmp_path / "hf"


@pytest.mark.parametrize("name", BAD_CONFIGS)
def test_bad_hugging_face_config(hf_dir, name):
    changes, says = BAD_CONFIGS[name]
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(rope_theta=DELETE, rope_scaling=DELETE)  # the 5.x layout: rope settings in rope_parameters
    config.update(changes)
    (hf_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v != DELETE}))
    with pytest.raises(CheckpointError) as e:
        convert(hf_dir, hf_dir.parent / "out.safetensors")
    assert says in error_line(e, hf_dir / "config.json")
    assert not (hf_dir.parent / "out.safetensors").exists()


@pytest.mark.parametrize("content, says", [
    (b'{"model_type": "llama",', "not valid JSON: Expecting"),
    (b'\xff\xfe{"a": 1}', "not valid JSON: 'utf-8' codec can't decode"),
    (b'["llama"]', "must hold a JSON object, got ['llama']"),
], ids=["truncated", "not-utf8", "a-list"])
@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_unreadable_json_files_are_one_line_errors(hf_dir, name, content, says):
    """config.json and the shard index (shared_config.files.read_json, which run directories use too)."""
    path = hf_dir / name
    if name.endswith("index.json"):
        (hf_dir / "model.safetensors").rename(hf_dir / "model-00001-of-00001.safetensors")
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        convert(hf_dir, hf_dir.parent / "out.safetensors")
    assert says in error_line(e, path)
    assert not (hf_dir.parent / "out.safetensors").exists()


def test_sharded_index_must_stay_inside_its_directory_and_agree_with_the_shards(hf_dir):
    (hf_dir / "model.safetensors").rename(hf_dir / "model-00001-of-00001.safetensors")
    index = hf_dir / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "../m.safetensors"}}))
    with pytest.raises(CheckpointError) as e:
        convert(hf_dir, hf_dir.parent / "out.safetensors")
    assert "weight_map must map tensor names to file names in" in error_line(e, index)
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(CheckpointError) as e:
        convert(hf_dir, hf_dir.parent / "out.safetensors")
    msg = error_line(e, hf_dir / "model-00001-of-00001.safetensors")
    assert "holds tensors the index places elsewhere: " in msg and "model.embed_tokens.weight" in msg


# --- interrupted writes ---------------------------------------------------------------------------


def crash(*args, **kwargs):
    """Write part of the output (every patched writer takes its path second), then fail like a full disk."""
    Path(args[1]).write_bytes(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")


# target format: (the module attribute that writes its bytes, DST)
WRITES = {
    "safetensors": ((shared_config.formats.safetensors, "save_file"), "out.safetensors"),
    "torch": ((torch, "save"), "out.pt"),
    "flax": ((ocp.StandardCheckpointer, "save"), "out-flax"),
    "hf": ((shared_config.formats.safetensors, "save_file"), "out-hf"),  # after config.json is written
}


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("target", WRITES)
def test_interrupted_conversion_leaves_destination_as_it_was(tmp_path, monkeypatch, target, existing):
    spec = make_spec()
    (tmp_path / "src").mkdir()
    src = tmp_path / "src" / "m.safetensors"
    save_checkpoint(src, init_weights(spec, 0), spec)
    (owner, writer), name = WRITES[target]
    if existing:
        convert(src, tmp_path / name, to=target)
    before = listing(tmp_path)
    monkeypatch.setattr(owner, writer, crash)
    with pytest.raises(ResourceError) as e:  # the environment's failure, exit code 3
        convert(src, tmp_path / name, to=target, force=True)
    assert error_line(e, tmp_path / name).endswith("cannot write: No space left on device")
    assert listing(tmp_path) == before  # DST absent or byte-identical; no temp file or directory left


@pytest.mark.parametrize("rename", ["exchange", "two-renames"])
def test_failed_final_rename_puts_the_old_directory_back(tmp_path, monkeypatch, rename):
    """The replace's one exchange, or (where the file system lacks it) its second rename, fails."""
    spec = make_spec()
    src = tmp_path / "m.safetensors"
    save_checkpoint(src, init_weights(spec, 0), spec)
    convert(src, tmp_path / "out-hf", to="hf")
    before = listing(tmp_path)
    real_replace = os.replace

    def replace(a, b):  # fail only the rename of the finished temporary directory into place
        if Path(a).is_dir() and str(a).endswith(".tmp"):
            raise OSError(errno.EIO, "Input/output error")
        real_replace(a, b)

    def exchange(a, b):
        if rename == "exchange":
            raise OSError(errno.EIO, "Input/output error")
        return False

    monkeypatch.setattr(shared_config.files, "_exchange", exchange)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(ResourceError, match="cannot write: Input/output error"):
        convert(src, tmp_path / "out-hf", to="hf", force=True)
    assert listing(tmp_path) == before


# --- the command line -----------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_errors_are_one_line_exit_2_no_traceback(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(ATTACKS["offsets_past_the_end"][0])
    marker, evil = tmp_path / "payload-ran", tmp_path / "evil.pt"
    torch.save({"state_dict": Payload(marker)}, evil)
    damaged = tmp_path / "damaged-flax"
    (damaged / "state").mkdir(parents=True)  # Orbax itself logs warnings and prints tracebacks here
    cases = [
        ([bad, tmp_path / "out.pt"], f"error: {bad}: not a valid safetensors file: tensor 'a'"),
        ([evil, tmp_path / "out.safetensors", "--spec", "tiny"], f"error: {evil}: refused by torch.load"),
        ([damaged, tmp_path / "out.pt", "--spec", "tiny"], f"error: {damaged / 'state'}: not a readable Orbax"),
        ([bad, tmp_path / "out", "--to", "onnx"], "error: argument --to: invalid choice: 'onnx'"),
    ]
    for args, starts in cases:
        assert one_line_error(run_script("convert", *args)).startswith(starts)
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "damaged-flax", "evil.pt"]  # no output
    debug = run_script("convert", bad, tmp_path / "out.pt", "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


@pytest.mark.parametrize("content", [b"junk\n", b"", b"PK\x03\x04not a zip"])
def test_a_pt_file_that_is_not_a_checkpoint_is_a_one_line_error(tmp_path, content):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        convert(junk, tmp_path / "out.safetensors")
    assert "refused by torch.load(weights_only=True)" in error_line(e, junk)
    assert not (tmp_path / "out.safetensors").exists()


def _train_checkpoint(tmp_path) -> Path:
    spec = make_spec()
    weights = init_weights(spec, 0)
    state = {"step": 3, "weights": weights, "m": {k: np.zeros_like(w) for k, w in weights.items()},
             "v": {k: np.ones_like(w) for k, w in weights.items()}}
    return run_dir.save_train_checkpoint(tmp_path, state, spec, {"backend": "jax"})


def _rewrite_moments(path: Path, change) -> None:
    moments, meta = shared_config.formats.safetensors.read_safetensors(path / "optimizer.safetensors")
    change(moments, meta)
    save_file(moments, path / "optimizer.safetensors", metadata=meta)


def _nan_in_v(moments, meta):
    moments["v.model.norm.weight"][0] = np.nan


@pytest.mark.parametrize("damage, file, says", [
    (lambda p: (p / "state.json").write_text('{"step": -1}'), "state.json", "'step' must be an integer >= 0"),
    (lambda p: (p / "state.json").write_text("[3]"), "state.json", "must hold a JSON object, got [3]"),
    (lambda p: (p / "optimizer.safetensors").unlink(), "optimizer.safetensors", "no such file"),
    (lambda p: _rewrite_moments(p, lambda m, meta: m.pop("m.lm_head.weight")), "optimizer.safetensors",
     "missing keys: m.lm_head.weight"),
    (lambda p: _rewrite_moments(p, _nan_in_v), "optimizer.safetensors",
     "non-finite values (NaN/Inf) in: v.model.norm.weight"),
    (lambda p: _rewrite_moments(p, lambda m, meta: meta.update(step="2")), "",
     "optimizer.safetensors is at step 2, state.json at 3"),
], ids=["negative-step", "state-not-an-object", "no-optimizer-file", "missing-moment", "nan-moment", "step-mismatch"])
def test_damaged_train_checkpoints_are_one_line_errors(tmp_path, damage, file, says):
    """A run directory's checkpoint (what --resume and train-state loading read): every part is checked."""
    path = _train_checkpoint(tmp_path)
    run_dir.load_train_checkpoint(path)  # intact: loads
    damage(path)
    with pytest.raises(CheckpointError) as e:
        run_dir.load_train_checkpoint(path)
    assert error_line(e, path / file if file else path).endswith(says)
