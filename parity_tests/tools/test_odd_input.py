"""The bench and study command lines against odd input (docs/bench.md, docs/norm-study.md, docs/routing.md): an empty
name, a number past what a step counter holds, a report of the wrong shape, two studies on one --out. Each is
refused in one `error:` line (exit 2) before any work, leaving nothing behind. In-process: main() under cli.run."""

from __future__ import annotations

import pytest

from shared_config import SpecError, load_train_config, save_checkpoint
from shared_config.cli import run
from shared_config.run_dir import lock_run

from ..support.common import load_script, make_spec, parity_weights


def error_line(main, argv: list, capsys, *fragments: str, code: int = 2) -> str:
    """Run `main(argv)` as the command line does; assert the error contract (exit `code`, 2 for bad input, 3 for the
    machine; stdout empty, one `error:` line on stderr holding every fragment) and return that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exit_.value.code == code and out == "", (exit_.value.code, out, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


def bench_main(name: str):
    from importlib import import_module

    return import_module(f"bench.{name}").main


@pytest.mark.parametrize("tool,argv,flag", [
    # a truthiness test read '' as "not given": the defaults ran, or the kernels instead of the compile step
    ("bench.compare", ["--train-config", ""], "--train-config"),
    ("bench.gla_layer", ["--compile-step", ""], "--compile-step"),
    # a path read '' as ".": the cache's jax/ and inductor/ folders landed in the current directory
    ("bench.compare", ["--compile-cache", ""], "--compile-cache"),
    ("bench.profile_step", ["--compile-cache", ""], "--compile-cache"),
    ("bench.gpu_check", ["--dry-run", "--compile-cache", ""], "--compile-cache"),
    ("scripts.parity_report", ["--spec", ""], "--spec"),  # was "give --spec, --weights or both"
    ("scripts.parity_report", ["--spec", "tiny", "--json", ""], "--json"),  # was "exists and is not a regular file"
    ("scripts.parity_report", ["--spec", "tiny", "--train-steps", "1", "--plot", ""], "--plot"),
    ("scripts.compare_logits", ["--weights", ""], "--weights"),
])
def test_an_empty_name_or_path_is_refused_by_its_option(tool, argv, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder, name = tool.split(".")
    main = bench_main(name) if folder == "bench" else load_script(name).main
    error_line(main, argv, capsys, f"argument {flag}", "got an empty string")
    assert list(tmp_path.iterdir()) == []


def test_a_step_count_past_a_32_bit_counter_is_refused(tmp_path, capsys):
    """The JAX twin counts steps in int32: --steps 2**31 was an OverflowError traceback from inside the first step
    (train.py, the studies, parity_report.py --train-steps), after run.json was written."""
    with pytest.raises(SpecError, match="steps=2147483648 must be at most 2,147,483,647"):
        load_train_config({"steps": 2**31})
    assert load_train_config({"steps": 2**31 - 1}).steps == 2**31 - 1
    out = tmp_path / "study"
    error_line(load_script("compare_routing").main, ["--steps", 2**31, "--configs", "dense", "--backends", "jax",
                                                     "--out", out], capsys, "steps=2147483648 must be at most")
    error_line(load_script("parity_report").main, ["--spec", "tiny", "--seq", "8", "--batch", "1", "--train-steps",
                                                   10**20], capsys, "steps=100000000000000000000 must be at most")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,says", [
    (["--configs", "rms-pre,,dyt-pre"], "--configs: 'rms-pre,,dyt-pre' holds an empty name"),  # was "  is given twice"
    (["--backends", ""], "--backends: '' holds an empty name"),  # was "unknown backend(s)  (jax, torch)"
])
def test_a_study_list_with_an_empty_name_is_refused(argv, says, tmp_path, capsys):
    error_line(load_script("compare_norms").main, [*argv, "--steps", "1", "--out", tmp_path / "o"], capsys, says)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tool,argv,says", [
    # the norm study checked its first configuration alone: rms-pre trained (minutes at --steps 300), then
    # rms-hybrid failed in words that named neither it nor --set, its run left in --out
    ("compare_norms", ["--configs", "rms-pre,rms-hybrid", "--set", "qk_norm=true"], "rms-hybrid: "),
    ("compare_routing", ["--configs", "dense,none-0.5"], "'none-0.5': a dense run routes nothing"),  # dense, twice
])
def test_a_study_refuses_any_bad_configuration_before_training_one(tool, argv, says, tmp_path, capsys):
    error_line(load_script(tool).main, [*argv, "--steps", "2", "--backends", "jax", "--out", tmp_path / "o"], capsys,
               says)
    assert list(tmp_path.iterdir()) == []


def test_a_routing_configuration_given_twice_in_two_spellings_is_refused(tmp_path, capsys):
    """mod-0.5,mod-0.50 trained one configuration twice, in two rows that read as two configurations."""
    error_line(load_script("compare_routing").main, ["--configs", "dense,mod-0.5,mod-0.50", "--steps", "1", "--out",
                                                     tmp_path / "o"], capsys, "--configs: mod-0.50 is mod-0.5 again")


def test_a_study_checks_its_memory_before_allocating(tmp_path, capsys):
    """--set batch_size=1000000000 was a numpy MemoryError from inside the loop's set-up (a smaller excess would have
    allocated until the machine killed it); train.py refused it before any work, the studies did not."""
    error_line(load_script("compare_norms").main, ["--configs", "rms-pre", "--set", "batch_size=1000000000", "--out",
                                                   tmp_path / "o"], capsys, "at batch 1000000000", "GiB of memory",
               code=3)
    assert list(tmp_path.iterdir()) == []


def test_a_study_refuses_an_out_another_study_is_writing(tmp_path, capsys):
    """Two studies on one --out replaced each other's runs and mixed their metrics.jsonl (twice the records), and both
    exited 0 with tables of the mixture; the second is now refused before it trains (exit 3, the machine's)."""
    out = tmp_path / "o"
    with lock_run(out):  # the first study, holding its --out (another open file: refused in this process too)
        error_line(load_script("compare_routing").main, ["--configs", "dense", "--backends", "jax", "--steps", "1",
                                                         "--out", out], capsys, "being written by another process",
                   code=3)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


@pytest.mark.parametrize("argv,says", [
    # ignored: no JSON written (nothing on stdout for `--json -`), exit 0
    (["--compile-step", "tiny", "--json", "t.json"], "--json: an option of the layer's timing; --compile-step"),
    (["--compile-step", "tiny", "--heads", "2"], "--heads: an option of the layer's timing"),
    (["--kernel", "pure", "--recurrent"], "--recurrent is --kernel recurrent: pass one of them"),  # ran recurrent
])
def test_gla_layer_refuses_options_it_would_ignore(argv, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    error_line(bench_main("gla_layer"), [*argv, "--tokens", "8"], capsys, says)
    assert list(tmp_path.iterdir()) == []


def test_profile_step_bounds_the_steps_its_profilers_keep_in_memory(capsys):
    """Every profiled step's events stay in memory (torch: ~12 MB a step of tiny on CPU): --steps 1000000000000 grew
    until the machine killed the process, with no error line."""
    error_line(bench_main("profile_step"), ["--steps", 10**12], capsys, "--steps 1000000000000: at most 100")


@pytest.mark.parametrize("argv,says", [
    # the last --set won without a word, here and in train.py, parity_report.py and the studies
    (["--set", "n_layers=2", "--set", "n_layers=3"], "--set n_layers: given twice; pass each key once"),
    # every variant took the sweep's value: the --set did nothing
    (["--set", "norm_type=dyt", "--sweep", "norm_type=rms,derf"], "--set norm_type and --sweep norm_type: every"),
])
def test_compare_refuses_a_spec_key_given_twice(argv, says, capsys):
    error_line(bench_main("compare"), argv, capsys, says)


def test_an_output_in_a_directory_it_cannot_write_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """--json in a read-only directory was refused at the first write: after the first job's compilation (compare.py),
    after the first backend (profile_step.py), at the very end (parity_report.py, gla_layer.py)."""
    import os

    readonly, access = (tmp_path / "ro").resolve(), os.access
    readonly.mkdir()
    # this process may run as root, whom no mode bit stops: the directory is made unwritable in os.access's answer
    monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and (
        not mode & os.W_OK or os.path.realpath(path) != str(readonly)))
    for main, argv in [(bench_main("compare"), ["--json", readonly / "r.json"]),
                       (bench_main("compare"), ["--plot", readonly / "r.png"]),
                       (bench_main("gla_layer"), ["--json", readonly / "r.json"]),
                       (load_script("parity_report").main, ["--spec", "tiny", "--json", readonly / "r.json"])]:
        error_line(main, argv, capsys, f"{readonly}/r.", f"{readonly} is not writable")
    # the checkpoint writers: init_checkpoint.py's "Read-only file system" named nothing, convert.py's came after
    # reading the whole source, as an error of the machine (exit 3)
    source = tmp_path / "w.safetensors"
    save_checkpoint(source, parity_weights(make_spec()), make_spec())
    init = ["--spec", "tiny", "--out", readonly / "r.safetensors"]
    for main, argv, flag in [(load_script("init_checkpoint").main, init, "--out"),
                             (load_script("convert").main, [source, readonly / "r.pt"], "DST")]:
        error_line(main, argv, capsys, f"{flag} {readonly}: {readonly} is not writable")
    assert list(readonly.iterdir()) == []


@pytest.mark.parametrize("record,says", [
    ('{"kind": "train", "step": 1, "loss": "abc"}', "record 1: loss must be a number, got 'abc'"),  # a traceback
    ('{"kind": "train", "step": 1, "loss": 1.0, "scalars": [1]}', "scalars must be an object of numbers"),  # one too
    ('{"kind": "train", "step": 1, "loss": 1.0, "scalars": null}', "scalars must be an object of numbers, got null"),
    ('{"kind": "train", "step": 1, "loss": true}', "record 1: loss must be a number, got true"),
    ('{"kind": "train", "loss": 1.0}', "record 1 has no step"),  # a KeyError traceback
    ('{"kind": "train", "step": 1}', "no training metrics"),  # an empty plot, exit 0
    # matplotlib's traceback: an axis spanning more than float64 holds
    ('{"kind": "train", "step": 1, "loss": 1, "scalars": {"a.alpha": 1e308}}', "a.alpha 1e+308 is past float32's"),
    ('{"kind": "eval", "step": 2, "val_loss": -1e308, "entropy": 1e39}', "val_loss -1e+308 is past float32's range"),
    # a curve per alpha name: 40,000 names (a 1.4 MB file) drew for 36 s in 570 MB, a 64 MiB line for half an hour
    pytest.param('{"kind": "train", "step": 1, "loss": 1, "scalars": {'
                 + ", ".join(f'"l{i}.alpha": 1' for i in range(4097)) + "}}",
                 "log 4,097 alpha names, a curve each; one plot draws at most 4,096", id="4097-alphas"),
])
def test_plot_curves_refuses_a_metrics_record_it_cannot_draw(record, says, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(record + "\n")
    error_line(load_script("plot_curves").main, [tmp_path / "run", "--out", tmp_path / "c.png"], capsys, says)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_plot_curves_names_a_run_directory_that_is_none(tmp_path, capsys):
    """A mistyped directory, or a file given as one, was "no training metrics (metrics.jsonl) to plot", as an empty
    run's directory is."""
    (tmp_path / "f.txt").write_text("x")
    main = load_script("plot_curves").main
    error_line(main, [tmp_path / "nope", "--out", tmp_path / "c.png"], capsys, f"{tmp_path}/nope: no such directory")
    error_line(main, [tmp_path / "f.txt", "--out", tmp_path / "c.png"], capsys, "f.txt: is not a directory; give run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_plot_curves_draws_a_run_whose_directory_name_is_not_utf8(tmp_path, capsys):
    """The legend names each run by its directory: a name that is not UTF-8 (Python keeps those bytes as surrogates)
    was matplotlib's TypeError traceback; it is drawn as the other tools print it, the bytes as \\xNN."""
    run_dir = tmp_path / "r\udcffx"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.0}\n'
                                           '{"kind": "train", "step": 2, "loss": 1.5}\n')
    with pytest.raises(SystemExit) as e:
        run(load_script("plot_curves").main, [str(run_dir), "--out", str(tmp_path / "c.png")])
    assert e.value.code == 0, capsys.readouterr().err[-2000:]
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")


def test_every_plot_draws_dollar_signs_as_written(tmp_path, capsys):
    """Labels and titles come from the user: matplotlib read a pair of `$` as math, so a run directory, a report's
    variant or device named `$\\frac{$` was a ParseSyntaxException traceback (parity_report.py's --weights path in its
    plot's title: after the training), and `$x$` drawn as an italic x. The caller's own settings are kept."""
    import json

    import matplotlib

    from bench.plot import plot_results
    from bench.plot_context import plot_context

    odd = "r$\\frac{$"
    (tmp_path / odd).mkdir()
    (tmp_path / odd / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.0}\n')
    with pytest.raises(SystemExit) as e:
        run(load_script("plot_curves").main, [str(tmp_path / odd), "--out", str(tmp_path / "c.png")])
    assert e.value.code == 0, capsys.readouterr().err[-2000:]
    report = {"env": {"mode": "train", "seq": 8, "device": odd, "dtype": "float32", "batch": 1},
              "results": [{"variant": odd, "backend": "$x$", "step_s": {"median": 1.0, "p10": 1.0, "p90": 1.0}}]}
    plot_results(json.loads(json.dumps(report)), tmp_path / "b.png")
    load_script("parity_report").plot({"jax": ([2.0, 1.0], {}), "torch": ([2.0, 1.0], {})}, tmp_path / "p.png", odd,
                                      False, 1e-5)
    plot_context({(odd, "$x$"): [(8, 1.0, 1.0, 1.0), (16, 2.0, 2.0, 2.0)]}, tmp_path / "x.png", odd)
    assert all((tmp_path / name).read_bytes().startswith(b"\x89PNG") for name in ("c.png", "b.png", "p.png", "x.png"))
    assert matplotlib.rcParams["text.parse_math"]


def test_a_name_that_is_not_utf8_is_drawn_or_refused_never_a_traceback(tmp_path, capsys):
    """A --spec path that is not UTF-8 in parity_report.py's plot title, a lone surrogate escape ("\\udcff") in a
    bench report's variant: matplotlib's TypeError traceback, the report's after its training. The path is drawn as
    the tools print it (\\xNN); the report, whose text is no file name, is refused by the escape it holds."""
    import json

    spec = tmp_path / "s\udcff.yaml"
    spec.write_text("vocab_size: 11\nd_model: 8\nn_layers: 1\nn_heads: 2\nd_ff: 8\nmax_seq_len: 8\n")
    (tmp_path / "t.yaml").write_text("batch_size: 1\nseq_len: 4\nsteps: 1\nwarmup_steps: 0\n")
    with pytest.raises(SystemExit) as e:
        run(load_script("parity_report").main, ["--spec", str(spec), "--seq", "4", "--batch", "1", "--train-steps",
                                                "1", "--train-config", str(tmp_path / "t.yaml"), "--plot",
                                                str(tmp_path / "p.png"), "--quiet"])
    assert e.value.code == 0, capsys.readouterr().err[-2000:]
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")
    report = {"env": {"mode": "train", "seq": 8, "device": "cpu", "dtype": "float32", "batch": 1},
              "results": [{"variant": "v\udcff", "backend": "jax", "step_s": {"median": 1, "p10": 1, "p90": 1}}]}
    (tmp_path / "r.json").write_text(json.dumps(report))
    error_line(bench_main("replot"), [tmp_path / "r.json", "--out", tmp_path / "r.png"], capsys,
               "r.json: not a bench/compare.py --json report: 'v\\udcff' is not UTF-8 text")
    assert not (tmp_path / "r.png").exists()


def test_plot_curves_smooths_over_a_window_past_the_run_as_over_the_whole_run(tmp_path, capsys):
    """--smooth 10**20 (a window of more steps than a C long holds) was numpy's OverflowError traceback; a window past
    the run's steps averages what there is, as one of its length does."""
    from shared_config.curves import moving_average

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.0}\n'
                                                    '{"kind": "train", "step": 2, "loss": 1.0}\n')
    with pytest.raises(SystemExit) as e:
        run(load_script("plot_curves").main, [str(tmp_path / "run"), "--out", str(tmp_path / "c.png"), "--smooth",
                                              str(10**20)])
    assert e.value.code == 0, capsys.readouterr().err[-2000:]
    assert moving_average([2.0, 1.0], 10**20).tolist() == moving_average([2.0, 1.0], 2).tolist() == [2.0, 1.5]


def test_a_study_refuses_a_gla_kernel_one_of_its_twins_lacks_before_any_run(tmp_path, monkeypatch, capsys):
    """`compare_norms.py --mixer gla --set gla_kernel=fla`: the JAX twin has no fla kernel, which its first run
    found as it started, after the runs before it (--backends torch,jax: the torch runs) had trained."""
    study = load_script("compare_norms")
    monkeypatch.setattr(study, "study", lambda *a, **k: pytest.fail("a run started"))
    error_line(study.main, ["--mixer", "gla", "--configs", "rms-pre", "--steps", "1", "--backends", "jax,torch",
                            "--set", "gla_kernel=fla", "--out", tmp_path / "s"], capsys,
               "gla_kernel=fla", "the jax twin runs auto, pure or pallas")
    assert not (tmp_path / "s").exists()


def test_compare_weighs_every_resident_job_of_a_sweep_against_memory(monkeypatch, capsys):
    """Every (variant, backend) keeps its model and AdamW state between the interleaved rounds: a sweep whose jobs each
    fit alone was refused only one job at a time, and the machine killed it mid-run. Here memory holds one job, and
    the four jobs of a two-variant sweep over both twins are refused together, before anything is allocated."""
    from shared_config import load_spec, resources
    from shared_config.resources import train_bytes

    one = max(train_bytes(load_spec("tiny").replace(norm_placement=p), 1, 8) for p in ("pre", "peri"))
    monkeypatch.setattr(resources, "machine_memory", lambda: (one + 1, "of memory on this machine"))
    monkeypatch.setattr(resources, "accelerator_present", lambda: False)
    monkeypatch.setattr("bench.compare.accelerator_present", lambda: False)
    argv = ["--batch", "1", "--seq", "8", "--sweep", "norm_placement=pre,peri", "--backend", "both"]
    error_line(bench_main("compare"), argv, capsys, "4 train jobs resident at once (2 variant(s) x 2 backend(s))",
               code=3)


def test_compare_weighs_a_decode_jobs_cache(monkeypatch, capsys):
    """--mode decode keeps the prompt's and every decoded token's keys and values (resources.cache_bytes): it was
    weighed as a forward pass, logits alone. Here memory holds the forward pass, not the cache beside it."""
    from shared_config import load_spec, resources
    from shared_config.resources import forward_bytes

    monkeypatch.setattr(resources, "accelerator_present", lambda: False)
    monkeypatch.setattr("bench.compare.accelerator_present", lambda: False)
    spec, rows, seq = load_spec("tiny"), 64, 32
    forward, cache = forward_bytes(spec, rows, seq), resources.cache_bytes(spec, rows, seq)
    assert cache > 0
    monkeypatch.setattr(resources, "machine_memory", lambda: (forward + cache // 2, "of memory on this machine"))
    argv = ["--mode", "decode", "--backend", "torch", "--batch", str(rows), "--seq", str(seq)]
    error_line(bench_main("compare"), argv, capsys, f"the decode job of tiny at batch {rows} x seq {seq} needs", code=3)


def test_compare_refuses_a_peak_it_would_not_use_on_a_cpu(capsys):
    """A CPU run reports no MFU: --peak-tflops 1 was dropped without a word after the whole run."""
    error_line(bench_main("compare"), ["--peak-tflops", "1", "--backend", "torch"], capsys,
               "--peak-tflops 1: a CPU run reports GFLOP/s and no MFU")


@pytest.mark.parametrize("tool,argv,says", [
    # `--mesh ''` (or ',') ran the step unsharded without a word
    ("compare", ["--backend", "jax", "--mesh", ""], "mesh '' names no axis"),
    ("train", ["--backend", "jax", "--mesh", ","], "mesh ',' names no axis"),
    # every CPU device is emulated with its own thread pools: 2,000 took 17 GB and over a minute before a step
    ("compare", ["--backend", "jax", "--devices", "2000", "--batch", "2000"], "--devices: 2,000 devices; a CPU"),
    ("train", ["--backend", "jax", "--mesh", "data=8,fsdp=16"], "--mesh: 128 devices; a CPU emulates at most 64"),
])
def test_a_mesh_that_names_no_device_or_too_many_cpu_devices_is_refused(tool, argv, says, tmp_path, monkeypatch,
                                                                         capsys):
    from shared_config import parallel

    monkeypatch.setattr(parallel, "accelerator_present", lambda: False)  # the same on a GPU machine
    monkeypatch.chdir(tmp_path)
    main = bench_main("compare") if tool == "compare" else load_script("train").main
    error_line(main, argv, capsys, says)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tool,argv,says", [
    # the jax job of --backend both raised the torch kernel's refusal below a started progress bar
    ("compare", ["--gla-kernel", "fla"], "--gla-kernel fla: flash-linear-attention's Triton chunk_gla"),
    ("profile_step", ["--gla-kernel", "pallas"], "Pallas kernel (jax_model/gla_kernel.py), the jax twin"),
    # a GPU kernel on a CPU: refused before the first job, not after the earlier jobs had compiled
    ("compare", ["--gla-kernel", "pallas", "--backend", "jax"], "gla_kernel=pallas is the JAX twin's Pallas kernel"),
    ("profile_step", ["--gla-kernel", "fla", "--backend", "torch"], "gla_kernel=fla is flash-linear-attention's"),
])
def test_a_gla_kernel_a_job_cannot_run_is_refused_before_any_job(tool, argv, says, monkeypatch, capsys):
    import bench.timing

    monkeypatch.setattr(bench.timing, "accelerator", lambda: "cpu")  # the same where a GPU is present
    error_line(bench_main(tool), ["--spec", "gla-tiny", "--batch", "1", "--seq", "8", *argv], capsys, says)
