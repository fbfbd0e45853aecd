"""Hybrid stack checkpoints (gla_attention_every): bit-exact round trips through the torch, Orbax and fla formats;
a .pt of the twins' fused in-memory layout read under a spec that is not fused; flash-linear-attention's GLAConfig
`attn` layers on export and import (its attention tensors `model.layers.N.attn.{q,k,v,o}_proj`, checked against
fla/models/gla/modeling_gla.py and fla/layers/attn.py), and what neither fla nor Hugging Face computes refused by
name."""

import json

import numpy as np
import pytest

from shared_config import CheckpointError, init_weights, load_spec, read_safetensors, save_checkpoint
from shared_config.formats import read_checkpoint
from shared_config.formats.fla import fla_name
from shared_config.formats.torch_pt import save_state_dict_file

from ..support.common import (HYBRID, HYBRID_GQA, file_bytes_equal, load_script, make_spec, one_line_error, quick_first,
                              run_script)

convert = load_script("convert").convert
NAMES = {"torch": "m.pt", "flax": "m-flax", "fla": "m-fla"}
# fla's exports need its block (pre RMSNorm, SwiGLU) and gate (rank 16, normalizer 16) and RoPE attention layers
FLA_HYBRID = load_spec("gla-tiny").replace(n_layers=4, gla_attention_every=2, position="rope", rope_theta=5e5)


def saved(path, spec, seed=0):
    save_checkpoint(path, init_weights(spec, seed), spec)
    return path


@pytest.mark.parametrize("fmt, spec", quick_first([  # the quick tier: torch and fla (test_convert.py runs flax)
    ("torch", make_spec(**HYBRID)), ("fla", FLA_HYBRID), ("flax", make_spec(**HYBRID)),
    ("torch", make_spec(**{**HYBRID, "position": "none", "fused_qkv": False, "norm_type": "dyt"})),
    # grouped keys in the attention layers: fla's attn.num_kv_heads, the fused [(H + 2K)·E, D] q/k/v in .pt and Orbax
    ("fla", FLA_HYBRID.replace(n_heads=4, n_kv_heads=2)), ("torch", make_spec(**HYBRID_GQA)),
    ("flax", make_spec(**HYBRID_GQA)),
], 2, multi=True), ids=["torch", "fla", "flax", "torch-nope-unfused-dyt", "fla-gqa", "torch-gqa", "flax-gqa"])
def test_round_trip_is_bit_exact(tmp_path, fmt, spec):
    src = saved(tmp_path / "a.safetensors", spec)
    convert(src, tmp_path / NAMES[fmt], to=fmt)
    convert(tmp_path / NAMES[fmt], tmp_path / "b.safetensors")
    file_bytes_equal(src, tmp_path / "b.safetensors")


def test_a_fused_state_dict_reads_under_a_spec_that_is_not_fused(tmp_path):
    """A .pt holds the twins' in-memory layout: q/k/v fused in the attention layers only (GLA layers keep q_proj
    either way, so q_proj alone does not say the file is unfused)."""
    spec = make_spec(**HYBRID)
    w = init_weights(spec, 0)
    save_state_dict_file(tmp_path / "m.pt", w, spec)
    got, got_spec = read_checkpoint(tmp_path / "m.pt", spec.replace(fused_qkv=False))
    assert not got_spec.fused_qkv and set(got) == set(w) and all(np.array_equal(got[k], w[k]) for k in w)


def test_fla_export_writes_the_attn_layers_and_their_names(tmp_path):
    convert(saved(tmp_path / "a.safetensors", FLA_HYBRID), tmp_path / "m-fla", to="fla")
    config = json.loads((tmp_path / "m-fla" / "config.json").read_text())
    assert config["attn"] == {"layers": [1, 3], "num_heads": 2, "num_kv_heads": 2, "qkv_bias": False,
                              "window_size": None, "rope_theta": 5e5, "max_position_embeddings": 128}
    stored, _ = read_safetensors(tmp_path / "m-fla" / "model.safetensors")
    layer = {k.removeprefix("model.layers.1."): v.shape for k, v in stored.items() if k.startswith("model.layers.1.")}
    assert layer == {  # fla.layers.attn.Attention: q/o [D, D], k/v [num_kv_heads · D/H, D], no bias, no norms
        "attn_norm.weight": (64,), "attn.q_proj.weight": (64, 64), "attn.k_proj.weight": (64, 64),
        "attn.v_proj.weight": (64, 64), "attn.o_proj.weight": (64, 64), "mlp_norm.weight": (64,),
        "mlp.gate_proj.weight": (128, 64), "mlp.up_proj.weight": (128, 64), "mlp.down_proj.weight": (64, 128)}
    assert "model.layers.0.attn.gk_proj.0.weight" in stored  # GLA in the others


def test_fla_export_and_import_carry_grouped_keys_as_attn_num_kv_heads(tmp_path):
    """n_kv_heads of a hybrid is fla's `attn.num_kv_heads` (fla.layers.attn.Attention: k/v [num_kv_heads · D/H, D]);
    the GLA layers' own `num_kv_heads` stays None (as many as heads)."""
    spec = FLA_HYBRID.replace(n_heads=4, n_kv_heads=1)
    convert(saved(tmp_path / "a.safetensors", spec), tmp_path / "m-fla", to="fla")
    config = json.loads((tmp_path / "m-fla" / "config.json").read_text())
    assert config["attn"]["num_heads"] == 4 and config["attn"]["num_kv_heads"] == 1 and config["num_kv_heads"] is None
    stored, _ = read_safetensors(tmp_path / "m-fla" / "model.safetensors")
    assert stored["model.layers.1.attn.k_proj.weight"].shape == stored["model.layers.1.attn.v_proj.weight"].shape == (
        16, 64)
    assert stored["model.layers.0.attn.k_proj.weight"].shape == (32, 64)  # GLA: d_k, whatever K
    # as fla saves it (no spec in the metadata): attn.num_kv_heads alone gives n_kv_heads
    spec = spec.replace(rope_theta=10000.0)
    w = init_weights(spec, 1)
    (tmp_path / "m").mkdir()
    config = {"model_type": "gla", "hidden_size": 64, "num_hidden_layers": 4, "num_heads": 4, "vocab_size": 256,
              "max_position_embeddings": 128, "intermediate_size": 128,
              "attn": {"layers": [1, 3], "num_heads": 4, "num_kv_heads": 1}}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    from safetensors.numpy import save_file
    save_file({fla_name(k): v for k, v in w.items()}, tmp_path / "m" / "model.safetensors")
    convert(tmp_path / "m", tmp_path / "b.safetensors")
    got, meta = read_safetensors(tmp_path / "b.safetensors")
    assert set(got) == set(w) and all(np.array_equal(got[k], w[k]) for k in w)
    assert json.loads(meta["spec"]) == spec.to_dict() and json.loads(meta["spec"])["n_kv_heads"] == 1


def test_fla_import_of_a_hybrid_without_our_metadata(tmp_path):
    """A directory as fla saves it: `attn` with its defaults left out (num_kv_heads, qkv_bias, window_size, rope_theta
    10000), no spec in the metadata."""
    spec = FLA_HYBRID.replace(rope_theta=10000.0)
    w = init_weights(spec, 1)
    (tmp_path / "m").mkdir()
    config = {"model_type": "gla", "hidden_size": 64, "num_hidden_layers": 4, "num_heads": 2, "vocab_size": 256,
              "max_position_embeddings": 128, "intermediate_size": 128, "attn": {"layers": [1, 3], "num_heads": 2}}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    from safetensors.numpy import save_file
    save_file({fla_name(k): v for k, v in w.items()}, tmp_path / "m" / "model.safetensors")
    convert(tmp_path / "m", tmp_path / "b.safetensors")
    got, meta = read_safetensors(tmp_path / "b.safetensors")
    assert set(got) == set(w) and all(np.array_equal(got[k], w[k]) for k in w)
    assert json.loads(meta["spec"]) == spec.to_dict()


@pytest.mark.parametrize("attn, why", quick_first([
    ({"layers": [0, 2], "num_heads": 2}, "its layers must be every k-th layer, k-1, 2k-1, ..."),
    ({"layers": [1], "num_heads": 2}, "its layers must be every k-th layer"),  # layer 3 left GLA
    ({"layers": [1, 3], "num_heads": 2, "num_kv_heads": 3}, "num_kv_heads must divide num_heads=2"),
    ({"layers": [1, 3], "num_heads": 2, "qkv_bias": True}, "qkv_bias must be false"),
    ({"layers": [1, 3], "num_heads": 1}, "num_heads must be 2"),
    ({"layers": "1,3", "num_heads": 2}, "a hybrid's attn must hold `layers`"),
], 3, multi=True))
def test_fla_import_refuses_attn_layers_we_cannot_compute(tmp_path, attn, why):
    convert(saved(tmp_path / "a.safetensors", FLA_HYBRID), tmp_path / "m-fla", to="fla")
    path = tmp_path / "m-fla" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "attn": attn}))
    with pytest.raises(CheckpointError, match=r"attn=.* is not supported \(.*" + why.replace("(", r"\(")[:40]):
        convert(tmp_path / "m-fla", tmp_path / "b.safetensors")


def test_fla_import_reads_attn_values_as_fla_types_them(tmp_path):
    """`attn` keys are typed as the config's own are (config_value): num_kv_heads null is fla's Attention's "as many
    kv heads as heads" (it was refused as grouped keys), and a float head count, a bool for an integer or a number
    for qkv_bias (2.0 == 2 and 0 == False passed the comparison) are refused naming the key."""
    convert(saved(tmp_path / "a.safetensors", FLA_HYBRID), tmp_path / "m-fla", to="fla")
    path = tmp_path / "m-fla" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "attn": {**config["attn"], "num_kv_heads": None}}))
    convert(tmp_path / "m-fla", tmp_path / "b.safetensors")
    file_bytes_equal(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    for key, value, kind in (("num_heads", 2.0, "an integer"), ("num_kv_heads", True, "an integer or null"),
                             ("qkv_bias", 0, "true or false"), ("rope_theta", None, "a finite number")):
        path.write_text(json.dumps({**config, "attn": {**config["attn"], key: value}}))
        with pytest.raises(CheckpointError, match=rf"config.json: attn: {key} must be {kind}, got "):
            convert(tmp_path / "m-fla", tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()


def test_fla_import_counts_the_attn_layers_of_a_config_claiming_any_depth():
    """A config.json claiming 10**30 layers (past 2**63) with `attn` layers was an OverflowError's traceback: the
    layers were compared with a range whose length Python cannot take; they are counted (L // k) instead."""
    from shared_config.formats.fla import hybrid_fields

    for layers in (10**30, 10**400):
        with pytest.raises(CheckpointError, match=r"its layers must be every k-th layer"):
            hybrid_fields({"layers": [1, 3]}, {"n_layers": layers, "n_heads": 2}, "config.json")
    assert hybrid_fields({"layers": [1, 3]}, {"n_layers": 5, "n_heads": 2}, "c")["gla_attention_every"] == 2


@pytest.mark.parametrize("changes, named", quick_first([
    (dict(position="none"), ["position=none", "fla's attention layers always rotate q/k"]),  # NoPE attention layers
    (dict(head_dim=16), ["head_dim=16", "head_dim=32"]),  # fla's attention: hidden_size // num_heads per head
    (dict(rope_scaling="llama3"), ["rope_scaling=llama3"]),
], 1, multi=True))
def test_fla_export_refuses_a_hybrid_it_cannot_compute_by_name(tmp_path, changes, named):
    src = saved(tmp_path / "a.safetensors", FLA_HYBRID.replace(**changes))
    one_line_error(run_script("convert", src, tmp_path / "m-fla", "--to", "fla"),
                   "no flash-linear-attention GLA equivalent for", *named)
    assert not (tmp_path / "m-fla").exists()


def test_hf_export_refuses_a_hybrid_by_name(tmp_path):
    src = saved(tmp_path / "a.safetensors", make_spec(**HYBRID))
    with pytest.raises(CheckpointError, match="no Hugging Face equivalent for .*mixer=gla"):
        convert(src, tmp_path / "m-hf", to="hf")
    assert not (tmp_path / "m-hf").exists()
