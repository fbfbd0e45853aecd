"""Loading from Python and from the command line, as a new user does: both twins' `from_pretrained` read every
format convert.py reads (canonical file, a run's step directory, Hugging Face, Orbax, .pt), the torch model for
inference; every script's --weights reads them all (and flash-linear-attention's directory); known derived buffers (old
transformers' RoPE `inv_freq`) are ignored with a one-line note by every
loader while any other unexpected tensor still fails; a bare state dict's error names --spec; convert.py --help
loads no framework."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import jax_model
import torch_model
from shared_config import CheckpointError, save_checkpoint
from shared_config.formats import read_checkpoint
from shared_config.run import read_init

from ..support.common import load_script, make_spec, parity_weights

convert = load_script("convert")
generate = load_script("generate")
TWINS = {"jax": jax_model, "torch": torch_model}


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """(spec, weights, {format: path}) of one model saved in every format."""
    tmp = tmp_path_factory.mktemp("formats")
    spec = make_spec()
    weights = parity_weights(spec)
    save_checkpoint(tmp / "model.safetensors", weights, spec)
    (tmp / "step-00000400").mkdir()
    save_checkpoint(tmp / "step-00000400" / "model.safetensors", weights, spec)
    paths = {"safetensors": tmp / "model.safetensors", "run step": tmp / "step-00000400"}
    for name, dst in [("torch", tmp / "model.pt"), ("flax", tmp / "model-flax"), ("hf", tmp / "model-hf")]:
        convert.convert(tmp / "model.safetensors", dst, to=name)
        paths[name] = dst
    return spec, weights, paths


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("fmt", ["safetensors", "run step", "torch", "flax", "hf"])
def test_from_pretrained_reads_every_format(formats, twin, fmt):
    spec, weights, paths = formats
    model = TWINS[twin].from_pretrained(paths[fmt])
    assert model.spec == spec
    got = TWINS[twin].get_weights(model)
    assert set(got) == set(weights)
    for name, w in weights.items():
        np.testing.assert_array_equal(got[name], w, err_msg=name)
    if twin == "torch":  # for inference: eval mode, no autograd graph
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert not model(torch.tensor([[1, 2, 3]])).requires_grad


@pytest.mark.parametrize("fmt", ["safetensors", "run step", "torch", "flax", "hf"])
def test_a_given_spec_may_change_the_qkv_fusion_of_every_format(formats, tmp_path, fmt):
    """fused_qkv is the given spec's to choose (docs/checkpoints.md), but the .pt and Orbax files store the twins'
    in-memory layout: a spec given beside them that fused otherwise than the file was 'missing keys q_proj ...;
    unexpected keys qkv_proj'. A bare state dict written unfused reads under a fused spec (--spec tiny) too."""
    spec, weights, paths = formats
    other = spec.replace(fused_qkv=not spec.fused_qkv)
    got, got_spec = read_checkpoint(paths[fmt], other.to_dict())
    assert got_spec == other and got_spec.fused_qkv == other.fused_qkv
    for name, w in weights.items():
        np.testing.assert_array_equal(got[name], w, err_msg=name)
    if fmt == "torch":
        unfused = torch_model.from_weights(weights, other).state_dict()
        assert not any("qkv_proj" in n for n in unfused)
        torch.save(unfused, tmp_path / "bare.pt")
        for given in (spec, other):
            got, _ = read_checkpoint(tmp_path / "bare.pt", given.to_dict())
            assert all(np.array_equal(got[n], w) for n, w in weights.items())


def test_command_line_loaders_accept_a_run_step_directory(formats):
    spec, weights, paths = formats
    for loader in (generate.load_weights, read_init):
        got, got_spec = loader(paths["run step"], None)
        assert got_spec == spec and all(np.array_equal(got[n], weights[n]) for n in weights)


def with_extra(directory, tensors):
    """Add `tensors` to the model.safetensors of a Hugging Face directory, keeping its metadata."""
    from safetensors import safe_open

    path = directory / "model.safetensors"
    with safe_open(path, "np") as f:
        meta = f.metadata()
    save_file({**load_file(path), **tensors}, path, metadata=meta)


def test_derived_buffers_are_ignored_with_a_note_everywhere(formats, tmp_path, capsys):
    spec, weights, paths = formats
    hf = tmp_path / "old-hf"
    convert.convert(paths["safetensors"], hf, to="hf")
    inv_freq = 1.0 / 10000 ** (np.arange(0, spec.E, 2, dtype=np.float32) / spec.E)
    with_extra(hf, {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq for i in range(spec.L)})
    torch.save({**torch.load(paths["torch"], weights_only=True)["state_dict"],
                "model.rotary_emb.inv_freq": torch.as_tensor(inv_freq)}, tmp_path / "bare.pt")
    loaders = [
        lambda: convert.convert(hf, tmp_path / "out.safetensors"),
        lambda: generate.load_weights(hf),
        lambda: read_init(hf, None),
        lambda: jax_model.from_pretrained(hf),
        lambda: torch_model.from_pretrained(hf),
        lambda: read_checkpoint(tmp_path / "bare.pt", spec),
    ]
    for load in loaders:
        capsys.readouterr()
        load()
        (note,) = capsys.readouterr().err.strip().splitlines()
        assert note.startswith("note: ") and "ignoring" in note and "rotary_emb.inv_freq" in note, note
    np.testing.assert_array_equal(load_file(tmp_path / "out.safetensors")["model.norm.weight"],
                                  weights["model.norm.weight"])


def test_other_unexpected_tensors_still_fail(formats, tmp_path):
    spec, _, paths = formats
    hf = tmp_path / "odd-hf"
    convert.convert(paths["safetensors"], hf, to="hf")
    with_extra(hf, {"model.layers.0.self_attn.rotary_emb.scale": np.ones(2, np.float32)})
    for load in (lambda: convert.convert(hf, tmp_path / "x.safetensors"), lambda: torch_model.from_pretrained(hf)):
        with pytest.raises(CheckpointError, match=r"unexpected keys: model\.layers\.0\.self_attn\.rotary_emb\.scale"):
            load()


def test_a_bare_state_dict_error_names_the_spec_option(formats, tmp_path):
    _, _, paths = formats
    torch.save(torch.load(paths["torch"], weights_only=True)["state_dict"], tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="carries no spec; pass one [(]--spec"):
        convert.convert(tmp_path / "bare.pt", tmp_path / "x.safetensors")


@pytest.fixture(scope="module")
def fla_dir(tmp_path_factory):
    """(spec, weights, path) of a GLA model in flash-linear-attention's directory format."""
    from shared_config import load_spec

    tmp = tmp_path_factory.mktemp("fla")
    spec = load_spec("gla-tiny").replace(n_layers=1)
    weights = parity_weights(spec)
    save_checkpoint(tmp / "gla.safetensors", weights, spec)
    convert.convert(tmp / "gla.safetensors", tmp / "gla-fla", to="fla")
    return spec, weights, tmp / "gla-fla"


WEIGHT_SCRIPTS = ["parity_report", "compare_logits"]  # with generate.py and train.py (above): every --weights reader


@pytest.mark.parametrize("script", WEIGHT_SCRIPTS)
@pytest.mark.parametrize("fmt", ["safetensors", "run step", "torch", "flax", "hf", "fla"])
def test_every_weights_option_reads_every_format(formats, fla_dir, script, fmt, monkeypatch, capsys):
    """parity_report.py and compare_logits.py --weights read what from_pretrained reads, through the same dispatch."""
    spec, weights, paths = (*fla_dir[:2], fla_dir[2]) if fmt == "fla" else formats
    path = fla_dir[2] if fmt == "fla" else paths[fmt]
    module, seen = load_script(script), {}
    if script == "parity_report":  # what the report is run on; the report itself is test_parity_report.py's
        monkeypatch.setattr(module, "report", lambda w, s, args, cfg: seen.update(weights=w, spec=s) or 0)
        assert module.main(["--weights", str(path), "--seq", "4", "--batch", "1", "--quiet"]) == 0
        assert seen["spec"] == spec
        for name, w in weights.items():
            np.testing.assert_array_equal(seen["weights"][name], w, err_msg=name)
    else:  # the whole comparison, at a tiny size
        module.main(["--weights", str(path), "--seq", "4", "--batch", "1"])
        result = json.loads(capsys.readouterr().out)
        assert result["spec"] == str(path) and result["max_abs_diff_over_std"] < 1e-5


@pytest.mark.parametrize("other", ["the other twin's model", None])
def test_to_safetensors_refuses_what_is_not_its_twins_model(formats, tmp_path, other):
    """Saved with the other twin's `to_safetensors`, a model was an IndexError from inside flax (JAX) or an
    AttributeError 'named_parameters' (torch); None an AttributeError. Both twins raise TypeError, and write nothing."""
    models = {name: twin.from_pretrained(formats[2]["safetensors"]) for name, twin in TWINS.items()}
    for name, twin in TWINS.items():
        model = models["torch" if name == "jax" else "jax"] if other else None
        with pytest.raises(TypeError, match=rf"^model must be a {name}_model.Transformer, not "):
            twin.to_safetensors(model, tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())
