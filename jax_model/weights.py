"""Canonical weights <-> the JAX twin's NNX state, and the twin's native init.

The mapping is read off `model_layout(spec)`: each tensor's JAX leaf is `Tensor.jax_name`
(`kernel`/`embedding` for Linear/Embed), transposed where `Tensor.transposed`.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from shared_config import fuse_qkv, init_rule, layout, model_layout, split_qkv

from .layers import DTYPES


def flat_params(model: nnx.Module) -> dict[str, jax.Array]:
    """The model's parameters keyed by dotted NNX path (`model.layers.0.self_attn.o_proj.kernel`)."""
    return flat_arrays(nnx.state(model, nnx.Param))


def flat_arrays(state: nnx.State) -> dict[str, jax.Array]:
    """A state's arrays (parameters, gradients, optimizer moments) keyed by dotted NNX path."""
    return {dotted(path): v[...] for path, v in nnx.to_flat_state(state)}


def dotted(path) -> str:
    """An NNX state path as the dotted name the layout table uses (`Tensor.jax_name`)."""
    return ".".join(map(str, path))


def to_canonical(flat: dict[str, jax.Array], spec) -> dict[str, np.ndarray]:
    """Flat NNX leaves (params, or their gradients) -> canonical file layout, torch orientation, numpy; sharded
    arrays are gathered whole."""
    weights = {}
    for t in model_layout(spec):
        x = whole(flat[t.jax_name])
        weights[t.name] = x.T if t.transposed else x
    return split_qkv(weights, spec)


def whole(x) -> np.ndarray:
    """An array in host memory: a sharded one gathered from this host's devices, or from every process (a
    collective)."""
    local = getattr(x, "is_fully_addressable", True)
    return np.asarray(x if local else multihost_utils.process_allgather(x, tiled=True))


def to_pure_dict(weights: dict, spec, xp=jnp) -> dict:
    """Canonical file layout -> the nested pure dict of the NNX state, in `param_dtype`; `xp=np`: in host memory."""
    weights = fuse_qkv({k: xp.asarray(v) for k, v in weights.items()}, spec, xp.concatenate)
    pure: dict = {}
    for t in model_layout(spec):
        x = weights[t.name].astype(DTYPES[spec.param_dtype])
        node, *parents = pure, *t.jax_name.split(".")[:-1]
        for part in parents:
            node = node.setdefault(int(part) if part.isdigit() else part, {})
        node[t.jax_name.split(".")[-1]] = x.T if t.transposed else x
    return pure


def get_weights(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's weights in the canonical file layout (q/k/v split back), as numpy."""
    return to_canonical(flat_params(model), model.spec)


def set_weights(model: nnx.Module, weights: dict) -> None:
    """Load canonical weights (every tensor of `layout(spec)`, already checked) into `model`."""
    set_pure_dict(model, to_pure_dict(weights, model.spec))


def set_pure_dict(model: nnx.Module, pure: dict) -> None:
    """Put the parameters of a nested pure dict (`to_pure_dict`'s shape) into `model`."""
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


def draw_weights(model: nnx.Module, rngs: nnx.Rngs) -> None:
    """Native init: every canonical tensor drawn by its rule with JAX's RNG (q/k/v drawn apart, then fused)."""
    spec, key = model.spec, rngs.params()
    weights = {}
    for t in layout(spec):
        rule, k = init_rule(t, spec), jax.random.fold_in(key, zlib.crc32(t.name.encode()))
        if rule.dist == "normal":
            weights[t.name] = rule.scale * jax.random.normal(k, t.shape, jnp.float32)
        elif rule.dist == "uniform":
            weights[t.name] = jax.random.uniform(k, t.shape, jnp.float32, -rule.scale, rule.scale)
        else:
            weights[t.name] = jnp.full(t.shape, rule.scale, jnp.float32)
    set_weights(model, weights)
