"""Each twin's native init (its own RNG, no numpy) and the numpy init `shared_config.init_weights` (where every
canonical checkpoint, `init_checkpoint.py` and the trajectories start) follow the spec's rules, tensor by tensor.

The expected distribution of every canonical tensor is written out here from the rules of docs/spec.md,
not read from `shared_config.init_rule`, so a wrong rule fails as surely as a wrong draw.
"""

import math

import numpy as np
import pytest
import torch
from flax import nnx

import jax_model
import torch_model
from shared_config import init_weights, layout, load_spec
from shared_config.init import init_rule
from shared_config.layout import Tensor
from shared_config.spec import deepnorm_alpha, deepnorm_beta
from shared_config.spec import CHOICES

SPECS = {
    "normal": load_spec("tiny-derf").replace(norm_bias=True, qk_norm=True, position="learned", shift_init=0.25),
    # peri: the attention and MLP output norms take part, each with its own alpha; the embedding norm takes the final's
    "xavier": load_spec("tiny-dyt").replace(init_scheme="xavier_uniform", norm_placement="peri", attn_alpha_init=0.8,
                                            ffn_alpha_init=0.2, final_alpha_init=0.3, embed_norm=True),
    "unscaled": load_spec("tiny").replace(residual_scaling=False, init_std=0.05, embed_init_std=0.1,
                                          tie_embeddings=True, norm_type="layernorm", norm_bias=True),
    # untruncated xavier normal; fused q/k/v drawn per slice, each at its own fans
    "xavier_normal": load_spec("tiny").replace(init_scheme="xavier_normal", norm_placement="hybrid_star"),
    # DeepNet's recipe: xavier normal at gain β on v, o and the MLP; q and k at gain 1
    "deepnorm": load_spec("tiny-dyt").replace(init_scheme="xavier_normal", norm_placement="deepnorm", n_layers=3),
    "deepnorm_normal": load_spec("tiny").replace(norm_placement="deepnorm", fused_qkv=False, mlp="gelu"),
    # every other token mixer: its tensors' init rules (GLA's gate bias 0, its per-head output norm)
    "gla_xavier": load_spec("gla-tiny").replace(init_scheme="xavier_uniform", gla_output_norm="same", norm_type="dyt",
                                                attn_alpha_init=0.8, ffn_alpha_init=0.2),
    # a hybrid stack: attention's q/k/v/o in layer 1 (fused q/k/v drawn per slice), GLA's in layer 0
    "hybrid": load_spec("gla-tiny").replace(gla_attention_every=2, position="rope", init_std=0.05),
    # grouped keys in the attention layer: fused q/k/v slices of H·E, K·E, K·E rows
    "hybrid_gqa": load_spec("gla-tiny").replace(gla_attention_every=2, position="rope", n_heads=4, n_kv_heads=1),
}


def test_the_specs_hold_every_norm_type_and_init_scheme():
    """A norm type, init scheme or mixer added to the spec's CHOICES has its init checked here only once a spec uses
    it."""
    for field in ("norm_type", "init_scheme", "mixer"):
        assert {getattr(spec, field) for spec in SPECS.values()} == set(CHOICES[field]), field


def expected(name: str, shape, spec):
    """(distribution, scale) of a canonical tensor by the spec's rules: normal std, uniform bound, or the constant."""
    leaf = name.rsplit(".", 1)[-1]
    if name in ("model.embed_tokens.weight", "model.embed_positions.weight"):
        return "normal", spec.embed_init_std
    if name == "model.embed_scale":
        return "constant", math.sqrt(spec.D)
    if leaf in ("alpha", "shift", "bias") or len(shape) == 1:
        # the model-level norms (final, embedding) are DyT's "other" layers, as the blocks' FFN side
        alpha = spec.final_alpha_init if name.startswith(("model.norm", "model.embed_norm")) else (
            spec.attn_alpha_init if any(s in name for s in ("input_layernorm", "attn_output_norm", "self_attn."))
            else spec.ffn_alpha_init)  # a norm inside the mixer (GLA's g_norm) takes the attention side's
        return "constant", {"alpha": alpha, "shift": spec.shift_init, "bias": 0.0}.get(leaf, 1.0)
    residual = 1 / math.sqrt(2 * spec.L) if spec.residual_scaled and ("o_proj" in name or "down_proj" in name) else 1.0
    if spec.norm_placement == "deepnorm" and not any(m in name for m in ("q_proj", "k_proj", "lm_head")):
        residual = (8 * spec.L) ** -0.25  # DeepNet's β (decoder-only) on v, o, gate, up, down
    if spec.init_scheme == "normal":
        return "normal", spec.init_std * residual
    if spec.init_scheme == "xavier_normal":
        return "normal", math.sqrt(2 / sum(shape)) * residual  # Glorot: fan_in + fan_out
    assert spec.init_scheme == "xavier_uniform", f"write the rule of init_scheme={spec.init_scheme} here"
    return "uniform", math.sqrt(6 / sum(shape)) * residual


def check_statistics(weights: dict, spec, twin: str):
    for t in layout(spec):
        x, (dist, scale) = weights[t.name].astype(np.float64), expected(t.name, t.shape, spec)
        where = f"{twin} {t.name} ({dist}, {scale:.4g})"
        if dist == "constant":
            assert np.all(x == np.float32(scale)), f"{where}: values {np.unique(x)[:5]}"
            continue
        n, std = x.size, scale if dist == "normal" else scale / math.sqrt(3)
        # 5-sigma bounds: the mean's error has std std/√n; the std's relative error 1/√(2n) for a
        # normal sample, 1/√(5n) for a uniform one (kurtosis 1.8)
        assert abs(x.mean()) <= 5 * std / math.sqrt(n), f"{where}: mean {x.mean():.3g}"
        assert (abs(x.std() / std - 1)
                <= 5 / math.sqrt((2 if dist == "normal" else 5) * n)), f"{where}: std {x.std():.4g} != {std:.4g}"
        if dist == "uniform":
            assert np.abs(x).max() <= scale, f"{where}: max|x| {np.abs(x).max():.4g} above the bound"
        else:  # untruncated: 4.55% of a normal sample lies beyond 2 std (none of jax's glorot_normal, truncated there)
            tail, p = np.mean(np.abs(x) > 2 * std), 0.0455
            assert abs(tail - p) <= 5 * math.sqrt(p * (1 - p) / n), f"{where}: {tail:.2%} beyond 2 std, not {p:.2%}"


@pytest.mark.parametrize("name", SPECS)
def test_native_init_follows_the_rules(name):
    spec = SPECS[name]
    jax_weights = jax_model.get_weights(jax_model.Transformer(spec, rngs=nnx.Rngs(0)))
    torch_weights = torch_model.get_weights(torch_model.Transformer(spec, generator=torch.Generator().manual_seed(0)))
    check_statistics(jax_weights, spec, "jax")
    check_statistics(torch_weights, spec, "torch")
    w = next(t.name for t in layout(spec) if t.kind == "linear")  # any mixer's
    assert not np.array_equal(jax_weights[w], torch_weights[w])  # each twin draws with its own RNG


@pytest.mark.parametrize("name", SPECS)
def test_numpy_init_follows_the_same_rules(name):
    check_statistics(init_weights(SPECS[name], 0), SPECS[name], "numpy")


def test_deepnorm_constants_match_the_papers_worked_values():
    """DeepNet (decoder-only): α = (2N)^(1/4), β = (8N)^(-1/4); N = 2 gives α = √2, β = 1/2."""
    assert deepnorm_alpha(2) == pytest.approx(math.sqrt(2), rel=1e-15)
    assert deepnorm_beta(2) == pytest.approx(0.5, rel=1e-15)
    assert (deepnorm_alpha(18) == pytest.approx(6 ** 0.5, rel=1e-15)
            and deepnorm_beta(32) == pytest.approx(1 / 4, rel=1e-15))


def test_truncated_normal_is_caught():
    """jax.nn.initializers.glorot_normal truncates at 2 std: the tail check must reject it."""
    import jax

    spec = SPECS["xavier_normal"]
    weights = init_weights(spec, 0)
    name = "model.layers.1.mlp.up_proj.weight"
    weights[name] = np.asarray(jax.nn.initializers.glorot_normal(in_axis=1, out_axis=0)(jax.random.key(0),
                                                                                        weights[name].shape))
    with pytest.raises(AssertionError, match=f"numpy {name}.*beyond 2 std"):
        check_statistics(weights, spec, "numpy")


def test_a_wrong_rule_is_named():
    spec = SPECS["normal"]
    weights = jax_model.get_weights(jax_model.Transformer(spec, rngs=nnx.Rngs(0)))
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name] = weights[name] * math.sqrt(2 * spec.L)  # residual scaling forgotten
    with pytest.raises(AssertionError, match=f"jax {name}.*std"):
        check_statistics(weights, spec, "jax")


def test_an_init_scheme_without_a_rule_is_refused():
    """A scheme added to the spec's CHOICES and not to `init_rule` is an error there, not another scheme's draws."""
    spec = load_spec("tiny")
    object.__setattr__(spec, "init_scheme", "not-a-scheme")  # past the spec's own check
    with pytest.raises(ValueError, match="init_scheme='not-a-scheme'"):
        init_weights(spec, 0)


@pytest.mark.parametrize("init, value", [("kaiming", None), ("constant", None)])
def test_a_layout_init_without_a_rule_is_refused(init, value):
    """A layout row whose init `init_rule` does not know (or a constant without its value) is an error naming the
    tensor; it was a constant None, which drew NaN."""
    t = Tensor("model.layers.0.toy.weight", (4,), "param", init, value)
    with pytest.raises(ValueError, match=f"no rule for init='{init}' .*of model.layers.0.toy.weight"):
        init_rule(t, load_spec("tiny"))


@pytest.mark.parametrize("name", SPECS)
def test_numpy_init_follows_the_rules(name):
    """`init_weights` has its own code path from the rules to the draws: checked against the same written-out rules."""
    spec = SPECS[name]
    check_statistics(init_weights(spec, 0), spec, "numpy")


def test_layout_init_and_save_take_a_spec_as_load_spec_does_and_name_a_bad_seed(tmp_path):
    """A preset name or a dict for the spec was an AttributeError ('str' object has no attribute 'V') in layout,
    init_weights and save_checkpoint, where from_weights takes them; a seed of -1 or None numpy's ValueError or
    TypeError."""
    from shared_config import SpecError, read_safetensors, save_checkpoint

    spec = load_spec("tiny")
    assert layout("tiny") == layout(spec.to_dict()) == layout(spec)
    w = init_weights("tiny", 0)
    assert all(np.array_equal(w[k], v) for k, v in init_weights(spec, 0).items())
    save_checkpoint(tmp_path / "a.safetensors", w, "tiny")
    assert set(read_safetensors(tmp_path / "a.safetensors")[0]) == set(w)
    for seed in (-1, None, 1.5, "0", True):
        with pytest.raises(SpecError, match=rf"^seed={seed!r} must be an integer >= 0$"):
            init_weights(spec, seed)
    with pytest.raises(SpecError, match="a spec is given as a preset name, a YAML path or a mapping of keys, not"):
        layout(None)
