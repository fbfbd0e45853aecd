"""What each kernel, device and backend choice needs from the machine, and one check of it for every script, bench
tool and both twins: asking for hardware that is not there is one `HardwareError` (exit code 2), never a
library's traceback and never a silent fallback.

Platforms are named as JAX names them: "cpu", "gpu" (CUDA or ROCm) and "tpu"; each twin says which one it
runs on (`device_platform()` in jax_model/attention.py and torch_model/attention.py).
"""

from __future__ import annotations

import os

# attention kernel -> the platforms it runs on (a kernel not named here runs everywhere)
KERNEL_PLATFORMS = {
    "cudnn": ("gpu",),  # cuDNN's fused attention (jax.nn.dot_product_attention, torch SDPA's CUDNN_ATTENTION)
    "pallas": ("tpu",),  # the Pallas TPU flash kernel (JAX; torch_xla wraps it)
}
KERNEL_NAMES = {"cudnn": "cuDNN's fused attention", "pallas": "the Pallas TPU flash kernel"}
PLATFORM_NAMES = {"cpu": "a CPU", "gpu": "a GPU", "tpu": "a TPU"}


class HardwareError(ValueError):
    """A kernel, device or backend was asked for that this machine (or this install) does not have."""


def check_kernel(attention: str, platform: str, asked: str) -> None:
    """Refuse (HardwareError) an attention kernel that does not run on `platform` ("cpu", "gpu" or "tpu"); `asked`
    is how the message names the request ("--attention cudnn", "the JAX twin's attention='cudnn'")."""
    needs = KERNEL_PLATFORMS.get(attention)
    if needs is not None and platform not in needs:
        where = " or ".join(PLATFORM_NAMES[p] for p in needs)
        raise HardwareError(f"{asked} is {KERNEL_NAMES[attention]}: it needs {where}, "
                            f"and this process runs on {PLATFORM_NAMES.get(platform, platform)} "
                            "(auto picks the best kernel present)")


GLA_KERNELS = ("auto", "pure", "pallas", "fla")  # the train config's `gla_kernel`, the bench's --gla-kernel
GLA_KERNEL_TWIN = {"pallas": "jax", "fla": "torch"}  # each GPU kernel is one twin's (pure: both, everywhere)
GLA_KERNEL_NAMES = {"pallas": "the JAX twin's Pallas kernel (jax_model/gla_kernel.py)",
                    "fla": "flash-linear-attention's Triton chunk_gla (torch_model/gla_kernel.py)"}


def resolve_gla_kernel(gla_kernel: str, twin: str, platform: str, fla_installed: bool = False) -> str:
    """The GLA kernel `twin` ("jax" or "torch") runs for `gla_kernel` on `platform`: "auto" is that twin's GPU
    kernel on a GPU (torch: when flash-linear-attention is installed) and the pure chunked form elsewhere.
    Raises HardwareError for another twin's kernel, a GPU kernel off a GPU, or fla not installed."""
    if gla_kernel == "auto":
        gpu_kernel = {"jax": "pallas", "torch": "fla"}[twin]
        return gpu_kernel if platform == "gpu" and (twin == "jax" or fla_installed) else "pure"
    if gla_kernel == "pure":
        return "pure"
    if gla_kernel not in GLA_KERNEL_TWIN:
        raise HardwareError(f"gla_kernel={gla_kernel!r} must be one of {', '.join(GLA_KERNELS)}")
    if GLA_KERNEL_TWIN[gla_kernel] != twin:
        raise HardwareError(f"gla_kernel={gla_kernel} is {GLA_KERNEL_NAMES[gla_kernel]}; the {twin} twin runs "
                            f"auto, pure or {next(k for k, t in GLA_KERNEL_TWIN.items() if t == twin)}")
    if platform != "gpu":
        raise HardwareError(f"gla_kernel={gla_kernel} is {GLA_KERNEL_NAMES[gla_kernel]}: it needs a GPU, and this "
                            f"process runs on {PLATFORM_NAMES.get(platform, platform)} (auto picks the pure form)")
    if gla_kernel == "fla" and not fla_installed:
        raise HardwareError("gla_kernel=fla needs flash-linear-attention 0.3.2 or later: pip install -e '.[gla]'")
    return gla_kernel


def check_gla_kernel(gla_kernel: str, specs, backends, twin) -> None:
    """A `gla_kernel` other than auto, where one of `specs` has GLA layers, must run in every twin of `backends` on
    this machine ("hf" and others skipped): resolve_gla_kernel with the twin's own platform, a HardwareError before
    the first job or run (the bench's and the studies' one rule: a twin without it failed as its first job started,
    after the jobs before it had run). `twin` is the tools' way to a twin (shared_config.twins.twin), passed in: the
    core imports no twin."""
    if gla_kernel == "auto" or not any(spec.mixer == "gla" for spec in specs):
        return
    for backend in [b for b in backends if b in GLA_KERNEL_TWIN.values()]:
        fla = backend == "torch" and twin("torch", "gla_kernel").fla_installed()
        resolve_gla_kernel(gla_kernel, backend, twin(backend, "attention").device_platform(), fla)


def jax_platforms_error(e: BaseException) -> HardwareError:
    """The one-line error for JAX failing to start its backend, naming JAX_PLATFORMS when that asked for it
    (JAX_PLATFORMS=cuda without the CUDA plugin fails inside JAX with a bare AssertionError)."""
    asked = os.environ.get("JAX_PLATFORMS", "")
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200] or type(e).__name__
    if asked:
        return HardwareError(f"JAX_PLATFORMS={asked} names a platform JAX cannot start on this machine ({detail}); "
                             "unset it (JAX picks what is present) or install that platform's jax plugin")
    return HardwareError(f"JAX cannot start a backend on this machine: {detail}")


def check_dtype(dtype: str, platform: str, native_bf16: bool, device: str) -> None:
    """Refuse (HardwareError) bfloat16 compute on a GPU without native bfloat16 (before Ampere: emulated, not a
    number worth timing); CPUs and TPUs compute it in both frameworks."""
    if dtype == "bfloat16" and platform == "gpu" and not native_bf16:
        raise HardwareError(f"--dtype bfloat16: {device} has no native bfloat16 (compute capability 8.0 or newer "
                            "needed); use --dtype float32")


def jax_backend_failure() -> HardwareError | None:
    """For a command that failed: the HardwareError to report if the cause is JAX failing to start its backend
    (JAX_PLATFORMS naming a platform it cannot start, which JAX reports as a bare AssertionError wherever the
    first array is made), else None. Looks only when this process has imported JAX."""
    import sys

    if "jax" not in sys.modules:
        return None
    try:
        sys.modules["jax"].devices()
    except Exception as e:  # the backend did not start: this, not the exception being handled, is the cause
        return jax_platforms_error(e)
    return None
