"""The LM head and the cross-entropy fused, chunk by chunk, with the gradients computed in the forward pass.

torch_model/head_loss.py is the same function in PyTorch. As llm.c's fused classifier and Liger-Kernel's fused
linear cross-entropy do it: each chunk of tokens gets its float32 logits, its loss and, at once, the logits'
gradient (softmax − one-hot, times the token's weight), turned straight into the gradients of the hidden states
and of the head weight; the logits are dropped before the next chunk. Nothing of size [M, V] outlives a chunk and
the backward pass is a multiplication by the upstream scalar: no logits kept, no head matmul recomputed.

Notation: M tokens (B·T flattened), c tokens per chunk, D model dim, V vocab.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


def _chunks(a, chunk: int):
    """`a` [M, ...] as [M / chunk, chunk, ...], padded with zeros (weight 0: adds nothing) to whole chunks."""
    pad = -a.shape[0] % chunk
    return jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)).reshape(-1, chunk, *a.shape[1:])


def _loss_and_grads(x_MD, w_VD, targets_M, weights_M, chunk: int, dtype):
    """Σ_m weights_m · CE_m and its gradients, one chunk at a time; returns (sum, dx_MD, dw_VD, ce_M)."""
    M, D = x_MD.shape
    w_cast = w_VD.astype(dtype)

    def one_chunk(dw_VD, xs):
        x_cD, targets_c, weights_c = xs
        x_cD = x_cD.astype(dtype)
        logits_cV = (x_cD @ w_cast.T).astype(jnp.float32)  # logits in float32, as model.head
        logz_c = jax.nn.logsumexp(logits_cV, axis=-1)
        ce_c = logz_c - jnp.take_along_axis(logits_cV, targets_c[:, None], axis=-1)[:, 0]
        # d(sum)/d(logits) = (softmax − one-hot) · weight, each term times the weight as autodiff orders it (the
        # target's −weight added in place: no one-hot [c, V]), cast to the compute dtype
        dlogits_cV = jnp.exp(logits_cV - logz_c[:, None]) * weights_c[:, None]
        dlogits_cV = dlogits_cV.at[jnp.arange(targets_c.shape[0]), targets_c].add(-weights_c).astype(dtype)
        dx_cD = dlogits_cV @ w_cast
        dw_VD = dw_VD + (dlogits_cV.T @ x_cD).astype(jnp.float32)
        return dw_VD, (jnp.sum(ce_c * weights_c), dx_cD, ce_c)

    xs = (_chunks(x_MD, chunk), _chunks(targets_M, chunk), _chunks(weights_M, chunk))
    # zeros_like: on a mesh (loss.rows_summed) the sum varies over the devices as w_VD does
    dw_VD, (sums_C, dx_CcD, ce_Cc) = jax.lax.scan(one_chunk, jnp.zeros_like(w_VD, jnp.float32), xs)
    dx_MD = dx_CcD.reshape(-1, D)[:M].astype(x_MD.dtype)
    return jnp.sum(sums_C), dx_MD, dw_VD.astype(w_VD.dtype), ce_Cc.reshape(-1)[:M]


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def fused_head_loss(x_MD, w_VD, targets_M, weights_M, chunk: int, dtype):
    """Σ_m weights_M[m] · cross-entropy(x_MD[m] · w_VDᵀ, targets_M[m]), float32 scalar, computed `chunk` tokens at
    a time in `dtype` (the spec's compute dtype; logits and softmax in float32).

    x_MD [M, D] final hidden states; w_VD [V, D] the LM head (or the tied embeddings) in its parameter dtype;
    targets_M [M] int token ids; weights_M [M] float32 (0 for a token not predicted). The gradients of x, w and
    weights are computed in the forward pass (module docstring) and only scaled in the backward; the head's
    gradient accumulates over the chunks in float32."""
    return _loss_and_grads(x_MD, w_VD, targets_M, weights_M, chunk, dtype)[0]


def _forward(x_MD, w_VD, targets_M, weights_M, chunk, dtype):
    total, dx_MD, dw_VD, ce_M = _loss_and_grads(x_MD, w_VD, targets_M, weights_M, chunk, dtype)
    return total, (dx_MD, dw_VD, ce_M, targets_M)


def _backward(chunk, dtype, saved, g):
    dx_MD, dw_VD, ce_M, targets_M = saved
    no_grad = np.zeros(targets_M.shape, jax.dtypes.float0)  # integer ids have no cotangent
    return (g * dx_MD).astype(dx_MD.dtype), (g * dw_VD).astype(dw_VD.dtype), no_grad, g * ce_M


fused_head_loss.defvjp(_forward, _backward)
