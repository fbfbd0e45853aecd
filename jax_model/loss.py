"""The next-token loss for the JAX twin: the batch split into inputs, targets and weights; the cross-entropy, plain
or fused with the LM head over chunks of tokens (head_loss.py); a routed spec's auxiliary losses.

torch_model/loss.py is the same file in PyTorch. train.py's `model_loss` puts them together for a model.

Notation: B batch, N = T + 1 tokens per batch row, T positions the model reads, V vocab, M = B·T tokens, D model dim.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from shared_config import TrainConfig
from shared_config.parallel import AXES, splits_rows
from shared_config.tokens import check_batch_array, check_batch_type

from .head_loss import fused_head_loss
from .layers import DTYPES, at_hand


IGNORE_INDEX = -100  # a target equal to this is not predicted (Hugging Face's convention)


def host_ids(tokens_BN) -> np.ndarray | None:
    """A batch's ids as numpy where they are at hand without waiting on a device, for `check_batch`: an array on the
    CPU, outside jit (`at_hand`), held by this process; else None (its ids are then data, the caller's to keep in
    the vocabulary)."""
    check_batch_type(tokens_BN, jax.Array)
    if isinstance(tokens_BN, jax.Array) and at_hand(tokens_BN) and tokens_BN.is_fully_addressable:
        return np.asarray(tokens_BN)
    return None


def split_batch(tokens_BN, mask_BN=None):
    """Inputs, targets and target weights of a batch: tokens[:, :-1] predicts tokens[:, 1:].

    A target counts when it is not IGNORE_INDEX and, if a mask (shaped like the tokens) is given,
    its mask entry is nonzero. Ignored tokens are read as token 0 where they are inputs.
    """
    tokens_BN = jnp.asarray(tokens_BN)
    check_batch_array(tokens_BN.shape, str(tokens_BN.dtype))
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


def chunked_next_token_loss(model, x_BTD, targets_BT, weights_BT, count=None, chunk: int = 1024):
    """next_token_loss(model.head(x_BTD), ...) with the LM head and the loss fused over `chunk` tokens at a time
    (head_loss.fused_head_loss): one chunk's float32 logits [chunk, V] exist at once, their gradient is taken in
    the forward pass, and the backward neither keeps nor recomputes logits."""
    D = x_BTD.shape[-1]
    x_MD, targets_M, weights_M = x_BTD.reshape(-1, D), targets_BT.reshape(-1), weights_BT.reshape(-1)
    chunk = min(chunk, targets_M.shape[0])  # never padded past the tokens there are
    dtype = DTYPES[model.spec.compute_dtype]
    count = jnp.maximum(jnp.sum(weights_BT), 1.0) if count is None else count
    head_loss = partial(rows_summed, fused_head_loss, model.model.mesh, x_BTD.shape[0])  # one device: fused_head_loss
    # the weights divided by the count before the sum, as autodiff scales the logits' gradient of the plain loss
    return head_loss(x_MD, model.head_weight(), targets_M, weights_M.astype(jnp.float32) / count, chunk, dtype)


def rows_summed(loss_fn, mesh: Mesh | None, rows: int, x_MD, w_VD, targets_M, weights_M, chunk: int, dtype):
    """`loss_fn(x_MD, w_VD, targets_M, weights_M, chunk, dtype)` (fused_head_loss, a sum over the M tokens of `rows`
    batch rows) run by each device of `mesh` on its own rows' tokens, at most `chunk` at a time, and the sums added
    (jax.shard_map; w_VD read whole, its gradient summed over the devices). No mesh, or rows the devices do not split
    (layers.split_rows): loss_fn itself. Left to XLA, every device scanned every chunk of the whole batch, splitting
    the head's contraction over fsdp and all-reducing partial logits [chunk, V]."""
    if mesh is None or not splits_rows(rows, mesh.size):
        return loss_fn(x_MD, w_VD, targets_M, weights_M, chunk, dtype)

    def local(x_MD, w_VD, targets_M, weights_M):
        w_VD = jax.lax.pcast(w_VD, AXES, to="varying")  # a different gradient on every device, summed (psum) back
        return jax.lax.psum(loss_fn(x_MD, w_VD, targets_M, weights_M, min(chunk, x_MD.shape[0]), dtype), AXES)

    rows_spec = PartitionSpec(AXES)
    return jax.shard_map(local, mesh=mesh, in_specs=(rows_spec, PartitionSpec(), rows_spec, rows_spec),
                         out_specs=PartitionSpec())(x_MD, w_VD, targets_M, weights_M)


def routing_loss(aux: dict | None, cfg: TrainConfig | None, metrics: dict | None):
    """router_predictor_loss_weight · router_bce + dtf_prior_loss_weight · prior_mse (routing.Routes.finish), 0
    for a dense spec. Each term is a mean over every position of the batch (masked targets or not: the router
    decides for every token), so its normalisation is the batch's rows × positions, whatever the targets: a part
    of a global batch (a micro-batch, a data-parallel rank) holding 1/n of its rows adds 1/n of its own mean
    (model_loss's `share`; ranks: the gradient average), whichever targets it counts. `metrics` gets router_bce,
    predictor_acc, prior_mse."""
    if not aux:
        return 0.0
    if metrics is not None:
        metrics.update(aux)
    return cfg.router_predictor_loss_weight * aux["router_bce"] + cfg.dtf_prior_loss_weight * aux.get("prior_mse", 0.0)
