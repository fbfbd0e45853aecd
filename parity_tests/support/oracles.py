"""Test oracles written from the definitions (docs/, papers), sharing no code with what they judge.

Each function here restates a rule the code under test implements elsewhere (`shared_config.decays`,
`shared_config.lr_factor`, the KV cache's positions, the twins' gradients) in its own, most direct
form. `test_mutations.py` plants a fault into the code under test for each oracle and expects the
oracle to object: an oracle that imports the rule it checks would agree with the fault.
"""

from __future__ import annotations

import math

import numpy as np

from shared_config import layout

from . import reference
from .train_common import reference_loss

# Linear weights (Hugging Face Llama names): decayed whatever the config says (docs/training.md).
LINEAR_SUFFIXES = tuple(f".{name}_proj.weight" for name in ("q", "k", "v", "o", "gate", "up", "down"))
EMBEDDINGS = ("model.embed_tokens.weight", "model.embed_positions.weight")


def decayed_names(spec, cfg) -> set[str]:
    """Canonical names AdamW decays, by name: every Linear weight (q/k/v/o, gate/up/down, lm_head); the
    embeddings only with `decay_embeddings`; never norm weights or biases, alpha, shift, embed_scale, q/k norms."""
    out = set()
    for name in (t.name for t in layout(spec)):
        if name == "lm_head.weight" or name.endswith(LINEAR_SUFFIXES):
            out.add(name)
        elif name in EMBEDDINGS and cfg.decay_embeddings:
            out.add(name)
    return out


def lr_multiplier(cfg, k: int) -> float:
    """The multiplier of `lr` for update k (0-based), from docs/training.md: update k < W uses (k+1)/(W+1), update W
    the peak 1; then `schedule` over the remaining steps down to `min_lr_ratio` at update `steps`, flat after."""
    W, floor = cfg.warmup_steps, cfg.min_lr_ratio
    if k < W:
        return (k + 1) / (W + 1)
    if cfg.schedule == "constant":
        return 1.0
    done = min(1.0, (k - W) / (cfg.steps - W)) if cfg.steps > W else 1.0  # fraction of the decay behind us
    shape = 0.5 * (1 + math.cos(math.pi * done)) if cfg.schedule == "cosine" else 1 - done
    return floor + (1 - floor) * shape


def layer0_keys(weights: dict, spec, tokens_T) -> np.ndarray:
    """Layer 0's keys [T, K, E] of one row read alone, before RoPE (after qk-norm), float64, from the reference."""
    taps: dict = {}
    reference.forward(weights, spec, np.asarray(tokens_T)[None], taps)
    x = taps["model.embed"]
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    if spec.norm_placement != "post":  # post: attention reads the residual stream itself
        x = reference.norm(x, w, "model.layers.0.input_layernorm", spec)
    k = (x @ w["model.layers.0.self_attn.k_proj.weight"].T).reshape(len(tokens_T), spec.K, spec.E)
    return reference.rms(k, w["model.layers.0.self_attn.k_norm.weight"], spec.norm_eps) if spec.qk_norm else k


def cache_positions(cached_SKE, keys_TKE, spec, S: int) -> tuple[np.ndarray, np.ndarray]:
    """For each cached key, the RoPE position p (0 ≤ p < S) whose rotation of the matching unrotated key fits it
    best, and that fit's error max|Δ| / max|key|: the position a row's token was given, read off the cache."""
    positions, errors = [], []
    for key_KE, cached_KE in zip(keys_TKE, cached_SKE):
        rotated_SKE = reference.rope(np.broadcast_to(key_KE, (1, S, *key_KE.shape)), spec)[0]  # at every position
        err_S = np.abs(rotated_SKE - cached_KE).max(axis=(1, 2)) / np.abs(cached_KE).max()
        positions.append(int(np.argmin(err_S)))
        errors.append(float(err_S.min()))
    return np.array(positions), np.array(errors)


def finite_difference_errors(weights: dict, spec, tokens_BN, grads: dict[str, dict], seed: int = 2, h: float = 1e-4,
                             tol: float = 1e-4, loss=None) -> list[str]:
    """Per canonical tensor, g · d against the central difference (L(w + hd) − L(w − hd)) / 2h of the float64
    reference loss along a random d; the failures, as "twin name: g·d vs FD" lines. `loss(weights) -> float`:
    another float64 loss (default: reference_loss on `tokens_BN`).

    A wrong gradient misses by ~‖g‖‖d‖/√n (n entries), far above `tol`·‖g‖‖d‖; the float64 central difference
    is exact to ~h² and the twins' float32 gradients to ~1e-6 relative.
    """
    rng, failures = np.random.default_rng(seed), []
    loss = loss or (lambda w: reference_loss(w, spec, tokens_BN))
    for t in layout(spec):
        d = rng.standard_normal(t.shape)
        shifted = [loss({**weights, t.name: weights[t.name] + s * h * d}) for s in (1, -1)]
        fd = (shifted[0] - shifted[1]) / (2 * h)
        for twin, g in grads.items():
            scale = np.linalg.norm(g[t.name]) * np.linalg.norm(d)
            if not abs(np.sum(g[t.name] * d) - fd) <= tol * scale:
                failures.append(f"{twin} {t.name}: g·d {np.sum(g[t.name] * d):.6g} vs FD {fd:.6g}")
    return failures


def bf16_values(shape, seed=0, scale=3.0) -> np.ndarray:
    """float32 values bf16 holds exactly."""
    import ml_dtypes

    x = scale * np.random.default_rng(seed).standard_normal(shape)
    return x.astype(ml_dtypes.bfloat16).astype(np.float32)


def rounded_more_than_once(got, ref, terms) -> str | None:
    """Where a bf16 output `got` is not its float64 value `ref` rounded once: more than half of bf16's spacing at
    each value away, beyond float32's own error on the `terms` (|…| of what was summed, before any cancellation):
    up to 2^-16 of them, 256 float32 ulps, room for any library's transcendentals and a reduction's order, still
    1/128 of bf16's spacing. None when every output is within."""
    half_spacing = np.exp2(np.floor(np.log2(np.maximum(np.abs(ref), 2.0**-126))) - 8)  # bf16: 8 bits of mantissa
    excess = np.abs(got - ref) / (half_spacing + 2.0**-16 * terms)
    if excess.max() <= 1:
        return None
    return f"{(excess > 1).mean():.1%} of outputs rounded more than once, up to {excess.max():.2f}x the bound"
