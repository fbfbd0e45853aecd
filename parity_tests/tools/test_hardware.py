"""Asking for hardware that is not there (shared_config.hardware): an attention kernel, a platform named by
JAX_PLATFORMS, bf16 on a GPU without it, --parallel without torchrun: one `error:` line and exit code 2 from every
script and bench tool, a HardwareError from both twins, never a library's traceback or a silent fallback."""

import jax
import pytest

import jax_model.attention
import torch_model.attention
from bench import compare
from shared_config import load_spec, save_checkpoint
from shared_config.cli import UsageError
from shared_config.cli import run as cli_run
from shared_config.hardware import HardwareError, check_dtype, check_kernel

from ..support.common import ROOT, one_line_error, parity_weights, run_python, run_script

TWINS = {"jax": jax_model.attention, "torch": torch_model.attention}


@pytest.mark.parametrize("attention, platform, ok", [
    ("cudnn", "cpu", False), ("cudnn", "tpu", False), ("cudnn", "gpu", True),
    ("pallas", "cpu", False), ("pallas", "gpu", False), ("pallas", "tpu", True),
    ("auto", "cpu", True), ("blocked", "cpu", True), ("sdpa", "gpu", True),
])
def test_check_kernel(attention, platform, ok):
    if ok:
        check_kernel(attention, platform, f"--attention {attention}")
    else:
        with pytest.raises(HardwareError, match=f"--attention {attention} is .* it needs a (GPU|TPU), and this "
                                                f"process runs on a {platform.upper()}"):
            check_kernel(attention, platform, f"--attention {attention}")


def test_check_dtype():
    check_dtype("bfloat16", "gpu", True, "NVIDIA A100")
    check_dtype("bfloat16", "cpu", False, "cpu")  # CPUs compute bf16 in both frameworks
    check_dtype("float32", "gpu", False, "Tesla V100")
    with pytest.raises(HardwareError, match="--dtype bfloat16: Tesla V100 has no native bfloat16"):
        check_dtype("bfloat16", "gpu", False, "Tesla V100")


@pytest.mark.parametrize("twin", TWINS)
def test_both_twins_refuse_cudnn_off_a_gpu(twin):
    """On this CPU host both twins refuse cuDNN by name (they used to crash at the first step or fall back)."""
    with pytest.raises(HardwareError, match=f"the {'JAX' if twin == 'jax' else 'torch'} twin's attention='cudnn' "
                                            "is cuDNN's fused attention: it needs a GPU"):
        TWINS[twin].resolve_attention("cudnn", load_spec("tiny"))


@pytest.mark.parametrize("failure", [AssertionError(), RuntimeError("Unable to initialize backend 'tpu': ...")])
def test_jax_platforms_naming_a_missing_platform(monkeypatch, failure):
    """JAX_PLATFORMS=cuda without the CUDA plugin: JAX raises a bare AssertionError from default_backend()."""
    def broken():
        raise failure

    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    monkeypatch.setattr(jax, "default_backend", broken)
    with pytest.raises(HardwareError, match="JAX_PLATFORMS=cuda names a platform JAX cannot start on this machine"):
        jax_model.attention.device_platform()


def test_a_jax_backend_that_cannot_start_is_one_line_from_every_command(monkeypatch, capsys):
    """Wherever JAX makes its first array (a converter, a loader), JAX_PLATFORMS=cuda fails with a bare
    AssertionError: shared_config.cli.run names the cause instead."""
    def broken():
        raise AssertionError()

    def main(argv):
        raise AssertionError()  # what jnp.zeros raises when the backend cannot start

    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    monkeypatch.setattr(jax, "devices", broken)
    with pytest.raises(SystemExit) as e:
        cli_run(main, [])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: JAX_PLATFORMS=cuda names a platform JAX cannot start on this machine (AssertionError); unset it "
        "(JAX picks what is present) or install that platform's jax plugin"]
    monkeypatch.undo()  # a working backend: the failure is the command's own, raised as it is
    with pytest.raises(AssertionError):
        cli_run(main, [])


def test_bench_parallel_needs_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UsageError, match="--parallel fsdp2 needs torchrun"):
        compare.parse_args(["--backend", "torch", "--parallel", "fsdp2"])
    assert compare.parse_args(["--backend", "torch"]).parallel is None


@pytest.mark.parametrize("args", [["--backend", "jax"], ["--backend", "both"], ["--backend", "torch", "--mode",
                                                                                 "decode"]])
def test_bench_parallel_times_the_torch_train_step_alone(monkeypatch, args):
    """Under a torchrun of one process --parallel ddp with the JAX twin (or a decode) was ignored without a word: the
    JAX step timed on one device; without torchrun it was told it needs torchrun, which then refuses JAX."""
    for launched in (False, True):
        for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
            monkeypatch.setenv(name, value) if launched else monkeypatch.delenv(name, raising=False)
        with pytest.raises(UsageError, match="--parallel ddp scales the torch twin's training under torchrun: pass "
                                             "--backend torch --mode train "):
            compare.parse_args([*args, "--parallel", "ddp"])


@pytest.mark.parametrize("env, parallel, fits, says", [
    ({}, None, False, None),
    ({}, "ddp", False, "--parallel ddp scales the torch twin's training under torchrun: pass --backend torch (the JAX "
                       "twin scales out with --devices/--mesh)"),
    ({}, "fsdp2", True, "--parallel fsdp2 needs torchrun: torchrun --standalone --nproc_per_node=N scripts/train.py "
                        "--backend torch ..."),
    ({"RANK": "0", "WORLD_SIZE": "2"}, None, False, "under torchrun scripts/train.py scales the torch twin's "
                                                    "training: pass --backend torch (the JAX twin scales out with "
                                                    "--devices/--mesh)"),
    ({"RANK": "0", "WORLD_SIZE": "1"}, "ddp", True, None),  # a torchrun of one process is a launch
    ({"RANK": "1", "WORLD_SIZE": "2"}, None, True, None),
])
def test_torchrun_and_parallel_scale_out_the_torch_twin_alone(monkeypatch, env, parallel, fits, says):
    """One rule for train.py and compare.py (each had its own copy, in other words)."""
    from shared_config.parallel import torchrun_error

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert torchrun_error(parallel, fits, "scripts/train.py") == says


# The command lines a user types; each used to end in a traceback (or, for generate.py, to succeed on another kernel).
@pytest.mark.slow  # five interpreters that import jax and torch
@pytest.mark.parametrize("case", ["compare-cudnn", "profile-cudnn", "compare-JAX_PLATFORMS", "generate-cudnn",
                                  "generate-JAX_PLATFORMS", "convert-JAX_PLATFORMS", "train-JAX_PLATFORMS"])
def test_command_lines_refuse_missing_hardware_in_one_line(case, tmp_path):
    spec = load_spec("tiny")
    weights = tmp_path / "tiny.safetensors"
    save_checkpoint(weights, parity_weights(spec), spec)
    gen = ["--weights", weights, "--tokens", "1,2", "--max-new-tokens", "1"]
    small = ["--steps", "1", "--warmup", "0", "--rounds", "1", "--batch", "1", "--seq", "8"]
    result, fragments = {
        "compare-cudnn": (lambda: run_python(ROOT / "bench/compare.py", "--attention", "cudnn", *small),
                          ["--attention cudnn is cuDNN's fused attention: it needs a GPU"]),
        "profile-cudnn": (lambda: run_python(ROOT / "bench/profile_step.py", "--attention", "cudnn", "--steps", "1"),
                          ["--attention cudnn is cuDNN's fused attention: it needs a GPU"]),
        "compare-JAX_PLATFORMS": (lambda: run_python(ROOT / "bench/compare.py", "--backend", "jax", *small,
                                                     JAX_PLATFORMS="cuda"), ["JAX_PLATFORMS=cuda names a platform"]),
        "generate-cudnn": (lambda: run_script("generate", "--backend", "torch", "--attention", "cudnn", *gen),
                           ["the torch twin's attention='cudnn' is cuDNN's fused attention: it needs a GPU"]),
        "generate-JAX_PLATFORMS": (lambda: run_python(ROOT / "scripts/generate.py", "--backend", "jax", *gen,
                                                      JAX_PLATFORMS="cuda"), ["JAX_PLATFORMS=cuda names a platform"]),
        "convert-JAX_PLATFORMS": (lambda: run_python(ROOT / "scripts/convert.py", weights, tmp_path / "flax", "--to",
                                                     "flax", JAX_PLATFORMS="cuda"),
                                  ["JAX_PLATFORMS=cuda names a platform"]),
        "train-JAX_PLATFORMS": (lambda: run_python(ROOT / "scripts/train.py", "--backend", "jax", "--steps", "1",
                                                   "--out", tmp_path / "run", JAX_PLATFORMS="cuda"),
                                ["JAX_PLATFORMS=cuda names"]),
    }[case]
    one_line_error(result(), *fragments)
    assert not (tmp_path / "flax").exists() and not (tmp_path / "run").exists()  # nothing left behind
