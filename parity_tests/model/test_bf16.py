"""bfloat16 compute: the twins' next-token distributions agree (per-token KL, top-1, loss), with
float32 parameters and with bfloat16 parameters; bf16 train steps end with the same parameters and
AdamW moments, within what bf16 roundings explain."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jax_model

import torch_model
from shared_config import TrainConfig, load_spec, synthetic_batch
from shared_config.spec import CHOICES
from shared_config.parity import (
    BF16_GRAD_TOL, BF16_KL_MAX, BF16_KL_MEAN, BF16_LOSS_TOL, BF16_TOP1, max_rel, token_kl, top1_agreement,
)

from ..support.common import ROOT, interleaved_rope, jax_logits, parity_weights, quick_first, torch_logits
from ..support.train_common import TWINS, both_loss_and_grads, trajectory

# one spec per norm type (a preset, and the changes on top of it): a missing float32 cast shows only in bf16
NORM_SPECS = {"tiny": ("tiny", {}), "tiny-dyt": ("tiny-dyt", {}), "tiny-derf": ("tiny-derf", {}),
              "tiny-layernorm": ("tiny", dict(norm_type="layernorm", norm_bias=True))}
CASES = [(name, dtype) for name in NORM_SPECS for dtype in ("float32", "bfloat16")]


# Every other token mixer is checked in bf16 in its own file (its float32 gates and state): the test, by path and name.
MIXER_BF16 = {"gla": "parity_tests/model/test_gla.py::test_bf16_compute_agrees"}


def test_the_cases_hold_every_norm_type():
    """A norm type added to the spec's CHOICES is checked in bf16 only once a spec here uses it; a mixer, once
    MIXER_BF16 names its bf16 test (which must exist)."""
    assert {norm_spec(name).norm_type for name in NORM_SPECS} == set(CHOICES["norm_type"])
    assert {"attention", *MIXER_BF16} == set(CHOICES["mixer"]), "name each mixer's bf16 test"
    for where in MIXER_BF16.values():
        path, name = where.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), f"no test {where}"


def norm_spec(name: str):
    preset, changes = NORM_SPECS[name]
    return load_spec(preset).replace(**changes)


def bf16_metrics(spec, weights, tokens_BN):
    j, t = jax_logits(weights, spec, tokens_BN[:, :-1]), torch_logits(weights, spec, tokens_BN[:, :-1])
    (lj, _), (lt, _) = both_loss_and_grads(weights, spec, tokens_BN)
    kl = token_kl(j, t)
    return kl.mean(), kl.max(), top1_agreement(j, t), abs(lj - lt)


@pytest.mark.parametrize("name,param_dtype", quick_first(CASES, multi=True), ids=[f"{n}-params-{d}" for n, d in CASES])
def test_bf16_compute_agrees(name, param_dtype):
    spec = norm_spec(name).replace(compute_dtype="bfloat16", param_dtype=param_dtype)
    weights = parity_weights(spec)  # O(1) logits: top-1 and KL mean something
    kl_mean, kl_max, top1, dloss = bf16_metrics(spec, weights, synthetic_batch(0, 0, 8, 128, spec.V))
    assert kl_mean <= BF16_KL_MEAN and kl_max <= BF16_KL_MAX, f"KL mean {kl_mean:.1e}, max {kl_max:.1e}"
    assert top1 >= BF16_TOP1, f"top-1 agreement {top1:.3f}"
    assert dloss <= BF16_LOSS_TOL, f"|Δloss| {dloss:.1e}"


def test_the_bounds_catch_a_real_mismatch(monkeypatch):
    """Interleaved RoPE in one twin (a classic porting bug) breaks the bf16 bounds."""
    monkeypatch.setattr(torch_model.attention, "apply_rope", interleaved_rope)
    spec = load_spec("tiny").replace(compute_dtype="bfloat16")
    kl_mean, kl_max, top1, _ = bf16_metrics(spec, parity_weights(spec), synthetic_batch(0, 0, 8, 128, spec.V))
    assert kl_mean > BF16_KL_MEAN or top1 < BF16_TOP1


def bf16_train_mismatches(spec, cfg) -> dict[str, str]:
    """Train both twins `cfg.steps` steps from the same weights; per tensor, where the final parameters or AdamW
    moments part by more than bf16 arithmetic explains (BF16_GRAD_TOL: ~13 roundings of 2⁻⁸, on max|x|).

    m (and v) are running means of the steps' (squared) gradients, so they differ as the gradients do: a few
    bf16 roundings of each matmul on each side. The parameters differ by what those gradients moved.
    """
    weights = parity_weights(spec)
    (a, sa), (b, sb) = (trajectory(twin, train, weights, spec, cfg) for _, twin, train in TWINS)
    assert (np.all(np.isfinite(a["loss"]))
            and np.abs(a["loss"] - b["loss"]).max() <= BF16_LOSS_TOL), (a["loss"], b["loss"])
    bad = {}
    for key in ("weights", "m", "v"):
        for name, want in sb[key].items():
            err = max_rel(sa[key][name], want)
            if not err <= BF16_GRAD_TOL:
                bad[f"{key} {name}"] = f"{err:.1e}"
    return bad


@pytest.mark.slow
@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bf16_train_steps_agree(param_dtype):
    """5 steps: losses, and per tensor the parameters and both AdamW moments (measured ≤ 2.5e-2, on v)."""
    spec = load_spec("tiny-dyt").replace(compute_dtype="bfloat16", param_dtype=param_dtype)
    bad = bf16_train_mismatches(spec, TrainConfig(lr=1e-3, warmup_steps=2, steps=5, batch_size=4, seq_len=32))
    assert not bad, f"max|Δ| / max|x| above {BF16_GRAD_TOL}: {bad}"



def test_bf16_embedding_gradients_sum_in_float32():
    """A bf16 model's embeddings (token and position rows, the learnable scale) get their gradients summed in
    float32: 1,024 uses of one token with a cotangent of ones give a row gradient of 1,024·scale, where a bf16 sum
    stalls at 256; the scale's gradient is the sum of every embedding entry's use."""
    spec = load_spec("tiny").replace(compute_dtype="bfloat16", position="learned", embed_scale="learnable")
    weights = {k: np.abs(v) + 0.5 for k, v in parity_weights(spec).items()}  # positive entries: no cancellation
    B, T, scale = 8, 128, float(weights["model.embed_scale"][0])
    tokens_BT, positions_T = np.full((B, T), 7), np.arange(T)
    want = {"model.embed_tokens.weight": B * T * scale, "model.embed_positions.weight": B * scale,
            "model.embed_scale": B * (T * weights["model.embed_tokens.weight"][7].sum()
                                      + weights["model.embed_positions.weight"][:T].sum())}

    graphdef, params, rest = nnx.split(jax_model.from_weights(weights, spec).model, nnx.Param, ...)

    def embed_sum(params):
        x_BTD = nnx.merge(graphdef, params, rest).embed(jnp.asarray(tokens_BT), jnp.asarray(positions_T))
        return jnp.sum(x_BTD.astype(jnp.float32))

    grads = jax.grad(embed_sum)(params)
    got_jax = {"model.embed_tokens.weight": float(grads["embed_tokens"]["embedding"][...][7, 0]),
               "model.embed_positions.weight": float(grads["embed_positions"]["embedding"][...][0, 0]),
               "model.embed_scale": float(grads["embed_scale"][...][0])}
    model = torch_model.from_weights(weights, spec).model
    model.embed(torch.as_tensor(tokens_BT), torch.as_tensor(positions_T)).float().sum().backward()
    got_torch = {"model.embed_tokens.weight": model.embed_tokens.weight.grad[7, 0].item(),
                 "model.embed_positions.weight": model.embed_positions.weight.grad[0, 0].item(),
                 "model.embed_scale": model.embed_scale.grad[0].item()}
    for twin, got in (("jax", got_jax), ("torch", got_torch)):
        for name, value in want.items():
            assert got[name] == pytest.approx(value, rel=1e-5), f"{twin}: {name}"


REPEATS_CASES = [("tiny", {"position": "learned", "embed_scale": "learnable"}), ("tiny-dyt", {"tie_embeddings": True})]


@pytest.mark.slow  # the quick tier under 5 minutes (5 min 37 s this stop); CI runs the full suite
@pytest.mark.parametrize("name,over", quick_first(REPEATS_CASES, multi=True), ids=[n for n, _ in REPEATS_CASES])
def test_bf16_gradients_sum_many_terms_in_float32(name, over):
    """Each twin's bf16 gradients against its own float32 gradients, on a batch where one token fills half of the
    positions: a gradient summed over many tokens in bf16 (an embedding row seen 512 times) stalls as its sum grows
    (at 256 for a sum of ones) and misses by far more than a few roundings. One-element parameters (alpha, shift,
    the scale) are left out: their gradient is one sum of B·T·D terms of both signs, whose cancellation makes its
    relative error large in both twins alike (the test above checks the scale's sum without cancellation)."""
    spec = load_spec(name).replace(compute_dtype="bfloat16", **over)
    weights, tokens_BN = parity_weights(spec), synthetic_batch(0, 0, 8, 128, spec.V)
    tokens_BN[:, ::2] = 7
    bf16 = both_loss_and_grads(weights, spec, tokens_BN)
    float32 = both_loss_and_grads(weights, spec.replace(compute_dtype="float32"), tokens_BN)
    for (twin, _, _), (_, got), (_, want) in zip(TWINS, bf16, float32):
        errors = {k: max_rel(got[k], want[k]) for k in want if want[k].size > 1}  # a scalar's sum may cancel
        worst = max(errors, key=errors.get)
        assert errors[worst] <= BF16_GRAD_TOL, f"{twin}: {worst} max|Δg| / max|g| = {errors[worst]:.1e}"
