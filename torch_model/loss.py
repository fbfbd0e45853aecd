"""The next-token loss for the PyTorch twin: the batch split into inputs, targets and weights; the cross-entropy,
plain or fused with the LM head over chunks of tokens (head_loss.py); a routed spec's auxiliary losses.

jax_model/loss.py is the same file in JAX. train.py's `model_loss` puts them together for a model.

Notation: B batch, N = T + 1 tokens per batch row, T positions the model reads, V vocab, M = B·T tokens, D model dim.
"""

from __future__ import annotations

import numpy as np
import torch

from shared_config import TrainConfig
from shared_config.tokens import check_batch_array, check_batch_type

from .head_loss import fused_head_loss
from .layers import DTYPES, at_hand


IGNORE_INDEX = -100  # a target equal to this is not predicted (Hugging Face's convention)


def host_ids(tokens_BN) -> np.ndarray | None:
    """A batch's ids as numpy where they are at hand without waiting on a device, for `check_batch`: a tensor on the
    CPU, uncompiled, of integer ids (any other dtype is refused here, numpy lacks bfloat16); else None (its ids are
    then data, the caller's to keep in the vocabulary)."""
    check_batch_type(tokens_BN, torch.Tensor)
    if isinstance(tokens_BN, torch.Tensor) and at_hand(tokens_BN):
        check_batch_array(tuple(tokens_BN.shape), str(tokens_BN.dtype).removeprefix("torch."))
        return tokens_BN.detach().numpy()
    return None


def split_batch(tokens_BN, mask_BN=None):
    """Inputs, targets and target weights of a batch: tokens[:, :-1] predicts tokens[:, 1:].

    A target counts when it is not IGNORE_INDEX and, if a mask (shaped like the tokens) is given,
    its mask entry is nonzero. Ignored tokens are read as token 0 where they are inputs.
    """
    tokens_BN = torch.as_tensor(tokens_BN)
    check_batch_array(tokens_BN.shape, str(tokens_BN.dtype).removeprefix("torch."))
    tokens_BN = tokens_BN.long()  # gather wants int64 indices
    inputs_BT, targets_BT = tokens_BN[:, :-1], tokens_BN[:, 1:]
    weights_BT = (targets_BT != IGNORE_INDEX).to(torch.float32)
    if mask_BN is not None:
        weights_BT = weights_BT * (torch.as_tensor(mask_BN)[:, 1:] != 0)
    inputs_BT = torch.where(inputs_BT == IGNORE_INDEX, 0, inputs_BT)
    return inputs_BT, torch.where(targets_BT == IGNORE_INDEX, 0, targets_BT), weights_BT


def next_token_loss(logits_BTV, targets_BT, weights_BT, count=None):
    """Cross-entropy logsumexp(logits) − logits[target] in float32, summed over the counted targets and divided
    by `count`: by default their number (at least 1), the mean. A data-parallel rank or a micro-batch passes
    the whole batch's count (over the ranks averaging it), so that the parts add up to the whole batch's mean."""
    logits_BTV = logits_BTV.to(torch.float32)
    logz_BT = torch.logsumexp(logits_BTV, dim=-1)
    target_logit_BT = torch.gather(logits_BTV, -1, targets_BT[..., None])[..., 0]
    count = torch.clamp(torch.sum(weights_BT), min=1.0) if count is None else count
    return torch.sum((logz_BT - target_logit_BT) * weights_BT) / count


def chunked_next_token_loss(model, x_BTD, targets_BT, weights_BT, count=None, chunk: int = 1024):
    """next_token_loss(model.head(x_BTD), ...) with the LM head and the loss fused over `chunk` tokens at a time
    (head_loss.fused_head_loss): one chunk's float32 logits [chunk, V] exist at once, their gradient is taken in
    the forward pass, and the backward neither keeps nor recomputes logits."""
    D = x_BTD.shape[-1]
    x_MD, targets_M, weights_M = x_BTD.reshape(-1, D), targets_BT.reshape(-1), weights_BT.reshape(-1)
    chunk = min(chunk, targets_M.shape[0])  # never padded past the tokens there are
    dtype = DTYPES[model.spec.compute_dtype]
    count = torch.clamp(torch.sum(weights_BT), min=1.0) if count is None else count
    # the weights divided by the count before the sum, as autodiff scales the logits' gradient of the plain loss
    return fused_head_loss(x_MD, model.head_weight(), targets_M, weights_M.to(torch.float32) / count, chunk, dtype)


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
