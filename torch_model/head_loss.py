"""The LM head and the cross-entropy fused, chunk by chunk, with the gradients computed in the forward pass.

jax_model/head_loss.py is the same function in JAX. As llm.c's fused classifier and Liger-Kernel's fused
linear cross-entropy do it: each chunk of tokens gets its float32 logits, its loss and, at once, the logits'
gradient (softmax − one-hot, times the token's weight), turned straight into the gradients of the hidden states
and of the head weight; the logits are dropped before the next chunk. Nothing of size [M, V] outlives a chunk and
the backward pass is a multiplication by the upstream scalar: no logits kept, no head matmul recomputed.

Notation: M tokens (B·T flattened), c tokens per chunk, D model dim, V vocab.
"""

from __future__ import annotations

import torch


def _loss_and_grads(x_MD, w_VD, targets_M, weights_M, chunk: int, dtype):
    """Σ_m weights_m · CE_m and its gradients, one chunk at a time; returns (sum, dx_MD, dw_VD, ce_M)."""
    w_cast = w_VD.to(dtype)
    total = torch.zeros((), dtype=torch.float32, device=x_MD.device)
    dx_MD, ce_M = torch.empty_like(x_MD), torch.empty(x_MD.shape[0], dtype=torch.float32, device=x_MD.device)
    dw_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device)
    for s in range(0, x_MD.shape[0], chunk):
        x_cD, targets_c, weights_c = x_MD[s : s + chunk].to(dtype), targets_M[s : s + chunk], weights_M[s : s + chunk]
        logits_cV = (x_cD @ w_cast.T).to(torch.float32)  # logits in float32, as model.head
        logz_c = torch.logsumexp(logits_cV, dim=-1)
        ce_c = logz_c - torch.gather(logits_cV, -1, targets_c[:, None])[:, 0]
        # d(sum)/d(logits) = (softmax − one-hot) · weight, each term times the weight as autodiff orders it (the
        # target's −weight added in place: no one-hot [c, V]), cast to the compute dtype
        dlogits_cV = torch.exp(logits_cV - logz_c[:, None]) * weights_c[:, None]
        dlogits_cV = dlogits_cV.scatter_add_(1, targets_c[:, None], -weights_c[:, None]).to(dtype)
        dx_MD[s : s + chunk] = dlogits_cV @ w_cast
        dw_VD += (dlogits_cV.T @ x_cD).to(torch.float32)
        total = total + torch.sum(ce_c * weights_c)
        ce_M[s : s + chunk] = ce_c
    return total, dx_MD, dw_VD.to(w_VD.dtype), ce_M


class FusedHeadLoss(torch.autograd.Function):
    """fused_head_loss as an autograd function: the forward saves the gradients, the backward scales them."""

    @staticmethod
    def forward(ctx, x_MD, w_VD, targets_M, weights_M, chunk: int, dtype):
        total, dx_MD, dw_VD, ce_M = _loss_and_grads(x_MD, w_VD, targets_M, weights_M, chunk, dtype)
        ctx.save_for_backward(dx_MD, dw_VD, ce_M)
        return total

    @staticmethod
    def backward(ctx, g):
        dx_MD, dw_VD, ce_M = ctx.saved_tensors
        return (g * dx_MD).to(dx_MD.dtype), (g * dw_VD).to(dw_VD.dtype), None, g * ce_M, None, None


def fused_head_loss(x_MD, w_VD, targets_M, weights_M, chunk: int, dtype):
    """Σ_m weights_M[m] · cross-entropy(x_MD[m] · w_VDᵀ, targets_M[m]), float32 scalar, computed `chunk` tokens at
    a time in `dtype` (the spec's compute dtype; logits and softmax in float32).

    x_MD [M, D] final hidden states; w_VD [V, D] the LM head (or the tied embeddings) in its parameter dtype;
    targets_M [M] int token ids; weights_M [M] float32 (0 for a token not predicted). The gradients of x, w and
    weights are computed in the forward pass (module docstring) and only scaled in the backward; the head's
    gradient accumulates over the chunks in float32."""
    return FusedHeadLoss.apply(x_MD, w_VD, targets_M, weights_M, chunk, dtype)
