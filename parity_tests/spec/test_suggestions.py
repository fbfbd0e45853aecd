"""Everywhere a name is looked up, a misspelt one gets the closest valid one suggested: options and choices of
every command (shared_config.cli.Parser), spec and train presets, spec choices, kernels, mesh axes, checks,
file extensions; and a Hugging Face directory without config.json is named as such."""

from __future__ import annotations

import json

import numpy as np
import pytest

import jax_model.attention
import torch_model.attention
from shared_config import SpecError, cli, did_you_mean, init_weights, load_spec, load_train_config, save_checkpoint
from shared_config.formats import read_checkpoint
from shared_config.files import CheckpointError
from shared_config.parallel import parse_mesh

from ..support.common import ROOT, load_script, make_spec
from ..tools.test_new_user_cli import parser_of

COMMANDS = sorted(p for p in [*(ROOT / "scripts").glob("*.py"), *(ROOT / "bench").glob("*.py")]
                  if "Parser(" in p.read_text() or "study_parser(" in p.read_text())


def usage_error(capsys, parse, argv) -> str:
    """The one `error:` line (exit 2) that parsing `argv` gives."""
    with pytest.raises(SystemExit) as e:
        parse(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_did_you_mean():
    assert did_you_mean("tinny", ["tiny", "small"]) == " (did you mean 'tiny'?)"
    assert did_you_mean("zzzz", ["tiny", "small"]) == ""


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_a_misspelt_option_gets_the_closest_one_in_every_command(path, monkeypatch, capsys):
    parser = parser_of(path, monkeypatch)
    monkeypatch.undo()  # parse for real now
    option = next(o for a in parser._actions
                  for o in a.option_strings if o.startswith("--") and o not in ("--help", "--debug"))
    line = usage_error(capsys, parser.parse_args, [f"{option}x", "1"])
    assert line == f"error: unrecognized option {option}x (did you mean '{option}'?); see --help", line


def test_an_unknown_option_is_named_before_the_required_one_it_hides(capsys):
    main = load_script("init_checkpoint").main
    line = usage_error(capsys, main, ["--spce", "tiny", "--out", "x.safetensors"])  # not "--spec is required"
    assert "unrecognized option --spce (did you mean '--spec'?)" in line, line
    line = usage_error(capsys, main, ["--spec", "tiny", "--out", "x.safetensors", "--qqq", "3"])
    assert "unrecognized option --qqq; see --help" in line, line


def test_abbreviations_negative_numbers_and_joined_values_are_no_unknown_options():
    parser = cli.Parser(prog="t")
    parser.add_argument("--spec-file")
    parser.add_argument("-n", type=int)
    parser.add_argument("--shift", type=float)
    args = parser.parse_args(["--spec=a", "-n5", "--shift", "-0.5"])
    assert (args.spec_file, args.n, args.shift) == ("a", 5, -0.5)


def test_a_misspelt_choice_gets_the_closest_one(capsys):
    line = usage_error(capsys, load_script("convert").main, ["a.safetensors", "b", "--to", "hff"])
    assert "invalid choice: 'hff'" in line and "(did you mean 'hf'?)" in line, line


def test_a_misspelt_preset_or_spec_value_gets_the_closest_one():
    with pytest.raises(SpecError, match=r"no spec preset or file named 'tinny' \(did you mean 'tiny'\?\); presets: "):
        load_spec("tinny")
    with pytest.raises(SpecError, match=r"no train config preset or file named 'cpuu' \(did you mean 'cpu'\?\)"):
        load_train_config("cpuu")
    with pytest.raises(SpecError, match=r"norm_type='dyth' must be one of .* \(did you mean 'dyt'\?\)"):
        make_spec(norm_type="dyth")
    with pytest.raises(SpecError, match=r"unknown axis 'fdsp' \(did you mean 'fsdp'\?\)"):
        parse_mesh("fdsp=2")


@pytest.mark.parametrize("twin", [jax_model.attention, torch_model.attention], ids=["jax", "torch"])
def test_a_misspelt_kernel_gets_the_closest_one(twin):
    with pytest.raises(ValueError, match=r"\(did you mean 'blocked'\?\)"):
        twin.resolve_attention("blocke", make_spec())


def test_a_misspelt_gpu_check_gets_the_closest_one():
    from bench import gpu_check

    name = gpu_check.plan()[0].name
    with pytest.raises(cli.UsageError, match=rf"unknown check '{name}x' \(did you mean '{name}'\?\)"):
        gpu_check.parse_args(["--only", f"{name}x"])


def test_a_misspelt_file_extension_gets_the_closest_one(tmp_path):
    (tmp_path / "m.safetensor").write_bytes(b"")
    with pytest.raises(CheckpointError,
                       match=r"unknown file extension '.safetensor' \(did you mean '.safetensors'\?\)"):
        read_checkpoint(tmp_path / "m.safetensor")


def hf_weights(path, spec):
    """model.safetensors as transformers writes it: Hugging Face names, {"format": "pt"}, no spec."""
    from safetensors.numpy import save_file

    path.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in init_weights(spec, 0).items()}, path / "model.safetensors",
              metadata={"format": "pt"})


def test_a_hugging_face_directory_without_config_json_is_named_as_such(tmp_path, capsys):
    spec = make_spec()
    hf_weights(tmp_path / "hf", spec)
    with pytest.raises(CheckpointError, match=r"hf: no config.json: a Hugging Face directory needs its config.json "
                                              r"beside the weights \(found model.safetensors\)"):
        read_checkpoint(tmp_path / "hf")
    weights, read_spec = read_checkpoint(tmp_path / "hf", spec)  # with the spec given, its weights still read
    assert read_spec == spec and set(weights) == set(init_weights(spec, 0))
    (tmp_path / "sharded").mkdir()
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "sharded" / "model-00001-of-00001.safetensors")
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(CheckpointError, match=r"no config.json: .* \(found model-00001-of-00001.safetensors, "
                                              r"model.safetensors.index.json\)"):
        read_checkpoint(tmp_path / "sharded")
    line = usage_error(capsys, lambda argv: cli.run(load_script("convert").main, argv),
                       [str(tmp_path / "sharded"), str(tmp_path / "out.safetensors")])
    assert "no config.json" in line


def test_a_run_checkpoint_and_a_directory_of_our_file_still_read(tmp_path):
    spec = make_spec()
    (tmp_path / "ours").mkdir()
    save_checkpoint(tmp_path / "ours" / "model.safetensors", init_weights(spec, 0), spec)  # carries its spec
    assert read_checkpoint(tmp_path / "ours")[1] == spec


def test_a_misspelt_twin_gets_the_closest_one():
    from shared_config.twins import twin

    assert twin("jax") is jax_model and twin("torch", "attention") is torch_model.attention
    with pytest.raises(ValueError, match=r"no twin 'toch': one of jax, torch \(did you mean 'torch'\?\)"):
        twin("toch")
