"""bench/profile_step.py: kernels are put in the right category (by HLO for JAX, by name for torch), GPU
traces are read from their stream lines only, and the CLI profiles both twins on this machine."""

from __future__ import annotations

import json

import pytest

from bench.profile_step import category, hlo_categories, trace_kernels

from ..support.common import ROOT, one_line_error, run_python

# The shape of XLA's optimized HLO text: fusions call computations; a GEMM may sit two fusions deep.
HLO = """\
HloModule jit_train_step, entry_computation_layout={(f32[8,16]{1,0})->f32[8,16]{1,0}}

%fused_dot (param_0: bf16[8,16], param_1: bf16[16,16]) -> bf16[8,16] {
  %param_0 = bf16[8,16]{1,0} parameter(0)
  %param_1 = bf16[16,16]{1,0} parameter(1)
  ROOT %dot.3 = bf16[8,16]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%outer_computation (param_0.1: bf16[8,16], param_1.1: bf16[16,16]) -> bf16[8,16] {
  %param_0.1 = bf16[8,16]{1,0} parameter(0)
  %param_1.1 = bf16[16,16]{1,0} parameter(1)
  %inner = bf16[8,16]{1,0} fusion(%param_0.1, %param_1.1), kind=kCustom, calls=%fused_dot
  ROOT %tanh.1 = bf16[8,16]{1,0} tanh(%inner)
}

%fused_add (param_0.2: f32[8,16]) -> f32[8,16] {
  %param_0.2 = f32[8,16]{1,0} parameter(0)
  ROOT %add.1 = f32[8,16]{1,0} add(%param_0.2, %param_0.2)
}

ENTRY %main.10 (Arg_0.1: f32[8,16]) -> f32[8,16] {
  %Arg_0.1 = f32[8,16]{1,0} parameter(0)
  %loop_add_fusion = f32[8,16]{1,0} fusion(%Arg_0.1), kind=kLoop, calls=%fused_add
  %gemm_fusion_dot.3 = bf16[8,16]{1,0} fusion(%a, %b), kind=kCustom, calls=%outer_computation, metadata={op_name="x"}
  %custom-call.4 = (bf16[8,16]{1,0}, s8[0]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul"
  %custom-call.7 = (bf16[2,4,8,16]{3,2,1,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax"
  ROOT %copy.2 = f32[8,16]{1,0} copy(%loop_add_fusion)
}
"""


def test_hlo_instructions_are_classified_by_what_they_compute():
    kinds = hlo_categories(HLO)
    assert kinds["gemm_fusion_dot.3"] == "matmul"  # a fusion whose fusion holds the dot
    assert kinds["inner"] == "matmul" and kinds["dot.3"] == "matmul"
    assert kinds["custom-call.4"] == "matmul"  # cuBLAS
    assert kinds["custom-call.7"] == "attention"  # cuDNN's fused attention
    assert kinds["loop_add_fusion"] == "other" and kinds["copy.2"] == "other" and kinds["add.1"] == "other"
    # The HLO decides for JAX, whatever the kernel's own name says; an unknown op falls back to the name.
    assert category("sm90_xmma_gemm_bf16bf16", kinds, "custom-call.4") == "matmul"
    assert category("cudnn_generated_fort_native_sdpa", kinds, "custom-call.7") == "attention"
    assert category("loop_add_fusion", kinds, "loop_add_fusion") == "other"
    assert category("Memcpy DtoD", kinds, None) == "copy"


@pytest.mark.parametrize("name,expected", [
    ("nvjet_tst_192x192_64x4_1x2_h_bz_coopB_TNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "matmul"),
    ("triton_tem_fused_mm_t_0", "matmul"),
    ("aten::mm", "matmul"),
    ("aten::addmm", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128", "attention"),
    ("void flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::bfloat16_t>>", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>", "optimizer"),
    ("aten::_fused_adamw_", "optimizer"),
    ("Memcpy DtoD (Device -> Device)", "copy"),
    ("Memset (Device)", "copy"),
    ("triton_red_fused__log_softmax_mul_0", "other"),
    ("triton_poi_fused_add_mul_silu_1", "other"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other"),
    ("aten::mul", "other"),
])
def test_kernel_names_are_classified(name, expected):
    assert category(name) == expected


def meta(pid, tid, kind, name):
    return {"ph": "M", "pid": pid, "tid": tid, "name": kind, "args": {"name": name}}


def test_gpu_trace_counts_stream_lines_only():
    """xprof's GPU trace repeats each kernel on its "XLA Ops" line: counting both would double the time."""
    events = [
        meta(1, None, "process_name", "/device:GPU:0"), meta(1, 7, "thread_name", "Stream #7(Compute)"),
        meta(1, 900, "thread_name", "XLA Ops"), meta(2, None, "process_name", "/host:CPU"),
        meta(2, 5, "thread_name", "python"),
        {"ph": "X", "pid": 1, "tid": 7, "name": "nvjet_tst", "dur": 30.0, "args": {"hlo_op": "custom-call.4"}},
        {"ph": "X", "pid": 1, "tid": 7, "name": "nvjet_tst", "dur": 20.0, "args": {"hlo_op": "custom-call.4"}},
        {"ph": "X", "pid": 1, "tid": 7, "name": "loop_add_fusion", "dur": 5.0, "args": {"hlo_op": "loop_add_fusion"}},
        {"ph": "X", "pid": 1, "tid": 900, "name": "custom-call.4", "dur": 50.0, "args": {"hlo_op": "custom-call.4"}},
        {"ph": "X", "pid": 2, "tid": 5, "name": "PjitFunction(train_step)", "dur": 400.0, "args": {}},
    ]
    assert trace_kernels(events) == {("nvjet_tst", "custom-call.4"): 50.0, ("loop_add_fusion", "loop_add_fusion"): 5.0}


def test_cpu_trace_counts_thunks():
    events = [
        meta(1, None, "process_name", "/host:CPU"), meta(1, 3, "thread_name", "tf_XLAEigen/1"),
        {"ph": "X", "pid": 1, "tid": 3, "name": "ynn_fusion.3", "dur": 8.0, "args": {"hlo_op": "ynn_fusion.3"}},
        {"ph": "X", "pid": 1, "tid": 3, "name": "end: ynn_fusion.3", "dur": 0.1, "args": {}},
        {"ph": "X", "pid": 1, "tid": 3, "name": "ThunkExecutor::Execute", "dur": 90.0, "args": {}},
    ]
    assert trace_kernels(events) == {("ynn_fusion.3", "ynn_fusion.3"): 8.0}


def profile(*args, check=True):
    proc = run_python(ROOT / "bench" / "profile_step.py", *args)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_cli_profiles_both_twins(tmp_path):
    out = profile("--batch", "2", "--seq", "64", "--steps", "2", "--warmup", "1", "--json", str(tmp_path / "p.json"))
    report = json.loads((tmp_path / "p.json").read_text())
    assert {"device", "versions", "threads"} <= set(report["env"])
    jax_result, torch_result = report["results"]
    assert (jax_result["backend"], torch_result["backend"]) == ("jax", "torch")
    for r in report["results"]:
        assert r["step_ms"] > 0 and r["top"] and {"matmul", "other"} <= set(r["categories"])
        assert r["categories"]["matmul"]["ms"] > 0
        shares = sum(c["share"] for c in r["categories"].values())
        if r["overlapping"]:  # concurrent thunks: shares of their summed thread-time, and no FLOP rate
            assert shares == pytest.approx(1.0) and "tflops" not in r["categories"]["matmul"]
        else:
            assert shares <= 1.0 + 1e-9 and r["categories"]["matmul"]["tflops"] > 0
    assert not torch_result["overlapping"]  # torch runs one operator at a time (each on every thread)
    # JAX on CPU: the thunks were traced and the dots found through the HLO (XLA's fusion names do not say "dot").
    assert any(k["category"] == "matmul" and "dot" not in k["name"] for k in jax_result["top"])
    assert torch_result["categories"]["attention"]["ms"] > 0  # torch's CPU SDPA is one fused kernel
    assert "top operators:" in out.stdout


def test_cli_bad_arguments_exit_2():
    assert (one_line_error(profile("--steps", "0", check=False))
            == "error: argument --steps: must be an integer >= 1, got 0")
    one_line_error(profile("--mode", "decode", check=False), "invalid choice: 'decode'")


def test_the_torch_profilers_chatter_is_kept_off_stderr(capfd):
    """Kineto prints `USDT:`/`STAGE:` lines from C++ at every profiler start and stop; other lines pass."""
    import os

    from bench.runners import without_profiler_chatter

    with without_profiler_chatter():
        os.write(2, b"USDT:2026-12-01 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"STAGE:2026-12-01 Completed Stage: Warm Up\n")
        os.write(2, b"a real warning\n")
    assert capfd.readouterr().err == "a real warning\n"


def test_a_fused_attention_kernels_rate_is_on_the_causal_count():
    """A fused causal kernel (flash, cuDNN) computes the keys at or before each query: its rate on all T keys read
    twice the kernel's (past the device's peak at 55%). Attention run as plain matmuls computes all T."""
    from types import SimpleNamespace

    from bench.profile_step import breakdown
    from shared_config import load_spec

    spec, args = load_spec("tiny"), SimpleNamespace(steps=1, batch=2, seq=64, mode="train", top=3)
    # tiny: H 6, E 16, L 3; per token 3 passes x 4·H·E·L·T FLOPs over all T keys (half of that causal), B·T tokens
    full = 3 * 4 * 6 * 16 * 3 * 64 * (2 * 64)
    fused = breakdown("torch", spec, args, {("flash_fwd", None): 1e3, ("gemm", None): 1e3}, 2e-3, "cuda", None)
    assert fused["categories"]["attention"]["tflops"] == pytest.approx(full / 2 / 1e-3 / 1e12)
    plain = breakdown("torch", spec, args, {("gemm", None): 1e3}, 2e-3, "cuda", None)
    assert plain["categories"]["matmul"]["tflops"] - fused["categories"]["matmul"]["tflops"] == pytest.approx(
        full / 1e-3 / 1e12)


def test_a_hybrid_stacks_attention_rate_counts_its_attention_layers_alone():
    """A hybrid stack (GLA layers, softmax attention every 2nd): the SDPA kernels' rate took the GLA layers'
    recurrence FLOPs too, which run as the chunk form's matmuls."""
    from types import SimpleNamespace

    from bench.profile_step import breakdown
    from shared_config import load_spec

    spec = load_spec("gla-tiny").replace(gla_attention_every=2, position="rope")
    args = SimpleNamespace(steps=1, batch=2, seq=64, mode="train", top=3)
    # one attention layer of H 2, E 32: 3 passes x 4·H·E·T FLOPs per token, halved (causal), over B·T tokens
    causal = 3 * 4 * 2 * 32 * 64 / 2 * (2 * 64)
    times = {("sdpa_fwd", None): 1e3, ("gemm", None): 1e3}
    assert breakdown("torch", spec, args, times, 2e-3, "cuda", None)["categories"]["attention"]["tflops"] == (
        pytest.approx(causal / 1e-3 / 1e12))
