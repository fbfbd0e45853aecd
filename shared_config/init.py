"""Init rules, read off the layout table, and the framework-neutral numpy init.

`init_rule` is the one place that turns a tensor's rule into a distribution; the numpy init below
and each twin's native init (its own RNG) all draw from it.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .formats.checks import np_dtype
from .layout import Tensor, layout
from .resources import check_memory, init_bytes
from .config_file import SpecError
from .generation import is_int
from .spec import ModelSpec, deepnorm_beta, load_spec


@dataclass(frozen=True)
class InitRule:
    """How a tensor is drawn at init: `dist` and its `scale` (std, bound or value), in weight units."""

    dist: str  # "normal" (scale = std) | "uniform" (scale = bound) | "constant" (scale = the value)
    scale: float


def init_rule(t: Tensor, spec: ModelSpec) -> InitRule:
    """The distribution of tensor `t`: its layout rule under `spec.init_scheme` (std or bound, in weight units)."""
    if t.init in ("linear", "residual", "beta"):
        factor = 1.0
        if t.init == "residual" and spec.residual_scaled:
            factor = 1 / math.sqrt(2 * spec.L)  # two residual adds per block (GPT-2 paper, sec. 2.3)
        elif t.init == "beta":
            factor = deepnorm_beta(spec.L)  # DeepNet's gain on v, o and the MLP (Wang et al. 2022)
        if spec.init_scheme == "normal":
            return InitRule("normal", spec.init_std * factor)
        fan_out, fan_in = t.shape  # per tensor of the file layout: fused q/k/v get each slice's own fans
        # untruncated, as torch's xavier_normal_ (jax's glorot_normal truncates)
        if spec.init_scheme == "xavier_normal":
            return InitRule("normal", math.sqrt(2 / (fan_in + fan_out)) * factor)
        if spec.init_scheme == "xavier_uniform":
            return InitRule("uniform", math.sqrt(6 / (fan_in + fan_out)) * factor)  # Glorot & Bengio 2010
        # a scheme added to the spec's CHOICES but not here would otherwise draw xavier_uniform without a word
        raise ValueError(f"init_rule: no rule for init_scheme={spec.init_scheme!r} (docs/extending.md)")
    if t.init == "embedding":
        return InitRule("normal", spec.embed_init_std)
    if t.init == "normal":  # the MoD router's [D] score weight
        return InitRule("normal", spec.init_std)
    if t.init in ("ones", "zeros"):
        return InitRule("constant", 1.0 if t.init == "ones" else 0.0)
    if t.init == "constant" and t.value is not None:
        return InitRule("constant", t.value)
    # a layout row with another init name (or a constant without its value) was a constant None, every draw NaN
    raise ValueError(f"init_rule: no rule for init={t.init!r} (value {t.value}) of {t.name} (docs/extending.md)")


def tensor_seed(seed: int, name: str) -> list[int]:
    """A per-tensor seed, so a tensor's values do not depend on which other tensors the spec has."""
    return [seed, zlib.crc32(name.encode())]


def init_weights(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """Canonical weights drawn with numpy: the bit-identical starting point for both twins; a spec too large for this
    machine's memory is refused (ResourceError) before any draw. `spec`: a spec or what `load_spec` takes; `seed`: an
    integer >= 0 (SpecError otherwise: -1 and None were numpy's ValueError and TypeError, 1.5 a TypeError)."""
    return dict(iter_init_weights(spec, seed))


def iter_init_weights(spec: ModelSpec, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    """`init_weights` one tensor at a time, in layout order: (canonical name, array of its shape in
    `spec.param_dtype`), for a caller that shows progress (a llama-1b draw takes about half a minute). The memory
    check (ResourceError) comes at the call, before the first draw."""
    spec = load_spec(spec)
    if not is_int(seed, 0):
        raise SpecError(f"seed={seed!r} must be an integer >= 0")
    check_memory(init_bytes(spec), f"drawing {spec.L:,} layers of d_model {spec.D:,}, vocab {spec.V:,}",
                 "use a smaller spec")
    return _draws(spec, seed)


def _draws(spec: ModelSpec, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    for t in layout(spec):
        rule, rng = init_rule(t, spec), np.random.default_rng(tensor_seed(seed, t.name))
        if rule.dist == "normal":
            x = rng.normal(0.0, rule.scale, t.shape)
        elif rule.dist == "uniform":
            x = rng.uniform(-rule.scale, rule.scale, t.shape)
        else:
            x = np.full(t.shape, rule.scale)
        yield t.name, x.astype(np.float32).astype(np_dtype(spec.param_dtype))
