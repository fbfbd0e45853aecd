"""Whole-model logits: both twins agree with each other and with the float64 numpy reference,
for every value of every spec option, alone and combined, and for random valid specs."""

import itertools

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shared_config.spec import CHOICES, SpecError

from ..support.common import (FORWARD_TOL, HYBRID, HYBRID_GQA, MIXERS, case_ids, jax_logits, make_spec, parity_weights,
                              ref_logits, rel_err, tokens, torch_logits)

# Every value of every option, each on top of the base spec.
SINGLE = [{k: v} for k in ("norm_type", "norm_placement", "embed_scale", "position", "mlp", "init_scheme")
          for v in CHOICES[k]]
# each mixer with the changes its rules need (one without a MIXERS row fails its own case, not this module's collection)
SINGLE += [{**MIXERS.get(m, {}), "mixer": m} for m in CHOICES["mixer"] if m != "attention"]
# hybrid stacks: attention layers inside a GLA stack, with RoPE (fused q/k/v) and without positions (unfused)
SINGLE += [HYBRID, {**HYBRID, "position": "none", "fused_qkv": False, "gla_attention_every": 3}]
SINGLE += [HYBRID_GQA]  # a hybrid's attention layer with grouped keys (fused [(H + 2K)·E, D] q/k/v)
SINGLE += [{k: v} for k in ("norm_bias", "qk_norm", "fused_qkv", "tie_embeddings", "residual_scaling", "embed_norm")
           for v in (False, True)]
SINGLE += [
    {"n_kv_heads": 6},  # plain multi-head attention
    {"n_kv_heads": 1},  # multi-query attention
    {"head_dim": 10},  # head_dim != d_model / n_heads
    {"rope_theta": 500000.0},
    {"norm_eps": 1e-2},  # large enough to change the output if ignored
    {"rope_scaling": "llama3", "rope_scaling_factor": 4.0, "rope_original_max_seq_len": 64},  # all three bands at T=64
    {"attn_alpha_init": 1.2, "ffn_alpha_init": 0.3, "final_alpha_init": 0.9, "norm_type": "dyt"},
    {"shift_init": 0.25, "norm_type": "derf"},
]
# Norms x placements, and a few dense combinations.
COMBOS = [{"norm_type": n, "norm_placement": p}
          for n, p in itertools.product(CHOICES["norm_type"], CHOICES["norm_placement"])]
COMBOS += [
    {"norm_type": "dyt", "norm_placement": "peri", "norm_bias": True, "embed_scale": "learnable", "qk_norm": True,
     "tie_embeddings": True},
    {"norm_type": "derf", "position": "learned", "mlp": "gelu_tanh", "fused_qkv": False, "n_kv_heads": 1,
     "embed_scale": "constant"},
    {"norm_type": "layernorm", "norm_bias": True, "position": "none", "mlp": "relu2", "head_dim": 12, "n_layers": 3},
    {"qk_norm": True, "tie_embeddings": True, "rope_scaling": "llama3", "rope_original_max_seq_len": 64,
     "n_kv_heads": 3},
    # Peri-LN as published (embed_norm), its alpha and shift at work after learned positions and a learnable scale
    {"norm_type": "derf", "norm_placement": "peri", "embed_norm": True, "position": "learned",
     "embed_scale": "learnable", "final_alpha_init": 0.9},
]



def check(spec, attention=("auto", "auto"), seq=64):
    w, x = parity_weights(spec), tokens(spec, seq=seq)
    ref = ref_logits(w, spec, x)
    assert ref.std() > 0.5, "test weights must give O(1) logits so that the tolerance means something"
    j, t = jax_logits(w, spec, x, attention[0]), torch_logits(w, spec, x, attention[1])
    assert rel_err(j, t) <= FORWARD_TOL, f"jax vs torch: {rel_err(j, t):.2e}"
    assert rel_err(j, ref) <= FORWARD_TOL, f"jax vs float64 reference: {rel_err(j, ref):.2e}"
    assert rel_err(t, ref) <= FORWARD_TOL, f"torch vs float64 reference: {rel_err(t, ref):.2e}"


@pytest.mark.parametrize("changes", SINGLE, ids=case_ids(SINGLE))
def test_every_option_value(changes):
    check(make_spec(**changes))


@pytest.mark.parametrize("changes", COMBOS, ids=case_ids(COMBOS))
def test_combinations(changes):
    check(make_spec(**changes))


@pytest.mark.parametrize("attention", [("einsum", "einsum"), ("xla", "sdpa"), ("einsum", "sdpa"),
                                       ("blocked", "blocked"), ("blocked", "sdpa")])
def test_attention_kernels_agree(attention):
    check(make_spec(qk_norm=True), attention)


@pytest.mark.slow  # the quick tier under 5 minutes (5 min 37 s this stop); CI runs the full suite
def test_long_sequence_where_rope_errors_grow():
    check(make_spec(max_seq_len=512, n_layers=1), seq=384)


@st.composite
def random_specs(draw):
    n_kv = draw(st.sampled_from([1, 2, 3, 6]))
    position = draw(st.sampled_from(CHOICES["position"]))
    head_dim = draw(st.sampled_from([None, 4, 10] if position == "rope" else [None, 5, 10]))
    changes = dict(
        n_kv_heads=n_kv, head_dim=head_dim, position=position, n_layers=draw(st.integers(1, 3)),
        **{k: draw(st.sampled_from(CHOICES[k])) for k in ("norm_type", "norm_placement", "embed_scale", "mlp")},
        **{k: draw(st.booleans()) for k in ("norm_bias", "qk_norm", "fused_qkv", "tie_embeddings")},
    )
    if position == "rope" and draw(st.booleans()):
        changes.update(rope_scaling="llama3", rope_original_max_seq_len=64)
    try:
        return make_spec(**changes)
    except SpecError:  # a combination the spec's rules refuse (HybridNorm with qk_norm, ...): drawn again, so that
        assume(False)  # the rules live in the spec alone, not restated here


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(spec=random_specs())
def test_random_valid_specs(spec):
    check(spec)
