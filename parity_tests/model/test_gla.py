"""Gated Linear Attention (mixer: gla): the spec's rules, the layout, both twins against the float64
recurrence of parity_tests/support/reference.py and against each other (logits, every gradient, AdamW steps, a
trajectory), the chunked form against the recurrence, cached decoding, and bf16."""

import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_model
import jax_model.generate  # noqa: F401  (twin.generate below)
import torch_model
import torch_model.generate  # noqa: F401
from jax_model.gla import set_chunk as jax_set_chunk
from shared_config import SpecError, layout, load_spec, load_train_config, synthetic_batch
from shared_config.parity import BF16_KL_MAX, BF16_KL_MEAN, BF16_TOP1, GRAD_TOL, LOSS_TOL, TRAJ_LOSS_TOL, TRAJ_PARAM_TOL
from shared_config.parity import max_rel, token_kl, top1_agreement
from shared_config.spec import CHOICES
from torch_model.gla import set_chunk as torch_set_chunk

from ..support import reference
from ..support.common import (FORWARD_TOL, MIXERS, case_ids, jax_steps, make_spec, parity_weights, quick_first, rel_err,
                              tokens, torch_steps, unit_logits)
from ..support.train_common import TWINS, both_loss_and_grads, reference_loss, trajectory

GLA = {**MIXERS["gla"], "gla_expand_k": 0.5}  # GLA's base spec, d_k half of d_model
# rms / dyt / derf x pre / peri; the per-head output norm RMSNorm or the spec's norm ("same"); a strong gate.
CASES = [dict(norm_type=n, norm_placement=p) for n in ("rms", "dyt", "derf") for p in ("pre", "peri")]
CASES += [
    dict(norm_type="dyt", norm_placement="peri", gla_output_norm="same", norm_bias=True),
    dict(norm_type="derf", gla_output_norm="same", gla_gate_normalizer=1.0, tie_embeddings=True),
    dict(norm_type="layernorm", norm_placement="post", gla_output_norm="same", mlp="gelu"),
    dict(norm_type="rms", norm_placement="pre_post", mlp="relu2"),
]
GRAD_CASES = CASES[:6] + CASES[7:8] + CASES[9:]


def test_every_norm_and_placement_gla_takes_is_in_the_cases():
    """CASES is written by hand: a norm type, or a placement GLA accepts, added to the spec's CHOICES fails here until
    it has a case (pre_post had none)."""
    def accepted(placement):
        try:
            return bool(gla_spec(norm_placement=placement))
        except SpecError:
            return False

    have = {(gla_spec(**c).norm_type, gla_spec(**c).norm_placement) for c in CASES}
    assert not set(CHOICES["norm_type"]) - {n for n, _ in have}, "a norm type has no GLA case"
    placements = {p for p in CHOICES["norm_placement"] if accepted(p)}
    assert placements == {"pre", "peri", "post", "pre_post"}  # the spec's rule, read back
    assert not placements - {p for _, p in have}, "a placement GLA takes has no case"


def gla_spec(**changes):
    return make_spec(**{**GLA, **changes})


def gla_weights(spec, seed=0):
    """`parity_weights` with forget gates spread far from 1 (gate biases ±4: α from ~0.2^(16/normalizer) to ~1),
    logits rescaled back to std 1."""
    w = parity_weights(spec, seed)
    rng = np.random.default_rng(seed + 7)
    for i in range(spec.L):
        p = f"model.layers.{i}.self_attn.gk_proj"
        w[f"{p}.1.bias"] = rng.uniform(-4, 4, w[f"{p}.1.bias"].shape).astype(np.float32)
        w[f"{p}.1.weight"] = (w[f"{p}.1.weight"] * 4).astype(np.float32)
    return unit_logits(w, spec, seed)


def both_logits(w, spec, toks, chunk=None):
    jm, tm = jax_model.from_weights(w, spec), torch_model.from_weights(w, spec)
    if chunk is not None:
        jax_set_chunk(jm, chunk)
        torch_set_chunk(tm, chunk)
    with torch.no_grad():
        return np.asarray(jm(jnp.asarray(toks))), tm(torch.as_tensor(toks)).numpy()


def test_spec_rules():
    for changes, fragment in [
        (dict(position="rope"), "mixer=gla needs position=none"),
        (dict(n_kv_heads=2), "n_kv_heads=2 must equal n_heads=4"),
        (dict(gla_expand_k=0.3), "gla_expand_k=0.3 gives d_k=14.4"),
        (dict(n_heads=5, d_model=40, gla_expand_v=0.3),
         "d_v=12 = gla_expand_v·d_model, which must be a whole multiple of n_heads=5"),
        (dict(qk_norm=True), "qk_norm"),
        (dict(gla_gate_rank=0), "gla_gate_rank=0 must be > 0"),
        (dict(gla_gate_normalizer=-1.0), "gla_gate_normalizer=-1.0 must be > 0"),
        (dict(gla_output_norm="layer"), "gla_output_norm='layer' must be one of rms, same"),
        (dict(mixer="mamba"), "mixer='mamba' must be one of attention, gla"),
    ]:
        with pytest.raises(SpecError, match=re.escape(fragment)):
            gla_spec(**changes)
    spec = load_spec("gla-tiny")
    assert ((spec.d_k, spec.d_v, spec.Kh, spec.Vh, spec.H, spec.L, spec.D, spec.F, spec.V)
            == (32, 64, 16, 32, 2, 2, 64, 128, 256))
    assert load_spec(spec.to_dict()) == spec


def test_layout_names_and_both_twins_hold_them():
    spec = gla_spec(norm_type="derf", gla_output_norm="same", norm_bias=True)
    p = "model.layers.1.self_attn"
    shapes = {t.name: t.shape for t in layout(spec)}
    assert {k: v for k, v in shapes.items() if k.startswith(p)} == {
        f"{p}.q_proj.weight": (24, 48), f"{p}.k_proj.weight": (24, 48), f"{p}.v_proj.weight": (60, 48),
        f"{p}.g_proj.weight": (60, 48), f"{p}.gk_proj.0.weight": (5, 48), f"{p}.gk_proj.1.weight": (24, 5),
        f"{p}.gk_proj.1.bias": (24,), f"{p}.o_proj.weight": (48, 60), f"{p}.g_norm.alpha": (1,),
        f"{p}.g_norm.shift": (1,), f"{p}.g_norm.weight": (15,), f"{p}.g_norm.bias": (15,),
    }
    w = gla_weights(spec)
    for twin in (jax_model, torch_model):
        got = twin.get_weights(twin.from_weights(w, spec))
        assert list(got) == list(shapes) and all(np.array_equal(got[k], w[k]) for k in w)


@pytest.mark.parametrize("changes", quick_first(CASES, 2), ids=case_ids(CASES))
def test_logits_match_the_float64_recurrence(changes):
    spec = gla_spec(**changes)
    w, x = gla_weights(spec), tokens(spec, seq=70)
    ref = reference.forward(w, spec, x)
    assert ref.std() > 0.5
    j, t = both_logits(w, spec, x)
    assert rel_err(j, t) <= FORWARD_TOL, f"jax vs torch: {rel_err(j, t):.2e}"
    assert rel_err(j, ref) <= FORWARD_TOL, f"jax vs float64 reference: {rel_err(j, ref):.2e}"
    assert rel_err(t, ref) <= FORWARD_TOL, f"torch vs float64 reference: {rel_err(t, ref):.2e}"


def test_the_gates_vary_far_from_one():
    """The test weights make some forget gates close the state within a few tokens, others keep it."""
    spec = gla_spec()
    b = gla_weights(spec)["model.layers.0.self_attn.gk_proj.1.bias"].astype(np.float64)
    alpha = np.exp(-np.logaddexp(0, -b) / spec.gla_gate_normalizer)
    assert alpha.min() < 0.8 and alpha.max() > 0.99 and alpha.min() ** 64 < 1e-5


@pytest.mark.parametrize("chunk", quick_first([0, 7, 1, 16, 64, 128], 2))
def test_chunked_equals_recurrent(chunk):
    """Every chunk size (0: token by token; 7 does not divide T = 70; 128 > T) gives the same logits."""
    spec = gla_spec(norm_type="dyt", gla_gate_normalizer=1.0)
    w, x = gla_weights(spec), tokens(spec, seq=70)
    ref = reference.forward(w, spec, x)
    for name, got in zip(("jax", "torch"), both_logits(w, spec, x, chunk)):
        assert rel_err(got, ref) <= FORWARD_TOL, f"{name}, chunk {chunk}: {rel_err(got, ref):.2e}"


@pytest.mark.parametrize("changes", quick_first(GRAD_CASES), ids=case_ids(GRAD_CASES))
def test_twins_agree_on_loss_and_every_gradient(changes):
    spec = gla_spec(**changes)
    w, x = gla_weights(spec), tokens(spec, seq=45)
    (lj, gj), (lt, gt) = both_loss_and_grads(w, spec, x)
    assert abs(lj - lt) / abs(lt) <= LOSS_TOL, f"loss: jax {lj} vs torch {lt}"
    assert set(gj) == set(gt) == {t.name for t in layout(spec)}
    bad = {k: f"{max_rel(gj[k], gt[k]):.1e}" for k in gt if not max_rel(gj[k], gt[k]) <= GRAD_TOL}
    assert not bad, f"max|g_jax − g_torch| / max|g_torch| above {GRAD_TOL}: {bad}"
    assert all(np.isfinite(g).all() for g in (*gj.values(), *gt.values()))


@pytest.mark.slow
def test_gradients_match_float64_finite_differences():
    """Per tensor, g · d equals the float64 recurrence's central difference (strong gates, chunk 16 < T)."""
    spec = gla_spec(norm_type="derf", norm_placement="peri", gla_gate_normalizer=2.0)
    w, x = gla_weights(spec), tokens(spec, seq=37)
    models = [twin.from_weights(w, spec) for _, twin, _ in TWINS]
    jax_set_chunk(models[0], 16)
    torch_set_chunk(models[1], 16)
    grads = [train.loss_and_grads(m, x)[1] for m, (_, _, train) in zip(models, TWINS)]
    rng, h = np.random.default_rng(2), 1e-4
    for t in layout(spec):
        d = rng.standard_normal(t.shape)
        fd = (reference_loss({**w, t.name: w[t.name] + h * d}, spec, x)
              - reference_loss({**w, t.name: w[t.name] - h * d}, spec, x)) / (2 * h)
        for name, g in zip(("jax", "torch"), grads):
            scale = np.linalg.norm(g[t.name]) * np.linalg.norm(d)
            assert abs(np.sum(g[t.name] * d) - fd) <= 1e-4 * scale, (
                f"{name} {t.name}: g·d {np.sum(g[t.name] * d)} vs {fd}")


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["pre", "peri"])
def test_hundred_adamw_steps_agree(placement):
    """100 AdamW steps of gla-tiny with DyT from gates spread far from 1 (the parity train preset, clipping on):
    every step's loss and the final weights of the twins agree."""
    spec = load_spec("gla-tiny").replace(norm_type="dyt", norm_placement=placement)
    cfg = load_train_config("parity")
    w = gla_weights(spec)
    (ja, js), (ta, ts) = (trajectory(twin, train, w, spec, cfg) for _, twin, train in TWINS)
    assert ta["loss"][-1] < ta["loss"][0] - 0.05 and (ta["grad_norm"] > cfg.grad_clip).any()
    worst = int(np.argmax(np.abs(ja["loss"] - ta["loss"]) / ta["loss"]))
    assert abs(ja["loss"][worst] - ta["loss"][worst]) / ta["loss"][worst] <= TRAJ_LOSS_TOL, f"step {worst}"
    bad = {k: f"{max_rel(js['weights'][k], p):.1e}"
           for k, p in ts["weights"].items() if not max_rel(js["weights"][k], p) <= TRAJ_PARAM_TOL}
    assert not bad, f"final max|Δp| / max|p| above {TRAJ_PARAM_TOL}: {bad}"
    assert js["step"] == ts["step"] == cfg.steps


def decode_both(w, spec, toks, prompt, start_B=None):
    """(logits [B, T, V], cache) of each twin decoding `toks` after a prefill of `prompt` tokens (`jax_steps`)."""
    return [steps(twin.from_weights(w, spec), toks, prompt, start_B)
            for twin, steps in ((jax_model, jax_steps), (torch_model, torch_steps))]


@pytest.mark.parametrize("changes",
                         quick_first([{}, dict(norm_type="dyt", norm_placement="peri", gla_output_norm="same")]),
                         ids=["rms", "dyt-peri-same"])
def test_prefill_then_decode_equals_the_full_forward(changes):
    spec = gla_spec(gla_gate_normalizer=2.0, **changes)
    w, x = gla_weights(spec), tokens(spec, seq=30)
    full = reference.forward(w, spec, x)
    for name, (got, cache) in zip(("jax", "torch"), decode_both(w, spec, x, prompt=19)):
        errs = [rel_err(got[:, t], full[:, t]) for t in range(x.shape[1])]
        assert max(errs) <= FORWARD_TOL, f"{name}: worst at step {int(np.argmax(errs))}: {max(errs):.2e}"
        assert (tuple(cache.layers[0].S_BHKV.shape) == (2, spec.H, spec.Kh, spec.Vh)
                and int(cache.layers[0].length) == 30)


@pytest.mark.slow
def test_split_sequence_with_carried_state_equals_the_whole():
    """The reference recurrence's state after the first part, fed to the twins' chunked prefill of the second."""
    spec = gla_spec(n_layers=1, gla_gate_normalizer=1.0)
    w, x = gla_weights(spec), tokens(spec, seq=50)
    wd = {k: np.asarray(v, np.float64) for k, v in w.items()}
    h = reference.norm(wd["model.embed_tokens.weight"][x], wd, "model.layers.0.input_layernorm", spec)
    p = "model.layers.0.self_attn"
    whole = reference.gla(h, wd, p, spec)
    first, S = reference.gla(h[:, :23], wd, p, spec, S=np.zeros((2, spec.H, spec.Kh, spec.Vh)))
    second, _ = reference.gla(h[:, 23:], wd, p, spec, S=S)
    assert np.abs(np.concatenate([first, second], 1) - whole).max() <= 1e-12 * np.abs(whole).max()
    for twin, tensor in ((jax_model, jnp.asarray), (torch_model, torch.as_tensor)):
        mixer = twin.from_weights(w, spec).model.layers[0].self_attn
        mixer.chunk = 8
        state = twin.gla.GLAState.empty(spec, 2, 50, *([] if twin is jax_model else [torch.zeros(1)]))
        with torch.no_grad():
            a, state = mixer(tensor(h[:, :23].astype(np.float32)), state=state)
            b, state = mixer(tensor(h[:, 23:].astype(np.float32)), state=state)
        got = np.concatenate([np.asarray(a), np.asarray(b)], 1)
        assert rel_err(got, whole) <= FORWARD_TOL
        assert (np.abs(np.asarray(state.S_BHKV) - reference.gla(h, wd, p, spec, S=np.zeros_like(S))[1]).max()
                <= 1e-5 * np.abs(S).max())


@pytest.mark.slow
def test_left_padding_leaves_each_row_as_alone():
    """A left-padded row decodes as it does alone: padding tokens do not change the state."""
    spec = gla_spec(gla_gate_normalizer=2.0)
    w = gla_weights(spec)
    x = tokens(spec, 2, 24, seed=3)
    x[1, :7] = 5  # row 1: 7 padding tokens, then its prompt
    alone = reference.forward(w, spec, x[1:, 7:])
    for name, (got, _) in zip(("jax", "torch"), decode_both(w, spec, x, prompt=12, start_B=np.array([0, 7]))):
        assert rel_err(got[1, 7:], alone[0]) <= FORWARD_TOL, f"{name}: {rel_err(got[1, 7:], alone[0]):.2e}"
        assert rel_err(got[0], reference.forward(w, spec, x[:1])[0]) <= FORWARD_TOL


@pytest.mark.slow
def test_generate_runs_for_gla():
    spec = load_spec("gla-tiny")
    w = gla_weights(spec)
    outs = [twin.generate.generate(twin.from_weights(w, spec), [[1, 2, 3], [4, 5]], 6)
            for twin in (jax_model, torch_model)]
    assert outs[0] == outs[1] and all(len(row) == 6 for row in outs[0])


@pytest.mark.slow
@pytest.mark.parametrize("norm_type", ["rms", "dyt"])
def test_bf16_compute_agrees(norm_type):
    spec = load_spec("gla-tiny").replace(compute_dtype="bfloat16", norm_type=norm_type)
    w, x = gla_weights(spec), synthetic_batch(0, 0, 8, spec.max_seq_len - 1, spec.V)  # [8, max_seq_len]
    j, t = both_logits(w, spec, x)
    kl = token_kl(j, t)
    assert (kl.mean() <= BF16_KL_MEAN and kl.max() <= BF16_KL_MAX
            and top1_agreement(j, t) >= BF16_TOP1), (kl.mean(), kl.max())


@pytest.mark.slow  # 11 s (the quick tier is kept under 5 minutes); CI runs the full suite
def test_the_recurrence_is_handed_float32_in_bf16(monkeypatch):
    """The gates, the state and the recurrence are float32 whatever compute_dtype says (gla.py's `heads`): a twin
    handing the chunk form or the recurrence bf16 projections (the cast dropped) still decoded without an error,
    and within the bf16 bounds. Each twin's prefill (the chunk form) and decode step (the recurrence) receive
    float32 q, k, v, log-gates and state."""
    import jax_model.gla as jg
    import torch_model.gla as tg

    spec = gla_spec(compute_dtype="bfloat16")
    w, seen = gla_weights(spec), []
    for module, twin, as_array in ((jg, jax_model, jnp.asarray), (tg, torch_model, torch.as_tensor)):
        for form in ("chunked_gla", "recurrent_gla"):
            def spy(*args, form=form, module=module, run=getattr(module, form)):
                seen.append((module.__name__, form, [str(a.dtype).removeprefix("torch.") for a in args[:5]]))
                return run(*args)

            monkeypatch.setattr(module, form, spy)
        model = twin.from_weights(w, spec)
        with torch.no_grad():
            _, cache = model(as_array(np.arange(20).reshape(2, 10) % spec.V), cache=model.init_cache(2, 12))
            model(as_array(np.array([[1], [2]])), cache=cache)
    assert {(m, f) for m, f, _ in seen} == {(m, f) for m in ("jax_model.gla", "torch_model.gla")
                                            for f in ("chunked_gla", "recurrent_gla")}
    for name, form, dtypes in seen:
        assert dtypes == ["float32"] * 5, (name, form, dtypes)
