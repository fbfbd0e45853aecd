"""The device a bench runs on: GPU, TPU or CPU, found without opening a TPU, and named as the reports name it;
torch's sync and peak-memory reading on each. bench/runners.py builds each backend's job on it."""

from __future__ import annotations

from shared_config.cli import UsageError


def tpu_chips() -> tuple[int, str | None]:
    """TPU chips on this host's PCI bus and their generation ("v4", "v5e", "v5p", "v6e", ...), found without opening
    them: the first framework to open a TPU holds it for the whole process (pytorch/xla#6747)."""
    from jax._src import hardware_utils  # JAX's own probe: it reads /sys and starts no backend

    n, version = hardware_utils.num_available_tpu_chips_and_device_id()
    return n, version.name if version is not None else None


def accelerator() -> str:
    """"gpu", "tpu" or "cpu": where the bench runs. A TPU is found before either framework opens it."""
    import torch

    if torch.cuda.is_available():
        return "gpu"
    if tpu_chips()[0]:
        return "tpu"
    from jax_model.attention import device_platform  # JAX_PLATFORMS naming a missing platform: a HardwareError

    return "gpu" if device_platform() == "gpu" else "cpu"


def check_tpu_backends(backends: list[str]) -> None:
    """On a TPU host, before any work: one framework per process (JAX and torch_xla each open the chips through
    their own runtime, and the first holds them), and the torch-based backends need torch_xla. Raises UsageError."""
    import importlib.util

    import torch

    if "jax" in backends and len(backends) > 1:
        raise UsageError("on a TPU, JAX and PyTorch/XLA cannot share the chips in one process: run --backend jax "
                         "and --backend torch (or hf) as two commands")
    if backends != ["jax"] and importlib.util.find_spec("torch_xla") is None:
        raise UsageError(f"--backend {backends[0]} on a TPU runs through PyTorch/XLA, which is not installed: "
                         "pip install 'torch_xla[tpu]' (the release matching torch "
                         f"{torch.__version__.split('+')[0]}), "
                         "or run --backend jax")


# The CPU as a report names it, whichever framework found it (JAX's name: its device_kind is "cpu"): torch's
# "cpu (x86_64)" made a --backend torch report of the machine another device than a --backend jax one, and
# plot_context.py refused to draw them together; the architecture is in env.platform
CPU_DEVICE = "cpu (cpu)"


def jax_device_name() -> str:
    import jax

    d = jax.devices()[0]
    return d.device_kind if d.platform in ("gpu", "tpu") else CPU_DEVICE


def torch_device():
    """CUDA, else a TPU through torch_xla, else the CPU."""
    import torch

    if not torch.cuda.is_available() and tpu_chips()[0]:
        import torch_xla.core.xla_model as xm

        return xm.xla_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    n, version = tpu_chips()
    return f"TPU {version}" if n else CPU_DEVICE


def torch_sync_and_peak(device):
    """A sync for timing and this job's peak memory: call it before the job allocates anything."""
    import torch

    if device.type == "xla":  # lazy tensors: mark_step cuts the step's graph and launches it; then wait for the TPU
        import torch_xla.core.xla_model as xm

        def sync(out):
            xm.mark_step()
            xm.wait_device_ops()

        return sync, (lambda: None)  # torch_xla's memory counters are not read: no peak memory on a TPU
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()  # other jobs' models stay resident: count only what this one adds
        return (lambda out: torch.cuda.synchronize()), (lambda: torch.cuda.max_memory_allocated() - base)
    return (lambda out: None), (lambda: None)  # CPU kernels have finished when the call returns


def torch_graph_breaks() -> int:
    """Graph breaks torch.compile has met in this process so far (dynamo's counters, one per break each time a
    frame is traced), 0 where torch was never imported. A break splits a compiled region into graphs with eager
    Python between them: a row timed "torch.compile" that met one runs part of its step eager."""
    import sys

    if "torch" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def compile_mode(compile: bool, device) -> str:
    """How a torch step runs: torch.compile, eager, or (on a TPU) torch_xla's lazy graph, which XLA compiles once."""
    return "torch.compile" if compile else "torch_xla lazy graph" if device.type == "xla" else "eager"
