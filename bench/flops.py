"""Device peaks in TFLOP/s per compute dtype, for MFU: the model FLOPs they divide are shared_config/flops.py's."""

from __future__ import annotations

# Dense (no sparsity) peak TFLOP/s by device-name substring, per compute dtype: vendor datasheets (their bf16 figures
# are "with sparsity": halved here). float32 means plain fp32 (TF32 off), which is how the bench runs float32.
# The longest matching key wins: the NVL boards (PCIe cards at a lower clock: 1,671 sparse bf16, 60 fp32) are not
# the SXM parts their names contain, nor is the L40 (181 dense bf16) the L4.
PEAK_TFLOPS: dict[str, dict[str, float | None]] = {
    "H200 NVL": {"bfloat16": 835.0, "float32": 60.0},
    "H200": {"bfloat16": 989.0, "float32": 67.0},
    "H100 NVL": {"bfloat16": 835.0, "float32": 60.0},
    "H100 PCIe": {"bfloat16": 756.0, "float32": 51.0},
    "H100": {"bfloat16": 989.0, "float32": 67.0},
    "GH200": {"bfloat16": 989.0, "float32": 67.0},
    "A100": {"bfloat16": 312.0, "float32": 19.5},
    "L40S": {"bfloat16": 362.0, "float32": 91.6},
    "L40": {"bfloat16": 181.0, "float32": 90.5},
    "L4": {"bfloat16": 121.0, "float32": 30.3},
    "A10": {"bfloat16": 125.0, "float32": 31.2},
    # AWS's A10G is not the A10 its name holds (fewer tensor-core FLOP/s) and NVIDIA publishes no datasheet for it:
    # no MFU rather than the A10's (pass --peak-tflops)
    "A10G": {"bfloat16": None, "float32": None},
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
