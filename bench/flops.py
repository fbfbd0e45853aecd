"""Model FLOPs per token and device peaks, for MFU.

FLOPs per token, as nanoGPT and torchtitan count them (PaLM paper, appendix B):
    train:   6·N + 12·L·H·E·T
    forward: 2·N +  4·L·H·E·T
N is the number of weights that take part in a matmul: every Linear, plus the LM head (the
token embedding when tied); the input embedding lookup is not a matmul and is excluded, as are
norm and scalar parameters. The attention term counts q·kᵀ and p·v for all T keys (2·2·T·E per
head per layer forward), without discounting the causal mask. A GLA layer (mixer: gla) has no term in T:
per token and head its recurrence does k_tᵀv_t and q_t·S_t (2·2·K'·V' forward), whatever form computes it.

Routed specs (routing.py, README "Routing"): a routed block processes k = floor(γ·T) of the T tokens of a
sequence, so its own weights count k/T of a token each and its attention k keys for k/T of the tokens;
the router tensors (mod's [D] score weight, dtf's prior FFN, the predictor) run on every token.
"""

from __future__ import annotations

import math

from shared_config import ModelSpec, layout

# Dense (no sparsity) peak TFLOP/s by device-name substring, per compute dtype: vendor datasheets.
# float32 means plain fp32 (TF32 off), which is how the bench runs float32.
PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.0, "float32": 67.0},
    "H100 PCIe": {"bfloat16": 756.0, "float32": 51.0},
    "H100": {"bfloat16": 989.0, "float32": 67.0},
    "GH200": {"bfloat16": 989.0, "float32": 67.0},
    "A100": {"bfloat16": 312.0, "float32": 19.5},
    "L40S": {"bfloat16": 362.0, "float32": 91.6},
    "L4": {"bfloat16": 121.0, "float32": 30.3},
    "A10": {"bfloat16": 125.0, "float32": 31.2},
    "V100": {"bfloat16": 125.0, "float32": 15.7},  # V100 has no bf16: its fp16 tensor-core peak
}

# Google Cloud TPUs: dense bf16 peak per chip, from each generation's system-architecture page
# (docs.cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e: "Peak compute per chip (bf16)").
# No float32 peak is published: the MXUs multiply bf16, and float32 at "highest" precision takes
# several bf16 passes, so a float32 run on a TPU reports no MFU (pass --peak-tflops to set one).
TPU_PEAK_TFLOPS = {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}
# jax.devices()[0].device_kind → chip. JAX reports v5e as "TPU v5 lite", v5p as "TPU v5" and v6e as
# "TPU v6 lite"; "TPU v5e", "TPU v5p", "TPU v6e" are the product names (the torch_xla path writes those).
TPU_KINDS = {
    "tpu v4": "v4", "tpu v5 lite": "v5e", "tpu v5e": "v5e", "tpu v5": "v5p", "tpu v5p": "v5p",
    "tpu v6 lite": "v6e", "tpu v6e": "v6e",
}


def matmul_params(spec: ModelSpec, seq_len: int | None = None) -> float:
    """N: weights used in matmuls per token (Linear weights, the LM head, mod's router weight), excluding the input
    embedding; a routed block's own weights weighted by the fraction of tokens it processes at `seq_len`."""
    fraction = routed_fraction(spec, seq_len)
    routed = tuple(f"model.layers.{i}." for i in spec.routed_layers)
    n = 0
    for t in layout(spec):
        if t.kind == "linear" or t.name.endswith(".router.weight"):
            share = fraction if t.name.startswith(routed) and ".router" not in t.name else 1
            n += math.prod(t.shape) * share
    return n + (spec.V * spec.D if spec.tie_embeddings else 0)  # a tied head still does the V·D matmul


def routed_fraction(spec: ModelSpec, seq_len: int | None) -> float:
    """k/T: the fraction of a sequence's tokens that a routed block processes (1 when nothing is routed)."""
    if not spec.routed_layers:
        return 1
    if seq_len is None:
        raise ValueError(f"routing={spec.routing}: the FLOPs depend on the sequence length; pass seq_len")
    return math.floor(spec.routing_capacity * seq_len) / seq_len


def flops_per_token(spec: ModelSpec, seq_len: int, mode: str) -> float:
    """Model FLOPs per token for a train step (forward + backward) or a forward pass."""
    return sum(flops_split(spec, seq_len, mode))


def flops_split(spec: ModelSpec, seq_len: int, mode: str) -> tuple[float, float]:
    """(weight matmuls, attention's q·kᵀ and p·v): model FLOPs per token; a backward costs two forwards."""
    passes = 3 if mode == "train" else 1
    if spec.mixer == "gla":  # the recurrence's state update and read-out, constant in the context length
        return passes * 2 * matmul_params(spec), passes * 4 * spec.L * spec.H * spec.Kh * spec.Vh
    routed, fraction = len(spec.routed_layers), routed_fraction(spec, seq_len)
    keys = (spec.L - routed) * seq_len + routed * fraction * (fraction * seq_len)  # per token, over the layers
    return passes * 2 * matmul_params(spec, seq_len), passes * 4 * spec.H * spec.E * keys


def tpu_chip(device_kind: str) -> str | None:
    """The TPU generation ("v4", "v5e", "v5p", "v6e") a device kind names, else None. Whole-name match, not a
    substring: "TPU v4 lite" (the v4i inference chip) is no v4, and "TPU v5" must not catch "TPU v5 lite"."""
    return TPU_KINDS.get(" ".join(device_kind.lower().split()))


def peak_tflops(device_name: str, dtype: str) -> float | None:
    """The device's dense peak per chip for `dtype` in TFLOP/s, or None when the device is not in the tables (a
    CPU, an unlisted chip, float32 on a TPU)."""
    if chip := tpu_chip(device_name):
        return TPU_PEAK_TFLOPS[chip] if dtype == "bfloat16" else None
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key.lower() in device_name.lower():
            return PEAK_TFLOPS[key][dtype]
    return None
