"""Helpers shared by the training-parity tests: both twins' train modules, trajectories, a float64 loss."""

from __future__ import annotations

import numpy as np

import jax_model
import torch_model
from jax_model import train as jax_train
from shared_config import TrainConfig, synthetic_batch
from shared_config.parity import log_softmax
from torch_model import train as torch_train

from . import reference

# (name, the twin's package, its train module), for tests that run the same code on both sides
TWINS = [("jax", jax_model, jax_train), ("torch", torch_model, torch_train)]


def both_loss_and_grads(weights, spec, tokens_BN, mask_BN=None, attention=("auto", "auto")):
    """(loss, canonical grads) of the JAX twin, then of the torch twin."""
    return tuple(
        train.loss_and_grads(twin.from_weights(weights, spec, attention=kernel), tokens_BN, mask_BN)
        for (_, twin, train), kernel in zip(TWINS, attention)
    )


def trajectory(twin, train, weights, spec, cfg: TrainConfig, steps: int | None = None, batch=None):
    """Train from `weights` on the synthetic batches of `cfg` (or on `batch(i)`: tokens and mask of step i):
    per-step metrics and the final canonical state."""
    model = twin.from_weights(weights, spec)
    state, step, metrics = train.init_train_state(model, cfg), train.make_train_step(model, cfg), []
    batch = batch or (lambda i: (synthetic_batch(cfg.seed, i, cfg.batch_size, cfg.seq_len, spec.V), None))
    for i in range(cfg.steps if steps is None else steps):
        state, m = step(state, *batch(i))
        metrics.append(m)
    metrics = {k: np.array([float(m[k]) for m in metrics]) for k in ("loss", "grad_norm", "lr")}
    return metrics, train.get_train_state(model, state)


def reference_loss(weights, spec, tokens_BN, weights_BT=None) -> float:
    """The mean next-token cross-entropy in float64, from the independent numpy forward."""
    logp_BTV = log_softmax(reference.forward(weights, spec, tokens_BN[:, :-1]))
    targets_BT = np.maximum(tokens_BN[:, 1:], 0)
    nll_BT = -np.take_along_axis(logp_BTV, targets_BT[..., None], -1)[..., 0]
    weights_BT = np.ones_like(nll_BT) if weights_BT is None else weights_BT
    return float((nll_BT * weights_BT).sum() / weights_BT.sum())


def reference_train_loss(weights, spec, tokens_BN, mask_BN, cfg: TrainConfig, held: dict | None = None) -> float:
    """The train step's loss in float64 on the global batch, from the definitions of docs/training.md: the mean
    cross-entropy over the counted targets (mask entry nonzero) + router_predictor_loss_weight · router BCE
    + dtf_prior_loss_weight · prior MSE, each aux term a mean over every position of the whole batch, averaged over
    the routed blocks (top-k forward). `held`: reference.stopgrad's record, for finite differences."""
    aux: dict = {}
    logp_BTV = log_softmax(reference.forward(weights, spec, tokens_BN[:, :-1], decide="topk", aux=aux, held=held))
    nll_BT = -np.take_along_axis(logp_BTV, tokens_BN[:, 1:, None], -1)[..., 0]
    counted_BT = np.ones_like(nll_BT) if mask_BN is None else (np.asarray(mask_BN)[:, 1:] != 0).astype(np.float64)
    ce = float((nll_BT * counted_BT).sum() / max(counted_BT.sum(), 1.0))
    return (ce + cfg.router_predictor_loss_weight * aux.get("router_bce", 0.0)
            + cfg.dtf_prior_loss_weight * aux.get("prior_mse", 0.0))
