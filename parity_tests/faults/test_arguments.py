"""Command-line arguments at their edges (docs/checkpoints.md, "Bad input, limits and failures"): text that is not
UTF-8, numbers out of range, option syntax with stray spaces, options that would silently override each other. Each
is one `error:` line naming the option, before any work; in-process where the CLI's own parsing is not the question."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from shared_config import SpecError, save_checkpoint
from shared_config.cli import UsageError, check_outputs, printable, utf8_argument
from shared_config import resources
from shared_config.resources import ResourceError
from shared_config.study import study_args, study_parser

from ..support.common import ROOT, checkout_env, load_script, make_spec, parity_weights

generate = load_script("generate")
compare_logits = load_script("compare_logits")
NOT_UTF8 = b"ab\xff\xfe".decode("utf-8", "surrogateescape")  # how Python hands argv bytes that are not UTF-8


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    spec = make_spec(vocab_size=300)
    path = tmp_path_factory.mktemp("args") / "model.safetensors"
    save_checkpoint(path, parity_weights(spec), spec)
    return path


def test_a_prompt_that_is_not_utf8_is_refused_naming_the_byte(weights):
    with pytest.raises(UsageError, match=r"--prompt: byte 0xff at character 2 is not UTF-8"):
        generate.main(["--backend", "torch", "--weights", str(weights), "--prompt", NOT_UTF8])
    assert utf8_argument("--prompt", "héllo") == "héllo"


def test_a_study_records_an_argument_that_is_not_utf8_as_printable_text(tmp_path):
    """The study's table holds its command line; a lone surrogate failed that write after the whole study."""
    argv = ["--out", str(tmp_path / NOT_UTF8)]
    args = study_args(study_parser("A study.", 1, ["a"], "configs", "out", "where").parse_args(argv), "x.py", argv)
    assert args.command.endswith("ab\\xff\\xfe") and args.command.encode("utf-8")
    assert printable("plain é") == "plain é"


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


@pytest.mark.parametrize("args, says", [
    (["--batch", "0"], "argument --batch: must be an integer >= 1, got 0"),  # ZeroDivisionError in numpy
    (["--batch", "-1"], "argument --batch: must be an integer >= 1, got -1"),  # negative dimensions
    (["--seed", "-1"], "argument --seed: must be an integer >= 0, got -1"),  # expected non-negative integer
    (["--seq", "0"], "argument --seq: must be an integer >= 1, got 0"),
])
def test_compare_logits_bounds_its_numbers_at_parse_time(args, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        compare_logits.main(["--spec", "tiny", *args])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip() == f"error: {says}"


def test_compare_logits_refuses_a_job_past_memory_before_drawing(monkeypatch):
    monkeypatch.setattr(compare_logits, "init_weights", lambda *a: pytest.fail("drew the weights"))
    with pytest.raises(ResourceError, match="comparing 3 layers .* batch 100,000,000 x seq 256 .* lower --batch"):
        compare_logits.main(["--spec", "tiny", "--batch", "100000000", "--seq", "256"])


def decode_report(**env) -> dict:
    row = {"variant": "tiny", "backend": "jax", "step_s": {"median": 1e-3, "p10": 9e-4, "p90": 2e-3}, "mfu": None}
    return {"env": {"mode": "decode", "seq": 16, "device": "cpu", "dtype": "float32", "batch": 2, **env},
            "results": [row]}


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".PNG", b"\x89PNG"), (".pdf", b"%PDF"),
                                           (".svg", b"<?xml")])
def test_every_plot_is_written_in_the_format_its_name_says(tmp_path, suffix, magic):
    """compare.py --plot x.svg and plot_context.py --out x.pdf wrote PNG bytes under those names."""
    from bench import plot, plot_context

    plot.plot_results({**decode_report(), "results": decode_report()["results"]}, tmp_path / f"bars{suffix}")
    report = tmp_path / "decode.json"
    report.write_text(json.dumps(decode_report()))
    plot_context.main([str(report), "--out", str(tmp_path / f"ctx{suffix}")])
    assert {p.name: p.read_bytes()[:len(magic)] for p in tmp_path.glob(f"*{suffix}")} == {
        f"bars{suffix}": magic, f"ctx{suffix}": magic}


def test_replot_redraws_a_reports_bars_and_refuses_what_is_not_one(tmp_path, capsys):
    """Nothing redrew a report: `python bench/plot.py r.json --out x.png` (a library) exited 0 and drew nothing.
    bench/replot.py reads the report as plot_context.py does (and an MFU that is no fraction)."""
    from bench import replot

    report = tmp_path / "r.json"
    report.write_text(json.dumps(decode_report()))
    replot.main([str(report), "--out", str(tmp_path / "bars.png")])
    assert (tmp_path / "bars.png").read_bytes()[:4] == b"\x89PNG"
    assert capsys.readouterr().out.strip().endswith("bars.png")
    report.write_text(json.dumps({**decode_report(), "results": [{**decode_report()["results"][0], "mfu": "high"}]}))
    with pytest.raises(UsageError, match=r"results\[0\]\.mfu must be null or a fraction in \[0, 1\]"):
        replot.main([str(report), "--out", str(tmp_path / "other.png")])
    assert not (tmp_path / "other.png").exists()


def test_json_and_plot_naming_one_file_is_refused(tmp_path):
    """compare.py --json x.png --plot x.png: the image replaced the report at the end of the run."""
    with pytest.raises(UsageError, match="--json and --plot name the same file"):
        check_outputs(tmp_path / "x.png", tmp_path / "." / "x.png")


@pytest.mark.parametrize("report, says", [
    ({}, "not a bench/compare.py --json report: no env object"),  # KeyError: 'env'
    ({"env": {"mode": "decode", "seq": "16"}, "results": []}, "env.seq is not an integer"),
    ({**decode_report(), "results": [{"variant": "tiny"}]}, "results[0] lacks variant, backend or step_s"),
    (decode_report(mode="train"), "r.json: a train report: pass decode reports"),
    # the title's fields: a KeyError traceback after the report was read
    ({**decode_report(), "env": {"mode": "decode", "seq": 16}}, "env.device is not a string"),
    (decode_report(batch=None), "env.batch is not an integer"),
    # a run stopped before its first round: an empty plot, exit 0
    ({**decode_report(), "results": [], "complete": False}, "r.json: no timed rows to plot"),
    # numbers no step takes: 1e308 was matplotlib's traceback; NaN, < 0, 0, true and a band below its median drew
    *[({**decode_report(), "results": [{**decode_report()["results"][0], "step_s": times}]},
       "results[0].step_s must") for times in ({"median": 1e308, "p10": 1e-3, "p90": 1e308},
                                               {"median": float("nan"), "p10": 1e-3, "p90": 1e-3},
                                               {"median": -1.0, "p10": -2.0, "p90": 1.0},
                                               {"median": True, "p10": True, "p90": True},
                                               {"median": 1e-3, "p10": 2e-3, "p90": 3e-3})],
    (decode_report(seq=0), "env.seq is not >= 1"),
    ({**decode_report(), "results": [{**decode_report()["results"][0], "variant": str(i)} for i in range(65)]},
     "the reports hold 65 (variant, backend) lines; one plot draws at most 64"),  # 20,000 drew for minutes
], ids=["empty", "seq-string", "row-without-times", "train", "no-device", "no-batch", "no-rows", "huge", "nan",
        "negative", "true", "band", "seq-0", "lines"])
def test_plot_context_names_a_json_that_is_not_a_decode_report(tmp_path, report, says):
    from bench import plot_context

    (tmp_path / "r.json").write_text(json.dumps(report))
    with pytest.raises(UsageError, match=re.escape(says)):
        plot_context.main([str(tmp_path / "r.json"), "--out", str(tmp_path / "ctx.png")])
    with pytest.raises(UsageError, match="--out .*ctx.txt: the file must end in .png, .pdf, .svg"):
        plot_context.main([str(tmp_path / "r.json"), "--out", str(tmp_path / "ctx.txt")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_plot_context_draws_one_curve_per_job_from_comparable_reports(tmp_path, capsys):
    """Reports of one device, dtype and batch, one per prompt length: a report given twice, a prompt length in two
    reports (the line went back and forth), or another batch (its points joined the first file's curves, titled with
    the first file's batch) is refused; a stopped run's report is drawn, named on stderr."""
    from bench import plot_context

    def report(name, **env):
        (tmp_path / name).write_text(json.dumps({**decode_report(**env), "complete": name != "stopped.json"}))
        return str(tmp_path / name)

    a, b, again, other = report("a.json"), report("stopped.json", seq=32), report("c.json"), report("d.json", batch=4)
    out = str(tmp_path / "ctx.png")
    for reports, says in [([a, a], "is given twice"), ([a, again], "tiny jax at --seq-len 16 is in two reports"),
                          ([a, other], "d.json has batch 4 and " + a + " batch 2: pass reports of one device")]:
        with pytest.raises(UsageError, match=re.escape(says)):
            plot_context.main([*reports, "--out", out])
    assert not (tmp_path / "ctx.png").exists()
    capsys.readouterr()
    plot_context.main([a, b, "--out", out])
    captured = capsys.readouterr()
    assert "seq 16: 1.00 ms  seq 32: 1.00 ms" in captured.out and (tmp_path / "ctx.png").stat().st_size > 0
    assert captured.err.strip() == (f'warning: {b} is a stopped run\'s report ("complete": false): its rows are over '
                                    "the steps it had (n_steps)")


def test_json_dash_puts_the_report_alone_on_stdout(tmp_path, monkeypatch, capsys):
    """`--json -` wrote a file named "-" into the working directory, and the table went to stdout."""
    from bench import gla_layer

    monkeypatch.chdir(tmp_path)
    gla_layer.main(["--backend", "torch", "--tokens", "16", "--heads", "1", "--key", "8", "--value", "8",
                    "--repeats", "1", "--json", "-"])
    out, err = capsys.readouterr()
    report = json.loads(out)  # the whole of stdout is one JSON document: the finished report
    assert report["complete"] is True and [r["kernel"] for r in report["results"]] == ["pure"]
    assert "| torch | pure |" in err and list(tmp_path.iterdir()) == []


def test_write_report_to_dash_writes_once_when_complete(capsys):
    from shared_config.report import report_on_stdout, write_report

    with report_on_stdout("-"):
        print("a table for people")
        write_report("-", {"rows": [1]}, complete=False)  # a partial report: a file keeps it; stdout would repeat
        write_report("-", {"rows": [1, 2]}, complete=True)
    out, err = capsys.readouterr()
    assert json.loads(out) == {"rows": [1, 2], "complete": True} and err == "a table for people\n"


@pytest.mark.parametrize("text", ["1_0", "１", "1,,2", "1,", "0x10", "1e3"])
def test_token_ids_are_ascii_integers(text):
    """int() alone read '1_0' as 10 (a typo for 1,0) and '１' (full-width) as 1."""
    with pytest.raises(UsageError, match="--tokens .* must be comma-separated integer ids"):
        generate.parse_tokens(text)
    assert generate.parse_tokens(" 1, 2,-3") == [1, 2, -3]  # spaces; a negative id is check_generation's to name


@pytest.mark.parametrize("mesh, says", [("data=²", "'data=²' must be axis=N with N >= 1"),  # int('²'): a traceback
                                        ("data=2,data=4", "axis 'data' given twice")])  # the last kept silently
def test_a_mesh_takes_ascii_sizes_and_each_axis_once(mesh, says):
    from shared_config.parallel import parse_mesh

    with pytest.raises(SpecError, match=re.escape(says)):
        parse_mesh(mesh)
    assert parse_mesh(" data = 2 , fsdp=4") == {"data": 2, "fsdp": 4}


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


def test_a_run_directory_given_as_weights_names_its_latest_checkpoint(tmp_path, weights):
    """--weights runs/tiny said only "neither a Hugging Face directory ... nor a run's checkpoint"."""
    from shared_config import CheckpointError
    from shared_config.formats import read_checkpoint

    for step in ("step-00000100", "step-00000200"):
        (tmp_path / step).mkdir()
        (tmp_path / step / "model.safetensors").write_bytes(weights.read_bytes())
    with pytest.raises(CheckpointError, match="a training run's directory, .* e.g. the latest: .*step-00000200$"):
        read_checkpoint(tmp_path)


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


@pytest.mark.parametrize("out", ["file", "file/x"])
def test_a_study_names_an_out_under_a_file_before_any_run(tmp_path, out):
    """It was "FILE: File exists" (or "Not a directory") from the first mkdir, naming no option."""
    (tmp_path / "file").write_text("not a directory")
    argv = ["--out", str(tmp_path / out)]
    with pytest.raises(UsageError, match=f"--out .*{out}: .*file is a file, not a directory"):
        study_args(study_parser("A study.", 1, ["a"], "c", "out", "w").parse_args(argv), "x.py", argv)


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


def test_generate_refuses_an_attention_kernel_for_a_model_without_attention(tmp_path):
    spec = make_spec(mixer="gla", position="none", n_kv_heads=None)
    save_checkpoint(tmp_path / "gla.safetensors", parity_weights(spec), spec)
    with pytest.raises(UsageError, match="--attention einsum: this model's layers are mixer=gla"):
        generate.main(["--backend", "torch", "--weights", str(tmp_path / "gla.safetensors"), "--tokens", "1",
                       "--attention", "einsum"])


@pytest.mark.parametrize("args", [["--top-p", "0.5"], ["--top-k", "3"], ["--seed", "5", "--temperature", "0"]])
def test_generate_refuses_sampling_options_greedy_decoding_ignores(weights, args):
    """--top-p 0.5 without --temperature decoded greedily: the option did nothing, without a word."""
    flag = args[0]
    with pytest.raises(UsageError, match=f"{flag} shapes sampling, and decoding is greedy"):
        generate.main(["--backend", "torch", "--weights", str(weights), "--tokens", "1", *args])


def test_parity_report_refuses_a_train_config_it_would_not_read():
    """--train-config without --train-steps compared untrained models, the config never read."""
    report = load_script("parity_report")
    with pytest.raises(UsageError, match="--train-config needs --train-steps N"):
        report.parse_args(["--spec", "tiny", "--train-config", "parity"])
    assert report.parse_args(["--spec", "tiny", "--train-steps", "1"]).train_config is None  # the parity preset


def test_prepare_data_holds_about_4_bytes_a_token_while_encoding(tmp_path, monkeypatch):
    """The whole file's ids were Python lists first: about 36 bytes a token, 9 GB for a 1 GB corpus."""
    import tracemalloc

    prepare = load_script("prepare_data")
    monkeypatch.setattr(prepare, "LINES_PER_CHUNK", 500)  # many chunks, as in a real corpus
    text = tmp_path / "in.txt"
    text.write_text("".join(f"line {i} of a story, once upon a time\n" for i in range(20_000)))
    tokenizer = prepare.train_bpe(text, 300)
    tracemalloc.start()
    try:
        tokens = prepare.bpe_tokens(tokenizer, text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tokens.dtype == "uint32" and len(tokens) > 100_000
    # ~8 bytes a token measured (the array and one concatenated copy, plus a chunk); the lists cost ~36. The margin
    # holds what other threads of a busy test worker allocate meanwhile (tracemalloc counts them too): at 12 a token
    # the test failed once under -n 2
    assert peak < 16 * len(tokens), peak / len(tokens)


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


def test_a_path_that_is_not_utf8_prints_as_its_bytes_on_a_strict_stdout(monkeypatch):
    """init_checkpoint.py and convert.py print the path they wrote: a strict stdout (a UTF-8 locale other than
    C.UTF-8) raised UnicodeEncodeError there, a traceback after the work was done."""
    import io
    import sys

    from shared_config.cli import run as cli_run

    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="utf-8", errors="strict"))
    with pytest.raises(SystemExit) as exit_:
        cli_run(lambda argv: print(f"/tmp/{NOT_UTF8}.safetensors"), [])
    sys.stdout.flush()
    assert exit_.value.code == 0 and raw.getvalue() == b"/tmp/ab\xff\xfe.safetensors\n"


# What a tool loads only once its work needs it: a framework, matplotlib, and ml_dtypes (0.8 s at import, which was
# most of every tool's start-up before an `error:` line or `--help`, and the time a Ctrl-C got a traceback in).
LOADED_FOR_WORK = ("torch", "jax", "flax", "orbax", "transformers", "matplotlib", "triton", "ml_dtypes")


@pytest.mark.slow
def test_every_tools_help_loads_no_framework():
    """Each tool (a scripts/ or bench/ file with a `__main__`), run with --help in one process one after another:
    its usage is printed with none of LOADED_FOR_WORK imported (the first tool that imports one is named)."""
    tools = sorted(str(p.relative_to(ROOT)) for folder in ("scripts", "bench") for p in (ROOT / folder).glob("*.py")
                   if "__main__" in p.read_text())
    code = ("import contextlib, io, runpy, sys\n"
            f"for path in {tools!r}:\n"
            "    sys.argv, out = [path, '--help'], io.StringIO()\n"
            "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
            "        runpy.run_path(path, run_name='__main__')\n"
            f"    loaded = sorted(m for m in {LOADED_FOR_WORK!r} if m in sys.modules)\n"
            "    print(path, 'usage:' in out.getvalue(), loaded)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=checkout_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(tools) >= 16 and result.stdout.splitlines() == [f"{path} True []" for path in tools]


def test_a_value_list_that_starts_with_a_negative_number_is_a_value():
    """`--tokens -1,2` was "unrecognized option -1,2" (argparse takes only -N and -N.N for values), where
    `--tokens=-1,2` named the id outside the vocabulary; both are now the value they are."""
    from shared_config.cli import Parser

    parser = Parser(prog="p")
    parser.add_argument("--tokens")
    for argv in (["--tokens", "-1,2"], ["--tokens", "-1, -2"], ["--tokens=-1,2"]):
        assert parser.parse_args(argv).tokens == argv[-1].removeprefix("--tokens=")
    with pytest.raises(SystemExit):
        parser.parse_args(["--tokens", "-x"])  # an option still: one error line


@pytest.mark.parametrize("tool, argv, says", [
    ("compare", ["--set", "batch_size=16"], "argument --set: batch_size is no spec key: this command takes it as "
                                            "--batch-size"),
    ("compare", ["--sweep", "steps=1,2"], "argument --sweep: steps is no spec key: this command takes it as --steps"),
    ("profile_step", ["--set", "seq_len=8"], "argument --set: seq_len is no spec key: this command takes it as "
                                             "--seq-len"),
    ("train", ["--backend", "jax", "--set", "eval_every=5"], "argument --set: eval_every is no spec or train config "
                                                             "key: this command takes it as --eval-every"),
    ("parity_report", ["--spec", "tiny", "--set", "seq=8"], "argument --set: seq is no spec key: this command takes "
                                                            "it as --seq"),
    ("init_checkpoint", ["--spec", "tiny", "--out", "x.safetensors", "--set", "seed=3"],
     "argument --set: seed is no spec key: this command takes it as --seed"),
    ("compare_norms", ["--set", "out=x"], "argument --set: out is no spec or train config key: this command takes it "
                                          "as --out"),
])
def test_a_set_key_that_is_the_command_s_own_option_is_named(tool, argv, says, capsys):
    """`compare.py --set batch_size=16` said "unknown spec key 'batch_size' (did you mean 'vocab_size'?)": a --set
    or --sweep key that is no key of the spec (or train config) but spells one of the command's options names it."""
    from bench import compare, profile_step

    if tool in ("compare", "profile_step"):
        parse = {"compare": compare.parse_args, "profile_step": profile_step.parse_args}[tool]
    else:  # init_checkpoint parses in main
        parse = getattr(load_script(tool), "parse_args", load_script(tool).main)
    with pytest.raises(SystemExit) as e:
        parse(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"error: {says}\n", err
