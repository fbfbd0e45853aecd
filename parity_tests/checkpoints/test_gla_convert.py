"""GLA checkpoints: round trips through every existing format; Hugging Face export refuses `mixer: gla` by
name; `convert.py --to fla` writes flash-linear-attention's GLA layout (checked against its documented names
and config keys, on files these tests write: the package needs Triton to import) and reads it back."""

import json

import numpy as np
import pytest

import torch_model
from shared_config import CheckpointError, init_weights, load_spec, read_safetensors, save_checkpoint, save_safetensors
from shared_config.formats.fla import fla_name

from ..support.common import file_bytes_equal, load_script, make_spec, one_line_error, run_script

convert = load_script("convert").convert
GLA = dict(mixer="gla", position="none", n_kv_heads=None, n_heads=4, gla_gate_rank=5, gla_expand_v=1.25)
NAMES = {"safetensors": "m.safetensors", "torch": "m.pt", "flax": "m-flax", "fla": "m-fla"}


def gla_file(path, spec):
    save_checkpoint(path, init_weights(spec, 0), spec)
    return path


@pytest.mark.parametrize("fmt", ["torch", "flax"])
@pytest.mark.parametrize("changes",
                         [{}, dict(norm_type="dyt", norm_placement="peri", gla_output_norm="same", norm_bias=True)],
                         ids=["rms", "dyt-peri-same"])
def test_round_trip_is_bit_exact(tmp_path, fmt, changes):
    spec = make_spec(**GLA, **changes)
    src = gla_file(tmp_path / "a.safetensors", spec)
    convert(src, tmp_path / NAMES[fmt], to=fmt)
    convert(tmp_path / NAMES[fmt], tmp_path / "b.safetensors")
    file_bytes_equal(src, tmp_path / "b.safetensors")


def test_fla_round_trip_keeps_a_head_dim_the_gla_does_not_read(tmp_path):
    """head_dim is valid in a GLA spec and unread by its layer; the fla reader set it to None, so gla → fla → back gave
    head_dim 32 for 8: a spec unequal to the original (a resume or --spec check then refuses the model's own file)."""
    spec = load_spec("gla-tiny").replace(n_layers=1, head_dim=8)
    src = gla_file(tmp_path / "a.safetensors", spec)
    convert(src, tmp_path / "m-fla", to="fla")
    convert(tmp_path / "m-fla", tmp_path / "b.safetensors")
    file_bytes_equal(src, tmp_path / "b.safetensors")


def test_hf_export_refuses_gla_by_name(tmp_path):
    src = gla_file(tmp_path / "a.safetensors", load_spec("gla-tiny"))
    with pytest.raises(CheckpointError, match="no Hugging Face equivalent for .*mixer=gla"):
        convert(src, tmp_path / "m-hf", to="hf")
    assert not (tmp_path / "m-hf").exists()


FLA_LAYER0 = {  # fla/models/gla/modeling_gla.py and fla/layers/gla.py, fuse_norm=True (the default)
    "model.layers.0.attn_norm.weight": (64,), "model.layers.0.attn.q_proj.weight": (32, 64),
    "model.layers.0.attn.k_proj.weight": (32, 64), "model.layers.0.attn.v_proj.weight": (64, 64),
    "model.layers.0.attn.g_proj.weight": (64, 64), "model.layers.0.attn.gk_proj.0.weight": (16, 64),
    "model.layers.0.attn.gk_proj.1.weight": (32, 16), "model.layers.0.attn.gk_proj.1.bias": (32,),
    "model.layers.0.attn.o_proj.weight": (64, 64), "model.layers.0.attn.g_norm_swish_gate.weight": (32,),
    "model.layers.0.mlp_norm.weight": (64,), "model.layers.0.mlp.gate_proj.weight": (128, 64),
    "model.layers.0.mlp.up_proj.weight": (128, 64), "model.layers.0.mlp.down_proj.weight": (64, 128),
}


def test_fla_export_has_its_names_and_config_and_reads_back(tmp_path):
    spec = load_spec("gla-tiny")
    src = gla_file(tmp_path / "a.safetensors", spec)
    convert(src, tmp_path / "m-fla", to="fla")
    config = json.loads((tmp_path / "m-fla" / "config.json").read_text())
    assert config["model_type"] == "gla" and config["architectures"] == ["GLAForCausalLM"]
    assert {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_heads", "expand_k", "expand_v",
                                   "intermediate_size", "vocab_size", "tie_word_embeddings", "hidden_act")} == dict(
        hidden_size=64, num_hidden_layers=2, num_heads=2, expand_k=0.5, expand_v=1.0, intermediate_size=128,
        vocab_size=256, tie_word_embeddings=False, hidden_act="swish")
    stored, _ = read_safetensors(tmp_path / "m-fla" / "model.safetensors")
    shapes = {k: v.shape for k, v in stored.items()}
    assert {k: v for k, v in shapes.items() if k.startswith("model.layers.0.")} == FLA_LAYER0
    assert {k: v for k, v in shapes.items() if ".layers." not in k} == {
        "model.embeddings.weight": (256, 64), "model.norm.weight": (64,), "lm_head.weight": (256, 64)}
    convert(tmp_path / "m-fla", tmp_path / "b.safetensors")  # the directory is told apart by its model_type
    file_bytes_equal(src, tmp_path / "b.safetensors")


def test_fla_import_of_a_file_without_our_metadata(tmp_path):
    """A directory as flash-linear-attention itself saves it: no spec in the metadata, `g_norm` when fuse_norm is
    off, intermediate_size left to its hidden_ratio rule; the imported model computes what the original does."""
    spec = load_spec("gla-tiny").replace(d_ff=256)  # fla: int(64 · 4 · 2/3) = 170, rounded up to 256
    w = init_weights(spec, 1)
    (tmp_path / "m").mkdir()
    config = {"model_type": "gla", "hidden_size": 64, "num_hidden_layers": 2, "num_heads": 2, "vocab_size": 256,
              "max_position_embeddings": 128, "fuse_norm": False, "hidden_ratio": 4, "intermediate_size": None,
              "attn_mode": "chunk", "use_cache": True, "bos_token_id": 1}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    from safetensors.numpy import save_file
    save_file({fla_name(k, fuse_norm=False): v for k, v in w.items()}, tmp_path / "m" / "model.safetensors")
    convert(tmp_path / "m", tmp_path / "b.safetensors")
    got, _ = read_safetensors(tmp_path / "b.safetensors")
    assert set(got) == set(w) and all(np.array_equal(got[k], w[k]) for k in w)
    model = torch_model.from_safetensors(tmp_path / "b.safetensors")
    assert model.spec == spec


@pytest.mark.parametrize("fmt", ["fla", "hf"])
def test_a_tied_matrix_stored_twice_must_match_and_a_head_alone_is_the_embedding(tmp_path, fmt):
    """A tied checkpoint that also stores lm_head.weight (transformers may) is read when that copy is the embedding;
    fla's reader dropped any lm_head.weight of a tied model, so one that differed was silently thrown away (Hugging
    Face's refused it as an 'unexpected key'). Both now name it, and both read a true copy. A file with the tied
    matrix under lm_head.weight alone (transformers 5.x loads it) was refused as missing the embedding."""
    spec = (load_spec("gla-tiny").replace(n_layers=1) if fmt == "fla" else make_spec(n_layers=1)).replace(
        tie_embeddings=True)
    src = gla_file(tmp_path / "a.safetensors", spec)
    convert(src, tmp_path / "m", to=fmt)
    file = tmp_path / "m" / "model.safetensors"
    stored, meta = read_safetensors(file)
    embed = "model.embeddings.weight" if fmt == "fla" else "model.embed_tokens.weight"
    for head, ok in ((stored[embed].copy(), True), (stored[embed] * 2, False)):
        save_safetensors({**stored, "lm_head.weight": head}, file, meta)
        if ok:
            convert(tmp_path / "m", tmp_path / "b.safetensors", force=True)
            file_bytes_equal(src, tmp_path / "b.safetensors")
        else:
            with pytest.raises(CheckpointError, match="lm_head.weight is not a copy of " + embed):
                convert(tmp_path / "m", tmp_path / "b.safetensors", force=True)
    save_safetensors({**{n: x for n, x in stored.items() if n != embed}, "lm_head.weight": stored[embed]}, file, meta)
    convert(tmp_path / "m", tmp_path / "b.safetensors", force=True)
    file_bytes_equal(src, tmp_path / "b.safetensors")


@pytest.mark.parametrize("key,value", [("use_short_conv", True), ("feature_map", "relu"), ("clamp_min", -1.0),
                                       ("attn", {"layers": [1], "num_heads": 2, "window_size": 64}),
                                       ("attn", {"layers": [0, 1], "num_heads": 2}), ("num_kv_heads", 1)])
def test_fla_import_refuses_what_we_cannot_compute(tmp_path, key, value):
    src = gla_file(tmp_path / "a.safetensors", load_spec("gla-tiny"))
    convert(src, tmp_path / "m-fla", to="fla")
    path = tmp_path / "m-fla" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    with pytest.raises(CheckpointError, match=f"{key}=.* is not supported"):
        convert(tmp_path / "m-fla", tmp_path / "b.safetensors")


def test_fla_export_refuses_options_by_name_from_the_command_line(tmp_path):
    src = gla_file(tmp_path / "a.safetensors", load_spec("gla-tiny").replace(norm_type="dyt", gla_gate_rank=8,
                                                                             embed_norm=True))
    result = run_script("convert", src, tmp_path / "m-fla", "--to", "fla")
    one_line_error(result, "no flash-linear-attention GLA equivalent for", "norm_type=dyt", "gla_gate_rank=8",
                   "embed_norm=true", "qk_norm=false")
    assert not (tmp_path / "m-fla").exists()
