"""Float fields that float32 arithmetic reads (docs/spec.md's keys table; docs/training.md's): each is a normal float32
number, or 0 where 0 is a value of the field, refused in one line naming the field otherwise. XLA flushes subnormals to
0 where torch keeps them, so a subnormal value would make the twins differ; 1e-320 is 0 (init_std: every weight 0)."""

from dataclasses import fields

import numpy as np
import pytest

from shared_config import ModelSpec, SpecError, load_spec, load_train_config
from shared_config.train_config import TrainConfig

from ..support.common import BASE, MIXERS

TINY, MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)  # float32's smallest normal, largest

# field: whether 0 is one of its values (a DyT alpha or Derf shift of 0; weight decay, clipping, a loss weight off)
SPEC_FLOAT32 = {"norm_eps": False, "init_std": False, "embed_init_std": False, "gla_gate_normalizer": False,
                **dict.fromkeys(("attn_alpha_init", "ffn_alpha_init", "final_alpha_init", "shift_init"), True)}
TRAIN_FLOAT32 = {"lr": False, "eps": False, **dict.fromkeys(
    ("beta1", "beta2", "weight_decay", "grad_clip", "min_lr_ratio", "router_predictor_loss_weight",
     "dtf_prior_loss_weight"), True)}
# float fields read in float64 only, each for its reason: no float32 rule of their own
SPEC_FLOAT64 = {
    "rope_theta": "rope_inv_freq computes in float64; the angles' float32 range is its own rule",
    "rope_scaling_factor": "rope_inv_freq, float64", "rope_low_freq_factor": "rope_inv_freq, float64",
    "rope_high_freq_factor": "rope_inv_freq, float64",
    "gla_expand_k": "a width: d_k = round(gla_expand_k · d_model)", "gla_expand_v": "a width",
    "routing_capacity": "a share of tokens: floor(γ·T) in Python", "dtf_prior_factor": "a width: ceil(D·f)",
}


def float_fields(cls) -> set[str]:
    return {f.name for f in fields(cls) if f.type == "float"}


def test_every_float_field_is_decided():
    """A float field added to the spec or the train config must be put in one of the tables above."""
    assert float_fields(ModelSpec) == set(SPEC_FLOAT32) | set(SPEC_FLOAT64)
    assert float_fields(TrainConfig) == set(TRAIN_FLOAT32)


def build(name: str, value: float):
    # init_std unscaled: residual scaling draws o_proj and down_proj with a smaller std (test_a_scaled_std_...)
    unscaled = {"residual_scaling": False} if name == "init_std" else {}
    return load_spec({**BASE, **unscaled, name: value}) if name in SPEC_FLOAT32 else load_train_config({name: value})


@pytest.mark.parametrize("name", [*SPEC_FLOAT32, *TRAIN_FLOAT32])
def test_values_float32_cannot_hold_are_refused_by_name(name):
    for value, says in ((1e-320, "is 0 in float32"), (1e-40, "is subnormal in float32"), (-1e-40, ""),
                        (1e39, "")):
        with pytest.raises(SpecError, match=rf"^{name}=\S+ (is|must)") as e:
            build(name, value)
        assert says in str(e.value) and "\n" not in str(e.value)
    assert getattr(build(name, TINY), name) == TINY
    zero = {**SPEC_FLOAT32, **TRAIN_FLOAT32}[name]
    if zero:
        assert getattr(build(name, 0.0), name) == 0.0
    else:
        with pytest.raises(SpecError, match=rf"^{name}=0.0 "):
            build(name, 0.0)


def test_the_messages_say_what_is_expected():
    with pytest.raises(SpecError, match=r"^init_std=1e-320 is 0 in float32: it must be a normal float32 number, of "
                                        r"magnitude 1.2e-38 to 3.4e38 \(the std of float32 weights\)$"):
        load_spec({**BASE, "init_std": 1e-320})
    with pytest.raises(SpecError, match=r"^lr=1e\+39 is past float32's range: it must be a normal float32 number"):
        load_train_config({"lr": 1e39})
    with pytest.raises(SpecError, match=r"^shift_init=1e-40 is subnormal in float32: it must be 0 or a normal"):
        load_spec({**BASE, "shift_init": 1e-40})


def test_the_largest_float32_is_accepted_where_the_field_allows_it():
    assert load_spec({**BASE, "attn_alpha_init": -MAX, "norm_eps": MAX}).attn_alpha_init == -MAX
    assert load_train_config({"lr": MAX, "eps": MAX, "grad_clip": MAX}).grad_clip == MAX


def test_a_beta_that_rounds_to_one_in_float32_is_refused():
    """beta2 = 1 - 1e-10 is 1 in float32: optax's bias correction 1 - beta2^t is 0 (no update at all), torch's, in
    float64, is not (a full one); [0, 1) held it."""
    below_one = float(np.nextafter(np.float32(1), np.float32(0)))  # 1 - 2^-24
    assert load_train_config({"beta2": below_one}).beta2 == below_one
    for name in ("beta1", "beta2"):
        with pytest.raises(SpecError, match=rf"^{name}=0.9999999999 is 1 in float32: it must be below 0.99999997"):
            load_train_config({name: 1 - 1e-10})


def test_a_gla_width_that_rounds_to_zero_is_refused():
    """gla_expand_k = 1e-12 gave d_k = round(4.8e-11) = 0, a multiple of n_heads: heads of no width."""
    with pytest.raises(SpecError, match=r"gla_expand_k=1e-12 gives d_k=4.8e-11 .* of n_heads=4, above 0"):
        load_spec({**BASE, **MIXERS["gla"], "gla_expand_k": 1e-12})
    with pytest.raises(SpecError, match=r"gla_expand_v=1e-12 gives d_v="):
        load_spec({**BASE, **MIXERS["gla"], "gla_expand_v": 1e-12})


@pytest.mark.parametrize("layers", [3, 4, 50])
@pytest.mark.parametrize("placement", ["pre", "deepnorm"])
def test_a_scaled_std_float32_cannot_hold_is_refused(placement, layers):
    """init_std was checked alone, but the residual scaling draws o_proj and down_proj with init_std / sqrt(2·n_layers)
    and DeepNorm v, o and the MLP with init_std · β: init_std=2e-38 of 50 layers drew them with a std of 2e-39,
    subnormal (the twins part, as the rule says of init_std itself). The least init_std the error names is accepted:
    rounded to 2 digits, it was rounded down ("init_std=2.6e-38 ... must be at least 2.6e-38", DeepNorm, 3 layers)."""
    from shared_config.init import init_rule
    from shared_config.layout import layout

    spec = {**BASE, "n_layers": layers, "norm_placement": placement}
    with pytest.raises(SpecError, match=r"^init_std · .*=\S+ is subnormal in float32: .* \(the std of .*, from "
                                        rf"init_std=2e-38; at n_layers={layers}, init_std must be at least "
                                        r"\d(\.\d)?e-3[78]\)$"):
        load_spec({**spec, "init_std": 2e-38})
    least = float(str(load_spec_error({**spec, "init_std": 2e-38})).rsplit(" ", 1)[-1].rstrip(")"))
    drawn = load_spec({**spec, "init_std": least})
    assert min(init_rule(t, drawn).scale for t in layout(drawn) if init_rule(t, drawn).dist == "normal") >= TINY
    assert load_spec({**spec, "init_std": 2e-38, "init_scheme": "xavier_normal"})  # init_std draws no scaled weight


def load_spec_error(spec: dict) -> SpecError:
    with pytest.raises(SpecError) as e:
        load_spec(spec)
    return e.value
