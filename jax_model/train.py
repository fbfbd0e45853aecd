"""Training for the JAX twin: the model's loss (loss.py), gradients by canonical name, AdamW (optax), one train step.

torch_model/train.py is the same file in PyTorch; both compute the same update (see the comments
where the libraries' defaults differ).

    state = init_train_state(model, cfg)                # TrainState(step, params, opt_state, working)
    train_step = make_train_step(model, cfg)            # jax.jit of a pure function, state donated
    state, metrics = train_step(state, tokens_BN)       # metrics: loss, grad_norm (before clipping), lr (+ routing's)
    eval_step = make_eval_step(model)                   # eval_step(state, tokens_BN) -> {loss (+ loss_topk)}, no update
    get_train_state(model, state)                       # canonical weights, AdamW m and v, step

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

from shared_config import SpecError, TrainConfig, check_train_state, decays, flat_taps, lr_factor, model_layout
from shared_config.tokens import CheckedStep, check_batch
from shared_config.train_config import as_train_config

from .layers import DTYPES, working_copy
from .loss import (IGNORE_INDEX, chunked_next_token_loss, host_ids, next_token_loss, routing_loss,
                   split_batch)
from .weights import dotted, flat_arrays, set_weights, to_canonical, to_pure_dict, whole

def model_loss(model, tokens_BN, mask_BN=None, count=None, cfg: TrainConfig | None = None, metrics: dict | None = None,
               *, remat: str = "none", loss_chunk: int = 0, share: float = 1.0, decide: str | None = None):
    """The model's next-token loss on a batch: the mean, or the sum over `count` (next_token_loss); with a `cfg`,
    plus a routed spec's auxiliary losses (routing_loss) times `share`, this batch's share of the rows of the batch
    it is part of (a micro-batch's: 1 / grad_accum_steps), their terms put into `metrics`. `remat` and `loss_chunk`:
    the train config's memory options (the same loss, less memory); `decide`: a routed spec's selection (the model's
    `decide`; None: top-k, as training)."""
    inputs_BT, targets_BT, weights_BT = split_batch(tokens_BN, mask_BN)
    aux = {} if cfg is not None else None
    if not loss_chunk or loss_chunk >= targets_BT.size:  # one chunk of every token is no chunking
        loss = next_token_loss(model(inputs_BT, aux=aux, decide=decide, remat=remat), targets_BT, weights_BT, count)
    else:
        x_BTD = model(inputs_BT, aux=aux, decide=decide, remat=remat, logits=False)
        loss = chunked_next_token_loss(model, x_BTD, targets_BT, weights_BT, count, loss_chunk)
    return loss + share * routing_loss(aux, cfg, metrics)


def micro_batches(x_BN, n: int):
    """A batch [B, ...] as n micro-batches [n, B/n, ...]: micro-batch i holds rows i, i + n, i + 2n, ..., so a device
    (or rank) holding a contiguous block of B/W rows keeps its own rows in every micro-batch."""
    x_BN = jnp.asarray(x_BN)
    B = x_BN.shape[0]
    if B % n:
        raise SpecError(f"grad_accum_steps={n} must divide the {B} rows of a batch (per device or rank)")
    return x_BN.reshape(B // n, n, *x_BN.shape[1:]).swapaxes(0, 1)


def accumulate_gradients(loss_fn, params, tokens_BN, mask_BN, count, steps: int):
    """`loss_fn(params, tokens_BN, mask_BN, count, share) -> (loss, metrics)` and the loss's gradient, over `steps`
    micro-batches (micro_batches) in a lax.scan: one micro-batch's activations at a time. Each micro-batch's summed
    loss is divided by the whole batch's count, and its routing terms (means over its positions) weighted by its
    share 1/steps of the rows, so the sums of the values and gradients are the one-shot step's (model_loss); the
    metrics (routing's means) are averaged over the micro-batches."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if steps == 1:
        return grad_fn(params, tokens_BN, mask_BN, count, 1.0)
    count = jnp.maximum(jnp.sum(split_batch(tokens_BN, mask_BN)[2]), 1.0) if count is None else count
    micro = (micro_batches(tokens_BN, steps), None if mask_BN is None else micro_batches(mask_BN, steps))

    def add(total, batch):
        return jax.tree.map(jnp.add, total, grad_fn(params, *batch, count, 1.0 / steps)), None

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(grad_fn, params, *first, count, 1.0 / steps))
    (loss, metrics), grads = jax.lax.scan(add, zeros, micro)[0]
    return (loss, jax.tree.map(lambda m: m / steps, metrics)), grads


def loss_and_grads(model, tokens_BN, mask_BN=None, count=None, cfg: TrainConfig | None = None, *, remat: str = "none",
                   loss_chunk: int = 0) -> tuple[float, dict[str, np.ndarray]]:
    """The loss (with `cfg`, routing's auxiliary losses included) and its gradient per canonical tensor (q/k/v split
    back, torch orientation), float32 numpy; with `cfg.grad_accum_steps` > 1, summed over its micro-batches as the
    train step does (accumulate_gradients)."""
    check_batch(tokens_BN, model.spec, IGNORE_INDEX, mask_BN, host_ids, count)
    if cfg is not None:
        cfg = as_train_config(cfg)
    graphdef, params, rest = split_params(model)
    loss, grads = _value_and_grad(graphdef, cfg, remat, loss_chunk, params, rest, jnp.asarray(tokens_BN), mask_BN,
                                  count)
    return float(loss), {k: v.astype(np.float32) for k, v in to_canonical(flat_arrays(grads), model.spec).items()}


def forward_taps(model, tokens_BT) -> dict[str, np.ndarray]:
    """Every tapped activation of one forward pass of tokens [B, T] (`model.embed`, `model.layers.0.attn_out`, ...,
    `logits`), float32 numpy, in the order the model computes them: what "the first non-finite tensor" reads."""
    taps = {}
    model(jnp.asarray(tokens_BT), taps=taps)
    return {name: whole(x).astype(np.float32) for name, x in flat_taps(taps).items()}  # not jax.tree.map: it sorts keys


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
    """Everything a train step reads and returns (a pytree: jit donates it): the update count, the parameters, the
    AdamW state and, under mixed precision, the working weights. torch_model/train.py's TrainState is its twin."""

    step: jax.Array  # updates applied so far (int32)
    params: nnx.State
    opt_state: optax.OptState
    working: dict[str, jax.Array]  # the working weights (working_weights), by JAX path; {} without


def init_train_state(model, cfg: TrainConfig) -> TrainState:
    """Step 0: the model's parameters, a fresh AdamW state (m = v = 0) and the working weights."""
    cfg = as_train_config(cfg)
    params = nnx.state(model, nnx.Param)
    working = working_weights(model, params, working_names(model, cfg))
    return TrainState(jnp.zeros((), jnp.int32), params, make_optimizer(model, cfg).init(params), working)


def working_names(model, cfg: TrainConfig) -> tuple[str, ...]:
    """The weights (JAX paths) the train step keeps working copies of, in the compute dtype (working_weights): every
    Linear weight when the compute dtype is narrower than the parameters' (mixed precision), but the LM head under a
    chunked loss (head_loss sums its gradient over chunks in float32 from the master). The embeddings are looked up
    in float32 and have none."""
    spec = model.spec
    if spec.compute_dtype == spec.param_dtype:
        return ()
    return tuple(t.jax_name for t in model_layout(spec)
                 if t.kind == "linear" and not (cfg.loss_chunk and t.name == "lm_head.weight"))


def working_weights(model, params: nnx.State, names) -> dict[str, jax.Array]:
    """The working weights: the master weights `names` cast to the compute dtype, made after each update (fused into
    the optimizer's by XLA), so the forward reads them instead of casting every weight at every use (and again in
    a rematted backward, and per micro-batch). Apex's and Megatron's model weights beside float32 master weights."""
    flat = flat_arrays(params)
    return {name: flat[name].astype(DTYPES[model.spec.compute_dtype]) for name in names}


def refresh_working(model, params: nnx.State, working: dict) -> dict[str, jax.Array]:
    """`working` made again from the masters `params` after an update (a new dict: the state is functional; XLA fuses
    the casts into the optimizer's update)."""
    return working_weights(model, params, tuple(working))


def read_working(params: nnx.State, working: dict) -> nnx.State:
    """`params` with each weight of `working` read as its working copy (layers.working_copy): the forward reads the
    copy, the gradient goes to the master in float32, bit for bit what casting the master gives."""
    if not working:
        return params
    return nnx.map_state(lambda path, v: v.replace(working_copy(v[...], working[dotted(path)]))
                         if dotted(path) in working else v, params)


def make_train_step(model, cfg: TrainConfig, *, compile: bool = True) -> Callable:
    """`train_step(state, tokens_BN, mask_BN=None, count=None) -> (state, metrics)`; `compile`: jax.jit it, donating
    the state. `count`: what the summed loss is divided by (next_token_loss; default: the counted targets).
    cfg.grad_accum_steps, remat and loss_chunk: the same update with less memory (docs/training.md, "Training bigger
    models")."""
    cfg = as_train_config(cfg)
    graphdef, _, rest = split_params(model)
    optimizer = make_optimizer(model, cfg)

    def loss_fn(working, params, tokens_BN, mask_BN, count, share):
        aux_metrics = {}  # routed specs: router_bce, predictor_acc, prior_mse
        model = nnx.merge(graphdef, read_working(params, working), rest)
        loss = model_loss(model, tokens_BN, mask_BN, count, cfg, aux_metrics, remat=cfg.remat,
                          loss_chunk=cfg.loss_chunk, share=share)
        return loss, aux_metrics

    def train_step(state: TrainState, tokens_BN, mask_BN=None, count=None):
        (loss, aux_metrics), grads = accumulate_gradients(partial(loss_fn, state.working), state.params, tokens_BN,
                                                          mask_BN, count, cfg.grad_accum_steps)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": cfg.lr * lr_factor(cfg, state.step, jnp),
                   **aux_metrics}
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state, refresh_working(model, params, state.working)), metrics

    # jax.jit of a pure function of arrays: nnx.jit would walk the object graph in Python every call
    return CheckedStep(jax.jit(train_step, donate_argnums=0) if compile else train_step, model.spec, IGNORE_INDEX,
                       host_ids)


def make_eval_step(model, *, compile: bool = True) -> Callable:
    """`eval_step(state, tokens_BN, mask_BN=None, count=None) -> {"loss": ..., "loss_topk": ...}`: the state's losses,
    no update; `count`: what the summed losses are divided by (next_token_loss; default: the counted targets).
    "loss": the causal forward's (a routed spec in predictor mode: each token's route decided from itself and the
    tokens before it, as in decoding; comparable with a dense model's); "loss_topk", routed specs only: the top-k
    forward's, as trained, which reads future tokens (the top-k is over the whole sequence; docs/routing.md)."""
    graphdef, _, rest = split_params(model)
    routed = model.spec.routing != "none"

    def eval_step(state: TrainState, tokens_BN, mask_BN=None, count=None):
        model = nnx.merge(graphdef, state.params, rest)
        losses = {"loss": model_loss(model, tokens_BN, mask_BN, count, decide="predictor")}
        if routed:
            losses["loss_topk"] = model_loss(model, tokens_BN, mask_BN, count, decide="topk")
        return losses

    return CheckedStep(jax.jit(eval_step) if compile else eval_step, model.spec, IGNORE_INDEX, host_ids)


def scalar_params(model, state: TrainState) -> dict[str, jax.Array]:
    """The state's one-element parameters (alpha, shift, embed_scale) by canonical name, as device scalars."""
    names = {t.jax_name: t.name for t in model_layout(model.spec) if t.shape == (1,)}
    return {names[path]: x[0] for path, x in flat_arrays(state.params).items() if path in names}


def get_train_state(model, state: TrainState) -> dict[str, Any]:
    """The state in canonical names: {"step": int, "weights", "m", "v": {canonical name: numpy}}."""
    m, v = (optax.tree_utils.tree_get(state.opt_state, key) for key in ("mu", "nu"))
    canonical = {key: to_canonical(flat_arrays(x), model.spec)
                 for key, x in (("weights", state.params), ("m", m), ("v", v))}
    return {"step": int(state.step), **canonical}


def set_train_state(model, state: TrainState, canonical: dict[str, Any]) -> TrainState:
    """`state` (e.g. fresh from init_train_state) holding a canonical train state, from either twin; CheckpointError
    for one that is not {"step", "weights", "m", "v"} of this model's layout (check_train_state)."""
    check_train_state(canonical, model.spec)
    set_weights(model, canonical["weights"])
    params, spec, step = nnx.state(model, nnx.Param), model.spec, jnp.asarray(canonical["step"], jnp.int32)
    m, v = (from_pure_dict(params, to_pure_dict(canonical[key], spec)) for key in ("m", "v"))
    opt_state = optax.tree_utils.tree_set(state.opt_state, mu=m, nu=v, count=step)  # Adam's and the schedule's count
    # copied: the counts now share one array, and the step donates its arguments buffer by buffer
    return TrainState(step, params, jax.tree.map(jnp.copy, opt_state), refresh_working(model, params, state.working))


# --- helpers ---------------------------------------------------------------------------------------


def split_params(model):
    """graphdef, parameters, and any other state (kept fixed while training)."""
    return nnx.split(model, nnx.Param, ...)


def from_pure_dict(like: nnx.State, pure: dict) -> nnx.State:
    """A state shaped like `like` holding the arrays of a nested pure dict."""
    state = jax.tree.map(jnp.zeros_like, like)
    nnx.replace_by_pure_dict(state, pure)
    return state


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _value_and_grad(graphdef, cfg, remat, loss_chunk, params, rest, tokens_BN, mask_BN, count):
    def loss_fn(p, tokens_BN, mask_BN, count, share):
        model = nnx.merge(graphdef, p, rest)
        return model_loss(model, tokens_BN, mask_BN, count, cfg, remat=remat, loss_chunk=loss_chunk, share=share), {}

    steps = 1 if cfg is None else cfg.grad_accum_steps  # the train step's accumulation
    (loss, _), grads = accumulate_gradients(loss_fn, params, tokens_BN, mask_BN, count, steps)
    return loss, grads
