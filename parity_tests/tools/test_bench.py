"""The bench CLI: every backend runs, the JSON has every field, sweeps, bad arguments, the FLOPs formula."""

from __future__ import annotations

import json

import pytest

from bench.flops import peak_tflops
from shared_config import load_spec
from shared_config.flops import flops_per_token, flops_split, matmul_params
from shared_config.spec import CHOICES

from ..support.common import MIXERS, ROOT, TORCHRUN, make_spec, one_line_error, quick_first, run_main, run_python
from ..support.parallel_common import free_port


def bench(*args, check=True):
    proc = run_python(ROOT / "bench" / "compare.py", *args)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def bench_here(capsys, *args):
    """compare.py's main in this process (its parsing, run and exit code, without a new interpreter): its output."""
    from bench import compare

    return run_main(compare.main, *args, capsys=capsys)


def test_flops_formula_against_a_hand_count():
    spec = load_spec("tiny")  # D 96, L 3, H 6, K 2, E 16, F 272, V 257, untied, swiglu
    per_layer = 96 * 96 + 2 * (32 * 96) + 96 * 96 + 3 * (272 * 96)  # q, k+v, o, gate+up+down
    assert per_layer == 102912
    n = 3 * per_layer + 257 * 96  # + lm_head; the input embedding is not a matmul
    assert matmul_params(spec) == n == 333408
    assert flops_per_token(spec, 256, "train") == 6 * n + 12 * 3 * 6 * 16 * 256 == 2885184
    assert flops_per_token(spec, 256, "forward") == 2 * n + 4 * 3 * 6 * 16 * 256
    # causal: attention's term halved, as llm.c counts (6·N + 6·L·H·E·T); GLA has no attention term to halve
    assert flops_per_token(spec, 256, "train", causal=True) == 6 * n + 6 * 3 * 6 * 16 * 256
    assert flops_per_token(spec, 256, "forward", causal=True) == 2 * n + 2 * 3 * 6 * 16 * 256
    gla = load_spec("gla-tiny")
    assert flops_per_token(gla, 256, "train", causal=True) == flops_per_token(gla, 256, "train")
    tied = spec.replace(tie_embeddings=True)
    assert matmul_params(tied) == n  # a tied head still does the V x D matmul


# the router's matmul weights: mod's [D] score weight; dtf's prior SwiGLU FFN (P = 24), its norm weight no matmul
@pytest.mark.parametrize("routing,router", [("none", 0), ("mod", 96), ("dtf", 3 * 24 * 96)])
def test_a_decode_row_counts_every_routed_block_dense(routing, router):
    """Decoding runs every token through a routed block (the predictor masks its update; docs/routing.md): its
    row's FLOPs are the dense model's plus the router's, not k/T of the block (tiny mod decode read 28% low)."""
    from types import SimpleNamespace

    from bench import timing

    spec = load_spec("tiny").replace(routing=routing)  # block 1 routed
    predictor = 48 * 96 + 48 if routing != "none" else 0
    n = 3 * 102912 + 257 * 96 + router + predictor  # all three blocks whole, the head, the router, the predictor
    keys = 64 + (1 + 8) / 2  # prompt 64, then a round of 8 steps attending to 65..72 keys: their mean
    args = SimpleNamespace(mode="decode", batch=2, seq=64, dtype="float32", peak_tflops=None)
    r = timing.result("tiny", "jax", spec, SimpleNamespace(attention="xla", info={}), 1.0, [0.01] * 4, [0.02], args,
                      "cpu (x86_64)", 8)
    assert r["matmul_params"] == n
    assert r["flops_per_token"] == r["flops_per_token_causal"] == 2 * n + 4 * 3 * 6 * 16 * keys
    assert r["tflops"] == pytest.approx(2 / 0.01 * (2 * n + 4 * 3 * 6 * 16 * keys) / 1e12, rel=1e-12)


def test_flops_count_every_mixer_and_refuse_one_they_do_not_know():
    """A mixer added to the spec's CHOICES and not to flops_split was counted as attention: each mixer has its count
    (a new one fails here until it has its branch), and an unknown one is an error."""
    for mixer in CHOICES["mixer"]:
        assert flops_split(make_spec(**MIXERS[mixer]), 64, "train")[1] > 0, mixer
    spec = make_spec()
    object.__setattr__(spec, "mixer", "not-a-mixer")  # past the spec's own check
    with pytest.raises(ValueError, match="mixer='not-a-mixer'"):
        flops_split(spec, 64, "train")


def test_the_report_records_the_compiler_flags_in_effect(monkeypatch):
    """XLA_FLAGS and torch.compile's TORCHINDUCTOR_* / TORCHDYNAMO_* variables change the code the step runs: each
    report's env keeps them (docs/bench.md, "Compiler options"); other variables stay out."""
    from bench.options import compiler_flags
    from shared_config.compile_cache import TORCH_CACHE_ENV

    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=true")
    monkeypatch.setenv("TORCHINDUCTOR_COORDINATE_DESCENT_TUNING", "1")
    monkeypatch.setenv("TWINLM_UNRELATED", "x")
    for name in TORCH_CACHE_ENV:  # what --compile-cache sets: where code is kept, not how it is made
        monkeypatch.setenv(name, "1")
    flags = compiler_flags()
    assert flags == {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true",
                     "TORCHINDUCTOR_COORDINATE_DESCENT_TUNING": "1"}, flags


def test_peak_table():
    assert peak_tflops("NVIDIA H200", "bfloat16") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "float32") == 19.5
    assert peak_tflops("cpu (x86_64)", "float32") is None
    assert peak_tflops("NVIDIA A10G", "bfloat16") is None  # no datasheet: not the A10's 125, which it contains


@pytest.mark.parametrize("device,dense_bf16,fp32", [
    # the names the drivers give (torch.cuda.get_device_name, JAX's device_kind); NVIDIA's datasheets: bf16 dense
    # (half their "with sparsity" figure where only that is printed) and fp32 (no tensor cores)
    ("NVIDIA H100 NVL", 1671 / 2, 60), ("NVIDIA H200 NVL", 1671 / 2, 60),  # PCIe boards: the SXM's 989 read 18% low
    ("NVIDIA L40", 181.05, 90.5),  # not the L4's 121: its MFU read 50% high
    ("NVIDIA H100 80GB HBM3", 1979 / 2, 67), ("NVIDIA H100 PCIe", 1513 / 2, 51), ("NVIDIA L40S", 362.05, 91.6),
])
def test_peak_of_each_board_is_its_own_datasheet_dense_figure(device, dense_bf16, fp32):
    """A device name that contains another board's key (H100 NVL holds "H100", L40 holds "L4") gets its own peak."""
    assert abs(peak_tflops(device, "bfloat16") - dense_bf16) <= 1
    assert peak_tflops(device, "float32") == fp32


FIELDS = {"backend", "variant", "step_s", "compile_s", "tokens_per_s", "tflops", "mfu", "mfu_causal",
          "flops_per_token_causal", "peak_mem_bytes", "attention"}


@pytest.mark.slow
def test_forward_mode_both_backends_json_and_plot(tmp_path, capsys):
    out = bench_here(capsys, "--mode", "forward", "--batch", "2", "--seq", "32", "--steps", "2", "--warmup", "1",
                     "--rounds", "1", "--json", tmp_path / "r.json", "--plot", tmp_path / "r.png")
    report = json.loads((tmp_path / "r.json").read_text())
    assert {"device", "versions", "threads", "compiler_flags", "compile_cache"} <= set(report["env"])
    assert set(report["env"]["compile_cache"]) == {"dir", "entries"}  # the session's scratch cache, on by default
    assert [r["backend"] for r in report["results"]] == ["jax", "torch"]
    for r in report["results"]:
        assert FIELDS <= set(r) and set(r["step_s"]) == {"median", "p10", "p90"}
        assert r["step_s"]["p10"] <= r["step_s"]["median"] <= r["step_s"]["p90"] and r["tokens_per_s"] > 0
    assert "jax/torch" in out.out.splitlines()[-1]
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args,message",
    quick_first([
        (["--set", "n_layer=2"], "unknown spec key 'n_layer' (did you mean 'n_layers'?)"),
        (["--backend", "mxnet"], "invalid choice: 'mxnet'"),
        (["--backend", "hf", "--spec", "tiny-dyt"], "norm_type=dyt"),
        (["--sweep", "norm_type"], "must look like key=v1,v2"),
        (["--sweep", "norm_type=rms,batchnorm"], "norm_type='batchnorm' must be one of"),
        (["--seq", "4096"], "exceeds max_seq_len=256"),
        # the prompt fits, the decoded tokens after it would not: refused before the cache is allocated
        (["--mode", "decode", "--seq", "253", "--steps", "8"], "prompt tokens + 4 decoded"),
        (["--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
        (["--peak-tflops", "nan"], "argument --peak-tflops: must be a finite number > 0, got nan"),
        # outputs are checked before the run, not after it (a missing directory was created, a .txt overwritten)
        (["--json", "no/such/dir/x.json"], "--json no/such/dir/x.json: no/such/dir is not a directory"),
        (["--plot", "x.txt"], "--plot x.txt: the file must end in .png, .pdf, .svg"),
        # the cache made the report's path a directory: refused after compiling, or after the whole run (--plot)
        (["--plot", "p.png", "--compile-cache", "p.png"], "--plot p.png and --compile-cache p.png name the same path"),
        # an alias: one model timed twice under two labels
        (["--sweep", "norm_type=tanh,dyt"], "--sweep: variant norm_type=dyt is the spec of norm_type=tanh again"),
    ], 2, multi=True),
)
def test_bad_arguments_give_one_line_and_exit_2(args, message):
    one_line_error(bench(*args, check=False), message)


@pytest.mark.slow
def test_decode_mode_reports_prefill_and_per_token_latency(tmp_path, capsys):
    # warmup 3 > 2 steps per round: the cache must hold compile + warmup tokens too
    bench_here(capsys, "--mode", "decode", "--backend", "all", "--batch", "2", "--seq", "16", "--steps", "4",
               "--warmup", "3", "--rounds", "2", "--json", tmp_path / "d.json")
    results = json.loads((tmp_path / "d.json").read_text())["results"]
    assert [r["backend"] for r in results] == ["jax", "torch", "hf"]
    for r in results:
        assert FIELDS <= set(r) and r["n_steps"] == 4
        assert set(r["prefill_s"]) == {"median", "p10", "p90"} and r["prefill_s"]["median"] > 0
        assert r["tokens_per_s"] == pytest.approx(2 / r["step_s"]["median"])


@pytest.mark.slow
def test_train_mode_every_backend_and_a_sweep(tmp_path, capsys):
    """The README's main job on every backend: one result per (variant, backend), in interleaved order."""
    out = bench_here(capsys, "--backend", "all", "--sweep", "n_kv_heads=1,3", "--sweep", "tie_embeddings=false,true",
                     "--batch", "2", "--seq", "32", "--steps", "2", "--warmup", "0", "--rounds", "2", "--json",
                     tmp_path / "t.json")
    results = json.loads((tmp_path / "t.json").read_text())["results"]
    variants = [f"n_kv_heads={k},tie_embeddings={t}" for k in (1, 3) for t in ("false", "true")]
    assert [(r["variant"], r["backend"]) for r in results] == [(v, b) for v in variants for b in ("jax", "torch", "hf")]
    for r in results:
        assert FIELDS <= set(r) and r["n_steps"] == 2 and r["flops_per_token"] > r["flops_per_token_causal"] > 0
    last = out.out.strip().splitlines()[-1]
    assert last.startswith("step-time ratio") and last.count("jax/torch") == 4 and "torch/hf" in last


@pytest.mark.slow
def test_jax_over_a_mesh_and_torch_under_torchrun(tmp_path):
    """Scaling out: the JAX step over 4 simulated host devices, the torch step on 2 gloo ranks (DDP, FSDP2)."""
    bench("--backend", "jax", "--mesh", "data=2,fsdp=2", "--batch", "4", "--seq", "32", "--steps", "2", "--warmup", "0",
          "--rounds", "1", "--json", str(tmp_path / "mesh.json"))
    (r,) = json.loads((tmp_path / "mesh.json").read_text())["results"]
    assert r["mesh"] == {"data": 2, "fsdp": 2} and r["n_steps"] == 2
    for parallel in ("ddp", "fsdp2"):  # FSDP2: its shards' peak memory is counted from this rank's local tensors
        proc = run_python(*TORCHRUN, ROOT / "bench" / "compare.py", "--backend", "torch", "--parallel", parallel,
                          "--batch", "4", "--seq", "32", "--steps", "2", "--warmup", "0", "--rounds", "1", "--threads",
                          "1", "--json", tmp_path / f"{parallel}.json", OMP_NUM_THREADS="1")
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads((tmp_path / f"{parallel}.json").read_text())
        assert report["env"]["world_size"] == 2 and report["env"]["parallel"] == parallel
        assert report["results"][0]["peak_mem_bytes"] > 0
        assert proc.stdout.count("# cpu") == 1  # rank 0 alone reports, and shows the progress
        assert proc.stderr.count("compile + warmup: 100%") == 1, proc.stderr[-3000:]
    # torchrun --nproc_per_node=1's environment (without the launcher): FSDP2 over one rank is timed, where it was
    # refused with "--parallel fsdp2 needs torchrun" (read as WORLD_SIZE > 1)
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="localhost", MASTER_PORT=str(free_port()))
    proc = run_python(ROOT / "bench" / "compare.py", "--backend", "torch", "--parallel", "fsdp2", "--batch", "4",
                      "--seq", "32", "--steps", "1", "--warmup", "0", "--rounds", "1", "--threads", "1", "--json",
                      tmp_path / "one.json", OMP_NUM_THREADS="1", **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "one.json").read_text())
    assert report["env"]["world_size"] == 1 and report["env"]["parallel"] == "fsdp2"


@pytest.mark.parametrize(
    "args,message",
    quick_first([
        (["--mesh", "data=2", "--mode", "forward"], "--devices/--mesh shard the JAX train step"),
        (["--mesh", "data=2", "--backend", "torch"], "--devices/--mesh shard the JAX train step"),
        (["--devices", "0"], "argument --devices: must be an integer >= 1, got 0"),
        (["--devices", "2", "--mesh", "data=2"], "--devices N and --mesh: pass one"),
        (["--backend", "jax", "--mesh", "data=3", "--batch", "4"],
         "--batch-size 4 must be divisible by the 3 data-parallel shards"),
    ], 1, multi=True),
)
def test_bad_scale_out_arguments(args, message):
    one_line_error(bench(*args, "--steps", "1", "--rounds", "1", "--warmup", "0", check=False), message)


def test_the_train_config_spellings_and_the_old_ones_parse_alike():
    """--batch-size, --seq-len, --compute-dtype, --grad-accum-steps (the train config's keys) and today's --batch,
    --seq, --dtype, --grad-accum name the same options, in both tools that take them."""
    from bench import compare, profile_step

    new = ["--batch-size", "4", "--seq-len", "16", "--compute-dtype", "bfloat16", "--grad-accum-steps", "2"]
    old = ["--batch", "4", "--seq", "16", "--dtype", "bfloat16", "--grad-accum", "2"]
    assert vars(compare.parse_args(new)) == vars(compare.parse_args(old))
    assert vars(profile_step.parse_args(new[:6])) == vars(profile_step.parse_args(old[:6]))
    assert compare.parse_args(["--bat", "4", "--grad", "2"]).grad_accum == 2  # abbreviations still name one option


def test_a_placement_sweep_gives_one_valid_spec_per_placement():
    """`--sweep norm_placement=pre,peri,deepnorm,hybrid` on the tiny preset: deepnorm resolves residual_scaling off."""
    from bench import compare

    got = compare.variants(compare.parse_args(["--sweep", "norm_placement=pre,peri,deepnorm,hybrid"]))
    assert [label for label, _ in got] == [f"norm_placement={p}" for p in ("pre", "peri", "deepnorm", "hybrid")]
    assert [s.norm_placement for _, s in got] == ["pre", "peri", "deepnorm", "hybrid"]
    assert [s.residual_scaled for _, s in got] == [True, True, False, True]


@pytest.mark.slow
def test_memory_options_cut_the_peak_memory_measured_on_cpu(tmp_path, capsys):
    """--loss-chunk, --remat and --grad-accum: each twin's step reports its peak memory on a CPU too (XLA's memory
    analysis; torch's profiler), and the options together cut it where the logits dominate (V = 4096)."""
    peaks = {}
    for name, options in (("plain", []), ("saving", ["--loss-chunk", "64", "--remat", "full", "--grad-accum", "2"])):
        out = bench_here(capsys, "--backend", "both", "--set", "vocab_size=4096", "--batch", "4", "--seq", "128",
                         "--steps", "1", "--warmup", "0", "--rounds", "1", *options, "--json",
                         tmp_path / f"{name}.json")
        report = json.loads((tmp_path / f"{name}.json").read_text())
        peaks[name] = {r["backend"]: r["peak_mem_bytes"] for r in report["results"]}
        assert all(isinstance(p, int) and p > 0 for p in peaks[name].values()), peaks
    assert (report["env"]["grad_accum_steps"] == 2 and report["env"]["remat"] == "full"
            and report["env"]["loss_chunk"] == 64)
    assert "grad_accum 2, remat full, loss_chunk 64" in out.out
    for backend in ("jax", "torch"):
        assert peaks["saving"][backend] < 0.8 * peaks["plain"][backend], peaks


@pytest.mark.parametrize(
    "args,message",
    quick_first([
        (["--remat", "block", "--backend", "all"], "--remat: train-config options of the twins"),
        (["--loss-chunk", "64", "--mode", "forward"], "--loss-chunk: train-config options of the twins"),
        (["--grad-accum", "3", "--batch", "8"], "--grad-accum-steps 3 must be >= 1 and divide --batch-size 8"),
        (["--loss-chunk", "-1"], "--loss-chunk -1 must be >= 0"),
    ], 2, multi=True),
)
def test_bad_memory_options(args, message):
    one_line_error(bench(*args, "--steps", "1", "--rounds", "1", "--warmup", "0", check=False), message)


def test_gpu_check_refuses_a_machine_without_a_gpu(monkeypatch, capsys):
    """gpu_check.main in this process (it imports both frameworks to look for the GPU): one error line, exit 2."""
    import torch

    from bench import gpu_check

    from .test_odd_input import error_line

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU, if any, hidden
    error_line(gpu_check.main, ["--quiet"], capsys, "no CUDA device: run on the GPU machine, or pass --dry-run")


@pytest.mark.slow
def test_a_compiled_torch_row_that_met_a_graph_break_says_so(monkeypatch, tmp_path, capsys):
    """A graph break splits a compiled step into graphs with eager Python between them, and the row labelled
    "torch.compile" timed that without a word: each compiled torch row now counts its breaks ("graph_breaks", 0 for
    a whole graph) and a warning names the job that met any."""
    import torch

    from bench import compare, timing
    from bench.runners import Bench
    from shared_config.cli import run as cli_run

    def whole(x):
        return x * 2 + 1

    def broken(x):
        x = x * 2
        torch._dynamo.graph_break()  # what a .item(), a print or an unsupported call does inside a region
        return x + 1

    def setup(spec, tokens, mode, attention, cfg, compile, new_tokens=0, gla_kernel="auto"):
        step = torch.compile(broken if spec.n_layers == 2 else whole, backend="eager")
        x = torch.ones(4)
        return Bench(lambda: step(x), lambda out: None, "sdpa", lambda: None, {"compile": "torch.compile"})

    monkeypatch.setitem(timing.SETUP, "torch", setup)
    monkeypatch.setattr(compare, "configure_threads", lambda *a: None)
    with pytest.raises(SystemExit) as e:
        cli_run(compare.main, ["--backend", "torch", "--compile", "--sweep", "n_layers=1,2", "--batch", "2", "--seq",
                               "8", "--steps", "1", "--warmup", "1", "--rounds", "1", "--quiet", "--compile-cache",
                               "none", "--json", str(tmp_path / "r.json")])
    assert e.value.code == 0
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [(r["variant"], r["graph_breaks"]) for r in rows] == [("n_layers=1", 0), ("n_layers=2", 1)]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "graph break" in line]
    assert warnings == ["warning: the torch train job of n_layers=2 met 1 torch.compile graph break(s): part of its "
                        "step runs eager (TORCH_LOGS=graph_breaks shows where)"]


@pytest.mark.slow
def test_the_bench_times_the_spec_s_own_dtypes(tmp_path, monkeypatch):
    """A spec file's compute_dtype bfloat16 was timed in float32 (--compute-dtype's default won over the spec); a
    train config's compute_dtype was ignored without a word; transformers kept float32 weights beside a twin's
    param_dtype bfloat16 (not the same work)."""
    import torch
    import transformers
    import yaml

    from bench import compare, runners
    from bench.options import variants
    from bench.timing import bench_train_config
    from shared_config.cli import UsageError

    spec_file = tmp_path / "bf16.yaml"
    spec_file.write_text(yaml.safe_dump({**load_spec("tiny").to_dict(), "compute_dtype": "bfloat16"}))
    args = compare.parse_args(["--spec", str(spec_file)])
    ((_, spec),) = variants(args)
    assert spec.compute_dtype == args.dtype == "bfloat16"
    args = compare.parse_args(["--spec", str(spec_file), "--compute-dtype", "float32"])  # the option, when given
    assert variants(args)[0][1].compute_dtype == args.dtype == "float32"
    config = tmp_path / "train.yaml"
    config.write_text("compute_dtype: bfloat16\n")
    with pytest.raises(UsageError, match="compute_dtype=bfloat16 is the bench's --compute-dtype"):
        bench_train_config(compare.parse_args(["--train-config", str(config)]))
    made = []

    class Made(Exception):
        pass

    def from_config(config, **kwargs):
        made.append(config.dtype)
        raise Made

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", from_config)
    with pytest.raises(Made):
        runners.setup_hf(make_spec(param_dtype="bfloat16"), None, "train", "sdpa", None, False)
    assert made in (["bfloat16"], [torch.bfloat16])


def test_the_table_names_the_unit_its_memory_column_is_in(capsys):
    """The table's memory column divides the JSON's bytes by 2**20: it is MiB, and said so (it read "peak MB", 4.9%
    below the megabytes it named: 104,857,600 bytes are 104.9 MB and 100 MiB)."""
    from bench.compare import print_table

    row = {"backend": "jax", "variant": "tiny", "step_s": {"median": 0.1, "p10": 0.09, "p90": 0.11},
           "tokens_per_s": 20480.0, "tflops": 0.05, "mfu": None, "compile_s": 1.0, "peak_mem_bytes": 104_857_600,
           "attention": "blocked"}
    env = {"device": "cpu (x86_64)", "mode": "forward", "dtype": "float32", "batch": 8, "seq": 256,
           "set": ["n_layers=1"]}  # the label "tiny" never showed it
    long = {**row, "variant": "norm_type=derf,norm_position=hybrid"}  # over 28 characters pushed its columns out
    print_table({"env": env, "results": [row, long]})
    title, head, *lines = capsys.readouterr().out.splitlines()[:4]
    assert title.endswith("batch 8 x seq 256 | --set n_layers=1")
    assert head.split()[-3:] == ["peak", "MiB", "attention"]
    assert [line.split()[-2:] for line in lines] == [["100", "blocked"]] * 2
    assert {line.index("20480") + 5 for line in lines} == {head.index("tokens/s") + 8}
