"""Hybrid stacks (mixer: gla, gla_attention_every: k): softmax attention in layers k-1, 2k-1, ..., GLA in the others.
The spec's rules, the one pattern (`spec.mixer_of`) and everything that reads it per layer: the layout, the decoding
state, both twins' blocks and caches, cached decoding and greedy generation across the twins. Logits against the
float64 reference, gradients, init, conversion and the bench take hybrids in their own tables (HYBRID rows)."""

import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_model
import jax_model.generate  # noqa: F401  (twin.generate below)
import torch_model
import torch_model.generate  # noqa: F401
from shared_config import SpecError, layout, model_layout
from shared_config.layout import state_layout
from shared_config.tokens import TokenError

from ..support.common import HYBRID, HYBRID_GQA, MIXERS, make_spec, parity_weights, tokens
from .test_kv_cache import check_cached_equals_uncached


def hybrid(**changes):
    return make_spec(**{**HYBRID, **changes})


@pytest.mark.parametrize("changes, fragment", [
    (dict(gla_attention_every=-1), "gla_attention_every=-1 must be >= 0"),
    (dict(gla_attention_every=1), "gla_attention_every=1 makes every layer softmax attention: use mixer: attention"),
    (dict(gla_attention_every=4), "gla_attention_every=4 must be <= n_layers=3"),
    (dict(mixer="attention", n_kv_heads=2), "gla_attention_every=2 puts attention layers in a GLA stack and is read "
                                            "with mixer=gla; mixer=attention must leave it 0"),
    (dict(position="learned"), "gla_attention_every=2 needs position=rope (its attention layers rotate q/k; GLA "
                               "layers take no positions) or none (NoPE attention), got position=learned"),
    (dict(n_kv_heads=3), "n_kv_heads=3 must divide n_heads=4"),  # mixer=attention's rule, for the attention layers
    (dict(n_kv_heads=2, gla_attention_every=0, position="none"), "mixer=gla has no grouped keys: n_kv_heads=2 must "
     "equal n_heads=4 (a hybrid stack's attention layers, gla_attention_every >= 2, take any divisor of n_heads)"),
    (dict(qk_norm=True), "qk_norm=true is an attention option; mixer=gla (hybrid stacks included) has none"),
    (dict(norm_placement="deepnorm"), "norm_placement=deepnorm is defined for attention; mixer=gla (hybrid stacks "
                                      "included) takes pre, peri, post or pre_post"),
    (dict(norm_placement="hybrid"), "norm_placement=hybrid is defined for attention"),
    (dict(routing="mod"), "routing=mod routes attention blocks; mixer=gla is not routed"),
    (dict(head_dim=9), "head_dim=9 must be even when position=rope"),
])
def test_spec_rules(changes, fragment):
    with pytest.raises(SpecError, match=re.escape(fragment)):
        hybrid(**changes)


def test_a_hybrids_attention_layers_take_grouped_keys_of_any_divisor():
    """n_kv_heads is K of the attention layers (Qwen3-Next: 16 query heads, 2 key/value heads); GLA layers ignore it."""
    assert [hybrid(n_kv_heads=k).K for k in (1, 2, 4)] == [1, 2, 4]
    assert hybrid(n_kv_heads=1, position="none", gla_attention_every=3).K == 1


def test_the_gla_rules_still_ask_for_no_positions_without_attention_layers():
    with pytest.raises(SpecError, match=re.escape("mixer=gla needs position=none (the recurrence carries order), got "
                                                  "position=rope (a hybrid stack, gla_attention_every >= 2, takes")):
        hybrid(gla_attention_every=0)
    assert hybrid(position="none").position == "none"  # NoPE attention layers (Jamba, Kimi Linear)
    assert hybrid(gla_attention_every=3).gla_attention_every == 3  # k = n_layers: the last layer alone


@pytest.mark.parametrize("k, n_layers, attention", [
    (0, 4, []), (2, 4, [1, 3]), (3, 7, [2, 5]), (4, 12, [3, 7, 11]),  # Qwen3-Next, Kimi Linear: 1 in 4
    (8, 16, [7, 15]),  # MiniMax-01: 1 in 8
])
def test_mixer_of_is_the_one_pattern(k, n_layers, attention):
    spec = hybrid(gla_attention_every=k, n_layers=n_layers, position="none")
    assert [i for i in range(n_layers) if spec.mixer_of(i) == "attention"] == attention == list(spec.attention_layers)
    assert all(spec.mixer_of(i) == "gla" for i in range(n_layers) if i not in attention)
    assert list(make_spec().attention_layers) == [0, 1] and list(make_spec(**MIXERS["gla"]).attention_layers) == []
    counts = {m: n for m, n in (("attention", len(attention)), ("gla", n_layers - len(attention))) if n}
    assert spec.layer_mixers == counts


def test_the_layer_counts_are_counted_not_walked():
    """bench's variants walked every layer's mixer_of, and the FLOP count summed over them: a spec claiming 10**400
    layers (refused later, by the memory check) never returned from `profile_step.py --set n_layers=999...`."""
    huge = 10**400
    assert hybrid(gla_attention_every=4, n_layers=huge, position="none").layer_mixers == {
        "attention": huge // 4, "gla": huge - huge // 4}
    assert make_spec(n_layers=huge).layer_mixers == {"attention": huge}


def test_the_layout_and_the_decoding_state_are_per_layer():
    spec = hybrid()  # GLA, attention, GLA; fused q/k/v in memory
    names = {t.name for t in layout(spec)}
    H, E, K, V = spec.H, spec.E, spec.Kh, spec.Vh
    for i in range(3):
        p = f"model.layers.{i}.self_attn"
        gla_only = {f"{p}.g_proj.weight", f"{p}.gk_proj.0.weight", f"{p}.g_norm.weight"}
        assert (gla_only <= names) == (i != 1) and not (gla_only & names and i == 1)
        assert {f"{p}.{n}_proj.weight" for n in "qkvo"} <= names
    shapes = {t.name: t.shape for t in layout(spec)}
    assert shapes["model.layers.1.self_attn.q_proj.weight"] == (H * E, spec.D)  # attention: H·E = D
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (spec.d_k, spec.D)  # GLA: d_k
    fused = [t.name for t in model_layout(spec) if "qkv_proj" in t.name]
    assert fused == ["model.layers.1.self_attn.qkv_proj.weight"]  # GLA layers keep q/k/v apart
    assert [state_layout(spec, spec.mixer_of(i), 2, 9) for i in range(3)] == [
        ((2, H, K, V), "float32"), ((2, 9, H, E), "float32"), ((2, H, K, V), "float32")]


def test_grouped_keys_size_the_attention_layers_only():
    """k/v [K·E, D] and the fused q/k/v [(H + 2K)·E, D] in the attention layer, its cache [B, S, K, E]; the GLA
    layers' tensors and [B, H, K', V'] states as without grouped keys."""
    spec, plain = make_spec(**HYBRID_GQA), hybrid()
    shapes, plain_shapes = ({t.name: t.shape for t in layout(s)} for s in (spec, plain))
    H, K, E, D = spec.H, spec.K, spec.E, spec.D
    assert K == 2 < H and shapes["model.layers.1.self_attn.k_proj.weight"] == (K * E, D)
    assert shapes["model.layers.1.self_attn.v_proj.weight"] == (K * E, D)
    assert {n: s for n, s in shapes.items() if ".layers.1." not in n} == {
        n: s for n, s in plain_shapes.items() if ".layers.1." not in n}
    fused = {t.name: t.shape for t in model_layout(spec) if "qkv_proj" in t.name}
    assert fused == {"model.layers.1.self_attn.qkv_proj.weight": ((H + 2 * K) * E, D)}
    assert state_layout(spec, "attention", 2, 9) == ((2, 9, K, E), "float32")
    assert state_layout(spec, "gla", 2, 9) == state_layout(plain, "gla", 2, 9)


@pytest.mark.parametrize("twin", [jax_model, torch_model], ids=["jax", "torch"])
def test_each_block_holds_its_layers_mixer_and_its_cache_slot_that_mixers_state(twin):
    spec = hybrid()
    model = twin.from_weights(parity_weights(spec), spec)
    assert [type(b.self_attn).__name__ for b in model.model.layers] == ["GLA", "Attention", "GLA"]
    cache = model.init_cache(2, 9)
    assert [type(s).__name__ for s in cache.layers] == ["GLAState", "LayerCache", "GLAState"]
    assert int(cache.length) == 0 and cache.size == 9  # read off layer 0, a GLA state here


@pytest.mark.slow  # 9 s (JAX compiles the chunk form, prefill and the decode step): over the quick tier's budget
def test_cached_decoding_equals_the_full_forward():
    """Prefill then decode steps = the whole forward, in both twins (RoPE positions carried by the attention
    layer's cache, the recurrent state by the GLA layers')."""
    check_cached_equals_uncached(hybrid(), seq=20, prompt=12)


def test_a_cache_of_a_gla_stack_is_refused_by_a_hybrid():
    spec = hybrid()
    other = spec.replace(gla_attention_every=0, position="none")
    cache = jax_model.from_weights(parity_weights(other), other).init_cache(1, 4)
    model = jax_model.from_weights(parity_weights(spec), spec)
    with pytest.raises(TokenError, match=r"^layer 1 of the cache holds float32 \[1, 4, 6, 15\] .* where this model's "
                                         r"init_cache makes float32 \[1, 4, 4, 12\]"):
        model(jnp.asarray([[1, 2]]), cache=cache)


@pytest.mark.slow  # 6 s
def test_twins_generate_the_same_greedy_continuation():
    spec = hybrid()
    w = parity_weights(spec)
    prompt = [int(t) for t in tokens(spec, 1, 16)[0]]
    outs = [twin.generate.generate(twin.from_weights(w, spec), [prompt, prompt[:5]], 12)
            for twin in (jax_model, torch_model)]
    assert outs[0] == outs[1] and all(len(row) == 12 for row in outs[0])
    with torch.no_grad():  # the greedy tokens are the full forward's argmax, in the torch twin
        full = torch_model.from_weights(w, spec)(torch.as_tensor([prompt + outs[1][0]])).numpy()
    assert (np.argmax(full[0, len(prompt) - 1 : -1], -1) == np.asarray(outs[1][0])).all()
