"""Float32 as written: the precision setting that parity needs, for every command and test that computes in float32.
Mirrors torch_model/precision.py."""

from __future__ import annotations

import jax


def exact_float32() -> None:
    """float32 matmuls at full precision on every device, as the other twin computes them: JAX would use TF32 on a
    GPU and bf16 passes on a TPU by default. Process-wide; call before the first computation is traced."""
    jax.config.update("jax_default_matmul_precision", "highest")
