"""Training for the PyTorch twin: the model's loss (loss.py), gradients by canonical name, AdamW (torch.optim),
one train step.

jax_model/train.py is the same file in JAX; both compute the same update (see the comments where
the libraries' defaults differ).

    state = init_train_state(model, cfg)                # TrainState(model, optimizer, scheduler, working)
    train_step = make_train_step(model, cfg)            # eager, or torch.compile'd with compile=True
    state, metrics = train_step(state, tokens_BN)       # metrics: loss, grad_norm (before clipping), lr (+ routing's)
    eval_step = make_eval_step(model)                   # eval_step(state, tokens_BN) -> {loss (+ loss_topk)}, no update
    get_train_state(model, state)                       # canonical weights, AdamW m and v, step

`train_step(state, tokens_BN, mask_BN=None, count=None) -> (state, metrics)`: the step updates the
model and the optimizer in place and returns the same state. Metrics are float32 scalars, loss and
grad_norm on the device (nothing inside the step waits for the host), lr on the host (the
scheduler's float).

Notation: B batch, N = T + 1 tokens per batch row, T positions the model reads, V vocab.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from shared_config import SpecError, TrainConfig, check_train_state, decays, flat_taps, lr_factor, model_layout
from shared_config.tokens import CheckedStep, check_batch
from shared_config.train_config import as_train_config

from .layers import DTYPES, working_copy
from .loss import (IGNORE_INDEX, chunked_next_token_loss, host_ids, next_token_loss, routing_loss,
                   split_batch)
from .model import compile_isolated
from .weights import set_weights, to_canonical, to_state_dict, whole

def model_loss(model, tokens_BN, mask_BN=None, count=None, cfg: TrainConfig | None = None, metrics: dict | None = None,
               *, remat: str = "none", loss_chunk: int = 0, share: float = 1.0, decide: str | None = None,
               working: dict | None = None):
    """The model's next-token loss on a batch: the mean, or the sum over `count` (next_token_loss); with a `cfg`,
    plus a routed spec's auxiliary losses (routing_loss) times `share`, this batch's share of the rows of the batch
    it is part of (a micro-batch's: 1 / grad_accum_steps), their terms put into `metrics`. `remat` and `loss_chunk`:
    the train config's memory options (the same loss, less memory); `decide`: a routed spec's selection (the model's
    `decide`; None: top-k, as training); `working`: the train state's working weights, read by the forward."""
    inputs_BT, targets_BT, weights_BT = split_batch(tokens_BN, mask_BN)
    aux = {} if cfg is not None else None
    forward = read_working(model, working)
    if not loss_chunk or loss_chunk >= targets_BT.numel():  # one chunk of every token is no chunking
        loss = next_token_loss(forward(inputs_BT, aux=aux, decide=decide, remat=remat), targets_BT, weights_BT, count)
    else:
        # through DDP's and FSDP2's forward: their hooks run
        x_BTD = forward(inputs_BT, aux=aux, decide=decide, remat=remat, logits=False)
        loss = chunked_next_token_loss(unwrapped(model), x_BTD, targets_BT, weights_BT, count, loss_chunk)
    return loss + share * routing_loss(aux, cfg, metrics)


def micro_batches(x_BN, n: int):
    """A batch [B, ...] as n micro-batches [n, B/n, ...]: micro-batch i holds rows i, i + n, i + 2n, ..., so a device
    (or rank) holding a contiguous block of B/W rows keeps its own rows in every micro-batch."""
    x_BN = torch.as_tensor(x_BN)
    B = x_BN.shape[0]
    if B % n:
        raise SpecError(f"grad_accum_steps={n} must divide the {B} rows of a batch (per device or rank)")
    return x_BN.reshape(B // n, n, *x_BN.shape[1:]).transpose(0, 1).contiguous()  # contiguous: one compiled graph


def accumulate_gradients(loss_fn, model, tokens_BN, mask_BN, count, steps: int,
                         metrics: dict | None = None) -> torch.Tensor:
    """Backward of `loss_fn(model, tokens_BN, mask_BN, count, metrics=..., share=...)` into the parameters' .grad, over
    `steps` micro-batches (micro_batches), one micro-batch's activations at a time; the loss. Each micro-batch's summed
    loss is divided by the whole batch's count, and its routing terms (means over its positions) weighted by its share
    1/steps of the rows, so the sums of the values and gradients are the one-shot step's (model_loss); `metrics`
    (routing's means) are averaged over the micro-batches. Under DDP or FSDP2 only the last micro-batch's backward
    communicates (gradient_sync)."""
    if steps == 1:
        loss = loss_fn(model, tokens_BN, mask_BN, count, metrics=metrics)
        loss.backward()
        return loss.detach()
    count = torch.clamp(torch.sum(split_batch(tokens_BN, mask_BN)[2]), min=1.0) if count is None else count
    tokens, masks = micro_batches(tokens_BN,
                                  steps), [None] * steps if mask_BN is None else micro_batches(mask_BN, steps)
    total = torch.zeros((), dtype=torch.float32, device=tokens_BN.device)
    for i in range(steps):
        part = {}
        with gradient_sync(model, i == steps - 1):
            loss = loss_fn(model, tokens[i], masks[i], count, metrics=part, share=1.0 / steps)
            loss.backward()
        total = total + loss.detach()
        if metrics is not None:
            for key, value in part.items():
                metrics[key] = metrics.get(key, 0.0) + value.detach() / steps
    return total


def loss_and_grads(model, tokens_BN, mask_BN=None, count=None, cfg: TrainConfig | None = None, *, remat: str = "none",
                   loss_chunk: int = 0) -> tuple[float, dict[str, np.ndarray]]:
    """The loss (with `cfg`, routing's auxiliary losses included) and its gradient per canonical tensor (q/k/v split
    back, torch orientation), float32 numpy; with `cfg.grad_accum_steps` > 1, summed over its micro-batches as the
    train step does (accumulate_gradients). An FSDP2 model: every rank calls it with the same batch (a collective)."""
    check_batch(tokens_BN, model.spec, IGNORE_INDEX, mask_BN, host_ids, count)
    if cfg is not None:
        cfg = as_train_config(cfg)
    names, params = zip(*model.named_parameters())
    batch = on_device(params[0].device, tokens_BN, mask_BN, count)
    # FSDP2's shards (DTensors) are not in the autograd graph (the forward reads gathered copies): autograd.grad gave
    # them zeros; their gradients arrive in .grad, reduce-scattered (each rank's batch is the whole batch: its mean)
    sharded = any(hasattr(p, "full_tensor") for p in params)
    if (cfg is None or cfg.grad_accum_steps == 1) and not sharded:
        loss = model_loss(model, *batch, cfg, remat=remat, loss_chunk=loss_chunk)
        grads = torch.autograd.grad(loss, params, materialize_grads=True)  # zeros where unused, as JAX; .grad untouched
    else:  # the train step's accumulation, into .grad: put back as it was after
        kept = [p.grad for p in params]
        for p in params:
            p.grad = None
        loss_fn = partial(model_loss, cfg=cfg, remat=remat, loss_chunk=loss_chunk)
        loss = accumulate_gradients(loss_fn, model, *batch, 1 if cfg is None else cfg.grad_accum_steps)
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        for p, g in zip(params, kept):
            p.grad = g
    return loss.item(), {k: v.astype(np.float32) for k, v in to_canonical(dict(zip(names, grads)), model.spec).items()}


@torch.no_grad()
def forward_taps(model, tokens_BT) -> dict[str, np.ndarray]:
    """Every tapped activation of one forward pass of tokens [B, T] (`model.embed`, `model.layers.0.attn_out`, ...,
    `logits`), float32 numpy, in the order the model computes them: what "the first non-finite tensor" reads."""
    taps = {}
    model(torch.as_tensor(tokens_BT, device=next(model.parameters()).device), taps=taps)
    return {name: whole(x).float().cpu().numpy() for name, x in flat_taps(taps).items()}


def make_optimizer(model, cfg: TrainConfig, *, fused: bool = True) -> tuple[torch.optim.AdamW, LambdaLR]:
    """AdamW and its schedule, computing optax.adamw's update; `fused`: one fused kernel (CPU and GPU), else foreach."""
    params = dict(model.named_parameters())
    groups = [
        {"params": [params[t.name] for t in model_layout(model.spec) if decays(t, cfg) == decay],
         "weight_decay": cfg.weight_decay if decay else 0.0}
        for decay in (True, False)
    ]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        # bias correction always on, as in optax; default beta2 0.999 in both: passed anyway
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,  # added to sqrt(v̂) (torch: sqrt(v)/sqrt(1 − β2ᵗ) + eps), as optax with eps_root=0
        weight_decay=cfg.weight_decay,  # torch's default is 1e-2, optax's 1e-4: always passed (per group above)
        fused=fused,  # torch picks foreach by default; the fused kernel is one call for all tensors
        foreach=not fused,
    )
    # LambdaLR evaluates the factor at 0 on construction and at k after the k-th scheduler.step():
    # update k gets lr_factor(k), as optax's schedule called with its count
    scheduler = LambdaLR(optimizer, lambda step: float(lr_factor(cfg, step)))
    return optimizer, scheduler


@dataclass
class TrainState:
    """Everything a train step reads and updates in place: the model (its parameters), AdamW and its schedule and,
    under mixed precision, the working weights. jax_model/train.py's TrainState is its twin."""

    model: torch.nn.Module
    optimizer: torch.optim.AdamW
    scheduler: LambdaLR  # last_epoch = updates applied so far
    working: dict[str, torch.Tensor] = field(default_factory=dict)  # the working weights, by name; {} without


def init_train_state(model, cfg: TrainConfig, *, fused: bool = True) -> TrainState:
    """Step 0: the model, a fresh AdamW state (m = v = 0) and the working weights."""
    cfg = as_train_config(cfg)
    working = working_weights(model, working_names(model, cfg))
    return TrainState(model, *make_optimizer(model, cfg, fused=fused), working)


def working_names(model, cfg: TrainConfig) -> tuple[str, ...]:
    """The weights (parameter names) the train step keeps working copies of, in the compute dtype (working_weights):
    every Linear weight when the compute dtype is narrower than the parameters' (mixed precision), but the LM head
    under a chunked loss (head_loss sums its gradient over chunks in float32 from the master). The embeddings are
    looked up in float32 and have none."""
    spec = model.spec
    if spec.compute_dtype == spec.param_dtype or cfg.remat != "none":  # torch only: a rematted block's recompute
        return ()  # runs after functional_call has put the masters back, and the checkpoint replays ops by index
    return tuple(t.name for t in model_layout(spec)
                 if t.kind == "linear" and not (cfg.loss_chunk and t.name == "lm_head.weight"))


@torch.no_grad()
def working_weights(model, names) -> dict[str, torch.Tensor]:
    """The working weights: the master weights `names` cast to the compute dtype, made after each update
    (refresh_working), so the forward reads them instead of casting every weight at every use (and again in a
    rematted backward, and per micro-batch). Apex's and Megatron's model weights beside float32 master weights."""
    named = dict(model.named_parameters())
    return {name: named[name].detach().to(DTYPES[model.spec.compute_dtype]) for name in names}


@torch.no_grad()
def refresh_working(model, working: dict) -> dict:
    """`working` made again from the masters after an update, in place (one multi-tensor copy, which casts): the
    tensors stay the same, so compiled graphs keep reading them."""
    if working:
        named = dict(model.named_parameters())
        torch._foreach_copy_(list(working.values()), [named[name] for name in working])
    return working


def read_working(model, working: dict | None):
    """`model` as a function whose forward reads each weight of `working` as its working copy (layers.working_copy,
    through torch.func.functional_call): the forward reads the copy, the gradient goes to the master in float32, bit
    for bit what casting the master gives."""
    if not working:
        return model

    def forward(*args, **kwargs):
        named = dict(model.named_parameters())
        copies = {name: working_copy(named[name], copy) for name, copy in working.items()}
        return torch.func.functional_call(model, copies, args, kwargs)

    return forward


def make_train_step(model, cfg: TrainConfig, *, compile: bool = False) -> Callable:
    """`train_step(state, tokens_BN, mask_BN=None, count=None) -> (state, metrics)`; `compile`: torch.compile each
    block (compile_blocks). `count`: what the summed loss is divided by (next_token_loss; default: the counted targets).
    cfg.grad_accum_steps, remat and loss_chunk: the same update with less memory (docs/training.md, "Training bigger
    models")."""
    cfg = as_train_config(cfg)
    loss_fn = partial(model_loss, cfg=cfg, remat=cfg.remat, loss_chunk=cfg.loss_chunk)
    if compile:
        compile_blocks(model)
    params = list(model.parameters())
    device = params[0].device

    def train_step(state: TrainState, tokens_BN, mask_BN=None, count=None):
        aux_metrics = {}  # routed specs: router_bce, predictor_acc, prior_mse
        batch = on_device(device, tokens_BN, mask_BN, count)
        loss = accumulate_gradients(partial(loss_fn, working=state.working), state.model, *batch,
                                    cfg.grad_accum_steps, aux_metrics)
        for p in params:  # torch leaves None where no token reached (a routed block of floor(γ·T) = 0 tokens); JAX has
            if p.grad is None:  # zeros, which AdamW decays: the same (the fused step raised on None at step 1)
                p.grad = torch.zeros_like(p)
        grad_norm = clip_by_global_norm([p.grad for p in params], cfg.grad_clip)
        lr = torch.tensor(state.optimizer.param_groups[0]["lr"], dtype=torch.float32)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.scheduler.step()
        refresh_working(model, state.working)
        aux_metrics = {k: v.detach() for k, v in aux_metrics.items()}
        return state, {"loss": loss.detach(), "grad_norm": grad_norm, "lr": lr, **aux_metrics}

    return CheckedStep(train_step, model.spec, IGNORE_INDEX, host_ids)


def compile_blocks(model, backend: str = "inductor") -> None:
    """Regional compilation (torchtitan's): torch.compile each block in place (as nn.Module.compile does: parameter
    names unchanged), forward and backward. The model's blocks share one compiled region (`compile_isolated`, its
    own recompile budget) whose graphs take the parameters as inputs, so identical blocks compile once (the others
    reuse that graph) instead of one graph holding every block; the embedding, final norm, LM head and loss run
    eager between them. Compiling twice is a no-op. `backend`: the torch.compile backend (tests use aot_eager: the
    same tracing without inductor's code generation)."""
    layers = [layer for layer in unwrapped(model).model.layers if layer._compiled_call_impl is None]
    if layers:
        region = compile_isolated(torch.nn.Module._call_impl, backend=backend)  # called as region(layer, ...)
        for layer in layers:
            layer._compiled_call_impl = partial(region, layer)  # what nn.Module.__call__ runs when set


def make_eval_step(model, *, compile: bool = False) -> Callable:
    """`eval_step(state, tokens_BN, mask_BN=None, count=None) -> {"loss": ..., "loss_topk": ...}`: the state's losses,
    no update; `count`: what the summed losses are divided by (next_token_loss; default: the counted targets).
    "loss": the causal forward's (a routed spec in predictor mode: each token's route decided from itself and the
    tokens before it, as in decoding; comparable with a dense model's); "loss_topk", routed specs only: the top-k
    forward's, as trained, which reads future tokens (the top-k is over the whole sequence; docs/routing.md)."""
    loss_fn = compile_isolated(model_loss) if compile else model_loss
    device, routed = next(model.parameters()).device, model.spec.routing != "none"

    @torch.no_grad()
    def eval_step(state: TrainState, tokens_BN, mask_BN=None, count=None):
        batch = on_device(device, tokens_BN, mask_BN, count)
        losses = {"loss": loss_fn(state.model, *batch, decide="predictor")}
        if routed:
            losses["loss_topk"] = loss_fn(state.model, *batch, decide="topk")
        return losses

    return CheckedStep(eval_step, model.spec, IGNORE_INDEX, host_ids)


def scalar_params(model, state: TrainState) -> dict[str, torch.Tensor]:
    """The state's one-element parameters (alpha, shift, embed_scale) by canonical name, as device scalars."""
    names = {t.name for t in model_layout(model.spec) if t.shape == (1,)}
    return {name: whole(x).detach()[0].clone() for name, x in model.named_parameters() if name in names}


def get_train_state(model, state: TrainState) -> dict[str, Any]:
    """The state in canonical names: {"step": int, "weights", "m", "v": {canonical name: numpy}}."""
    named = dict(model.named_parameters())
    m, v = ({n: state.optimizer.state.get(p, {}).get(key, torch.zeros_like(p)) for n, p in named.items()}
            for key in ("exp_avg", "exp_avg_sq"))
    canonical = {key: to_canonical(x, model.spec) for key, x in (("weights", named), ("m", m), ("v", v))}
    return {"step": state.scheduler.last_epoch, **canonical}


def set_train_state(model, state: TrainState, canonical: dict[str, Any]) -> TrainState:
    """`state` (e.g. fresh from init_train_state) holding a canonical train state, from either twin; CheckpointError
    for one that is not {"step", "weights", "m", "v"} of this model's layout (check_train_state)."""
    check_train_state(canonical, model.spec)
    set_weights(model, canonical["weights"])
    spec, step, optimizer = model.spec, canonical["step"], state.optimizer
    m, v = (to_state_dict(canonical[key], spec) for key in ("m", "v"))
    names = {p: n for n, p in model.named_parameters()}
    saved = optimizer.state_dict()  # load_state_dict puts `step` where this optimizer (fused or not) wants it
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    ordered = [names[p] for group in optimizer.param_groups for p in group["params"]]
    saved["state"] = {i: {"step": torch.tensor(float(step)), "exp_avg": m[n], "exp_avg_sq": v[n]}
                      for i, n in zip(ids, ordered)}
    optimizer.load_state_dict(saved)
    # a scheduler built at last_epoch = step − 1 steps once on construction: update `step` gets lr_factor(step)
    return TrainState(model, optimizer, LambdaLR(optimizer, state.scheduler.lr_lambdas, last_epoch=step - 1),
                      refresh_working(model, state.working))


# --- helpers ---------------------------------------------------------------------------------------


def on_device(device, *arrays):
    """Tokens, mask and count (numpy, numbers or tensors) as tensors on the model's device, before any compiled
    code sees them; None stays None."""
    return tuple(None if x is None else torch.as_tensor(x, device=device) for x in arrays)


def gradient_sync(model, enabled: bool):
    """A context in which a backward reduces its gradients over ranks (`enabled`) or only adds them up in .grad:
    DDP's no_sync(), FSDP2's set_requires_gradient_sync(); a model in one process: nothing to do."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 (fully_shard): every unit below the root too
        model.set_requires_gradient_sync(enabled)
    elif hasattr(model, "no_sync") and not enabled:  # DistributedDataParallel
        return model.no_sync()
    return contextlib.nullcontext()


def unwrapped(model):
    """The Transformer inside a DistributedDataParallel wrapper (FSDP2 wraps in place: the model itself)."""
    return getattr(model, "module", model)


def clip_by_global_norm(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale `grads` in place to a global norm of at most `max_norm` (0: off); the norm before clipping.

    optax.clip_by_global_norm's rule: g · max_norm / norm when norm ≥ max_norm (torch's own
    clip_grad_norm_ divides by norm + 1e-6); no host sync, the factor stays a tensor.
    """
    norm = torch.nn.utils.get_total_norm(grads)
    if max_norm > 0:
        torch._foreach_mul_(grads, torch.clamp(max_norm / norm, max=1.0))
    return norm
