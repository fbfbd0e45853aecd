"""Bad checkpoint directories (docs/checkpoints.md): a damaged Orbax checkpoint, Hugging Face directories whose
config.json or shard index is unsupported or unreadable, a run's damaged train checkpoint. A one-line error naming
the file and the problem, and DST exactly as it was."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import shared_config.formats.safetensors
from shared_config import CheckpointError, init_weights, run_dir, save_checkpoint

from ..support.common import error_line, load_script, make_spec

convert = load_script("convert").convert


# --- Orbax directories ----------------------------------------------------------------------------


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


def test_an_orbax_spec_json_that_is_no_readable_file_is_refused_not_taken_as_absent(tmp_path):
    """spec.json a directory or a loop of links read as "no spec": "carries no spec; pass one", and with --spec given
    the checkpoint converted without a word about its own spec."""
    spec = make_spec()
    save_checkpoint(tmp_path / "m.safetensors", init_weights(spec, 0), spec)
    convert(tmp_path / "m.safetensors", tmp_path / "m-flax", to="flax")
    (tmp_path / "m-flax" / "spec.json").unlink()
    (tmp_path / "m-flax" / "spec.json").mkdir()
    with pytest.raises(CheckpointError) as e:
        convert(tmp_path / "m-flax", tmp_path / "out.pt", spec=spec)
    assert "cannot read: Is a directory" in error_line(e, tmp_path / "m-flax" / "spec.json")
    assert not (tmp_path / "out.pt").exists()


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
    # a list or an object was dict membership's TypeError (unhashable) and a traceback
    "model_type_list": ({"model_type": ["llama"]}, "model_type ['llama'] is not supported (only llama, qwen3)"),
    # RoPE values were read by the spec, which takes "8" as 8.0 (transformers fails on such a file)
    "rope_theta_string": ({"rope_parameters": {"rope_type": "default", "rope_theta": "10000"}},
                          "rope_theta must be a finite number, got '10000' (in the RoPE parameters)"),
    "llama3_factor_string": ({"rope_parameters": {"rope_type": "llama3", "factor": "8", "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
                             "factor must be a finite number, got '8' (in the RoPE parameters)"),
    # an int past float's range: math.isfinite's OverflowError
    "number_past_float": ({"rms_norm_eps": 10**400}, "rms_norm_eps must be a finite number, got 1000000000"),
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


@pytest.mark.parametrize("architectures", [None, DELETE])
def test_a_config_without_architectures_is_read(hf_dir, architectures):
    """`architectures: null` (PretrainedConfig's default, as a config saved without a model writes it) was refused
    as "architectures null is not supported"; transformers reads the directory by its model_type."""
    config = {**json.loads((hf_dir / "config.json").read_text()), "architectures": architectures}
    (hf_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v != DELETE}))
    convert(hf_dir, hf_dir.parent / "out.safetensors")
    assert (hf_dir.parent / "out.safetensors").is_file()


@pytest.mark.parametrize("damage, says", [("directory", "is a directory, not a JSON file"),
                                          ("dangling_link", "no such file")])
def test_a_config_json_that_is_no_readable_file_is_refused(tmp_path, damage, says):
    """A run checkpoint's directory with a config.json that is a directory (or a link to nothing) beside its
    model.safetensors was converted from the weights' own spec, the config.json passed over without a word."""
    spec = make_spec()
    (tmp_path / "step").mkdir()
    save_checkpoint(tmp_path / "step" / "model.safetensors", init_weights(spec, 0), spec)
    config = tmp_path / "step" / "config.json"
    config.mkdir() if damage == "directory" else config.symlink_to(tmp_path / "nothing.json")
    with pytest.raises(CheckpointError) as e:
        convert(tmp_path / "step", tmp_path / "out.safetensors")
    assert error_line(e, config) == f"{config}: {says}"
    assert not (tmp_path / "out.safetensors").exists()


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


def test_a_directory_of_pickled_weights_is_named_as_such(hf_dir):
    """An older transformers save (pytorch_model.bin beside config.json) said 'hf/model.safetensors: no such file'."""
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        convert(hf_dir, hf_dir.parent / "out.safetensors")
    assert "holds pytorch_model.bin, transformers' pickle format, which is not read" in error_line(e, hf_dir)


def test_sharded_index_must_stay_inside_its_directory_and_agree_with_the_shards(hf_dir):
    (hf_dir / "model.safetensors").rename(hf_dir / "model-00001-of-00001.safetensors")
    index = hf_dir / "model.safetensors.index.json"
    for shard in ("../m.safetensors", ""):  # "" was read as the directory: "hf: a directory, not a safetensors file"
        index.write_text(json.dumps({"weight_map": {"model.norm.weight": shard}}))
        with pytest.raises(CheckpointError) as e:
            convert(hf_dir, hf_dir.parent / "out.safetensors")
        assert "weight_map must map tensor names to file names in" in error_line(e, index)
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(CheckpointError) as e:
        convert(hf_dir, hf_dir.parent / "out.safetensors")
    msg = error_line(e, hf_dir / "model-00001-of-00001.safetensors")
    assert "holds tensors the index places elsewhere: " in msg and "model.embed_tokens.weight" in msg


# --- a run's train checkpoints --------------------------------------------------------------------


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
    (lambda p: shutil.copyfile(p / "model.safetensors", p / "optimizer.safetensors"), "optimizer.safetensors",
     "its metadata says format 'twinlm', not 'twinlm-adamw': not a run's AdamW moments (m.<name>, v.<name>)"),
    (lambda p: _rewrite_moments(p, lambda m, meta: meta.pop("format")), "optimizer.safetensors",
     "its metadata names no format, not 'twinlm-adamw': not a run's AdamW moments (m.<name>, v.<name>)"),
], ids=["negative-step", "state-not-an-object", "no-optimizer-file", "missing-moment", "nan-moment", "step-mismatch",
        "weights-as-moments", "no-format"])
def test_damaged_train_checkpoints_are_one_line_errors(tmp_path, damage, file, says):
    """A run directory's checkpoint (what --resume and train-state loading read): every part is checked."""
    path = _train_checkpoint(tmp_path)
    run_dir.load_train_checkpoint(path)  # intact: loads
    damage(path)
    with pytest.raises(CheckpointError) as e:
        run_dir.load_train_checkpoint(path)
    assert error_line(e, path / file if file else path).endswith(says)


@pytest.mark.parametrize("where", ["/", "."])
def test_a_directory_path_without_a_name_is_read_like_any_directory(tmp_path, monkeypatch, where):
    """from_pretrained("/") or "." (a notebook in a checkpoint's directory) raised pathlib's ValueError
    "PosixPath('.') has an empty name" from the reader's look for a moved-aside `.NAME.old`, in both twins."""
    import jax_model
    import torch_model

    monkeypatch.chdir(tmp_path)
    for twin in (jax_model, torch_model):
        with pytest.raises(CheckpointError, match=r"^/?\.?: neither a Hugging Face directory"):
            twin.from_pretrained(where)
    spec = make_spec()
    save_checkpoint(tmp_path / "model.safetensors", init_weights(spec, 0), spec)  # "." as a run's step directory
    assert jax_model.from_pretrained(".").spec == torch_model.from_pretrained(".").spec == spec
