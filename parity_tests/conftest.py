"""Precision pinned for both frameworks, so the same tests are strict on a GPU too; no network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the Hugging Face tests build their models locally

import jax
import torch

# float32 matmuls at full precision: JAX would use TF32 (GPU) or bf16 passes (TPU) by default,
# torch may have TF32 enabled by the user's environment.
jax.config.update("jax_default_matmul_precision", "highest")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.set_float32_matmul_precision("highest")
torch.manual_seed(0)
