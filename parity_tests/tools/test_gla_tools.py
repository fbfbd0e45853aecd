"""GLA in the tools: the FLOPs count, the bench's mixer sweep and context plot, parity_report stage by stage, and
gla_layer.py --compile-step's progress."""

from __future__ import annotations

import io
import json
import os
import sys
from functools import partial

import pytest

from shared_config import load_spec
from shared_config.flops import flops_per_token, flops_split, matmul_params

from ..support.common import load_script, run_main
from .test_odd_input import error_line


def test_gla_flops_against_a_hand_count():
    spec = load_spec("gla-tiny")  # D 64, L 2, H 2, d_k 32 (K' 16), d_v 64 (V' 32), r 16, F 128, V 256, untied
    # q k, v g, gk0, gk1, o, mlp
    per_layer = 2 * (32 * 64) + 2 * (64 * 64) + 16 * 64 + 32 * 16 + 64 * 64 + 3 * (128 * 64)
    n = 2 * per_layer + 256 * 64
    assert matmul_params(spec) == n
    recurrence = 4 * 2 * 2 * 16 * 32  # per layer and head: k_tᵀv_t and q_t·S_t, 2 FLOPs per multiply-add
    for seq in (16, 128):  # no term in the context length
        assert flops_per_token(spec, seq, "forward") == 2 * n + recurrence
        assert flops_per_token(spec, seq, "train") == 6 * n + 3 * recurrence


@pytest.mark.parametrize("mode, causal", [("train", False), ("forward", True), ("decode", False)])
def test_hybrid_flops_count_each_layers_own_mixer(mode, causal):
    """MFU's numerator on a hybrid stack: the mixer term is the sum of its layers' own, each layer's read off a stack
    of that mixer alone (GLA's constant in T, attention's 4·H·E·T, halved by `causal`); the weights from the layout."""
    gla = load_spec("gla-tiny").replace(n_layers=4)  # D 64, H 2, E 32, K' 16, V' 32
    hybrid = gla.replace(gla_attention_every=2, position="rope")  # GLA, attention, GLA, attention
    attention = gla.replace(mixer="attention", position="rope")
    for seq in (16, 128):
        per_layer = {s.mixer: flops_split(s, seq, mode, causal)[1] / s.L for s in (gla, attention)}
        weights, mixers = flops_split(hybrid, seq, mode, causal)
        assert mixers == 2 * per_layer["gla"] + 2 * per_layer["attention"]
        assert per_layer["attention"] == (3 if mode == "train" else 1) * 4 * 2 * 32 * seq * (0.5 if causal else 1)
        assert weights == (6 if mode == "train" else 2) * matmul_params(hybrid)
        assert matmul_params(hybrid) == (matmul_params(gla) + matmul_params(attention)) / 2  # 2 layers of each
    grouped = hybrid.replace(n_kv_heads=1)  # K 1: each attention layer's k/v [K·E, D] = [32, 64], scores per query head
    assert flops_split(grouped, 128, mode, causal)[1] == flops_split(hybrid, 128, mode, causal)[1]
    assert matmul_params(hybrid) - matmul_params(grouped) == 2 * 2 * (2 - 1) * 32 * 64  # 2 layers' k and v


def test_bench_options_see_every_layers_mixer():
    """--attention picks the kernel of a hybrid stack's attention layers: refused on a GLA stack, taken here."""
    from argparse import Namespace

    from bench.options import variants

    args = dict(spec="gla-tiny", dtype="float32", attention="einsum", gla_kernel="pure", sweep=[])
    hybrid = variants(Namespace(**args, set=["gla_attention_every=2"]))
    assert [list(s.attention_layers) for _, s in hybrid] == [[1]]


@pytest.mark.slow
def test_bench_sweeps_a_hybrid_stack(tmp_path, capsys):
    """`compare.py --sweep gla_attention_every=0,2` (docs/gla.md, "Hybrid stacks"): both twins, the kernel column
    naming each mixer's kernel."""
    from bench import compare

    out = tmp_path / "hybrid.json"
    run_main(compare.main, "--spec", "gla-tiny", "--sweep", "gla_attention_every=0,2", "--backend", "both", "--batch",
             "2", "--seq", "16", "--steps", "2", "--warmup", "1", "--rounds", "2", "--json", out, capsys=capsys)
    results = json.loads(out.read_text())["results"]
    assert [(r["variant"], r["backend"], r["attention"]) for r in results] == [
        ("gla_attention_every=0", "jax", "gla-chunk64"), ("gla_attention_every=0", "torch", "gla-chunk64"),
        ("gla_attention_every=2", "jax", "gla-chunk64+blocked"), ("gla_attention_every=2", "torch", "gla-chunk64+sdpa")]


@pytest.mark.slow
def test_bench_sweeps_the_mixer(tmp_path, capsys):
    """`--sweep mixer=attention,gla` in decode mode at two prompt lengths, and plot_context.py over the two reports.
    The same sweep in train mode is test_gpu_check.py's dry run of the extra plan (its gla-sweep check)."""
    from bench import compare, plot_context

    reports = [tmp_path / f"decode-{seq}.json" for seq in (16, 32)]
    for seq, report in zip((16, 32), reports):
        run_main(compare.main, "--spec", "gla-tiny", "--sweep", "mixer=attention,gla", "--mode", "decode", "--batch",
                 "2", "--seq", seq, "--steps", "2", "--warmup", "1", "--rounds", "2", "--json", report, capsys=capsys)
    results = json.loads(reports[0].read_text())["results"]
    assert [(r["variant"], r["backend"]) for r in results] == [
        (f"mixer={m}", b) for m in ("attention", "gla") for b in ("jax", "torch")]
    assert {r["attention"] for r in results if r["variant"] == "mixer=gla"} == {"gla-chunk64"}
    printed = run_main(plot_context.main, *reports, "--out", tmp_path / "ctx.png", capsys=capsys)
    assert (tmp_path / "ctx.png").stat().st_size > 0
    assert "seq 16:" in printed.out and "seq 32:" in printed.out


@pytest.mark.slow
def test_parity_report_passes_stage_by_stage_for_gla(tmp_path):
    report = load_script("parity_report")
    out = tmp_path / "report.json"
    code = report.main(["--spec", "gla-tiny", "--set", "norm_type=dyt", "--set", "norm_placement=peri", "--seq", "40",
                        "--batch", "1", "--json", str(out)])
    rows = json.loads(out.read_text())
    stages = [r["stage"] for r in rows["rows"]] if isinstance(rows, dict) else [r["stage"] for r in rows]
    assert code in (0, None) and any("self_attn.gk_proj.1.bias" in s for s in stages)
    assert any("attn_out" in s for s in stages)


@pytest.mark.slow
def test_the_gla_norm_study_on_a_few_steps(tmp_path):
    """--mixer gla runs the experiment's four variants on gla-tiny and judges the four criteria."""
    # warmup 0: both steps count toward the gradient-norm variance, which needs two (one was a variance of 0)
    small = [f"--set={kv}" for kv in ("batch_size=2", "seq_len=16", "warmup_steps=0")]
    load_script("compare_norms").main(["--mixer", "gla", "--steps", "2", "--backends", "torch", "--out", str(tmp_path),
                                       *small])
    report = json.loads((tmp_path / "norms.json").read_text())
    assert list(report["results"]) == ["rms-pre", "dyt-pre", "rms-peri", "dyt-peri"]
    assert json.loads((tmp_path / "runs" / "dyt-peri-torch" / "step-00000002"
                       / "state.json").read_text())["spec"]["mixer"] == "gla"
    criteria = [c["criterion"] for c in report["criteria"]]
    for placement in ("pre", "peri"):
        assert f"dyt-{placement} within 0.5 perplexity of rms-{placement}" in criteria
        assert f"dyt-{placement} outputs distributed like rms-{placement}'s (mean TV ≤ 0.25)" in criteria
    assert "no NaN/Inf in any run" in criteria and "lowest gradient-norm variance overall" in criteria
    sites = report["results"]["dyt-peri"]["torch"]["outputs"]
    assert "model.layers.1.self_attn.g_norm" in sites and "model.layers.0.mlp_output_norm" in sites
    assert all(abs(sum(p) - 1) < 1e-9 for p in sites.values())


def test_total_variation_of_the_output_histograms():
    study = load_script("compare_norms")
    p, q = [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]
    rows = {"rms-pre": {"outputs": {"a": p, "b": p}}, "dyt-pre": {"outputs": {"a": p, "b": q}}}
    (name, passed, detail), = study.output_criteria(rows)
    assert passed is True and "mean TV 0.250 over 2 sites; worst b 0.500" in detail  # (0 + 0.5) / 2, at the bound
    rows["dyt-pre"]["outputs"]["a"] = q
    assert study.output_criteria(rows)[0][1] is False


@pytest.mark.slow
def test_the_gla_layer_bench_times_each_kernel_against_the_pure_form(tmp_path, monkeypatch, capsys):
    """bench/gla_layer.py in process at a tiny geometry: one row per (twin, kernel), the pure form first with error
    0, the recurrence within float32's floor of it, every field in the JSON; a GPU kernel on this CPU is refused in
    one line (left out and listed with --if-present: test_gpu_check.py's core dry run, whose gla-kernels check runs
    that command). JAX is told not to preallocate the GPU (as compare.py does): torch's kernels run in the same
    process."""
    from bench import gla_layer
    from shared_config.cli import run

    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    out = tmp_path / "gla.json"
    small = ["--heads", "2", "--tokens", "40", "--key", "8", "--value", "12", "--repeats", "1"]
    with pytest.raises(SystemExit) as exit_:
        run(gla_layer.main, [*small, "--kernel", "recurrent,pure", "--json", str(out)])
    assert exit_.value.code == 0 and os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    report = json.loads(out.read_text())
    rows = {(r["twin"], r["kernel"]): r for r in report["results"]}
    assert (report["complete"]
            and list(rows) == [("jax", "pure"), ("jax", "recurrent"), ("torch", "pure"), ("torch", "recurrent")])
    assert all(rows[t, "pure"]["max_rel_err"] == 0 and 0 < rows[t, "recurrent"]["max_rel_err"] <= 1e-5
               for t in ("jax", "torch"))
    assert rows["jax", "pure"]["peak_mem_bytes"] > 0 and rows["jax", "pure"]["compile_s"] > 0
    error_line(gla_layer.main, [*small, "--kernel", "pure,pallas"], capsys, "--kernel pallas", "needs a GPU")


def test_the_triton_report_finds_every_kernel_and_its_tensor_core_dots(tmp_path, monkeypatch, capsys):
    """bench/gla_triton.py without a GPU or the triton package: --ir-only writes the four kernels' Triton IR, every
    dot on tensor cores (three TF32 passes: a float32 dot in Triton runs as scalar FMAs, which spill: docs/gla.md);
    compiling without triton is one error line naming --ir-only."""
    from bench import gla_triton
    from shared_config.cli import run

    tiny = ["--batch", "1", "--heads", "2", "--tokens", "150", "--key", "12", "--value", "80"]
    with pytest.raises(SystemExit) as exit_:
        run(gla_triton.main, [*tiny, "--ir-only", "--out", str(tmp_path / "ir"), "--json", str(tmp_path / "t.json")])
    assert exit_.value.code == 0
    rows = {r["kernel"]: r for r in json.loads((tmp_path / "t.json").read_text())["results"]}
    assert set(rows) == {"_states_kernel", "_output_kernel", "_state_grads_kernel", "_grads_kernel"}
    assert all(r["dots"] > 0 and r["tf32x3_dots"] == r["dots"] for r in rows.values()), rows
    assert sorted(p.name for p in (tmp_path / "ir").iterdir()) == sorted(f"{k}.ttir" for k in rows)
    monkeypatch.setitem(sys.modules, "triton", None)  # not installed
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run(gla_triton.main, tiny)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("error:") and "--ir-only" in err and "\n" not in err


def test_each_gla_layer_call_frees_the_last_ones_tensors_before_its_peak_is_reset():
    """bench/gla_layer.measure with a fake allocator: each call's peak counter restarts after the previous call's
    inputs, outputs and gradients are gone (kept, torch's CUDA peak counted them: ~50 MB at gla-small), then
    inputs, run, wait, read; the last call's inputs and outputs come back."""
    import weakref

    from bench.gla_layer import measure

    class Tensors:  # stands for a call's tensors: weakref-able, freed when the last reference goes
        pass

    made, events = [], []

    class FakePeak:
        def reset(self):
            events.append(("reset", sum(ref() is not None for ref in made)))  # tensors of earlier calls alive

        def sync(self):
            events.append("sync")

        def peak(self):
            events.append("peak")
            return 7

    def tensors(event):
        made.append(weakref.ref(t := Tensors()))
        events.append(event)
        return t

    times, peak, (inputs, outputs) = measure(2, lambda: tensors("inputs"), lambda x: tensors("run"), FakePeak(),
                                             on_call=lambda: events.append("call"))
    assert events == [("reset", 0), "inputs", "run", "sync", "peak", "call"] * 3
    assert len(times) == 2 and peak == 7 and (made[-2](), made[-1]()) == (inputs, outputs)


@pytest.mark.parametrize("quiet", [False, True])
def test_the_gla_layer_bench_shows_progress_on_stderr_and_quiet_silences_it(quiet, capsys):
    """bench/gla_layer.py in process: off a terminal, plain progress lines on stderr (no carriage returns) up to its
    last call, the table alone on stdout; --quiet: none; `--json -`: the JSON alone on stdout."""
    from bench import gla_layer
    from shared_config.cli import run

    tiny = ["--heads", "2", "--tokens", "24", "--key", "8", "--value", "12", "--repeats", "2", "--backend", "torch",
            *(["--quiet"] if quiet else [])]
    for json_out in (False, True):
        with pytest.raises(SystemExit) as exit_:
            run(gla_layer.main, [*tiny, *(["--json", "-"] if json_out else [])])
        out, err = capsys.readouterr()
        assert exit_.value.code == 0
        table = err if json_out else out
        assert [line[0] for line in table.splitlines() if line[:1] in "#|"].count("|") == 3  # header, rule, one row
        if json_out:
            assert json.loads(out)["complete"]
        else:
            assert all(line.startswith(("#", "|")) for line in out.splitlines())
        progress = [line for line in err.splitlines() if line.startswith("gla fwd+bwd:")]
        assert "\r" not in err
        assert progress == [] if quiet else "3/3" in progress[-1] and "torch pure" in progress[-1]


@pytest.mark.parametrize("quiet", [False, True])
def test_the_triton_report_shows_progress_on_stderr_and_quiet_silences_it(quiet, tmp_path, capsys):
    """bench/gla_triton.py --ir-only in process: plain progress lines on stderr (no carriage returns) up to its last
    kernel, the table alone on stdout; --quiet: none."""
    from bench import gla_triton
    from shared_config.cli import run

    with pytest.raises(SystemExit) as exit_:
        run(gla_triton.main, ["--batch", "1", "--heads", "2", "--tokens", "150", "--key", "12", "--value", "80",
                              "--ir-only", "--out", str(tmp_path / "ir"), *(["--quiet"] if quiet else [])])
    out, err = capsys.readouterr()
    assert exit_.value.code == 0 and "\r" not in err
    assert all(line.startswith(("#", "|")) for line in out.splitlines()) and out.count("\n| _") == 4
    progress = [line for line in err.splitlines() if line.startswith("ttir")]
    assert progress == [] if quiet else "4/4" in progress[-1]


def test_gla_layer_compile_step_shows_progress(monkeypatch):
    """--compile-step, one XLA call of 12 s or more at gla-small, showed nothing until it printed its seconds: it
    shows its stages, and the elapsed time again during each."""
    from bench import gla_layer
    from shared_config.progress import progress

    stream = io.StringIO()
    monkeypatch.setattr(gla_layer, "progress", partial(progress, interval=0.05, stream=stream))
    assert gla_layer.main(["--compile-step", "tiny", "--batch", "1", "--tokens", "16"]) == 0
    lines = stream.getvalue().splitlines()
    assert [s for s in ("build", "lower", "compile]", "done") if not any(s in line for line in lines)] == []
    assert sum("2/3 stages" in line and "compile]" in line for line in lines) >= 2  # shown again while it compiled


def test_the_by_hand_fla_check_says_what_it_needs_where_fla_is_missing(capsys):
    """python -m parity_tests.external.fla_package (not collected) ended in a bare ModuleNotFoundError traceback on a
    machine without flash-linear-attention, as every CI machine is."""
    import importlib.util

    from parity_tests.external import fla_package

    if importlib.util.find_spec("fla") is not None:
        pytest.skip("flash-linear-attention is installed here: the check itself runs (docs/gla.md, Conversion)")
    assert fla_package.main() == 2
    assert capsys.readouterr().err.startswith("error: this check needs flash-linear-attention")
