"""Training for the JAX twin: next-token loss, gradients by canonical name, AdamW (optax), one train step.

torch_model/train.py is the same file in PyTorch; both compute the same update (see the comments
where the libraries' defaults differ).

    state = init_train_state(model, cfg)                   # TrainState(step, params, opt_state)
    train_step = make_train_step(model, cfg)               # jax.jit of a pure function, state donated
    state, metrics = train_step(state, tokens_BN)          # metrics: loss, grad_norm (before clipping), lr (+ routing's)
    eval_step = make_eval_step(model)                      # eval_step(state, tokens_BN) -> loss, no update
    get_train_state(model, state)                          # canonical weights, AdamW m and v, step

`train_step(state, tokens_BN, mask_BN=None, count=None) -> (state, metrics)`: the step donates
`state` (and at the first step the model's own arrays): keep only the returned state;
`set_weights(model, ...)` or `nnx.update(model, state.params)` puts trained weights back into the
model. Metrics are float32 device scalars: nothing inside the step waits for the host.

Notation: B batch, N = T + 1 tokens per batch row, T positions the model reads, V vocab.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from shared_config import TrainConfig, decays, lr_factor, model_layout

from .weights import dotted, flat_arrays, set_weights, to_canonical, to_pure_dict

IGNORE_INDEX = -100  # a target equal to this is not predicted (Hugging Face's convention)


def split_batch(tokens_BN, mask_BN=None):
    """Inputs, targets and target weights of a batch: tokens[:, :-1] predicts tokens[:, 1:].

    A target counts when it is not IGNORE_INDEX and, if a mask (shaped like the tokens) is given,
    its mask entry is nonzero. Ignored tokens are read as token 0 where they are inputs.
    """
    tokens_BN = jnp.asarray(tokens_BN)
    inputs_BT, targets_BT = tokens_BN[:, :-1], tokens_BN[:, 1:]
    weights_BT = (targets_BT != IGNORE_INDEX).astype(jnp.float32)
    if mask_BN is not None:
        weights_BT = weights_BT * (jnp.asarray(mask_BN)[:, 1:] != 0)
    inputs_BT = jnp.where(inputs_BT == IGNORE_INDEX, 0, inputs_BT)
    return inputs_BT, jnp.where(targets_BT == IGNORE_INDEX, 0, targets_BT), weights_BT


def next_token_loss(logits_BTV, targets_BT, weights_BT, count=None):
    """Cross-entropy logsumexp(logits) − logits[target] in float32, summed over the counted targets and divided
    by `count`: by default their number (at least 1), the mean. A data-parallel rank or a micro-batch passes
    the whole batch's count (over the ranks averaging it), so that the parts add up to the whole batch's mean."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    count = jnp.maximum(jnp.sum(weights_BT), 1.0) if count is None else count
    return jnp.sum((logz_BT - target_logit_BT) * weights_BT) / count


def model_loss(model, tokens_BN, mask_BN=None, count=None, cfg: TrainConfig | None = None, metrics: dict | None = None):
    """The model's next-token loss on a batch: the mean, or the sum over `count` (next_token_loss); with a `cfg`,
    plus a routed spec's auxiliary losses (routing_loss), their terms put into `metrics`."""
    inputs_BT, targets_BT, weights_BT = split_batch(tokens_BN, mask_BN)
    aux = {} if cfg is not None else None
    loss = next_token_loss(model(inputs_BT, aux=aux), targets_BT, weights_BT, count)
    return loss + routing_loss(aux, weights_BT, count, cfg, metrics)


def routing_loss(aux: dict | None, weights_BT, count, cfg: TrainConfig | None, metrics: dict | None):
    """router_predictor_loss_weight · router_bce + dtf_prior_loss_weight · prior_mse (routing.Routes.finish), 0
    for a dense spec; with a `count`, scaled by this part's share of the counted targets, so that parts add up to
    the token-weighted whole. `metrics` gets router_bce, predictor_acc, prior_mse."""
    if not aux:
        return 0.0
    if metrics is not None:
        metrics.update(aux)
    extra = cfg.router_predictor_loss_weight * aux["router_bce"] + cfg.dtf_prior_loss_weight * aux.get("prior_mse", 0.0)
    return extra if count is None else extra * jnp.sum(weights_BT) / count


def loss_and_grads(model, tokens_BN, mask_BN=None, count=None, cfg: TrainConfig | None = None) -> tuple[float, dict[str, np.ndarray]]:
    """The loss (with `cfg`, routing's auxiliary losses included) and its gradient per canonical tensor (q/k/v split
    back, torch orientation), float32 numpy."""
    graphdef, params, rest = split_params(model)
    loss, grads = _value_and_grad(graphdef, cfg, params, rest, jnp.asarray(tokens_BN), mask_BN, count)
    return float(loss), {k: v.astype(np.float32) for k, v in to_canonical(flat_arrays(grads), model.spec).items()}


def make_optimizer(model, cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and the shared schedule, computing torch.optim.AdamW's update."""
    decayed = {t.jax_name: decays(t, cfg) for t in model_layout(model.spec)}
    return optax.chain(
        # torch_model clips by hand: torch's clip_grad_norm_ divides by norm + 1e-6, optax by the norm
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(
            # called with the count of updates so far: update 0 gets lr_factor(0), as torch's LambdaLR
            learning_rate=lambda count: cfg.lr * lr_factor(cfg, count, jnp),
            b1=cfg.beta1,  # bias correction of m and v: always on, in optax as in torch
            b2=cfg.beta2,  # optax's default is 0.999, as torch's: passed anyway
            eps=cfg.eps,  # added to sqrt(v̂), as torch does; eps_root=0 (the default) keeps it out of the sqrt
            weight_decay=cfg.weight_decay,  # optax's default is 1e-4, torch's 1e-2: always passed
            # decoupled decay times the scheduled lr (optax: added before scale_by_learning_rate;
            # torch: p *= 1 − lr·wd before the Adam step), on the tensors `decays` names only
            mask=lambda params: nnx.map_state(lambda path, _: decayed[dotted(path)], params),
        ),
    )


class TrainState(NamedTuple):
    step: jax.Array  # updates applied so far (int32)
    params: nnx.State
    opt_state: optax.OptState


def init_train_state(model, cfg: TrainConfig) -> TrainState:
    """Step 0: the model's parameters and a fresh AdamW state (m = v = 0)."""
    params = nnx.state(model, nnx.Param)
    return TrainState(jnp.zeros((), jnp.int32), params, make_optimizer(model, cfg).init(params))


def make_train_step(model, cfg: TrainConfig, *, compile: bool = True) -> Callable:
    """`train_step(state, tokens_BN, mask_BN=None, count=None) -> (state, metrics)`; `compile`: jax.jit it, donating
    the state. `count`: what the summed loss is divided by (next_token_loss; default: the counted targets)."""
    graphdef, _, rest = split_params(model)
    optimizer = make_optimizer(model, cfg)

    def train_step(state: TrainState, tokens_BN, mask_BN=None, count=None):
        def loss_fn(params):
            aux_metrics = {}  # routed specs: router_bce, predictor_acc, prior_mse
            return model_loss(nnx.merge(graphdef, params, rest), tokens_BN, mask_BN, count, cfg, aux_metrics), aux_metrics

        (loss, aux_metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": cfg.lr * lr_factor(cfg, state.step, jnp), **aux_metrics}
        return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), metrics

    # jax.jit of a pure function of arrays: nnx.jit would walk the object graph in Python every call
    return jax.jit(train_step, donate_argnums=0) if compile else train_step


def make_eval_step(model, *, compile: bool = True) -> Callable:
    """`eval_step(state, tokens_BN, mask_BN=None) -> loss`: the loss of the state's parameters, no update."""
    graphdef, _, rest = split_params(model)

    def eval_step(state: TrainState, tokens_BN, mask_BN=None):
        return model_loss(nnx.merge(graphdef, state.params, rest), tokens_BN, mask_BN)

    return jax.jit(eval_step) if compile else eval_step


def scalar_params(model, state: TrainState) -> dict[str, jax.Array]:
    """The state's one-element parameters (alpha, shift, embed_scale) by canonical name, as device scalars."""
    names = {t.jax_name: t.name for t in model_layout(model.spec) if t.shape == (1,)}
    return {names[path]: x[0] for path, x in flat_arrays(state.params).items() if path in names}


def get_train_state(model, state: TrainState) -> dict[str, Any]:
    """The state in canonical names: {"step": int, "weights", "m", "v": {canonical name: numpy}}."""
    m, v = (optax.tree_utils.tree_get(state.opt_state, key) for key in ("mu", "nu"))
    canonical = {key: to_canonical(flat_arrays(x), model.spec) for key, x in (("weights", state.params), ("m", m), ("v", v))}
    return {"step": int(state.step), **canonical}


def set_train_state(model, state: TrainState, canonical: dict[str, Any]) -> TrainState:
    """`state` (e.g. fresh from init_train_state) holding a canonical train state, from either twin."""
    set_weights(model, canonical["weights"])
    params, spec, step = nnx.state(model, nnx.Param), model.spec, jnp.asarray(canonical["step"], jnp.int32)
    m, v = (from_pure_dict(params, to_pure_dict(canonical[key], spec)) for key in ("m", "v"))
    opt_state = optax.tree_utils.tree_set(state.opt_state, mu=m, nu=v, count=step)  # Adam's and the schedule's count
    # copied: the counts now share one array, and the step donates its arguments buffer by buffer
    return TrainState(step, params, jax.tree.map(jnp.copy, opt_state))


# --- helpers ---------------------------------------------------------------------------------------


def split_params(model):
    """graphdef, parameters, and any other state (kept fixed while training)."""
    return nnx.split(model, nnx.Param, ...)


def from_pure_dict(like: nnx.State, pure: dict) -> nnx.State:
    """A state shaped like `like` holding the arrays of a nested pure dict."""
    state = jax.tree.map(jnp.zeros_like, like)
    nnx.replace_by_pure_dict(state, pure)
    return state


@partial(jax.jit, static_argnums=(0, 1))
def _value_and_grad(graphdef, cfg, params, rest, tokens_BN, mask_BN, count):
    return jax.value_and_grad(lambda p: model_loss(nnx.merge(graphdef, p, rest), tokens_BN, mask_BN, count, cfg))(params)
