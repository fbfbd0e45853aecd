"""Gated Linear Attention through flash-linear-attention's Triton `chunk_gla`: the GPU path of the torch twin.
jax_model/gla_kernel.py is its counterpart: a Pallas kernel behind the same interface.

flash-linear-attention (github.com/fla-org/flash-linear-attention, the optional extra `gla`) is the reference
implementation of GLA; its kernels take [B, T, H, K] tensors and log-space forget gates, as the twins' layers
compute them. It runs some dots in TF32 and takes exponents as differences of cumulative gates, which drift after
a very negative gate (github.com/fla-org/flash-linear-attention/issues/20): the pure form (`gla.chunked_gla`) stays the
reference and the CPU path.
Imported only when used: the module imports without Triton.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re

import torch

GATE_FLOOR = -1e30  # log α below it acts as it: exp of any sum holding it is 0 in float32 either way (no 0·−inf)
FLA_RELEASE = (0, 3, 2)  # the oldest fla taken: older releases read [B, H, T, K] by default (wrong heads, no error)


def fla_installed() -> bool:
    """Whether flash-linear-attention ≥ 0.3.2 can be imported, found without importing it (that needs Triton); an
    older release counts as absent. The `fla` package ships in `fla-core` since 0.3 (before: the main package)."""
    if importlib.util.find_spec("fla") is None:
        return False
    for dist in ("fla-core", "flash-linear-attention"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        return tuple(int(n) for n in re.findall(r"\d+", version)[:3]) >= FLA_RELEASE
    return True  # importable without an installed distribution (a source checkout on the path): taken as it is


def fla_gla(q_BHTK, k_BHTK, v_BHTV, g_BHTK, S_BHKV):
    """outputs [B, H, T, V] and last state [B, H, K, V], float32, as `gla.chunked_gla`, from fla's `chunk_gla`
    (queries already scaled: scale 1; log-gates below GATE_FLOOR act as it); differentiable in every input."""
    from fla.ops.gla import chunk_gla

    q, k, v, g = (x.transpose(1, 2) for x in (q_BHTK, k_BHTK, v_BHTV, torch.clamp(g_BHTK, min=GATE_FLOOR)))
    o_BTHV, S_BHKV = chunk_gla(q=q, k=k, v=v, g=g, scale=1.0, initial_state=S_BHKV, output_final_state=True)
    return o_BTHV.transpose(1, 2), S_BHKV
