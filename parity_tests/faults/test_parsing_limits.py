"""Parsing is bounded (docs/checkpoints.md, "Bad input, limits and failures"): JSON and YAML nesting, alias
expansion, keys given twice, files read whole, typed config values and the length of what an error quotes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import shared_config.formats
import shared_config.limits
from shared_config import CheckpointError, SpecError, load_spec, metrics, run_dir
from shared_config.cli import fail
from shared_config.limits import MAX_NESTING, MAX_YAML_BYTES
from shared_config.train_config import load_train_config

from ..support.common import ROOT, fla_dir, load_script, peak_memory, safetensors_file, with_metadata_spec

convert = load_script("convert").convert


DEEP_JSON = "[" * 200_000 + "]" * 200_000
DEEP_YAML = "a: " + "[" * 100_000 + "]" * 100_000 + "\n"
# "billion laughs": each level refers to the one before nine times, 9^20 leaves in 22 lines
LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"l{i}: &l{i} [{', '.join(['*' + ('a' if i == 0 else f'l{i - 1}')] * 9)}]\n" for i in range(20)
)


def test_json_nested_deeper_than_the_limit_is_refused_in_every_reader(tmp_path, canonical):
    hf = tmp_path / "hf"
    convert(canonical, hf, to="hf")
    cases = {}
    (hf / "config.json").write_text(DEEP_JSON)
    cases["config.json"] = (hf, hf / "config.json")
    index = tmp_path / "sharded"
    convert(canonical, index, to="hf")
    (index / "model.safetensors").rename(index / "model-00001-of-00001.safetensors")
    (index / "model.safetensors.index.json").write_text(DEEP_JSON)
    cases["index"] = (index, index / "model.safetensors.index.json")
    cases["header"] = (safetensors_file(tmp_path / "deep.safetensors", DEEP_JSON.encode()),) * 2
    cases["metadata spec"] = (with_metadata_spec(canonical, tmp_path / "meta.safetensors", DEEP_JSON),) * 2
    pt = tmp_path / "deep.pt"
    torch.save({"spec": DEEP_JSON, "state_dict": {}}, pt)
    cases[".pt spec"] = (pt, pt)
    for name, (src, named) in cases.items():
        with pytest.raises(CheckpointError) as e:
            convert(src, tmp_path / "out.safetensors")
        msg = str(e.value)
        assert msg.startswith(str(named)) and f"JSON nested deeper than {MAX_NESTING} levels" in msg, (name, msg)
    run = tmp_path / "run"
    (run / "step-00000001").mkdir(parents=True)
    (run / "step-00000001" / "state.json").write_text(DEEP_JSON)
    with pytest.raises(CheckpointError, match="state.json: JSON nested deeper"):
        run_dir.read_state(run / "step-00000001")
    (run / "metrics.jsonl").write_text('{"step": 1}\n' + DEEP_JSON + "\n")
    with pytest.raises(CheckpointError, match="metrics.jsonl: line 2: JSON nested deeper"):
        metrics.read_metrics(run / "metrics.jsonl")


@pytest.mark.parametrize("text, says", [(DEEP_YAML, f"YAML nested deeper than {MAX_NESTING} levels"),
                                        (LAUGHS, "more than 100 YAML aliases")], ids=["deep", "billion-laughs"])
def test_yaml_nesting_and_alias_expansion_are_bounded_for_specs_and_train_configs(tmp_path, text, says):
    path = tmp_path / "evil.yaml"
    path.write_text(text)
    for load in (load_spec, load_train_config):
        raised, peak = peak_memory(lambda: load(str(path)))
        assert isinstance(raised, SpecError) and says in str(raised) and str(path) in str(raised), raised
        assert peak < 50 * 2**20
    with pytest.raises(SpecError, match="not a YAML scalar"):
        shared_config.parse_overrides([f"d_model={DEEP_YAML[3:]}"])


def test_a_key_given_twice_is_refused_in_every_yaml_and_json_reader(tmp_path, canonical):
    """PyYAML and json keep the last of two equal keys silently: a spec with d_model twice built the other model."""
    spec_yaml = tmp_path / "spec.yaml"
    spec_yaml.write_text((ROOT / "shared_config/specs/tiny.yaml").read_text() + "d_model: 48\n")
    with pytest.raises(SpecError, match=r"duplicate key 'd_model' \(line 9\)"):
        load_spec(str(spec_yaml))
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text("lr: 0.001\nsteps: 3\nlr: 0.1\n")
    with pytest.raises(SpecError, match="duplicate key 'lr'"):
        load_train_config(str(train_yaml))
    with pytest.raises(SpecError, match="not a YAML scalar"):
        shared_config.parse_overrides(["d_model={a: 1, a: 2}"])
    with safe_open(str(canonical), "np") as f:  # the writer's own spec JSON, with a second d_model added
        text = f.metadata()["spec"]
    twice = with_metadata_spec(canonical, tmp_path / "twice.safetensors", text[:-1] + ', "d_model": 48}')
    with pytest.raises(CheckpointError, match="duplicate key 'd_model'"):
        shared_config.formats.read_checkpoint(twice)
    # a metrics.jsonl line with a key twice was taken for a line cut by a crash: skipped silently as the last line
    # (plot_curves.py: "no training metrics"), "not valid JSON (... cut by a crash)" before another
    for lines, number in ((['{"step": 1, "loss": 2.0, "loss": 3.0}'], 1), (['{"step": 1, "step": 2}', '{}'], 1)):
        (tmp_path / "metrics.jsonl").write_text("\n".join(['{"step": 0}', *lines]) + "\n")
        with pytest.raises(CheckpointError, match=f"metrics.jsonl: line {number + 1}: duplicate key '(loss|step)'"):
            metrics.read_metrics(tmp_path / "metrics.jsonl")
    # a YAML merge key (`<<: *base`) is overridden by the mapping's own keys by design: not a duplicate
    merged = tmp_path / "merged.yaml"
    merged.write_text("base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  x: 3\n")
    assert shared_config.limits.parse_yaml(merged.read_text())["use"] == {"x": 3, "y": 2}


def test_files_read_whole_are_capped_before_reading(tmp_path, canonical):
    """A sparse multi-GB config.json or spec YAML is refused from its size alone."""
    hf = tmp_path / "hf"
    convert(canonical, hf, to="hf")
    with open(hf / "config.json", "r+b") as f:
        f.truncate(4 * 2**30)
    raised, peak = peak_memory(lambda: convert(hf, tmp_path / "out.safetensors"))
    assert isinstance(raised, CheckpointError) and "4,294,967,296 bytes, over the 67,108,864-byte limit" in str(raised)
    spec = tmp_path / "big.yaml"
    with open(spec, "wb") as f:
        f.truncate(MAX_YAML_BYTES + 1)
    with pytest.raises(SpecError, match="over the 1,048,576-byte limit"):
        load_spec(str(spec))
    assert peak < 50 * 2**20


def test_values_quoted_in_errors_are_shortened(tmp_path, canonical):
    hf = tmp_path / "hf"
    convert(canonical, hf, to="hf")
    config = json.loads((hf / "config.json").read_text())
    for key, value in [("hidden_act", "x" * 10**6), ("rope_parameters", list(range(10**5))),
                       ("layer_types", [{"a": 1}] * 1000), ("intermediate_size", "9" * 10**6)]:
        (hf / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(CheckpointError) as e:
            convert(hf, tmp_path / "out.safetensors")
        assert len(str(e.value)) < len(str(hf)) + 300, (key, len(str(e.value)))
    yaml_spec = tmp_path / "s.yaml"
    yaml_spec.write_text(f"{'k' * 10**5}: 1\n")
    with pytest.raises(SpecError) as e:
        load_spec(str(yaml_spec))
    assert len(str(e.value)) < len(str(yaml_spec)) + 400
    header = {"a": {"dtype": "F32", "shape": [1] * 10**5, "data_offsets": [0, 4]}}
    with pytest.raises(CheckpointError) as e:
        convert(safetensors_file(tmp_path / "s.safetensors", header, bytes(4)), tmp_path / "o.pt", spec="tiny")
    assert len(str(e.value)) < 400


@pytest.mark.parametrize("edits, says", [
    ({"intermediate_size": None, "hidden_ratio": float("nan")}, "hidden_ratio must be a finite number, got nan"),
    ({"intermediate_size": None, "hidden_ratio": 1e308},
     "hidden_ratio × hidden_size must be in (0, 2^62), got 1e+308 × 64"),
    ({"intermediate_size": None, "hidden_ratio": "x"}, "hidden_ratio must be a finite number, got 'x'"),
    ({"intermediate_size": None, "hidden_ratio": -2}, "hidden_ratio × hidden_size must be in (0, 2^62), got -2 × 64"),
    ({"intermediate_size": None, "hidden_size": 10**400}, "hidden_ratio × hidden_size must be in (0, 2^62)"),
    ({"hidden_size": "64"}, "hidden_size must be an integer, got '64'"),
    ({"intermediate_size": None, "hidden_size": "64"}, "hidden_size must be an integer, got '64'"),
    ({"num_heads": True}, "num_heads must be an integer, got true"),
    ({"norm_eps": float("inf")}, "norm_eps must be a finite number, got inf"),
    ({"fuse_norm": "false"}, "fuse_norm must be true or false, got 'false'"),
    ({"tie_word_embeddings": 0}, "tie_word_embeddings must be true or false, got 0"),
], ids=["ratio-nan", "ratio-1e308", "ratio-str", "ratio-negative", "size-huge-int", "size-str", "size-str-no-ff",
        "heads-bool", "eps-inf", "fuse-str", "tie-int"])
def test_fla_config_values_are_typed_before_any_arithmetic(tmp_path, edits, says):
    fla = fla_dir(tmp_path, **edits)
    with pytest.raises(CheckpointError) as e:
        convert(fla, tmp_path / "out.safetensors")
    assert str(e.value).startswith(str(fla / "config.json")) and says in str(e.value), str(e.value)
    assert len(str(e.value)) < len(str(fla)) + 200
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("edits, says", [
    ({"hidden_size": "48"}, "hidden_size must be an integer, got '48'"),
    ({"num_hidden_layers": 2.0}, "num_hidden_layers must be an integer, got 2.0"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite number, got nan"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings must be true or false, got 'no'"),
], ids=["size-str", "layers-float", "eps-nan", "tie-str"])
def test_hugging_face_config_values_are_typed_naming_the_key(tmp_path, canonical, edits, says):
    hf = tmp_path / "hf"
    convert(canonical, hf, to="hf")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, **edits}))
    with pytest.raises(CheckpointError) as e:
        convert(hf, tmp_path / "out.safetensors")
    assert str(e.value).startswith(str(hf / "config.json")) and says in str(e.value), str(e.value)


def test_an_error_line_is_capped(capsys):
    with pytest.raises(SystemExit):
        fail("y" * 100_000)
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and len(line) < 2100 and "98,000 more characters" in line
