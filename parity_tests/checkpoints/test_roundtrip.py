"""Round trips are bit-exact: init -> file -> jax -> file -> torch -> file equals the original."""

import json

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open

import jax_model
import torch_model
from shared_config import init_weights, layout, load_checkpoint, save_checkpoint

from ..support.common import HYBRID, HYBRID_GQA, file_bytes_equal, make_spec

SPECS = {
    "fused": {"fused_qkv": True},
    "unfused": {"fused_qkv": False},
    "tied": {"tie_embeddings": True},
    "learned_dyt_peri": {"position": "learned", "norm_type": "dyt", "norm_placement": "peri",
                         "embed_scale": "learnable"},
    "derf_bias_qknorm": {"norm_type": "derf", "norm_bias": True, "qk_norm": True, "norm_placement": "post"},
    "bf16_params": {"param_dtype": "bfloat16", "compute_dtype": "bfloat16"},
    "hybrid": HYBRID,  # attention layers among GLA layers, each saved and loaded through its own tensors
    "hybrid_gqa": HYBRID_GQA,  # ... with grouped keys in the attention layers
}


@pytest.mark.parametrize("name", SPECS)
def test_init_file_jax_file_torch_file(tmp_path, name):
    spec = make_spec(**SPECS[name])
    original = tmp_path / "init.safetensors"
    save_checkpoint(original, init_weights(spec, seed=3), spec)
    jax_model.to_safetensors(jax_model.from_safetensors(original), tmp_path / "jax.safetensors")
    torch_model.to_safetensors(torch_model.from_safetensors(tmp_path / "jax.safetensors"),
                               tmp_path / "torch.safetensors")
    jax_model.to_safetensors(jax_model.from_safetensors(tmp_path / "torch.safetensors"), tmp_path / "jax2.safetensors")
    for out in ("jax", "torch", "jax2"):
        file_bytes_equal(original, tmp_path / f"{out}.safetensors")


@pytest.mark.parametrize("name", ["fused", "tied", "learned_dyt_peri"])
def test_native_init_saves_and_reloads_in_the_other_twin(tmp_path, name):
    spec = make_spec(**SPECS[name])
    jax_model.to_safetensors(jax_model.Transformer(spec, rngs=nnx.Rngs(5)), tmp_path / "a.safetensors")
    torch_model.to_safetensors(torch_model.from_safetensors(tmp_path / "a.safetensors"), tmp_path / "b.safetensors")
    file_bytes_equal(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    torch_model.to_safetensors(torch_model.Transformer(spec, generator=torch.Generator().manual_seed(5)),
                               tmp_path / "c.safetensors")
    jax_model.to_safetensors(jax_model.from_safetensors(tmp_path / "c.safetensors"), tmp_path / "d.safetensors")
    file_bytes_equal(tmp_path / "c.safetensors", tmp_path / "d.safetensors")


def test_file_format(tmp_path):
    spec = make_spec(tie_embeddings=True, param_dtype="bfloat16")
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, init_weights(spec, 0), spec)
    with safe_open(path, "np") as f:
        assert json.loads(f.metadata()["spec"]) == spec.to_dict()
        assert list(f.keys()) == sorted(t.name for t in layout(spec))  # safetensors sorts its keys
        assert "lm_head.weight" not in f.keys()  # a tied model never duplicates the embedding
    weights, loaded = load_checkpoint(path)
    assert loaded == spec and weights["model.embed_tokens.weight"].dtype.name == "bfloat16"


def test_same_seed_same_weights_and_tensors_independent_of_other_options():
    a = init_weights(make_spec(), 7)
    b = init_weights(make_spec(norm_type="dyt", qk_norm=True), 7)
    assert all(np.array_equal(a[k], b[k]) for k in a if k in b and "norm" not in k)
    assert not np.array_equal(init_weights(make_spec(), 8)["lm_head.weight"], a["lm_head.weight"])
