"""Canonical weights <-> the PyTorch twin's parameters, and the twin's native init.

The module tree follows the canonical names, so `state_dict()` keys are `model_layout(spec)`
names and Linear weights are already [out, in]: only fused q/k/v need converting.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import nn

from shared_config import fuse_qkv, init_rule, layout, model_layout, np_dtype, split_qkv

from .layers import DTYPES


def flat_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters keyed by dotted path (`model.layers.0.self_attn.o_proj.weight`)."""
    return dict(model.named_parameters())


def to_canonical(flat: dict[str, torch.Tensor], spec) -> dict[str, np.ndarray]:
    """Flat parameters (or their gradients) -> canonical file layout, numpy; FSDP2 shards are gathered whole."""
    weights = {t.name: whole(flat[t.name]).detach().cpu() for t in model_layout(spec)}
    return {k: to_numpy(v) for k, v in split_qkv(weights, spec).items()}


def whole(x: torch.Tensor) -> torch.Tensor:
    """A DTensor (an FSDP2 shard) gathered from every rank, a collective; any other tensor as it is.

    Duck-typed, so that this module does not import torch.distributed (absent from some builds).
    """
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy copy (a view would change as the model trains on; JAX arrays are immutable, so the
    JAX twin's arrays are snapshots too); bfloat16 goes through its bits (numpy has no native bfloat16)."""
    if x.dtype == torch.bfloat16:
        return x.contiguous().view(torch.int16).numpy().view(np_dtype("bfloat16")).copy()
    return x.contiguous().numpy().copy()


def to_state_dict(weights: dict, spec, device=None) -> dict[str, torch.Tensor]:
    """Canonical file layout -> the model's state dict, in `param_dtype`."""
    weights = {k: v if torch.is_tensor(v) else torch.tensor(np.asarray(v, np.float32)) for k, v in weights.items()}
    weights = fuse_qkv(weights, spec, torch.cat)
    return {t.name: weights[t.name].to(device=device, dtype=DTYPES[spec.param_dtype]) for t in model_layout(spec)}


def get_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's weights in the canonical file layout (q/k/v split back), as numpy."""
    return to_canonical(flat_params(model), model.spec)


def set_weights(model: nn.Module, weights: dict) -> None:
    """Load canonical weights (every tensor of `layout(spec)`, already checked) into `model`."""
    device = next(model.parameters()).device
    device = None if device.type == "meta" else device
    model.load_state_dict(to_state_dict(weights, model.spec, device), strict=True, assign=device is None)


@torch.no_grad()
def draw_weights(model: nn.Module, generator: torch.Generator | None) -> None:
    """Native init: every canonical tensor drawn by its rule with torch's RNG (q/k/v drawn apart, then fused)."""
    spec, device = model.spec, next(model.parameters()).device
    if device.type == "meta":  # a shell for loading weights into (the JAX twin's nnx.eval_shape)
        return
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    weights = {}
    for t in layout(spec):
        rule = init_rule(t, spec)
        g = torch.Generator(device).manual_seed(seed ^ zlib.crc32(t.name.encode()))
        if rule.dist == "normal":
            weights[t.name] = rule.scale * torch.randn(t.shape, generator=g, device=device)
        elif rule.dist == "uniform":
            weights[t.name] = torch.empty(t.shape, device=device).uniform_(-rule.scale, rule.scale, generator=g)
        else:
            weights[t.name] = torch.full(t.shape, rule.scale, device=device)
    set_weights(model, weights)
