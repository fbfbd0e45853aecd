"""Key sets and shapes: both twins' parameters map one-to-one onto the canonical layout table."""

import numpy as np
import pytest
import torch
from flax import nnx

import jax_model
import torch_model
from shared_config import fuse_qkv, group_names, init_weights, layout, model_layout, split_qkv
from jax_model.weights import flat_params as jax_params
from torch_model.weights import flat_params as torch_params

from .common import make_spec

SPECS = {
    "base": {},
    "unfused": {"fused_qkv": False},
    "tied_learned": {"tie_embeddings": True, "position": "learned"},
    "dyt_peri_bias": {"norm_type": "dyt", "norm_placement": "peri", "norm_bias": True, "embed_scale": "learnable"},
    "derf_post_qknorm": {"norm_type": "derf", "norm_placement": "post", "qk_norm": True},
    "layernorm_gelu": {"norm_type": "layernorm", "mlp": "gelu", "head_dim": 10},
}


@pytest.mark.parametrize("name", SPECS)
def test_both_twins_hold_exactly_the_model_layout(name):
    spec = make_spec(**SPECS[name])
    table = {t.name: t for t in model_layout(spec)}
    torch_shapes = {k: tuple(v.shape) for k, v in torch_params(torch_model.Transformer(spec)).items()}
    assert torch_shapes == {n: t.shape for n, t in table.items()}
    assert set(torch_model.Transformer(spec).state_dict()) == set(table)  # no buffers beside the table
    jax_shapes = {k: tuple(v.shape) for k, v in jax_params(jax_model.Transformer(spec, rngs=nnx.Rngs(0))).items()}
    assert jax_shapes == {t.jax_name: t.jax_shape for t in table.values()}


@pytest.mark.parametrize("name", SPECS)
def test_canonical_names_follow_hugging_face_llama(name):
    spec = make_spec(**SPECS[name])
    names = [t.name for t in layout(spec)]
    assert names[0] == "model.embed_tokens.weight"
    assert ("lm_head.weight" in names) != spec.tie_embeddings
    assert all(n.startswith(("model.", "lm_head.")) for n in names)
    assert len(names) == len(set(names))
    q = next(t for t in layout(spec) if t.name == "model.layers.0.self_attn.q_proj.weight")
    assert q.shape == (spec.H * spec.E, spec.D)  # Linear weights [out, in]
    assert not any("qkv_proj" in n for n in names)  # the file never holds a fused tensor


def test_norm_slots_hold_the_parameters_of_their_type():
    for norm_type, leaves in [("rms", {"weight"}), ("layernorm", {"weight"}), ("dyt", {"alpha", "weight"}),
                              ("derf", {"alpha", "shift", "weight"})]:
        for bias in (False, True):
            spec = make_spec(norm_type=norm_type, norm_bias=bias)
            got = {t.name.rsplit(".", 1)[1] for t in layout(spec) if t.name.startswith("model.norm.")}
            assert got == leaves | ({"bias"} if bias else set())
    peri = {t.name for t in layout(make_spec(norm_placement="peri"))}
    assert "model.layers.1.attn_output_norm.weight" in peri and "model.layers.1.mlp_output_norm.weight" in peri
    post = {t.name for t in layout(make_spec(norm_placement="post"))}
    assert not any(n.startswith("model.norm") for n in post)


def test_fuse_and_split_are_inverse_and_order_rows_q_k_v():
    spec = make_spec()
    w = init_weights(spec, 0)
    fused = fuse_qkv(w, spec)
    qkv = fused["model.layers.1.self_attn.qkv_proj.weight"]
    assert qkv.shape == ((spec.H + 2 * spec.K) * spec.E, spec.D)
    np.testing.assert_array_equal(qkv[: spec.H * spec.E], w["model.layers.1.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(qkv[-spec.K * spec.E :], w["model.layers.1.self_attn.v_proj.weight"])
    back = split_qkv(fused, spec)
    assert set(back) == set(w) and all(np.array_equal(back[k], w[k]) for k in w)
    t = fuse_qkv({k: torch.as_tensor(v) for k, v in w.items()}, spec, torch.cat)
    np.testing.assert_array_equal(t["model.layers.0.self_attn.qkv_proj.weight"].numpy(), fused["model.layers.0.self_attn.qkv_proj.weight"])


def test_group_names_folds_layers():
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(16)] + ["lm_head.weight"]
    assert group_names(names) == "model.layers.{0..15}.mlp.up_proj.weight, lm_head.weight"
    assert group_names(["model.layers.3.a", "model.layers.7.a"]) == "model.layers.{3,7}.a"
    assert group_names(["model.layers.3.a"]) == "model.layers.3.a"
