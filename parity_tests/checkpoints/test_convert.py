"""Conversions: every format to every other through one path, bit-exact, the spec kept, a bf16 cast rounding once."""

import itertools

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from flax import nnx
from safetensors import safe_open

import jax_model
import torch_model
from shared_config import CheckpointError, init_weights, load_spec, read_safetensors, save_checkpoint
from shared_config.cli import UsageError
from shared_config.formats.hf import unsupported_options
from shared_config.spec import CHOICES

from ..support.common import HYBRID, MIXERS, file_bytes_equal, load_script, make_spec, parity_weights, run_script

convert = load_script("convert").convert

# Where each format lives in a test directory; flax and hf are directories, told apart by --to.
NAMES = {"safetensors": "m.safetensors", "torch": "m.pt", "flax": "m-flax", "hf": "m-hf"}

SPECS = {
    "fused_gqa": {},
    "tied_unfused_qknorm": {"tie_embeddings": True, "fused_qkv": False, "qk_norm": True},
    "bf16_llama3": {"param_dtype": "bfloat16", "rope_scaling": "llama3", "rope_original_max_seq_len": 64},
    "dyt_peri_learned_bias": {"norm_type": "dyt", "norm_placement": "peri", "position": "learned", "norm_bias": True,
                              "embed_scale": "learnable"},
    "derf_post_gelu": {"norm_type": "derf", "norm_placement": "post", "mlp": "gelu", "tie_embeddings": True},
    # the norm placements: unused slots absent, v_norm present, the spec's resolved residual_scaling kept
    "dyt_deepnorm_xavier": {"norm_type": "dyt", "norm_placement": "deepnorm", "init_scheme": "xavier_normal"},
    "rms_hybrid_unfused": {"norm_placement": "hybrid", "fused_qkv": False},
    "derf_hybrid_star_bias": {"norm_type": "derf", "norm_placement": "hybrid_star", "norm_bias": True},
    "layernorm_pre_post_tied": {"norm_type": "layernorm", "norm_placement": "pre_post", "tie_embeddings": True},
    "dyt_peri_embed_norm": {"norm_type": "dyt", "norm_placement": "peri", "embed_norm": True, "norm_bias": True},
    # every other token mixer (Hugging Face export refuses them: TRIPS leaves hf out)
    "gla_dyt_peri_same": {**MIXERS["gla"], "norm_type": "dyt", "norm_placement": "peri", "gla_output_norm": "same"},
    # a hybrid stack: attention layers fused in the .pt and Orbax files, GLA layers not (Hugging Face refuses it)
    "hybrid_fused": HYBRID,
}


def canonical_file(path, spec, seed=0):
    save_checkpoint(path, init_weights(spec, seed), spec)
    return path


# Hugging Face only for the specs it can represent (the refusal is tested in test_hf.py).
def test_the_specs_hold_every_norm_type_and_placement():
    """A norm type, placement or mixer added to the spec's CHOICES round-trips here only once a spec uses it."""
    specs = [make_spec(**changes) for changes in SPECS.values()]
    for field in ("norm_type", "norm_placement", "mixer"):
        assert {getattr(spec, field) for spec in specs} == set(CHOICES[field]), field


TRIPS = [
    (fmt, name) for fmt in ("torch", "flax", "hf") for name in SPECS
    if fmt != "hf" or not unsupported_options(make_spec(**SPECS[name]))
]


@pytest.mark.parametrize("fmt, name", TRIPS)
def test_round_trip_is_bit_exact_and_keeps_the_spec(tmp_path, fmt, name):
    spec = make_spec(**SPECS[name])
    src = canonical_file(tmp_path / "a.safetensors", spec)
    convert(src, tmp_path / NAMES[fmt], to=fmt)
    convert(tmp_path / NAMES[fmt], tmp_path / "b.safetensors")
    file_bytes_equal(src, tmp_path / "b.safetensors")


def test_every_format_converts_to_every_other(tmp_path):
    spec = make_spec(tie_embeddings=True, fused_qkv=True)
    (tmp_path / "src").mkdir()
    src = canonical_file(tmp_path / "src" / NAMES["safetensors"], spec)
    for fmt in ("torch", "flax", "hf"):
        convert(src, tmp_path / "src" / NAMES[fmt], to=fmt)
    for a, b in itertools.permutations(NAMES, 2):
        out = tmp_path / f"{a}-to-{b}"
        out.mkdir()
        convert(tmp_path / "src" / NAMES[a], out / NAMES[b], to=b)
        convert(out / NAMES[b], out / "back.safetensors")
        file_bytes_equal(src, out / "back.safetensors")


def test_a_tied_embedding_is_stored_once_in_every_format(tmp_path):
    spec = make_spec(tie_embeddings=True)
    src = canonical_file(tmp_path / "m.safetensors", spec)
    for fmt in ("torch", "flax", "hf"):
        convert(src, tmp_path / NAMES[fmt], to=fmt)
    assert "lm_head.weight" not in torch.load(tmp_path / "m.pt", weights_only=True)["state_dict"]
    with ocp.StandardCheckpointer() as checkpointer:
        assert "lm_head" not in checkpointer.restore((tmp_path / "m-flax" / "state").absolute())
    with safe_open(tmp_path / "m-hf" / "model.safetensors", "np") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()


def test_files_written_by_the_twins_themselves_convert(tmp_path):
    """A bare `torch.save(model.state_dict())` and an Orbax save of the NNX state's pure dict, with --spec."""
    spec = make_spec()
    weights = parity_weights(spec)
    src = tmp_path / "src.safetensors"
    save_checkpoint(src, weights, spec)
    torch.save(torch_model.from_weights(weights, spec).state_dict(), tmp_path / "bare.pt")
    with ocp.StandardCheckpointer() as checkpointer:
        state = nnx.to_pure_dict(nnx.state(jax_model.from_weights(weights, spec), nnx.Param))
        checkpointer.save((tmp_path / "bare-flax" / "state").absolute(), state)
    for bare in ("bare.pt", "bare-flax"):
        with pytest.raises(CheckpointError, match="carries no spec"):
            convert(tmp_path / bare, tmp_path / f"{bare}.safetensors")
        convert(tmp_path / bare, tmp_path / f"{bare}.safetensors", spec=spec)
        file_bytes_equal(src, tmp_path / f"{bare}.safetensors")


def test_outputs_load_in_the_twins(tmp_path):
    spec = make_spec(qk_norm=True)
    weights = parity_weights(spec)
    src = tmp_path / "src.safetensors"
    save_checkpoint(src, weights, spec)
    convert(src, tmp_path / "m.pt")
    convert(src, tmp_path / "m-flax", to="flax")
    model = torch_model.Transformer(spec)
    model.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True)["state_dict"])  # the twin's own layout
    restored, loaded_spec = jax_model.load_orbax(tmp_path / "m-flax")
    assert loaded_spec == spec
    for got in (restored, torch_model.get_weights(model)):
        assert all(np.array_equal(got[k], w) for k, w in weights.items())


def test_bfloat16_cast_rounds_once(tmp_path):
    spec = make_spec()
    src = canonical_file(tmp_path / "f32.safetensors", spec)
    # f32 -> bf16 (torch file) -> f32 (flax) -> bf16 (canonical): the same bytes as one cast
    convert(src, tmp_path / "bf16.pt", dtype="bfloat16")
    convert(tmp_path / "bf16.pt", tmp_path / "f32-flax", to="flax", dtype="float32")
    convert(tmp_path / "f32-flax", tmp_path / "bf16-again.safetensors", dtype="bfloat16")
    weights, meta = read_safetensors(tmp_path / "bf16-again.safetensors")
    assert '"param_dtype": "bfloat16"' in meta["spec"]
    for name, w in init_weights(spec, 0).items():
        once = torch.from_numpy(w).to(torch.bfloat16).view(torch.int16).numpy()  # torch's round-to-nearest-even
        assert weights[name].dtype == ml_dtypes.bfloat16 and np.array_equal(weights[name].view(np.int16), once), name


def test_existing_destination_needs_force_and_is_replaced_whole(tmp_path):
    spec = make_spec()
    src = canonical_file(tmp_path / "a.safetensors", spec)
    (tmp_path / "m.pt").write_bytes(b"old")
    with pytest.raises(UsageError, match="m.pt exists; pass --force"):
        convert(src, tmp_path / "m.pt")
    assert (tmp_path / "m.pt").read_bytes() == b"old"
    convert(src, tmp_path / "m.pt", force=True)
    (tmp_path / "m-hf").mkdir()
    with pytest.raises(UsageError, match="m-hf exists; pass --force"):
        convert(src, tmp_path / "m-hf", to="hf")
    with pytest.raises(UsageError, match="is a directory, but a torch checkpoint is a file"):
        convert(src, tmp_path / "m-hf", to="torch", force=True)
    convert(src, tmp_path / "m-hf", to="hf", force=True)  # an empty directory holds nothing to lose
    (tmp_path / "m-hf" / "stale.txt").write_text("from before")  # a checkpoint directory that gathered a stale file
    convert(src, tmp_path / "m-hf", to="hf", force=True)
    assert sorted(p.name for p in (tmp_path / "m-hf").iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "m-hf", "m.pt"]  # no temp left


@pytest.mark.parametrize("to", ["hf", "fla", "flax"])
def test_force_never_replaces_a_directory_convert_did_not_write(tmp_path, to):
    spec = load_spec("gla-tiny") if to == "fla" else make_spec()
    src = canonical_file(tmp_path / "a.safetensors", spec)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "canary.txt").write_text("keep me")
    with pytest.raises(UsageError, match=r"notes: --force replaces only a checkpoint directory convert.py writes "
                                         r"\(config.json or state\), and this one holds neither"):
        convert(src, tmp_path / "notes", to=to, force=True)
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["canary.txt"]
    assert (tmp_path / "notes" / "canary.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()  # an empty directory holds nothing to lose
    convert(src, tmp_path / "empty", to=to, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "empty", "notes"]


def test_a_dst_link_into_a_missing_directory_is_refused_as_bad_input(tmp_path):
    """DST a link to a file in a directory that does not exist was read, then failed as 'cannot write: No such file
    or directory', exit 3 (the environment's code), naming DST's own directory, which exists."""
    src = canonical_file(tmp_path / "a.safetensors", make_spec())
    (tmp_path / "m.pt").symlink_to(tmp_path / "gone" / "m.pt")
    with pytest.raises(UsageError, match=r"gone: no such directory \(where the link .*m.pt leads\)"):
        convert(src, tmp_path / "m.pt")
    with pytest.raises(UsageError, match=r"a.safetensors: not a directory$"):  # it said "no such directory"
        convert(src, tmp_path / "a.safetensors" / "m.pt")
    (tmp_path / "gone").mkdir()  # the link is written through, to its target
    convert(src, tmp_path / "m.pt")
    assert (tmp_path / "m.pt").is_symlink() and (tmp_path / "gone" / "m.pt").is_file()


def test_a_directory_dst_holds_the_tokenizer_beside_the_source(tmp_path):
    """A run's checkpoint (or a Hugging Face directory) keeps its tokenizer.json, where generate.py --prompt reads it;
    converted to a directory, the tokenizer stayed behind and generate.py encoded the prompt as UTF-8 bytes, other ids
    than the model was trained on, without a word. A file DST gets nothing beside it (that place is the user's)."""
    src = tmp_path / "step"
    src.mkdir()
    canonical_file(src / "model.safetensors", make_spec())
    (src / "tokenizer.json").write_text('{"a tokenizer": 1}')
    for dst, to in ((tmp_path / "hf", "hf"), (tmp_path / "flax", "flax"), (tmp_path / "hf", "hf")):  # hf: in place
        convert(src, dst, to=to, force=True)
        assert (dst / "tokenizer.json").read_text() == '{"a tokenizer": 1}', to
        src = dst
    (tmp_path / "out").mkdir()
    convert(src, tmp_path / "out" / "m.pt")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.pt"]
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.json").symlink_to(tmp_path / "gone.json")  # refused as generate.py refuses it, not left out
    with pytest.raises(CheckpointError, match="tokenizer.json: not a regular file"):
        convert(src, tmp_path / "flax", to="flax", force=True)


def test_target_format_from_to_extension_or_existing_directory(tmp_path):
    src = canonical_file(tmp_path / "a.safetensors", make_spec())
    assert convert(src, tmp_path / "b.pth") == ("safetensors", "torch")
    assert convert(tmp_path / "b.pth", tmp_path / "c", to="hf") == ("torch", "hf")
    assert convert(src, tmp_path / "c", force=True) == ("safetensors", "hf")  # an existing HF directory
    with pytest.raises(UsageError, match="cannot tell the format from the name; pass --to"):
        convert(src, tmp_path / "d")


@pytest.mark.slow
def test_cli_converts_and_says_what_it_did(tmp_path):
    src = canonical_file(tmp_path / "a.safetensors", make_spec())
    result = run_script("convert", src, tmp_path / "b.pt", "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{src} (safetensors) -> {tmp_path / 'b.pt'} (torch)"
    assert torch.load(tmp_path / "b.pt", weights_only=True)["state_dict"]["model.norm.weight"].dtype == torch.bfloat16


def test_cli_reads_the_bfloat16_files_it_writes(tmp_path):
    """safetensors' numpy reader knows BF16 only once ml_dtypes is imported: in a fresh process (the command line,
    nothing else loaded) every read of a bf16 canonical file or Hugging Face directory was a traceback ending in
    "TypeError: data type 'bfloat16' not understood", exit 1; in-process tests had ml_dtypes loaded already."""
    spec = make_spec(n_layers=1, param_dtype="bfloat16")
    src = canonical_file(tmp_path / "a.safetensors", spec)
    convert(src, tmp_path / "hf", to="hf")
    for source in (src, tmp_path / "hf"):
        dst = tmp_path / f"{source.stem}-back.safetensors"
        result = run_script("convert", source, dst)  # safetensors -> safetensors: no framework imported
        assert result.returncode == 0, result.stderr
        file_bytes_equal(src, dst)

