"""What "the twins agree" means: the documented tolerances and the metrics they bound (numpy only).

Read by the parity tests and by scripts/parity_report.py, so a bound changes in one place. Errors are
measured on the reference's scale (torch is the reference side), never as plain absolute errors.
"""

from __future__ import annotations


import numpy as np

# float32 on CPU
FORWARD_TOL = 1e-5  # activations and logits: max|Δ| / std(reference)
# parity_report.py bounds each float32 stage by float32's own rounding there: the change one rounding of every
# weight (a relative 2⁻²⁴, random sign) makes in the reference twin at that stage, times this factor
FLOOR_FACTOR = 16
LOSS_TOL = 1e-6  # |Δloss| / |loss|
GRAD_TOL = 1e-4  # per tensor: max|Δg| / max|g|
TRAJ_LOSS_TOL = 1e-5  # every step of a trajectory: |Δloss| / |loss|
TRAJ_PARAM_TOL = 1e-4  # per tensor after the trajectory: max|Δp| / max|p|

# compute_dtype bfloat16 (parameters float32): one bf16 rounding is 2⁻⁸ ≈ 4e-3 relative
BF16_KL_MEAN = 1e-3  # per-token KL(torch ‖ jax) of the next-token distributions, mean over tokens
BF16_KL_MAX = 1e-2  # ... and at worst
BF16_TOP1 = 0.98  # fraction of tokens whose argmax agrees
BF16_LOSS_TOL = 1e-2  # |Δloss|, absolute
BF16_FORWARD_TOL = 5e-2  # activations: max|Δ| / max|reference|, a few roundings of the largest value
BF16_GRAD_TOL = 5e-2  # per tensor: max|Δg| / max|g|; also the parameters at the end of a bf16 trajectory


def nudged(weights: dict) -> dict[str, np.ndarray]:
    """Every weight rounded once more: a relative 2⁻²⁴ of random sign (seeded), the scale of float32's rounding (the
    floor FLOOR_FACTOR multiplies)."""
    signs = np.random.default_rng(0)
    return {n: (w.astype(np.float64) * (1 + 2.0**-24 * signs.choice([-1.0, 1.0], w.shape))).astype(w.dtype)
            for n, w in weights.items()}


def fewest_attended(spec, seq: int) -> int | None:
    """The fewest tokens of a `seq`-token sequence that a softmax attention layer of `spec` attends over: `seq`, or a
    routed block's floor(routing_capacity · seq); None without attention. Under 2 the layer's q and k gradients are
    zero (one token's softmax weight is 1 whatever its score): the twins' gradients there are rounding noise."""
    if "attention" not in spec.layer_mixers:
        return None
    routed = [i for i in spec.routed_layers if spec.mixer_of(i) == "attention"]
    return spec.routed_tokens(seq) if routed else seq


def rel_err(a, b) -> float:
    """max|a − b| / std(b): error on the scale of the reference. A constant reference (std 0: one element, a tap that
    does not vary) is measured on its max|b| instead: over std 0, twins that agree exactly were NaN, a FAIL."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = b.std() or np.abs(b).max() or np.finfo(np.float64).tiny
    return float(np.abs(a - b).max() / scale)


def max_rel(a, b) -> float:
    """max|a − b| / max|b|: error relative to the reference's largest entry (gradients, parameters)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), np.finfo(np.float64).tiny))


def loss_rel(a, b):
    """|a − b| / |b| of losses (elementwise on arrays; the reference b): over float64's tiny where b is 0, as max_rel
    measures. A loss is exactly 0 where a vocabulary has one token, or logits are certain of every next token: two
    twins that agree were a ZeroDivisionError traceback (parity_report.py) or a NumPy warning and NaN (per step)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b) / np.maximum(np.abs(b), np.finfo(np.float64).tiny)


def log_softmax(logits) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def token_kl(logits_a, logits_ref) -> np.ndarray:
    """Per-token KL(ref ‖ a) of the next-token distributions, float64, shape [..., T]."""
    log_p, log_q = log_softmax(logits_ref), log_softmax(logits_a)
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def top1_agreement(logits_a, logits_ref) -> float:
    """The fraction of tokens whose argmax agrees; NaN where a logit is NaN (argmax takes the first NaN: two NaN
    twins agreed, a PASS row amid the FAILs)."""
    if np.isnan(logits_a).any() or np.isnan(logits_ref).any():
        return float("nan")
    return float((np.argmax(logits_a, -1) == np.argmax(logits_ref, -1)).mean())
