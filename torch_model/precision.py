"""Float32 as written: the precision setting that parity needs, for every command and test that computes in float32.
Mirrors jax_model/precision.py."""

from __future__ import annotations

import torch


def exact_float32() -> None:
    """float32 matmuls at full precision on every device, as the other twin computes them: a user's environment may
    have enabled TF32 (matmuls and cuDNN). Process-wide; call before the first computation."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
