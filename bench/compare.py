"""Side-by-side step time of the JAX and PyTorch twins (and of Hugging Face transformers' Llama).

    python bench/compare.py --backend both                       # tiny spec, train mode, this machine
    python bench/compare.py --backend all --spec small --dtype bfloat16 --seq 2048 --json out.json
    python bench/compare.py --sweep norm_type=rms,dyt,derf --plot sweep.png

How it measures (README, "Bench"): the first step (compilation) is timed on its own, then
`--warmup` steps, then `--steps` timed steps, each synchronised before the clock is read, run in
`--rounds` interleaved rounds over every (variant, backend) so that machine drift hits all alike.
Results: a table on stdout, `--json` for the numbers, `--plot` for a PNG; progress on stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import math
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ modules, when run as a script

import load  # noqa: E402
from shared_config import SpecError, load_spec, parse_overrides  # noqa: E402
from shared_config.cli import Parser, UsageError, above, at_least, check_outputs, run  # noqa: E402
from shared_config.compile_cache import add_compile_cache_option, use_compile_cache  # noqa: E402
from shared_config.hardware import check_kernel  # noqa: E402
from shared_config.parallel import parse_mesh, rows_per_shard  # noqa: E402
from shared_config.report import write_report  # noqa: E402
from shared_config.resources import (  # noqa: E402
    ResourceError, check_memory, forward_bytes, is_out_of_memory, train_bytes,
)

BACKENDS = {"both": ["jax", "torch"], "jax": ["jax"], "torch": ["torch"], "hf": ["hf"], "all": ["jax", "torch", "hf"]}
ATTENTION = ("auto", "sdpa", "cudnn", "xla", "einsum", "blocked", "pallas")


def parse_args(argv):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="both", choices=list(BACKENDS), help="what to time (all: jax, torch and hf)")
    p.add_argument("--spec", default="tiny", help="preset name or YAML path (default: tiny)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2", help="benchmark every value")
    p.add_argument("--batch", type=at_least(1), default=8, help="sequences per step")
    p.add_argument("--seq", type=at_least(1), default=None, help="tokens per sequence (default: min(256, max_seq_len))")
    p.add_argument("--steps", type=at_least(1), default=20, help="timed steps per (variant, backend), rounded up to a multiple of --rounds")
    p.add_argument("--warmup", type=at_least(0), default=3, help="untimed steps after compilation")
    p.add_argument("--rounds", type=at_least(1), default=4, help="interleaved rounds the timed steps are split into")
    p.add_argument("--mode", default="train", choices=["train", "forward", "decode"],
                   help="train: forward+backward+AdamW; forward: logits; decode: prefill --seq tokens, then time "
                        "--steps one-token KV-cache steps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the torch/hf step (default: on GPU yes, on CPU no)")
    p.add_argument("--attention", default="auto", choices=ATTENTION, help="attention kernel (translated per twin)")
    p.add_argument("--train-config", default=None, help="YAML of optimizer settings for train mode")
    p.add_argument("--grad-accum", type=int, default=None, metavar="N",
                   help="train mode, twins: --batch rows as N micro-batches (grad_accum_steps)")
    p.add_argument("--remat", default=None, choices=["none", "block", "full"],
                   help="train mode, twins: recompute each block's activations in the backward")
    p.add_argument("--loss-chunk", type=int, default=None, metavar="TOKENS",
                   help="train mode, twins: LM head + cross-entropy over chunks of TOKENS tokens (0: off)")
    p.add_argument("--threads", type=at_least(1), default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                   help="CPU threads for every framework (default: every CPU this process may use)")
    p.add_argument("--devices", type=at_least(1), default=None, help="JAX: train over N devices (a data=N mesh)")
    p.add_argument("--mesh", default=None, help="JAX: train over a device mesh, e.g. data=2,fsdp=4")
    p.add_argument("--parallel", default=None, choices=["ddp", "fsdp2"],
                   help="torch under torchrun: DistributedDataParallel or FSDP2 (fully_shard) (default under torchrun: ddp)")
    p.add_argument("--peak-tflops", type=above(0), default=None, help="device peak for MFU (default: known table)")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of the step times here")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_compile_cache_option(p)
    args = p.parse_args(argv)
    if args.devices and args.mesh:
        raise UsageError("--devices N and --mesh: pass one (--devices N is --mesh data=N)")
    memory = [f"--{f.replace('_', '-')}" for f in ("grad_accum", "remat", "loss_chunk") if getattr(args, f) is not None]
    if memory and (args.mode != "train" or "hf" in BACKENDS[args.backend]):
        raise UsageError(f"{', '.join(memory)}: train-config options of the twins: use them with --mode train and "
                         "--backend both, jax or torch")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if (args.mesh or args.devices) and (args.mode != "train" or "jax" not in BACKENDS[args.backend]):
        raise UsageError("--devices/--mesh shard the JAX train step: use them with --mode train and a jax backend")
    if distributed and (args.backend != "torch" or args.mode != "train"):
        raise UsageError("under torchrun the bench times the torch train step: pass --backend torch --mode train")
    if args.parallel and not distributed:  # not silently timed on one process
        raise UsageError(f"--parallel {args.parallel} needs torchrun: torchrun --standalone --nproc_per_node=N "
                         "bench/compare.py --backend torch ...")
    args.parallel = args.parallel or ("ddp" if distributed else None)
    check_outputs(args.json, args.plot)  # before any work, not after the run
    if "hf" in BACKENDS[args.backend] and importlib.util.find_spec("transformers") is None:  # before any work
        raise UsageError(f"--backend {args.backend} times Hugging Face transformers, which is not installed: "
                         "pip install -e '.[hf]' (or pip install transformers)")
    return args


def variants(args) -> list[tuple[str, object]]:
    """(label, spec) for the base spec with --set applied and every combination of --sweep values."""
    base = load_spec(args.spec)
    changes = {**parse_overrides(args.set), "compute_dtype": args.dtype}
    sweeps = []
    for item in args.sweep:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise UsageError(f"--sweep {item!r} must look like key=v1,v2")
        sweeps.append([(key, parse_overrides([f"{key}={v}"])[key]) for v in values.split(",")])
    out = []
    for combo in itertools.product(*sweeps) if sweeps else [()]:
        label = ",".join(f"{k}={v}" for k, v in combo) or args.spec
        try:
            out.append((label, base.replace(**{**changes, **dict(combo)})))
        except SpecError as e:
            raise SpecError(f"variant {label}: {e}") from None
    return out


def configure_threads(n: int, cpu_devices: int | None) -> None:
    """The same CPU threads for every framework (and, for a mesh on a CPU, that many host devices);
    must run before jax or torch is imported.

    XLA has no thread-count flag: it sizes its pools from the CPUs the process may run on, so the
    process is pinned to n CPUs; torch gets the same n (torch.set_num_threads, OMP_NUM_THREADS).
    """
    if hasattr(os, "sched_setaffinity") and n < len(os.sched_getaffinity(0)):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    if cpu_devices:  # only the CPU platform reads it: GPUs are counted as they are
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={cpu_devices}"
        os.environ["XLA_FLAGS"] = flags.strip()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch in one process


def kernels(attention: str, platform: str, dtype: str, mesh: bool = False) -> dict[str, str]:
    """The attention kernel each backend is asked for. On GPU in bf16 `auto` pins cuDNN's flash
    attention in both twins, so they run the same kernel family; on a TPU it pins the Pallas flash
    kernel (the same kernel: torch_xla wraps JAX's), except JAX over a mesh: XLA cannot partition a
    Pallas kernel ("Mosaic kernels cannot be automatically partitioned"), so XLA's attention runs there."""
    check_kernel(attention, platform, f"--attention {attention}")  # before any model is built: one line, exit code 2
    if attention == "auto" and platform == "tpu":
        return {"jax": "xla" if mesh else "pallas", "torch": "pallas", "hf": "sdpa"}
    if attention == "auto":
        attention = "cudnn" if platform == "gpu" and dtype == "bfloat16" else "auto"
    jax_name = {"sdpa": "xla"}.get(attention, attention)
    torch_name = {"xla": "sdpa"}.get(attention, attention)
    return {"jax": jax_name, "torch": torch_name, "hf": "sdpa"}


def environment(args, device: str) -> dict:
    import jax
    import torch

    versions = {"python": platform.python_version(), "jax": jax.__version__, "torch": torch.__version__}
    for name in ("flax", "optax", "transformers", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device,
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": args.threads, "versions": versions,
        "mode": args.mode, "dtype": args.dtype, "batch": args.batch, "seq": args.seq, "steps": args.steps,
        "warmup": args.warmup, "rounds": args.rounds, "spec": args.spec, "set": args.set, "sweep": args.sweep,
        "matmul_precision": "highest (no TF32)" if args.dtype == "float32" else "bf16 matmuls, fp32 accumulate",
        "mesh": args.mesh or (f"data={args.devices}" if args.devices else None),
        # the memory options (profile_step.py, which shares this function, has none: the defaults)
        "grad_accum_steps": getattr(args, "grad_accum", None) or 1, "remat": getattr(args, "remat", None) or "none",
        "loss_chunk": getattr(args, "loss_chunk", None) or 0,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")), "parallel": args.parallel if "WORLD_SIZE" in os.environ else None,
    }


def main(argv=None):
    args = parse_args(argv)
    before, during = load.snapshot(measure_busy=True), []  # before any work of ours: what else the machine is doing
    specs = variants(args)
    seq = args.seq if args.seq is not None else min(256, min(s.max_seq_len for _, s in specs))
    args.seq = seq
    from timing import decoded_tokens  # light: jax and torch are imported after configure_threads

    for label, spec in specs:
        if seq > spec.max_seq_len:
            raise UsageError(f"--seq {seq} exceeds max_seq_len={spec.max_seq_len} of {label}")
        if args.mode == "decode" and seq + (n := decoded_tokens(args.steps, args.rounds, args.warmup)) > spec.max_seq_len:
            raise UsageError(f"--mode decode: --seq {seq} prompt tokens + {n} decoded (--steps/--rounds, or 1 + --warmup) "
                             f"exceed max_seq_len={spec.max_seq_len} of {label}")
    backends = BACKENDS[args.backend]
    if "hf" in backends:
        from shared_config.formats.hf import unsupported_options

        for label, spec in specs:
            if problems := unsupported_options(spec):
                raise UsageError(f"--backend hf: {label} has no Hugging Face Llama equivalent: {', '.join(problems)}")
    shards = math.prod(parse_mesh(args.mesh).values()) if args.mesh else args.devices
    if shards:
        rows_per_shard(args.batch, shards)  # the global batch splits evenly over the mesh, or fail now
    for label, spec in specs:  # before anything is allocated: a job that cannot fit is refused in one line
        memory = {"grad_accum_steps": args.grad_accum or 1, "remat": args.remat or "none", "loss_chunk": args.loss_chunk or 0}
        need = train_bytes(spec, args.batch, seq, **memory) if args.mode == "train" else forward_bytes(spec, args.batch, seq)
        check_memory(need, f"the {args.mode} job of {label} at batch {args.batch} x seq {seq}",
                     "lower --batch or --seq, or the model's sizes")
    configure_threads(args.threads, shards)
    use_compile_cache(args.compile_cache)
    from timing import run_benchmarks

    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun every rank times its step; rank 0 reports

    def on_progress(partial, device):  # the JSON as of the last measured row: a stopped run keeps it
        if rank0:
            write_report(args.json, {"env": environment(args, device), **partial}, complete=False)

    try:
        results, device = run_benchmarks(args, specs, backends, kernels, on_progress, during)
    except Exception as e:
        if is_out_of_memory(e):
            raise ResourceError(f"the {getattr(args, 'job', 'benchmark')} ran out of memory at batch {args.batch} x "
                                f"seq {seq}: lower --batch or --seq") from e
        raise
    if not rank0:
        return
    report = {"env": {**environment(args, device), "load": machine_load(args, before, during)}, "results": results}
    print_table(report)
    if device.startswith("cpu") and (problems := load.fairness_problems(before, during, args.threads, results)):
        print(load.warning_line(problems), file=sys.stderr)
    write_report(args.json, report, complete=True)
    if args.plot:
        from plot import plot_results

        plot_results(report, args.plot)


def machine_load(args, before: dict, during: list[dict]) -> dict:
    """The machine's load for the JSON: snapshots before the run and after each round (bench/load.py) and the
    threads each framework was given."""
    return {"before": before, "during": during, "threads": args.threads}


def print_table(report: dict) -> None:
    results, gpu = report["results"], any(r["mfu"] is not None for r in report["results"])
    head = f"{'backend':<7} {'variant':<28} {'step ms (p10-p90)':>22} {'tokens/s':>10} {'TFLOP/s' if gpu else 'GFLOP/s':>8} {'MFU':>6} {'compile s':>9} {'peak MB':>8}  attention"
    env = report["env"]
    memory = f" | grad_accum {env['grad_accum_steps']}, remat {env['remat']}, loss_chunk {env['loss_chunk']}" if env["mode"] == "train" else ""
    print(f"# {env['device']} | {env['mode']} | {env['dtype']} | batch {env['batch']} x seq {env['seq']}{memory}")
    print(head)
    for r in results:
        s = r["step_s"]
        rate = r["tflops"] if gpu else r["tflops"] * 1e3
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_bytes'] / 2**20:.0f}" if r["peak_mem_bytes"] else "-"
        step = f"{1e3 * s['median']:.2f} ({1e3 * s['p10']:.2f}-{1e3 * s['p90']:.2f})"
        prefill = f"  prefill {1e3 * r['prefill_s']['median']:.2f} ms" if "prefill_s" in r else ""
        print(f"{r['backend']:<7} {r['variant']:<28} {step:>22} {r['tokens_per_s']:>10.0f} {rate:>8.2f} {mfu:>6} {r['compile_s']:>9.1f} {mem:>8}  {r['attention']}{prefill}")
    by = {(r["variant"], r["backend"]): r["step_s"]["median"] for r in results}
    ratios = []
    for variant in dict.fromkeys(r["variant"] for r in results):
        parts = []
        if (variant, "jax") in by and (variant, "torch") in by:
            parts.append(f"jax/torch {by[variant, 'jax'] / by[variant, 'torch']:.2f}")
        for twin in ("jax", "torch"):
            if (variant, twin) in by and (variant, "hf") in by:
                parts.append(f"{twin}/hf {by[variant, twin] / by[variant, 'hf']:.2f}")
        if parts:
            ratios.append(f"{variant}: {', '.join(parts)}")
    if ratios:
        print("step-time ratio (lower is faster): " + "; ".join(ratios))


if __name__ == "__main__":
    run(main)
