"""The bench's command-line arguments at their edges (bench/*.py; docs/bench.md): sweeps and sets parsed or
refused naming the option, lists naming an item twice, threads past the CPUs, kernels and options no variant can
use. Each is one `error:` line naming the option, before any work; in-process."""

from __future__ import annotations

import re

import pytest

from shared_config import SpecError
from shared_config.cli import UsageError
from shared_config import resources
from shared_config.resources import ResourceError
from shared_config.study import study_args, study_parser

from ..support.common import ROOT, load_script, make_spec


def bench_variants(sets=(), sweeps=()):
    from argparse import Namespace

    from bench.options import variants

    return variants(Namespace(spec="tiny", set=list(sets), sweep=list(sweeps), dtype="float32"))


@pytest.mark.parametrize("sweeps, says", [
    ([" d_model=48,96"], None),  # spaces around the key: a KeyError traceback before
    (["d_model =48,96"], None),
    (["=1,2"], "--sweep '=1,2' must look like key=v1,v2"),  # named --set before
    (["d_model= "], "--sweep 'd_model= ' must look like key=v1,v2"),
    (["d_model=[1"], "--sweep 'd_model=[1': the value is not a YAML scalar"),
    (["d_model=48", "d_model=96"], "--sweep d_model: given twice"),
    (["compute_dtype=bfloat16,float32"], "--sweep compute_dtype: the bench sets it from --compute-dtype"),
], ids=["space-before-key", "space-after-key", "no-key", "no-value", "not-scalar", "twice", "compute-dtype"])
def test_bench_sweeps_are_parsed_or_refused_naming_sweep(sweeps, says):
    if says is None:
        assert [spec.d_model for _, spec in bench_variants(sweeps=sweeps)] == [48, 96]
    else:
        with pytest.raises((UsageError, SpecError), match=re.escape(says)):
            bench_variants(sweeps=sweeps)


def test_bench_refuses_a_set_its_own_option_would_override():
    """--compute-dtype (default float32) replaced a --set compute_dtype=bfloat16 silently: a float32 run."""
    with pytest.raises(UsageError, match="--set compute_dtype: the bench sets it from --compute-dtype"):
        bench_variants(sets=["compute_dtype=bfloat16"])
    assert [spec.compute_dtype for _, spec in bench_variants(sets=[" d_model=48"])] == ["float32"]


def test_a_variant_labelled_by_a_spec_path_that_is_not_utf8_can_be_drawn(tmp_path):
    """With no --sweep a variant is labelled by --spec: a path whose bytes are not UTF-8 reached compare.py's plot as
    it was, matplotlib's TypeError traceback after the whole bench; it is labelled as the tools print it (\\xNN)."""
    from argparse import Namespace

    from bench.options import variants

    spec = tmp_path / "s\udcff.yaml"
    spec.write_text("vocab_size: 11\nd_model: 8\nn_layers: 1\nn_heads: 2\nd_ff: 8\nmax_seq_len: 8\n")
    [(label, _)] = variants(Namespace(spec=str(spec), set=[], sweep=[], dtype="float32"))
    assert label == f"{tmp_path}/s\\xff.yaml"
    label.encode("utf-8")


def test_gla_layer_checks_its_arguments_and_outputs_before_any_work(tmp_path, monkeypatch):
    from bench import gla_layer

    def no_work(*args):
        raise AssertionError("the work started")

    monkeypatch.setattr(gla_layer, "inputs", no_work)
    with pytest.raises(UsageError, match="--kernel '' names no kernel"):  # ran nothing, exit 0, before
        gla_layer.main(["--kernel", "", "--tokens", "64"])
    with pytest.raises(UsageError, match="--json .*missing is not a directory"):  # failed after every kernel ran
        gla_layer.main(["--tokens", "64", "--backend", "torch", "--json", str(tmp_path / "missing" / "x.json")])
    with pytest.raises(ResourceError, match="the gla layer at B 100000 .* lower --batch"):  # numpy's MemoryError
        gla_layer.main(["--batch", "100000", "--tokens", "100000", "--backend", "torch"])
    with pytest.raises(UsageError, match="--tokens 100000 exceeds max_seq_len=256 of tiny"):  # a traceback
        gla_layer.main(["--compile-step", "tiny", "--tokens", "100000"])
    monkeypatch.setattr(resources, "machine_memory", lambda: (10**6, "of memory here"))  # built, then OOM-killed
    with pytest.raises(ResourceError, match="--compile-step tiny's train state needs about .* a smaller spec"):
        gla_layer.main(["--compile-step", "tiny", "--tokens", "64"])


def test_a_list_option_naming_an_item_twice_is_refused(tmp_path):
    """Each was run twice, its rows labelled alike (a study's second run replaced the first's directory)."""
    from bench import gla_layer

    with pytest.raises(UsageError, match="--configs: dense is given twice"):
        study_args(study_parser("A study.", 1, ["dense"], "c", "out", "w").parse_args(["--configs", "dense,dense"]),
                   "x.py", [])
    with pytest.raises(UsageError, match="--backends: jax is given twice"):
        study_args(study_parser("A study.", 1, ["a"], "c", "out", "w").parse_args(["--backends", "jax,torch,jax"]),
                   "x.py", [])
    with pytest.raises(UsageError, match="--sweep d_model: 48 is given twice"):
        bench_variants(sweeps=["d_model=48,96,48"])
    with pytest.raises(UsageError, match="--sweep norm_bias: false is given twice"):  # a false value too
        bench_variants(sweeps=["norm_bias=false,false"])
    with pytest.raises(UsageError, match="--kernel: pure is given twice"):
        gla_layer.main(["--kernel", "pure,pure"])
    (tmp_path / "run").mkdir()
    with pytest.raises(UsageError, match="run directories: .*run is given twice"):
        load_script("plot_curves").main([str(tmp_path / "run"), str(tmp_path / "." / "run"), "--out",
                                         str(tmp_path / "c.png")])


def test_bench_threads_are_bounded_by_the_cpus_this_process_may_use(capsys):
    """--threads 100000 reached torch.set_num_threads: the process died of signal 11."""
    from bench import compare
    from bench.load import usable_cpus

    with pytest.raises(SystemExit) as exit_:
        compare.parse_args(["--threads", str(usable_cpus() + 1)])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip() == (
        f"error: argument --threads: must be at most {usable_cpus()}, the CPUs this process may use, "
        f"got {usable_cpus() + 1}")
    assert compare.parse_args(["--threads", str(usable_cpus())]).threads == usable_cpus()


def test_bench_refuses_a_gla_kernel_no_variant_can_run():
    """--gla-kernel fla on an attention spec ran the whole bench with the option ignored."""
    from argparse import Namespace

    from bench.options import variants

    args = dict(spec="tiny", set=[], dtype="float32", gla_kernel="pure")
    with pytest.raises(UsageError, match="--gla-kernel pure: no variant has a layer of mixer gla .* has layers of "
                                         "mixer attention"):
        variants(Namespace(**args, sweep=[]))
    with pytest.raises(UsageError, match="--attention einsum: no variant has a layer of mixer attention .* has layers "
                                         "of mixer gla"):
        variants(Namespace(spec="gla-tiny", set=[], dtype="float32", attention="einsum", sweep=[]))
    args["set"] = ["n_kv_heads=null", "position=none"]
    assert [s.mixer for _, s in variants(Namespace(**args, sweep=["mixer=attention,gla"]))] == ["attention", "gla"]


def test_the_bench_names_a_third_mixer_as_it_is(monkeypatch):
    """A mixer beside attention and GLA (a value added to the spec's CHOICES): the bench's refusal of --attention named
    its layers GLA's, and its report's kernel column read GLA's attributes off the mixer (an AttributeError)."""
    from argparse import Namespace

    from bench.options import variants
    from bench.runners import mixer_kernel
    from shared_config.spec import CHOICES

    monkeypatch.setitem(CHOICES, "mixer", (*CHOICES["mixer"], "toy"))
    with pytest.raises(UsageError, match="--attention einsum: .* has layers of mixer toy$"):
        variants(Namespace(spec="tiny", set=["mixer=toy"], dtype="float32", attention="einsum", sweep=[]))
    assert mixer_kernel(make_spec(mixer="toy"), object()) == "toy"


def test_compile_is_refused_where_only_jax_runs(capsys):
    """--compile (torch.compile) with --backend jax ran the JAX twin, the option ignored without a word."""
    from bench import compare, profile_step

    for parse in (compare.parse_args, profile_step.parse_args):
        for flag in ("--compile", "--no-compile"):
            with pytest.raises(UsageError, match=f"{flag}: torch.compile steers the torch .and hf. step"):
                parse(["--backend", "jax", flag])
        assert parse(["--backend", "both", "--compile"]).compile is True
        with pytest.raises(UsageError, match="--train-config: the optimizer settings of --mode train; --mode forward"):
            parse(["--mode", "forward", "--train-config", "cpu"])
    with pytest.raises(SystemExit) as exit_:
        load_script("train").parse_args(["--backend", "jax", "--compile"])
    assert exit_.value.code == 2 and "--compile: torch.compile steers the torch twin's steps" in capsys.readouterr().err


def test_a_twins_attention_kernel_is_refused_where_only_transformers_runs():
    """--attention einsum --backend hf timed transformers' SDPA, the option ignored (the table's column said sdpa)."""
    from bench import compare

    with pytest.raises(UsageError, match="--attention einsum: a kernel of the twins; transformers' Llama runs SDPA"):
        compare.parse_args(["--backend", "hf", "--attention", "einsum"])
    assert compare.parse_args(["--backend", "all", "--attention", "einsum"]).attention == "einsum"


def test_a_train_configs_memory_options_are_the_ones_the_report_records(tmp_path):
    """A --train-config's remat: full and grad_accum_steps: 2 ran while the report (env), its table and the memory
    check said remat none and grad_accum 1, in both tools; transformers (--backend all) ignored them. A flag wins."""
    from bench import compare, profile_step
    from bench.options import environment

    config = tmp_path / "train.yaml"
    config.write_text("grad_accum_steps: 2\nremat: full\n")
    for args, want in ((compare.parse_args(["--train-config", str(config), "--remat", "block"]), (2, "block", 0)),
                       (profile_step.parse_args(["--train-config", str(config)]), (2, "full", 0))):
        env = environment(args, "cpu")
        assert (env["grad_accum_steps"], env["remat"], env["loss_chunk"]) == want
    with pytest.raises(UsageError, match="grad_accum_steps: 2 of --train-config .*: train-config options of the twin"):
        compare.parse_args(["--train-config", str(config), "--backend", "all"])


def test_a_dry_run_writes_its_tiny_figures_under_runs_not_beside_the_gpu_results(monkeypatch):
    """bench/results/ holds the committed GPU results: a dry run without --out wrote its CPU figures there, as
    bench/results/cpu-cpu-<date>/, one `git add` away from a commit. It now goes under the git-ignored runs/."""
    import contextlib

    from bench import gpu_check

    where = []
    monkeypatch.setattr(gpu_check, "lock_run", lambda out: contextlib.nullcontext())  # nothing made in the checkout
    monkeypatch.setattr(gpu_check, "run_plan", lambda args, env, out, started: where.append(out))
    gpu_check.main(["--dry-run", "--quiet"])
    assert where[0].parent == ROOT / "runs" / "gpu_check-dry-run", where
    assert "/runs/" in (ROOT / ".gitignore").read_text().splitlines()


def test_the_steps_a_report_records_are_the_steps_timed():
    """--steps 1 --rounds 4 timed 4 steps (rounded up to a round each) while env.steps said 1."""
    from bench import compare
    from bench.options import environment

    args = compare.parse_args(["--steps", "1", "--rounds", "4"])
    assert args.steps == environment(args, "cpu")["steps"] == 4
    assert compare.parse_args(["--steps", "9", "--rounds", "4"]).steps == 12


def test_a_plot_of_more_bars_than_a_chart_draws_is_refused_before_any_work(tmp_path, monkeypatch):
    """compare.py --plot drew any number of bars (for minutes at thousands) after timing them all; replot.py
    refused more than 64 of the same report."""
    from bench import compare

    def no_work(*args):
        raise AssertionError("the work started")

    monkeypatch.setattr(compare, "check_jobs_memory", no_work)

    sweep = "d_model=" + ",".join(str(48 * n) for n in range(1, 34))  # 33 variants x 2 backends
    with pytest.raises(UsageError, match="--plot: 33 variant.s. x 2 backend.s. are 66 bars; one chart draws at most"):
        compare.main(["--sweep", sweep, "--plot", str(tmp_path / "p.png")])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,env,message", [
    (["--backend", "jax", "--mesh", "data=2", "--batch", "2", "--grad-accum", "2"], {},
     "--grad-accum-steps 2 must divide the 1 rows of a batch"),
    (["--backend", "torch", "--batch", "3"], {"RANK": "0", "WORLD_SIZE": "2"},
     "--batch-size 3 must be divisible by the 2 data-parallel shards"),
    (["--backend", "torch", "--batch", "2", "--grad-accum", "2"], {"RANK": "0", "WORLD_SIZE": "2"},
     "--grad-accum-steps 2 must divide the 1 rows of a batch"),
    (["--backend", "torch", "--batch", "3", "--grad-accum", "2"], {},
     "--grad-accum-steps 2 must be >= 1 and divide --batch-size 3"),
], ids=["mesh-micro-batches", "torchrun-rows", "torchrun-micro-batches", "micro-batches"])
def test_a_batch_that_does_not_split_is_refused_before_any_job(monkeypatch, args, env, message):
    """A batch whose share of a device or rank does not split into the micro-batches, or that does not split over
    torchrun's ranks at all, failed at the first step, after the imports, the process group and the models. The
    message names a value a flag set by that flag: it said `grad_accum_steps=2`, a key the user never typed."""
    import bench.timing
    from bench import compare

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(bench.timing, "run_benchmarks", lambda *a: pytest.fail("the jobs ran"))
    with pytest.raises(SpecError, match=message):
        compare.compare(compare.parse_args([*args, "--seq", "16", "--steps", "1", "--rounds", "1", "--warmup", "0"]))
