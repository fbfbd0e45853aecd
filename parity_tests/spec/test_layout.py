"""Key sets and shapes: both twins' parameters map one-to-one onto the canonical layout table."""

import numpy as np
import pytest
import torch
from flax import nnx

import jax_model
import torch_model
from shared_config import fuse_qkv, group_names, init_weights, layout, model_layout, split_qkv
from jax_model.weights import flat_params as jax_params
from shared_config.spec import CHOICES
from torch_model.weights import flat_params as torch_params

from ..support.common import HYBRID, HYBRID_GQA, MIXERS, make_spec

SPECS = {
    "base": {},
    "unfused": {"fused_qkv": False},
    "tied_learned": {"tie_embeddings": True, "position": "learned"},
    "dyt_peri_bias": {"norm_type": "dyt", "norm_placement": "peri", "norm_bias": True, "embed_scale": "learnable"},
    "derf_post_qknorm": {"norm_type": "derf", "norm_placement": "post", "qk_norm": True},
    "layernorm_gelu": {"norm_type": "layernorm", "mlp": "gelu", "head_dim": 10},
    "dyt_deepnorm_unfused": {"norm_type": "dyt", "norm_placement": "deepnorm", "fused_qkv": False},
    "derf_hybrid_star": {"norm_type": "derf", "norm_placement": "hybrid_star", "norm_bias": True},
    "layernorm_pre_post": {"norm_type": "layernorm", "norm_placement": "pre_post"},
    "derf_peri_embed_norm": {"norm_type": "derf", "norm_placement": "peri", "embed_norm": True, "norm_bias": True},
    # every other token mixer, its tensors under the block's self_attn slot
    "gla_same": {**MIXERS["gla"], "norm_type": "derf", "gla_output_norm": "same", "norm_bias": True},
    # hybrid stacks: attention's tensors (fused q/k/v in memory, or not) in every k-th layer, GLA's in the others
    "hybrid_fused": HYBRID,
    "hybrid_unfused_nope": {**HYBRID, "n_layers": 4, "position": "none", "fused_qkv": False},
    "hybrid_gqa": HYBRID_GQA,  # k/v [K·E, D] in the attention layer, fused [(H + 2K)·E, D]
}


def test_the_specs_hold_every_mixer():
    """A mixer added to the spec's CHOICES has both twins' key sets checked here only once a spec uses it."""
    assert {make_spec(**changes).mixer for changes in SPECS.values()} == set(CHOICES["mixer"])


def test_the_specs_hold_every_norm_type():
    """So does a norm type: a twin holding a tensor the layout lacks (or lacking one) passed otherwise."""
    assert {make_spec(**changes).norm_type for changes in SPECS.values()} == set(CHOICES["norm_type"])


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
    if spec.mixer == "attention":
        q = next(t for t in layout(spec) if t.name == "model.layers.0.self_attn.q_proj.weight")
        assert q.shape == (spec.H * spec.E, spec.D)  # Linear weights [out, in]
    assert not any("qkv_proj" in n for n in names)  # the file never holds a fused tensor


def test_norm_slots_hold_the_parameters_of_their_type():
    leaves_of = {"rms": {"weight"}, "layernorm": {"weight"}, "dyt": {"alpha", "weight"},
                 "derf": {"alpha", "shift", "weight"}}
    assert set(leaves_of) == set(CHOICES["norm_type"]), "list the canonical leaves of every norm type here"
    for norm_type, leaves in leaves_of.items():
        for bias in (False, True):
            spec = make_spec(norm_type=norm_type, norm_bias=bias)
            got = {t.name.rsplit(".", 1)[1] for t in layout(spec) if t.name.startswith("model.norm.")}
            assert got == leaves | ({"bias"} if bias else set())
    peri = {t.name for t in layout(make_spec(norm_placement="peri"))}
    assert "model.layers.1.attn_output_norm.weight" in peri and "model.layers.1.mlp_output_norm.weight" in peri
    post = {t.name for t in layout(make_spec(norm_placement="post"))}
    assert not any(n.startswith("model.norm") for n in post)


def block_names(spec, i):
    return {t.name.split(f"model.layers.{i}.", 1)[1] for t in layout(spec) if t.name.startswith(f"model.layers.{i}.")}


@pytest.mark.parametrize("norm_type", ["rms", "dyt"])
def test_placements_list_exactly_the_slots_they_use(norm_type):
    """No dead parameters: a slot a placement leaves unused is not in the layout; HybridNorm's Q/K/V norms are
    RMSNorm weights [head_dim] whatever norm_type says."""
    mats = {f"self_attn.{n}_proj.weight" for n in "qkvo"} | {f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
    slot = lambda s: {f"{s}.weight"} | ({f"{s}.alpha"} if norm_type == "dyt" else set())  # noqa: E731
    qkv = {f"self_attn.{n}_norm.weight" for n in "qkv"}
    n1, n2 = slot("input_layernorm"), slot("post_attention_layernorm")
    expect = {  # placement: (block 0, block 1, final norm)
        "pre": (n1 | n2, n1 | n2, True),
        "pre_post": (n1 | n2, n1 | n2, True),
        "deepnorm": (n1 | n2, n1 | n2, False),
        "hybrid": (qkv | n2, qkv | n2, True),
        "hybrid_star": (n1 | qkv | n2, qkv | n2, True),
    }
    for placement, (first, other, final) in expect.items():
        spec = make_spec(norm_type=norm_type, norm_placement=placement)
        assert block_names(spec, 0) == mats | first and block_names(spec, 1) == mats | other, placement
        assert any(t.name.startswith("model.norm.") for t in layout(spec)) == final, placement
        shapes = {t.name: t.shape for t in layout(spec)}
        assert all(shapes[f"model.layers.1.{n}"] == (spec.E,) for n in qkv & other), placement


def test_deepnorm_marks_v_o_and_mlp_for_the_beta_gain():
    spec = make_spec(norm_placement="deepnorm")
    inits = {t.name.split("model.layers.1.", 1)[1]: t.init
             for t in layout(spec) if t.name.startswith("model.layers.1.") and t.kind == "linear"}
    assert {n for n, i in inits.items() if i == "beta"} == {
        "self_attn.v_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
        "mlp.down_proj.weight"}
    assert inits["self_attn.q_proj.weight"] == inits["self_attn.k_proj.weight"] == "linear"


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
    np.testing.assert_array_equal(t["model.layers.0.self_attn.qkv_proj.weight"].numpy(),
                                  fused["model.layers.0.self_attn.qkv_proj.weight"])


def test_group_names_folds_layers():
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(16)] + ["lm_head.weight"]
    assert group_names(names) == "model.layers.{0..15}.mlp.up_proj.weight, lm_head.weight"
    assert group_names(["model.layers.3.a", "model.layers.7.a"]) == "model.layers.{3,7}.a"
    assert group_names(["model.layers.3.a"]) == "model.layers.3.a"
