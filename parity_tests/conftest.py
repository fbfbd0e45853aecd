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


import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHES = ("__pycache__", ".pytest_cache", ".hypothesis", ".egg-info")


def _checkout_files() -> set[str] | None:
    """Untracked and ignored paths of the checkout (caches aside), or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return {line[3:] for line in out.stdout.splitlines() if line[:2] in ("??", "!!") and not any(c in line for c in CACHES)}


@pytest.fixture(scope="session", autouse=True)
def checkout_stays_untouched():
    """Tests write under tmp_path only: a file a test leaves in the checkout (a default `runs/tiny`) fails the suite."""
    before = _checkout_files()
    yield
    after = _checkout_files()
    if before is not None and after is not None:
        assert after <= before, f"tests wrote into the checkout: {sorted(after - before)[:10]}"
