"""Routed training and evaluation against their definitions, not twin against twin (routing.py, docs/routing.md).

- The update does not depend on how the global batch is cut: grad_accum_steps = 2 on micro-batches that count 6 vs
  32 targets gives the one-shot loss and gradients (the aux terms are means over every position of the global
  batch); data-parallel ranks and the JAX mesh: test_distributed_torch.py, test_sharding.py (routed variants).
- Routed gradients against an independent oracle: central differences of the float64 reference's train loss, with
  every stop-gradient input (the predictor's x, DTF's moving-average input and H_post in the prior MSE) held at its
  unperturbed value (reference.stopgrad).
- Evaluation is causal: the eval step's loss (predictor mode) at positions <= t does not move when only later
  tokens change; the top-k figure beside it does (the test can fail).
- Evaluation is row-separable: parts of a batch, each summed over the whole batch's count of targets, add up to the
  whole batch's losses, the top-k figure too (top-k picks per row): what lets each torchrun rank evaluate its rows.
- Guards: the hand-written cases here and in test_routing.py hold every routing kind, and their test weights move
  every router parameter off its init.

γ·T is fractional in every case (floor and ceil pick different k).
"""

from __future__ import annotations

import numpy as np
import pytest

from shared_config import TrainConfig, init_weights, layout
from shared_config.parity import TRAJ_PARAM_TOL, max_rel
from shared_config.spec import CHOICES

from ..support.common import case_ids, make_spec, quick_first, tokens
from ..support.oracles import finite_difference_errors
from ..model.test_routing import ROUTED, assert_margins, reference_taps, routed_weights
from ..support.train_common import TWINS, reference_train_loss

CASES = [
    dict(routing="mod", routing_capacity=0.3, routing_gate="sigmoid"),  # k = floor(0.3 · 16) = 4 (ceil: 5)
    dict(routing="dtf", routing_capacity=0.35, dtf_window=3),  # k = floor(5.6) = 5 (ceil: 6)
]
CFG = TrainConfig(router_predictor_loss_weight=0.5, dtf_prior_loss_weight=0.3)
UPDATE_TOL = 1e-6  # float32: |Δloss| / loss and ‖Δgrad‖ / ‖grad‖ over every tensor (each alone within 1e-5: a
# scalar's gradient, a sum over every position, reordered, rounds to ~1e-6 of itself)


def test_the_cases_hold_every_routing_kind():
    """CASES here and ROUTED in test_routing.py are written by hand: a routing kind added to the spec's CHOICES is held
    against the float64 reference, the other twin and the one-shot update only once a case uses it."""
    for name, cases in (("ROUTED (test_routing.py)", ROUTED), ("CASES", CASES)):
        missing = set(CHOICES["routing"]) - {"none"} - {make_spec(**c).routing for c in cases}
        assert not missing, f"{name} has no case with routing in {sorted(missing)}"


def test_routed_weights_move_every_router_parameter_off_its_init():
    """routed_weights sets DTF's gate scalars by name: a router's scalar left at its init (a new router's, or one
    dropped from that list) lets a twin that hard-codes its init value pass every routing test."""
    for changes in ROUTED + CASES:
        spec = make_spec(**changes)
        w, init = routed_weights(spec), init_weights(spec, 0)
        kept = [t.name for t in layout(spec) if ".router" in t.name and np.any(w[t.name] == init[t.name])]
        assert not kept, f"routed_weights leaves these at their init value: {kept}"


def uneven_batch(spec):
    """4 rows of 17 tokens; micro-batch 0 (rows 0, 2 at grad_accum_steps = 2) counts 3 + 3 targets, micro-batch 1
    (rows 1, 3) 16 + 16: a token-weighted share of the aux terms is then far from the positions' share."""
    x_BN = tokens(spec, 4, 17, seed=3)
    mask_BN = np.ones_like(x_BN)
    mask_BN[[0, 2], 4:] = 0
    return x_BN, mask_BN


def update(twin, train, w, spec, x_BN, mask_BN, cfg):
    return train.loss_and_grads(twin.from_weights(w, spec), x_BN, mask_BN, cfg=cfg)


@pytest.mark.slow
@pytest.mark.parametrize("changes", CASES, ids=case_ids(CASES))
def test_accumulated_update_equals_the_one_shot_update(changes):
    spec = make_spec(**changes)
    w, (x_BN, mask_BN) = routed_weights(spec), uneven_batch(spec)
    assert_margins(reference_taps(w, spec, x_BN[:, :-1]), spec, "topk")
    expected = reference_train_loss(w, spec, x_BN, mask_BN, CFG)
    for name, twin, train in TWINS:
        loss, grads = update(twin, train, w, spec, x_BN, mask_BN, CFG)
        assert abs(loss - expected) / expected <= 1e-5, (name, loss, expected)
        acc_loss, acc_grads = update(twin, train, w, spec, x_BN, mask_BN, CFG.replace(grad_accum_steps=2))
        assert abs(acc_loss - loss) / loss <= UPDATE_TOL, (name, acc_loss, loss)
        assert update_error(acc_grads, grads) <= UPDATE_TOL, (name, update_error(acc_grads, grads))
        bad = {n: f"{max_rel(acc_grads[n], g):.1e}" for n, g in grads.items() if not max_rel(acc_grads[n], g) <= 1e-5}
        assert not bad, f"{name}: accumulated gradients differ from the one-shot ones: {bad}"


def update_error(got: dict, want: dict) -> float:
    """‖got − want‖ / ‖want‖ over every tensor together (the whole gradient as one vector)."""
    num = sum(float(np.sum((got[n].astype(np.float64) - g) ** 2)) for n, g in want.items())
    return (num / sum(float(np.sum(np.square(g, dtype=np.float64))) for g in want.values())) ** 0.5


def routed_fd_failures(changes) -> list[str]:
    """finite_difference_errors of both twins' routed gradients (masked batch, aux terms weighted) against the
    float64 reference's train loss with its stop-gradient inputs held."""
    spec = make_spec(**changes)
    w, (x_BN, mask_BN) = routed_weights(spec), uneven_batch(spec)
    assert_margins(reference_taps(w, spec, x_BN[:, :-1]), spec, "topk")
    grads = {name: update(twin, train, w, spec, x_BN, mask_BN, CFG)[1] for name, twin, train in TWINS}
    held: dict = {}
    reference_train_loss(w, spec, x_BN, mask_BN, CFG, held)  # records the stop-gradient inputs at w
    return finite_difference_errors(w, spec, x_BN, grads,
                                    loss=lambda v: reference_train_loss(v, spec, x_BN, mask_BN, CFG, held))


@pytest.mark.slow
@pytest.mark.parametrize("changes", CASES, ids=case_ids(CASES))
def test_routed_gradients_match_finite_differences_of_the_reference(changes):
    failures = routed_fd_failures(changes)
    assert not failures, failures


def eval_losses(twin, train, w, spec, xs_BN, mask_BN):
    """The eval step's losses for each batch of `xs_BN`: one model and one step for all (one compilation)."""
    model = twin.from_weights(w, spec)
    step, state = train.make_eval_step(model), train.init_train_state(model, CFG)
    return [{k: float(v) for k, v in step(state, x_BN, mask_BN).items()} for x_BN in xs_BN]


@pytest.mark.parametrize("changes", CASES, ids=case_ids(CASES))
def test_evaluation_is_causal(changes):
    """Targets 1..t+1 (logits at 0..t) counted; tokens after t+1 changed: the eval loss stays, top-k's moves."""
    spec = make_spec(**changes)
    w, x_BN, t = routed_weights(spec), tokens(spec, 2, 17, seed=5), 7
    later = x_BN.copy()
    later[:, t + 2 :] = tokens(spec, 2, 17, seed=6)[:, t + 2 :]
    mask_BN = np.zeros_like(x_BN)
    mask_BN[:, : t + 2] = 1
    assert_margins(reference_taps(w, spec, x_BN[:, :-1], "predictor"), spec, "predictor")
    for name, twin, train in TWINS:
        a, b = eval_losses(twin, train, w, spec, (x_BN, later), mask_BN)
        assert set(a) == {"loss", "loss_topk"}
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * a["loss"], (name, a, b)
        assert (abs(a["loss_topk"] - b["loss_topk"])
                > 1e-4 * a["loss_topk"]), (name, "top-k should read the future", a, b)
        with_logits = twin.from_weights(w, spec)
        logits = [np.asarray(forward(twin, with_logits, x)) for x in (x_BN, later)]
        assert np.abs(logits[0][:, : t + 1] - logits[1][:, : t + 1]).max() <= 1e-6 * np.abs(logits[0]).max(), name


def forward(twin, model, x_BN):
    """The evaluation forward (predictor mode) of inputs x[:, :-1]: logits [B, T, V]."""
    import jax.numpy as jnp
    import torch

    if twin.__name__ == "jax_model":
        return model(jnp.asarray(x_BN[:, :-1]), decide="predictor")
    with torch.no_grad():
        return model(torch.as_tensor(x_BN[:, :-1]), decide="predictor").numpy()


@pytest.mark.parametrize("backend", quick_first(["torch", "jax"]))
def test_train_loop_reports_the_causal_validation_loss_and_top_k_beside_it(backend, tmp_path):
    """scripts/train.py's eval record and summary: val_loss/val_ppl the predictor-mode loss, val_*_topk the top-k's."""
    import math

    from shared_config.loop import Loop, trainer_factory
    from shared_config.run import resolve_run
    from shared_config.metrics import read_metrics
    from shared_config.twins import twin

    from .test_train_loop import SMALL, T

    # sigmoid: top-k
    routed = ["--set", "routing=mod", "--set", "routing_capacity=0.3", "--set", "routing_gate=sigmoid"]
    # and predictor mode already part at init (a raw gate, r ≈ 0, leaves them equal in float32)
    small = [{"warmup_steps=4": "warmup_steps=1"}.get(a, a) for a in SMALL]  # a key is --set once
    args = ["--backend", backend, "--out", str(tmp_path), *small, *routed, "--steps", "2",
            "--eval-every", "2", "--eval-batches", "1"]
    run = resolve_run(T.parse_args(args))
    summary = Loop(run, trainer_factory(twin(backend, "trainer").Trainer, run), progress=False)()
    (record,) = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    assert record["val_ppl"] == pytest.approx(math.exp(record["val_loss"]))
    assert record["val_ppl_topk"] == pytest.approx(math.exp(record["val_loss_topk"]))
    assert record["val_loss"] != record["val_loss_topk"]
    assert ({k: summary[k] for k in ("val_loss", "val_loss_topk")}
            == {k: record[k] for k in ("val_loss", "val_loss_topk")})


@pytest.mark.parametrize("changes", quick_first(CASES), ids=case_ids(CASES))
def test_evaluation_is_row_separable(changes):
    """Rows 0 and 1..3 (3 vs 35 counted targets), each eval step given the whole batch's count: their losses add up
    to the whole batch's, loss_topk too. torch_model.distributed.make_eval_step sums its ranks' parts so."""
    spec = make_spec(**changes)
    w, (x_BN, mask_BN) = routed_weights(spec), uneven_batch(spec)
    count = float(mask_BN[:, 1:].sum())
    for name, twin, train in TWINS:
        model = twin.from_weights(w, spec)
        step, state = train.make_eval_step(model), train.init_train_state(model, CFG)
        whole = step(state, x_BN, mask_BN)
        parts = [step(state, x_BN[rows], mask_BN[rows], count) for rows in (slice(0, 1), slice(1, 4))]
        assert set(whole) == {"loss", "loss_topk"}, (name, whole)
        for key, value in whole.items():
            summed = sum(float(part[key]) for part in parts)
            assert abs(summed - float(value)) <= 1e-6 * float(value), (name, key, summed, float(value))


def test_a_routed_block_that_no_token_reaches_trains_alike_in_both_twins():
    """floor(γ·T) = 0 (γ 0.125, T 7): no token runs a routed block, whose weights get no gradient. torch left their
    .grad None and its fused AdamW raised at step 1 (`train.py --backend torch --set routing=mod --set seq_len=4`:
    a traceback, exit 1) while JAX took zeros, which AdamW decays; now both take zeros, and update alike. (train.py
    and the studies now refuse such a run, TrainConfig.model_spec; a library caller may still step on it.)"""
    spec = make_spec(routing="mod", routing_capacity=0.125)
    cfg = TrainConfig(steps=2, warmup_steps=0, lr=1e-2, weight_decay=0.5)
    w, x_BN = routed_weights(spec), tokens(spec, 2, 8)
    after = {}
    for name, twin, train in TWINS:
        model = twin.from_weights(w, spec)
        state, _ = train.make_train_step(model, cfg)(train.init_train_state(model, cfg), x_BN)
        after[name] = train.get_train_state(model, state)["weights"]
    routed = [n for n in w if n.startswith(f"model.layers.{spec.routed_layers[0]}.mlp.")]
    assert routed and all(not np.array_equal(after["torch"][n], w[n]) for n in routed)  # decayed
    assert max(max_rel(after["torch"][n], a) for n, a in after["jax"].items()) <= TRAJ_PARAM_TOL
