"""The bench on a TPU, checked on CPU by faking only what the device reports: chip names and peaks, MFU per chip,
the attention each twin picks, the Pallas kernel itself (in Pallas' TPU interpret mode), the torch_xla rules.
Nothing here needs a TPU; docs/bench.md, "TPU", says what was and was not run on one."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax._src import hardware_utils
from jax.experimental.pallas import tpu as pltpu

import jax_model.attention
import torch_model.attention
from bench import compare, devices, timing
from bench.flops import TPU_PEAK_TFLOPS, peak_tflops, tpu_chip
from shared_config import load_spec
from shared_config.cli import UsageError, run
from shared_config.hardware import HardwareError

from ..support.common import ROOT, checkout_env

# device_kind as JAX reports it (JAX's own Pallas tests and XLA's ifrt memory table), then the product names
KINDS = [("TPU v4", "v4", 275.0), ("TPU v5 lite", "v5e", 197.0), ("TPU v5", "v5p", 459.0),
         ("TPU v6 lite", "v6e", 918.0), ("TPU v5e", "v5e", 197.0), ("TPU v5p", "v5p", 459.0), ("TPU v6e", "v6e", 918.0),
         ("tpu  V5 Lite", "v5e", 197.0)]


@pytest.mark.parametrize("kind,chip,peak", KINDS)
def test_device_kind_names_the_chip_and_its_bf16_peak(kind, chip, peak):
    assert tpu_chip(kind) == chip
    assert peak_tflops(kind, "bfloat16") == peak
    assert peak_tflops(kind, "float32") is None  # no published float32 peak: no MFU rather than a made-up one


def test_unlisted_chips_have_no_peak_and_gpus_keep_theirs():
    for kind in ("TPU v4 lite", "TPU v3", "TPU v2", "TPU7x", "TPU v5 litepod", "cpu (x86_64)"):
        assert tpu_chip(kind) is None and peak_tflops(kind, "bfloat16") is None, kind
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0 and peak_tflops("NVIDIA H200", "float32") == 67.0


def test_the_torch_xla_device_name_parses_for_every_listed_chip():
    """torch_device_name writes "TPU <generation>" from JAX's PCI probe: each listed generation must parse back."""
    names = {v.name for v in hardware_utils.TpuVersion}
    assert set(TPU_PEAK_TFLOPS) <= names
    for name in TPU_PEAK_TFLOPS:
        assert tpu_chip(f"TPU {name}") == name


def fake_tpu(monkeypatch, chips: int = 4, version: str = "v5e"):
    """This host, with `chips` TPUs on its PCI bus: what `devices.tpu_chips` reads from /sys."""
    monkeypatch.setattr(devices, "tpu_chips", lambda: (chips, version))


@pytest.mark.parametrize("mesh,chips", [(None, 1), ({"data": 2, "fsdp": 2}, 4)])
def test_mfu_is_per_chip(mesh, chips):
    spec = load_spec("tiny")
    bench = SimpleNamespace(attention="pallas", info={"compile": "jax.jit", **({"mesh": mesh} if mesh else {})})
    args = SimpleNamespace(mode="train", batch=8, seq=256, dtype="bfloat16", peak_tflops=None)
    r = timing.result("tiny", "jax", spec, bench, 1.0, [0.01] * 4, [], args, "TPU v5 lite", 4)
    assert r["chips"] == chips
    assert r["mfu"] == pytest.approx(r["tflops"] / (197.0 * chips), rel=1e-12)
    causal = r["flops_per_token_causal"] / r["flops_per_token"]  # attention's term halved: 6N + 6·L·H·E·T of 6N + 12·…
    assert 0.5 < causal < 1 and r["mfu_causal"] == pytest.approx(r["mfu"] * causal, rel=1e-12)
    assert timing.result("tiny", "jax", spec, bench, 1.0, [0.01] * 4, [], args, "cpu (x86_64)", 4)["mfu"] is None


def test_auto_attention_on_a_faked_tpu(monkeypatch):
    spec = load_spec("tiny")  # E 16
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    jax_resolve, torch_resolve = jax_model.attention.resolve_attention, torch_model.attention.resolve_attention
    assert jax_resolve("auto", spec) == "pallas"
    assert jax_resolve("auto", spec.replace(head_dim=256)) == "pallas"
    assert jax_resolve("auto", spec.replace(head_dim=192)) == "xla"  # the kernel refuses it
    assert jax_resolve("pallas", spec) == "pallas" and jax_resolve("pallas", spec.replace(head_dim=192)) == "xla"
    assert jax_resolve("einsum", spec) == "einsum"
    monkeypatch.setattr(jax, "device_count", lambda: 8)  # a slice: the step may be sharded, and XLA cannot split a
    assert jax_resolve("auto", spec) == "xla"  # Pallas kernel; asked for by name, it runs (the bench, one device)
    with torch.device("xla:0"):  # what torch_xla's device makes the default while the bench builds the model
        assert torch_resolve("auto", spec) == "pallas" and torch_resolve("pallas", spec) == "pallas"
        assert torch_resolve("auto", spec.replace(head_dim=192)) == "sdpa"
        assert torch_resolve("pallas", spec.replace(head_dim=192)) == "sdpa"
    # The bench pins the same kernel in both twins on a TPU, except JAX over a mesh (a Pallas kernel needs a shard_map)
    assert compare.kernels("auto", "tpu", "bfloat16") == {"jax": "pallas", "torch": "pallas", "hf": "sdpa"}
    assert compare.kernels("auto", "tpu", "bfloat16", mesh=True)["jax"] == "xla"
    assert compare.kernels("pallas", "tpu", "bfloat16") == {"jax": "pallas", "torch": "pallas", "hf": "sdpa"}
    assert compare.kernels("xla", "tpu", "bfloat16") == {"jax": "xla", "torch": "sdpa", "hf": "sdpa"}


def qkv(T: int, H: int = 4, K: int = 2, E: int = 16, B: int = 2):
    rng = np.random.default_rng(0)
    return [jnp.asarray(rng.normal(size=(B, T, n, E)), jnp.float32) for n in (H, K, K)]


@pytest.mark.slow
def test_the_pallas_kernel_computes_causal_gqa_attention_and_its_gradients():
    """JAX's Pallas TPU flash kernel and its backward kernels, run by Pallas' TPU interpreter on CPU: the same
    math as the einsum kernel (a train step differentiates through it)."""
    q, k, v = qkv(128, H=2, K=1, E=8, B=1)  # the interpreter is slow: one 128-block, two query heads on one kv head
    dy = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

    def out_and_grads(attention):
        y, vjp = jax.vjp(lambda q, k, v: jax_model.attention.attend(q, k, v, attention), q, k, v)
        return y, *vjp(dy)

    want = out_and_grads("einsum")
    with pltpu.force_tpu_interpret_mode():
        got = jax.jit(out_and_grads, static_argnums=0)("pallas")
    for name, g, w in zip(("output", "dq", "dk", "dv"), got, want):
        assert float(jnp.max(jnp.abs(g - w))) < 2e-6 * float(jnp.max(jnp.abs(w))), name


def test_the_torch_twin_hands_torch_xla_the_kernel_s_layout(monkeypatch):
    """torch_xla's `flash_attention(q, k, v, causal, sm_scale=...)` over [B, H, T, E] runs JAX's Pallas kernel on
    the TPU. Standing in for it: that same kernel, interpreted on CPU, reached through numpy (no torch_xla here)."""
    from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention as jax_flash

    def flash_attention(q, k, v, causal=False, q_segment_ids=None, kv_segment_ids=None, sm_scale=1.0):
        with pltpu.force_tpu_interpret_mode():
            o = jax_flash(*(jnp.asarray(t.numpy()) for t in (q, k, v)), causal=causal, sm_scale=sm_scale)
        return torch.as_tensor(np.array(o))

    kernel = SimpleNamespace(flash_attention=flash_attention)
    monkeypatch.setitem(sys.modules, "torch_xla", SimpleNamespace(experimental=SimpleNamespace(custom_kernel=kernel)))
    monkeypatch.setitem(sys.modules, "torch_xla.experimental", SimpleNamespace(custom_kernel=kernel))
    monkeypatch.setitem(sys.modules, "torch_xla.experimental.custom_kernel", kernel)
    q, k, v = (torch.as_tensor(np.array(t)) for t in qkv(128, H=2, K=1, E=8, B=1))
    want = torch_model.attention.einsum_attention(q, k, v)
    got = torch_model.attention.attend(q, k, v, "pallas")
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())


@pytest.mark.slow
def test_pallas_falls_back_to_xla_where_the_kernel_cannot_run():
    """T not a multiple of 128, a head dim it does not take, or an explicit mask (decoding): the kernel is not called
    (off a TPU, outside the interpreter, it would fail)."""
    q, k, v = qkv(128, E=160)
    np.testing.assert_allclose(jax_model.attention.attend(q, k, v, "pallas"),
                               jax_model.attention.einsum_attention(q, k, v), rtol=1e-5, atol=1e-6)
    q, k, v = qkv(96)
    want = jax_model.attention.einsum_attention(q, k, v)
    np.testing.assert_allclose(jax_model.attention.attend(q, k, v, "pallas"), want, rtol=1e-5, atol=1e-6)
    mask_BTS = jnp.tril(jnp.ones((96, 96), bool))[None].repeat(2, 0)
    np.testing.assert_allclose(jax_model.attention.attend(q, k, v, "pallas", mask_BTS), want, rtol=1e-5, atol=1e-6)
    qt, kt, vt = (torch.as_tensor(np.array(t)) for t in (q, k, v))
    np.testing.assert_allclose(torch_model.attention.attend(qt, kt, vt, "pallas").numpy(), want, rtol=1e-5, atol=1e-6)


def bench_main(argv: list[str], monkeypatch, capsys) -> str:
    """compare.py's main under the CLI wrapper, in this process: exit 2 and one `error:` line, which it returns."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # restored after the test
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    for name in ("jax", "torch", "hf"):  # any model built is a failure: the check comes before any work
        monkeypatch.setitem(timing.SETUP, name, lambda *a, **k: pytest.fail("a model was built"))
    threads = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    with pytest.raises(SystemExit) as exit:
        run(compare.main, ["--threads", threads, *argv])
    out, err = capsys.readouterr()
    assert exit.value.code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("backend", ["torch", "hf"])
def test_torch_without_torch_xla_on_a_tpu_stops_with_one_line(backend, monkeypatch, capsys):
    fake_tpu(monkeypatch)
    find_spec = importlib.util.find_spec  # torch_xla absent, whatever this host has installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name,
                        *a: None if name == "torch_xla" else find_spec(name, *a))
    line = bench_main(["--backend", backend], monkeypatch, capsys)
    assert line == (f"error: --backend {backend} on a TPU runs through PyTorch/XLA, which is not installed: "
                    "pip install "
                    f"'torch_xla[tpu]' (the release matching torch {torch.__version__.split('+')[0]}), or run "
                    "--backend jax")


def test_one_framework_per_process_on_a_tpu(monkeypatch, capsys):
    fake_tpu(monkeypatch)
    line = bench_main(["--backend", "both"], monkeypatch, capsys)
    assert "JAX and PyTorch/XLA cannot share the chips in one process" in line
    assert devices.check_tpu_backends(["jax"]) is None


def test_torch_compile_is_refused_on_a_tpu(monkeypatch):
    fake_tpu(monkeypatch)
    args = SimpleNamespace(threads=torch.get_num_threads(), dtype="bfloat16", compile=True, attention="auto",
                           mode="forward", backend="jax")
    with pytest.raises(UsageError, match="torch.compile's inductor does not target TPUs"):
        timing.backend_options(args, compare.kernels)
    args.compile = None  # the default on a TPU: torch_xla's own graph compilation
    assert (timing.backend_options(args, compare.kernels)[:2]
            == (False, {"jax": "pallas", "torch": "pallas", "hf": "sdpa"}))


def test_the_cpu_path_is_unchanged():
    """On this CPU host: no TPU found, the names, kernels and compile default the bench had before TPUs."""
    assert devices.tpu_chips()[0] == 0 and devices.accelerator() == "cpu"
    # one name for the machine whichever framework a report ran (torch's "cpu (x86_64)" was another device)
    assert devices.jax_device_name() == devices.torch_device_name() == "cpu (cpu)"
    assert devices.torch_device().type == "cpu" and devices.compile_mode(False, torch.device("cpu")) == "eager"
    assert compare.kernels("auto", "cpu", "bfloat16") == {"jax": "auto", "torch": "auto", "hf": "sdpa"}
    assert compare.kernels("auto", "gpu", "bfloat16") == {"jax": "cudnn", "torch": "cudnn", "hf": "sdpa"}
    spec = load_spec("tiny")
    assert jax_model.attention.resolve_attention("auto", spec) == "blocked"
    assert torch_model.attention.resolve_attention("auto", spec) == "sdpa"
    for twin in (jax_model.attention, torch_model.attention):  # asked for by name off a TPU: a clear error, not a crash
        with pytest.raises(ValueError, match="'pallas' is the Pallas TPU flash kernel: it needs a TPU"):
            twin.resolve_attention("pallas", spec)
    with pytest.raises(HardwareError, match="--attention pallas is the Pallas TPU flash kernel: it needs a TPU"):
        compare.kernels("pallas", "cpu", "bfloat16")
    args = SimpleNamespace(threads=torch.get_num_threads(), dtype="float32", compile=None, attention="auto",
                           mode="forward", backend="both")
    assert timing.backend_options(args, compare.kernels)[:2] == (False, {"jax": "auto", "torch": "auto", "hf": "sdpa"})
    assert math.isclose(peak_tflops("NVIDIA A100-SXM4-80GB", "bfloat16"), 312.0)


@pytest.mark.slow
def test_the_tpu_check_runs_each_twin_in_its_own_process_and_prints_their_ratio(tmp_path):
    """bench/tpu_check.sh, the one command for a TPU host, run here on the CPU with tiny settings after its defaults."""
    args = ["--spec", "tiny", "--dtype", "float32", "--mode", "forward", "--batch", "1", "--seq", "16", "--steps", "1",
            "--warmup", "0", "--rounds", "1"]
    proc = subprocess.run(["bash", str(ROOT / "bench" / "tpu_check.sh"), *args], capture_output=True, text=True,
                          env=checkout_env(OUT=str(tmp_path), PYTHON=sys.executable), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    backends = [json.loads((tmp_path / f"tpu-{b}.json").read_text())["results"][0]["backend"] for b in ("jax", "torch")]
    assert backends == ["jax", "torch"]
    assert proc.stdout.splitlines()[-1].startswith("step-time ratio (lower is faster): tiny: jax/torch ")
