"""The timing loop: compile, warm up, then interleaved rounds of synchronised steps."""

from __future__ import annotations

import math
import re
import sys
import time
from functools import partial

import numpy as np
from tqdm import tqdm

from shared_config.cli import UsageError
from shared_config.flops import flops_per_token, matmul_params
from shared_config.parallel import env_int
from shared_config.hardware import check_dtype
from shared_config.progress import progress

from bench.flops import peak_tflops
from bench.load import CpuClock, process_threads, snapshot
from bench.options import MEMORY_FLAGS
from bench.devices import accelerator, check_tpu_backends, jax_device_name, torch_device_name, torch_graph_breaks
from bench.runners import setup_hf, setup_jax, setup_torch

SETUP = {"jax": setup_jax, "torch": setup_torch, "hf": setup_hf}


def bench_tokens(spec, args, seed: int = 0) -> np.ndarray:
    """The same int32 tokens for every backend: [batch, seq + 1] in train mode (a step predicts seq tokens),
    [batch, seq] otherwise (the prompt of decode mode)."""
    tokens = np.random.default_rng(seed).integers(0, spec.V, (args.batch, args.seq + 1), dtype=np.int32)
    return tokens if args.mode == "train" else tokens[:, :-1]


def bench_train_config(args, specs=(), shards: int | None = None):
    """The optimizer settings of train mode (--train-config, or the defaults) at the bench's batch shape, with the
    memory options --grad-accum-steps, --remat and --loss-chunk where given, checked against every (label, spec) of
    `specs` as a training run is (TrainConfig.model_spec: a routed spec whose blocks see floor(γ·seq) = 0 tokens was
    timed with blocks that never ran, a step that under DDP waits for their gradients). numpy only: the tools call it
    before any framework loads, so that a bad option is refused in the second it takes, not after the imports.
    With `shards` (the devices of --mesh, or torchrun's ranks), the global batch must split evenly over them and each
    share into the micro-batches. Raises SpecError naming a value a flag set by the flag."""
    from shared_config import SpecError, load_train_config
    from shared_config.parallel import rows_per_shard

    base = load_train_config(args.train_config).to_dict() if args.train_config else {}
    if base.get("compute_dtype") is not None:  # the steps run the spec's dtype: the config's was ignored
        raise UsageError(f"--train-config {args.train_config}: compute_dtype={base['compute_dtype']} is the bench's "
                         "--compute-dtype; drop it from the config and pass --compute-dtype")
    if base.get("gla_kernel", "auto") not in ("auto", args.gla_kernel):  # the steps ran --gla-kernel's: ignored
        raise UsageError(f"--train-config {args.train_config}: gla_kernel={base['gla_kernel']} is the bench's "
                         f"--gla-kernel; drop it from the config and pass --gla-kernel {base['gla_kernel']}")
    memory = {key: getattr(args, flag) for key, flag in MEMORY_FLAGS.items() if getattr(args, flag, None) is not None}
    given = {"batch_size": args.batch, "seq_len": args.seq, **memory}
    # a value a flag set is named as the flag (`--grad-accum-steps 2`), not as the config key the user never typed
    flags = {key for key, value in given.items() if value is not None and base.get(key) != value}
    try:
        config = load_train_config({**base, **given})
        if shards:  # under torchrun, or for the micro-batches, this failed at the first step, after the imports
            rows_per_shard(config.batch_size, shards, config.grad_accum_steps)
    except SpecError as e:
        raise SpecError(flag_spelling(str(e), flags)) from None
    for label, spec in specs:
        try:
            config.model_spec(spec)
        except SpecError as e:
            raise SpecError(f"variant {label}: {flag_spelling(str(e), flags)}") from None
    return config


def flag_spelling(message: str, keys) -> str:
    """`message` with each train-config `key=value` of `keys` spelled as the bench's flag, `--key-name value`."""
    for key in keys:
        message = re.sub(rf"\b{key}=", f"--{key.replace('_', '-')} ", message)
    return message


def timed(bench, fn=None) -> float:
    """Seconds for one call of `fn` (default: a step), synchronised before the clock is read."""
    t0 = time.perf_counter()
    bench.sync((fn or bench.step)())
    return time.perf_counter() - t0


def backend_options(args, kernels) -> tuple[bool, dict[str, str]]:
    """What every backend's setup shares, after setting precision and threads: whether to compile (default: on a
    GPU; on a TPU torch_xla compiles each step's graph itself) and the attention kernel per backend."""
    platform = set_precision_and_threads(args)
    if platform == "tpu" and args.compile:
        raise UsageError("--compile: on a TPU torch_xla compiles each step's graph with XLA; torch.compile's "
                         "inductor does not target TPUs (drop --compile)")
    if platform == "cpu" and getattr(args, "peak_tflops", None):  # before any job: it was dropped without a word
        raise UsageError(f"--peak-tflops {args.peak_tflops:g}: a CPU run reports GFLOP/s and no MFU (docs/bench.md); "
                         "drop --peak-tflops")
    mesh = bool(getattr(args, "mesh", None) or getattr(args, "devices", None))
    compile = platform == "gpu" if args.compile is None else args.compile
    return compile, kernels(args.attention, platform, args.dtype, mesh)


def check_gla_kernel(args, specs, backends: list[str]) -> None:
    """A --gla-kernel other than auto must run in every asked twin on this machine, refused (HardwareError) before
    any job (shared_config.hardware.check_gla_kernel, the studies' rule too)."""
    from shared_config.hardware import check_gla_kernel as check
    from shared_config.twins import twin

    check(args.gla_kernel, [spec for _, spec in specs], backends, twin)


def set_precision_and_threads(args) -> str:
    """The same precision policy and CPU threads for every backend; returns the platform: "gpu", "tpu" or "cpu"."""
    import torch

    torch.set_num_threads(args.threads)
    platform = accelerator()
    if platform == "gpu":
        check_dtype(args.dtype, platform, torch.cuda.is_bf16_supported(including_emulation=False), torch_device_name())
    if args.dtype == "float32":  # true float32 matmuls everywhere (no TF32, no bf16 passes on a TPU)
        from jax_model.precision import exact_float32 as jax_exact_float32
        from torch_model.precision import exact_float32 as torch_exact_float32

        jax_exact_float32()
        torch_exact_float32()
        if platform == "tpu" and args.backend != "jax":
            import torch_xla.backends

            torch_xla.backends.set_mat_mul_precision("highest")
    return platform


def decoded_tokens(steps: int, rounds: int, warmup: int) -> int:
    """Decode mode: the tokens one prefill is followed by, which the cache holds after the prompt: a round of
    timed steps (`steps` split into `rounds`), or the compilation step and the warmup steps."""
    return max(math.ceil(steps / rounds), 1 + warmup)


def run_benchmarks(args, specs, backends, kernels, train_config, on_progress=None, during: list | None = None):
    """Time every (variant, backend) (train mode: with `train_config`, bench_train_config's, made before any framework
    loaded); returns the JSON results and the device name. `on_progress(partial, device)`,
    if given, is called after every job's compilation and after every round of timed steps: `partial` holds
    "results" (one row per job timed so far, over the steps it has had) and "compiled" (the jobs compiled but not
    yet timed: their compile_s and peak_mem_bytes), so that a report written there keeps what a stopped run measured.
    `during` gets a load snapshot (bench/load.py) after each round; each row gets its process's CPU time per wall
    time."""
    if accelerator() == "tpu":  # before any work: one framework per process, torch_xla for torch
        check_tpu_backends(backends)
    compile, names = backend_options(args, kernels)
    check_gla_kernel(args, specs, backends)
    setups = {b: partial(setup, gla_kernel=args.gla_kernel) if b != "hf" else setup for b, setup in SETUP.items()}
    if args.mesh or args.devices:  # the JAX train step over a device mesh
        from jax_model import distributed

        setups["jax"] = partial(setups["jax"], mesh=distributed.make_mesh(args.mesh, devices=args.devices))
    if args.parallel:  # launched by torchrun (compare.py's check): DDP or FSDP2 over the process group, of 1 too
        from torch_model import distributed

        distributed.init_distributed()
        setups["torch"] = partial(setups["torch"], parallel=args.parallel)
    device = torch_device_name() if "jax" not in backends else jax_device_name()
    jobs, benches = [(label, spec, b) for label, spec in specs for b in backends], {}
    per_round = math.ceil(args.steps / args.rounds)
    new_tokens = decoded_tokens(args.steps, args.rounds, args.warmup)
    for label, spec, backend in progress(jobs, desc="compile + warmup", quiet=args.quiet):
        args.job = f"{backend} {args.mode} job of {label}"  # named by compare.py if it runs out of memory
        tokens = bench_tokens(spec, args)
        bench = setups[backend](spec, tokens, args.mode, names[backend], train_config, compile, new_tokens=new_tokens)
        breaks = torch_graph_breaks()
        compile_s = (timed(bench, bench.start) if bench.start else 0.0) + timed(bench)
        for _ in range(args.warmup):
            timed(bench)
        if bench.info.get("compile") == "torch.compile":
            check_whole_graphs(bench, torch_graph_breaks() - breaks, args.job)
        bench.info["peak_mem_bytes"] = bench.peak_mem()  # now, before the next job allocates
        bench.info["cpu"] = CpuClock()  # over the timed steps only
        benches[label, backend] = (spec, bench, compile_s, [], [])
        if on_progress:
            on_progress(measured(benches, args, device, per_round), device)
    with progress(total=per_round * args.rounds * len(jobs), desc="timed steps", quiet=args.quiet) as bar:
        for r in range(args.rounds):
            # Each round starts one job later: every backend follows every other equally often (the job after
            # another framework's pays for cold thread pools and caches, and that must not always be the same one).
            for label, _, backend in jobs[r % len(jobs):] + jobs[: r % len(jobs)]:
                spec, bench, _, times, prefills = benches[label, backend]
                args.job = f"{backend} {args.mode} job of {label}"
                if bench.start:  # decode: a fresh prompt each round, so every round decodes the same positions
                    prefills.append(timed(bench, bench.start))
                with bench.info["cpu"]:
                    for _ in range(per_round):
                        times.append(timed(bench))
                        bar.update()
                bench.info["process_threads"] = process_threads()
                if on_progress:  # after every job of the round: one job's new steps are one more measured row
                    on_progress(measured(benches, args, device, per_round), device)
            if during is not None:
                during.append(snapshot())
    return [result(label, backend, *benches[label, backend], args, device, per_round)
            for label, _, backend in jobs], device


def check_whole_graphs(bench, breaks: int, job: str) -> None:
    """Record a torch.compile'd job's graph breaks in its row ("graph_breaks"), and warn on stderr when it met any:
    its step then runs partly eager, and a row labelled "torch.compile" would time that without a word."""
    bench.info["graph_breaks"] = breaks
    if breaks:
        tqdm.write(f"warning: the {job} met {breaks} torch.compile graph break(s): part of its step runs eager "
                   "(TORCH_LOGS=graph_breaks shows where)", file=sys.stderr)  # above a progress bar, not into it


def measured(benches: dict, args, device: str, per_round: int) -> dict:
    """What the jobs so far have measured: "results" rows of the jobs with timed steps, "compiled" for the others."""
    results, compiled = [], []
    for (label, backend), (spec, bench, compile_s, times, prefills) in benches.items():
        if times:
            results.append(result(label, backend, spec, bench, compile_s, times, prefills, args, device, per_round))
        else:
            compiled.append({"backend": backend, "variant": label, "compile_s": compile_s,
                             "peak_mem_bytes": bench.info.get("peak_mem_bytes")})
    return {"results": results, "compiled": compiled}


def result(label, backend, spec, bench, compile_s, times, prefills, args, device, per_round) -> dict:
    median = float(np.median(times))
    clock = bench.info.get("cpu") or CpuClock()  # the process's CPU time over the timed steps (bench/load.py)
    bench.info["cpu_s_per_wall_s"] = clock.share
    bench.info["cpu_s_per_step"] = clock.cpu_s / len(times) if clock.wall_s else None
    if args.mode == "decode":  # a step makes one token per row; the i-th of a round's attends to seq + i keys
        tokens_per_s = args.batch / median
        keys = args.seq + (per_round + 1) / 2  # the mean over i = 1..per_round (per_round // 2 missed up to a key)
        flops = causal = flops_per_token(spec, keys, "decode")  # new tokens see every key
    else:
        tokens_per_s = args.batch * args.seq / median
        flops = flops_per_token(spec, args.seq, args.mode)
        causal = flops_per_token(spec, args.seq, args.mode, causal=True)  # llm.c's count: attention halved
    achieved = tokens_per_s * flops / 1e12
    peak = args.peak_tflops or peak_tflops(device, args.dtype)  # per chip
    # chips the step runs on: a JAX mesh's devices, or torchrun's processes (one device each)
    chips = math.prod(bench.info["mesh"].values()) if "mesh" in bench.info else env_int("WORLD_SIZE", 1)
    return {
        "backend": backend, "variant": label,
        "step_s": {"median": median, "p10": float(np.percentile(times, 10)), "p90": float(np.percentile(times, 90))},
        "compile_s": compile_s, "tokens_per_s": tokens_per_s, "tflops": achieved,
        "mfu": achieved / (peak * chips) if peak and not device.startswith("cpu") else None, "chips": chips,
        "mfu_causal": achieved * causal / flops / (peak * chips) if peak and not device.startswith("cpu") else None,
        "attention": bench.attention, "flops_per_token": flops, "flops_per_token_causal": causal,
        "matmul_params": matmul_params(spec, args.seq, 1 if args.mode == "decode" else None), "n_steps": len(times),
        **{k: v for k, v in bench.info.items() if k != "cpu"},
        **({"prefill_s": {"median": float(np.median(prefills)), "p10": float(np.percentile(prefills, 10)),
                          "p90": float(np.percentile(prefills, 90))}} if prefills else {}),
    }
