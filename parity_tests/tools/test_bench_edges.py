"""The bench tools at the edges of their options, as a demanding new user meets them: defaults that must run, numbers
that must not round away what was timed, reports that must not call rounding noise a mismatch. In-process where
the tool's main allows it; nothing here times a model."""

from __future__ import annotations

import pytest

from .test_odd_input import error_line


class Stop(Exception):
    """Raised by a stand-in for the timing loop: the test has read what the options became."""


@pytest.fixture
def untimed_compare(monkeypatch):
    """compare.py's main with the timing loop replaced: the args it would time with are kept, nothing runs (no
    framework, no thread pinning, no cache directory)."""
    from bench import compare, timing

    seen = {}

    def stop(args, *rest, **kw):
        seen["args"] = args
        raise Stop

    monkeypatch.setattr(timing, "run_benchmarks", stop)
    monkeypatch.setattr(compare, "configure_threads", lambda *a: None)
    return compare.main, seen


def test_decode_mode_s_default_prompt_leaves_room_for_the_decoded_tokens(untimed_compare, capsys):
    """`compare.py --mode decode` with every other option at its default was refused on the default spec: its
    prompt, min(256, max_seq_len) = 256 tokens of tiny, left no room for the 5 tokens it decodes ("--seq-len 256 ...
    exceed max_seq_len=256", a flag the user never gave). The default prompt is now what fits beside them."""
    main, seen = untimed_compare
    with pytest.raises(Stop):
        main(["--mode", "decode", "--backend", "jax", "--compile-cache", "none"])
    assert seen["args"].seq == 256 - 5  # tiny's max_seq_len less 1 + --warmup 3 ... = max(20 / 4, 4) = 5
    with pytest.raises(Stop):  # a given --seq-len is taken as given
        main(["--mode", "decode", "--backend", "jax", "--seq", "100", "--compile-cache", "none"])
    assert seen["args"].seq == 100
    # more decoded tokens than the spec holds: the error says the default was too long, not a --seq-len given
    error_line(main, ["--mode", "decode", "--backend", "jax", "--steps", "300", "--rounds", "1"], capsys,
               "the default --seq-len 1 prompt tokens + 300 decoded", "max_seq_len=256")


def test_the_gla_layer_table_keeps_a_sub_millisecond_time():
    """bench/gla_layer.py's table printed seconds to 3 decimals: a kernel's 0.4 ms (a GPU's at the default geometry,
    JAX's pure form at --tokens 1 on a CPU) read 0.000 s, as if nothing had been timed. Three significant digits."""
    from bench.gla_layer import table_row

    row = {"twin": "jax", "kernel": "pallas", "median_s": 4.12e-4, "min_s": 3.9e-5, "compile_s": 1.5,
           "peak_mem_bytes": 2**21, "max_rel_err": 1e-6}
    assert table_row(row).split(" | ")[2:4] == ["0.000412", "3.9e-05"]
    assert table_row({**row, "median_s": 12.345, "min_s": 0.0441}).split(" | ")[2:4] == ["12.3", "0.0441"]


def test_gla_layer_if_present_with_no_kernel_left_to_time_is_refused(tmp_path, capsys):
    """`gla_layer.py --kernel pallas,fla --if-present` on a machine without a GPU skipped both, printed an empty
    table, wrote a report without rows and exited 0, as if the kernels had been timed: refused in one line (before
    any note), nothing written."""
    from bench import gla_layer
    from shared_config.resources import accelerator_present

    if accelerator_present():
        pytest.skip("a GPU here may run pallas or fla")
    out = tmp_path / "gla.json"
    error_line(gla_layer.main, ["--kernel", "pallas,fla", "--if-present", "--tokens", "16", "--json", out], capsys,
               "--if-present: every asked kernel is skipped here", "the jax twin's pallas", "add pure to --kernel")
    assert list(tmp_path.iterdir()) == []


def test_a_train_configs_batch_shape_is_the_one_timed_unless_a_flag_says_otherwise(tmp_path):
    """A --train-config's batch_size and seq_len were replaced by the bench's defaults without a word: batch_size 32
    x seq_len 64 was timed at 8 x 256, and batch_size 6 with grad_accum_steps 3 was refused as 'grad_accum_steps=3
    must divide batch_size=8', a batch the user never gave. They are now read as the memory options are: the flag
    wins, else the config's value, else the default; in both tools."""
    from bench import compare, profile_step
    from bench.options import environment

    config = tmp_path / "train.yaml"
    config.write_text("batch_size: 6\nseq_len: 64\ngrad_accum_steps: 3\n")
    for parse in (compare.parse_args, profile_step.parse_args):
        env = environment(parse(["--train-config", str(config)]), "cpu")
        assert (env["batch"], env["seq"], env["grad_accum_steps"]) == (6, 64, 3)
        env = environment(parse(["--train-config", str(config), "--batch", "9", "--seq", "32"]), "cpu")
        assert (env["batch"], env["seq"]) == (9, 32)
        assert (parse([]).batch, parse([]).seq) == (8, None)  # no config: the defaults (seq: the spec's, later)



def test_a_seq_len_too_long_for_the_spec_names_where_it_came_from(tmp_path, capsys):
    """A --train-config's seq_len past the spec's max_seq_len is named as the config's, not as a --seq-len."""
    from bench import compare, profile_step

    config = tmp_path / "train.yaml"
    config.write_text("seq_len: 300\n")
    for main in (compare.main, profile_step.main):
        error_line(main, ["--backend", "jax", "--train-config", config], capsys,
                   f"--train-config {config}'s seq_len 300 exceeds max_seq_len=256 of tiny")
        error_line(main, ["--backend", "jax", "--seq", "300"], capsys, "error: --seq-len 300 exceeds max_seq_len=256")


def test_the_tables_keep_a_small_rate_s_digits(capsys):
    """compare.py's and profile_step.py's tables rounded rates to fixed decimals: a decode step of 3 s at batch 1 read
    0 tokens/s, a CPU's 0.037 model GFLOP/s (profile_step at batch 1 x seq 16) read 0.0: a rate of nothing, for a
    step that ran. Small figures keep 3 significant digits; large ones print as before."""
    from bench import compare, profile_step
    from bench.plot import figure

    assert [figure(x, 1) for x in (0.0, 3.7e-2, 4.283, 42.83, 989.0)] == ["0.0", "0.037", "4.28", "42.8", "989.0"]
    assert [figure(x, 0) for x in (0.333, 42.5, 20480.0)] == ["0.333", "42.5", "20480"]
    row = {"backend": "jax", "variant": "tiny", "step_s": {"median": 3.0, "p10": 2.9, "p90": 3.1},
           "tokens_per_s": 1 / 3, "tflops": 3.7e-5, "mfu": None, "compile_s": 1.0, "peak_mem_bytes": None,
           "attention": "blocked"}
    env = {"device": "cpu (x86_64)", "mode": "decode", "dtype": "float32", "batch": 1, "seq": 16}
    compare.print_table({"env": env, "results": [row]})
    assert capsys.readouterr().out.splitlines()[2].split()[4:6] == ["0.333", "0.037"]
    # a GPU's decode step of 51 µs read 0.05 ms, torch's eager first step and prefill 0.0 s of compile
    fast = {**row, "step_s": {"median": 5.12e-5, "p10": 4.9e-5, "p90": 5.5e-5}, "compile_s": 0.0213,
            "prefill_s": {"median": 1.234e-4, "p10": 1e-4, "p90": 2e-4}}
    compare.print_table({"env": env, "results": [fast]})
    cells = capsys.readouterr().out.splitlines()[2].split()
    assert cells[2:4] + cells[7:8] + cells[-2:-1] == ["0.0512", "(0.049-0.055)", "0.0213", "0.123"]
    result = {"backend": "torch", "step_ms": 1281.0, "tflops": 3.7e-5, "attention_kernel": "sdpa",
              "overlapping": False, "busy_ms": 1000.0, "top": [],
              "categories": {"matmul": {"ms": 722.0, "share": 0.56, "tflops": 6.1e-5}}}
    profile_step.print_table({"env": {**env, "spec": "tiny", "mode": "train"}, "results": [result]})
    lines = capsys.readouterr().out.splitlines()
    assert "0.037 model GFLOP/s" in lines[2] and lines[4].split()[-1] == "0.061"


def test_an_output_that_is_a_dangling_link_names_the_folder_it_leads_to(tmp_path):
    """`--out x.png` (any tool's --json or --plot) where x.png is a link into a missing folder was refused as
    '. is not a directory', naming a folder that is one: the error names where the link leads."""
    from shared_config.cli import UsageError, check_outputs

    link = tmp_path / "x.png"
    link.symlink_to(tmp_path / "gone" / "x.png")
    with pytest.raises(UsageError, match=f"--plot {link}: {tmp_path / 'gone'}, where the link leads, is not a dir"):
        check_outputs(plot_path=link)
    with pytest.raises(UsageError, match=f"--json {tmp_path / 'gone' / 'r.json'}: {tmp_path / 'gone'} is not a dir"):
        check_outputs(tmp_path / "gone" / "r.json")


def test_a_routed_train_job_whose_blocks_see_no_token_is_refused(capsys):
    """`compare.py --set routing=mod --seq 4` (capacity 0.125: floor(0.5) = 0 tokens a sequence) timed a train step
    whose routed blocks never ran (under DDP a step waiting for their gradients), where train.py refuses such a run:
    both tools check every variant as a training run is checked (TrainConfig.model_spec)."""
    from bench import compare, profile_step

    for main in (compare.main, profile_step.main):
        error_line(main, ["--backend", "jax", "--set", "routing=mod", "--seq", "4"], capsys,
                   "variant tiny: routing_capacity=0.125 of --seq-len 4 routes floor(0.125 x 4) = 0 tokens")


def test_a_train_configs_gla_kernel_is_not_dropped(tmp_path, capsys):
    """A --train-config's gla_kernel: pure was dropped without a word: the bench ran --gla-kernel's (auto: on a GPU
    the Pallas or fla kernel) and its report said auto. Refused as its compute_dtype is, in both tools; the same
    kernel in both places runs."""
    from bench import compare, profile_step

    config = tmp_path / "train.yaml"
    config.write_text("gla_kernel: pure\n")
    for main in (compare.main, profile_step.main):
        error_line(main, ["--backend", "jax", "--spec", "gla-tiny", "--train-config", config], capsys,
                   f"--train-config {config}: gla_kernel=pure is the bench's --gla-kernel", "--gla-kernel pure")
    from bench.timing import bench_train_config

    args = compare.parse_args(["--spec", "gla-tiny", "--train-config", str(config), "--gla-kernel", "pure"])
    args.seq = 16
    assert bench_train_config(args).gla_kernel == "pure"


def test_the_ratio_line_says_when_the_twins_ran_on_different_chip_counts(capsys):
    """`--devices 2 --backend both` shards the JAX step over 2 devices and runs torch's on 1: the table's
    'jax/torch 0.50' read as JAX twice as fast on like hardware. The line names each side's chips where they differ."""
    from bench.compare import print_table

    row = {"backend": "jax", "variant": "tiny", "step_s": {"median": 0.05, "p10": 0.05, "p90": 0.05},
           "tokens_per_s": 1.0, "tflops": 0.05, "mfu": None, "compile_s": 1.0, "peak_mem_bytes": None,
           "attention": "blocked", "chips": 2}
    torch_row = {**row, "backend": "torch", "step_s": {"median": 0.1, "p10": 0.1, "p90": 0.1}, "chips": 1}
    env = {"device": "cpu (x86_64)", "mode": "train", "dtype": "float32", "batch": 8, "seq": 256}
    print_table({"env": env, "results": [row, torch_row]})
    assert capsys.readouterr().out.splitlines()[-1].endswith("tiny: jax/torch 0.50 (jax on 2 chips, torch on 1)")
    print_table({"env": env, "results": [{**row, "chips": 1}, torch_row]})
    assert capsys.readouterr().out.splitlines()[-1].endswith("tiny: jax/torch 0.50")


def test_an_mfu_past_one_is_named_and_its_report_replots(monkeypatch, tmp_path, capsys):
    """On a GPU, `--peak-tflops 100` (a bf16 H100 reaches more) gave an MFU of 412% without a word, and replot.py
    refused the report compare.py had written ('mfu must be a fraction in [0, 1]'). compare.py now warns, naming
    the flag; replot.py redraws what compare.py writes."""
    from bench import compare, replot, timing

    row = {"backend": "jax", "variant": "tiny", "step_s": {"median": 0.01, "p10": 0.01, "p90": 0.01},
           "tokens_per_s": 2e5, "tflops": 412.0, "mfu": 4.12, "compile_s": 1.0, "peak_mem_bytes": None,
           "attention": "cudnn"}
    monkeypatch.setattr(timing, "run_benchmarks", lambda *a, **k: ([row], "NVIDIA H100 80GB HBM3"))
    monkeypatch.setattr(compare, "configure_threads", lambda *a: None)
    out = tmp_path / "r.json"
    compare.main(["--backend", "jax", "--peak-tflops", "100", "--compile-cache", "none", "--json", str(out)])
    err = capsys.readouterr().err
    assert "warning: MFU above 100% (jax tiny 412%): --peak-tflops 100 is below the rate the step reached" in err
    replot.main([str(out), "--out", str(tmp_path / "r.png")])
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
