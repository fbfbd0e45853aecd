"""Side-by-side step time of the JAX and PyTorch twins (and of Hugging Face transformers' Llama).

    python bench/compare.py --backend both                       # tiny spec, train mode, this machine
    python bench/compare.py --backend all --spec small --compute-dtype bfloat16 --seq-len 2048 --json out.json
    python bench/compare.py --sweep norm_type=rms,dyt,derf --plot sweep.png

How it measures (docs/bench.md): the first step (compilation) is timed on its own, then
`--warmup` steps, then `--steps` timed steps, each synchronised before the clock is read, run in
`--rounds` interleaved rounds over every (variant, backend) so that machine drift hits all alike.
Results: a table on stdout, `--json` for the numbers, `--plot` for a PNG; progress on stderr.
"""

from __future__ import annotations

import importlib.util
import math
import sys

from shared_config.cli import Parser, UsageError, above, at_least, check_outputs, run
from shared_config.compile_cache import cache_state, use_compile_cache
from shared_config.parallel import env_int, mesh_devices, torchrun_error, world_size
from shared_config.report import report_on_stdout, write_report
from shared_config.run import SPEC_KEYS
from shared_config.resources import (
    ResourceError, accelerator_present, cache_bytes, check_memory, forward_bytes, is_out_of_memory, layout_size,
    train_bytes,
)

from bench import load
from bench.options import (
    BACKENDS, add_job_options, add_report_options, check_used_options, configure_threads, environment, job_inputs,
    kernels, memory_options, variants,
)
from bench.plot import MAX_LINES, figure, report_title


def parse_args(argv):
    p = Parser(description=__doc__.splitlines()[0])
    add_job_options(p, backends=list(BACKENDS), backend_help="what to time (all: jax, torch and hf)",
                    modes=["train", "forward", "decode"],
                    mode_help="train: forward+backward+AdamW; forward: logits; decode: prefill --seq-len tokens "
                              "(default: min(256, max_seq_len less the decoded tokens)), then time --steps one-token "
                              "KV-cache steps",
                    steps=20, steps_help="timed steps per (variant, backend), rounded up to a multiple of --rounds",
                    compiled="torch/hf")
    p.add_argument("--sweep", action="append", default=[], type=p.key_item(SPEC_KEYS, "spec"), metavar="KEY=V1,V2",
                   help="benchmark every value")
    p.add_argument("--rounds", type=at_least(1), default=4, help="interleaved rounds the timed steps are split into")
    p.add_argument("--grad-accum-steps", "--grad-accum", dest="grad_accum", type=int, default=None, metavar="N",
                   help="train mode, twins: --batch-size rows as N micro-batches")
    p.add_argument("--remat", default=None, choices=["none", "block", "full"],
                   help="train mode, twins: recompute each block's activations in the backward")
    p.add_argument("--loss-chunk", type=int, default=None, metavar="TOKENS",
                   help="train mode, twins: LM head + cross-entropy over chunks of TOKENS tokens (0: off)")
    p.add_argument("--devices", type=at_least(1), default=None, help="JAX: train over N devices (a data=N mesh)")
    p.add_argument("--mesh", default=None, help="JAX: train over a device mesh, e.g. data=2,fsdp=4")
    p.add_argument("--parallel", default=None, choices=["ddp", "fsdp2"],
                   help="torch under torchrun: DistributedDataParallel or FSDP2 (fully_shard) (default under "
                        "torchrun: ddp)")
    p.add_argument("--peak-tflops", type=above(0), default=None, help="device peak for MFU (default: known table)")
    add_report_options(p, plot=True)
    args = p.parse_args(argv)
    args.steps = math.ceil(args.steps / args.rounds) * args.rounds  # as timed: env.steps said 1 where rows had 4
    if args.devices and args.mesh:
        raise UsageError("--devices N and --mesh: pass one (--devices N is --mesh data=N)")
    # checked at parse time: `--mesh ''` ran unsharded; 2,000 CPU devices took 17 GB to start
    args.shards = mesh_devices(args.mesh, args.devices)
    memory = memory_options(args)  # the flags, or --train-config's keys: what the report and memory check read
    if memory and (args.mode != "train" or "hf" in BACKENDS[args.backend]):
        raise UsageError(f"{', '.join(memory)}: train-config options of the twins: use them with --mode train and "
                         "--backend both, jax or torch")
    distributed = world_size() > 1  # RANK and WORLD_SIZE checked: RANK=1 WORLD_SIZE=1 waited for a rank 0
    if (args.mesh or args.devices) and (args.mode != "train" or "jax" not in BACKENDS[args.backend]):
        raise UsageError("--devices/--mesh shard the JAX train step: use them with --mode train and a jax backend")
    if error := torchrun_error(args.parallel, args.backend == "torch" and args.mode == "train", "bench/compare.py",
                               "--backend torch --mode train"):
        raise UsageError(error)
    args.parallel = args.parallel or ("ddp" if distributed else None)
    check_outputs(args.json, args.plot, cache=args.compile_cache, inputs=job_inputs(args))  # before any work
    check_used_options(args)
    if "hf" in BACKENDS[args.backend] and importlib.util.find_spec("transformers") is None:  # before any work
        raise UsageError(f"--backend {args.backend} times Hugging Face transformers, which is not installed: "
                         "pip install -e '.[hf]' (or pip install transformers)")
    return args


def main(argv=None):
    args = parse_args(argv)
    with report_on_stdout(args.json):  # `--json -`: the table goes to stderr
        return compare(args)


def compare(args):
    before, during = load.snapshot(measure_busy=True), []  # before any work of ours: what else the machine is doing
    specs = variants(args)
    from bench.timing import bench_train_config, decoded_tokens  # light: jax and torch load after configure_threads

    decoded = decoded_tokens(args.steps, args.rounds, args.warmup) if args.mode == "decode" else 0
    # the default prompt leaves room for the decoded tokens: `--mode decode` alone was refused on tiny (256 + 5 > 256)
    room = min(s.max_seq_len for _, s in specs) - decoded
    seq = args.seq if args.seq is not None else min(256, max(room, 1))
    given = args.seq_from if args.seq is not None else "the default --seq-len"  # a too long --steps: not the user's
    args.seq = seq
    for label, spec in specs:
        if seq > spec.max_seq_len:
            raise UsageError(f"{given} {seq} exceeds max_seq_len={spec.max_seq_len} of {label}")
        if seq + decoded > spec.max_seq_len:
            raise UsageError(f"--mode decode: {given} {seq} prompt tokens + {decoded} decoded (--steps/--rounds, "
                             f"or 1 + --warmup) exceed max_seq_len={spec.max_seq_len} of {label}")
    backends = BACKENDS[args.backend]
    if args.plot and (bars := len(specs) * len(backends)) > MAX_LINES:  # replot.py refused it; this drew for minutes
        raise UsageError(f"--plot: {len(specs)} variant(s) x {len(backends)} backend(s) are {bars} bars; one chart "
                         f"draws at most {MAX_LINES}: plot fewer in one run, or leave --plot out")
    if "hf" in backends:
        from shared_config.formats.hf import unsupported_options

        for label, spec in specs:
            if problems := unsupported_options(spec):
                raise UsageError(f"--backend hf: {label} has no Hugging Face Llama equivalent: {', '.join(problems)}")
    shards = args.shards
    split = (shards or world_size()) if shards or args.parallel else None  # (train mode only) the mesh or the ranks
    train_config = bench_train_config(args, specs, split) if args.mode == "train" else None  # before the imports
    check_jobs_memory(args, specs, backends, seq, decoded)
    configure_threads(args.threads, shards)
    args.cache_state = cache_state(use_compile_cache(args.compile_cache))  # cold or warm: env.compile_cache
    from bench.timing import run_benchmarks

    rank0 = env_int("RANK") == 0  # under torchrun every rank times its step; rank 0 reports
    args.quiet = args.quiet or not rank0  # and shows the progress, as train.py's: each rank drew its own bars

    def on_progress(partial, device):  # the JSON as of the last measured row: a stopped run keeps it
        if rank0:
            write_report(args.json, {"env": environment(args, device), **partial}, complete=False)

    try:
        results, device = run_benchmarks(args, specs, backends, kernels, train_config, on_progress, during)
    except Exception as e:
        if is_out_of_memory(e):
            raise ResourceError(f"the {getattr(args, 'job', 'benchmark')} ran out of memory at batch {args.batch} x "
                                f"seq {seq}: lower --batch-size or --seq-len") from e
        raise
    if rank0:
        report = {"env": {**environment(args, device), "load": machine_load(args, before, during)},
                  "results": results}
        print_table(report)
        if device.startswith("cpu") and (problems := load.fairness_problems(before, during, args.threads, results)):
            print(load.warning_line(problems), file=sys.stderr)
        if over := [f"{r['backend']} {r['variant']} {100 * r['mfu']:.0f}%" for r in results if (r["mfu"] or 0) > 1]:
            peak = f"--peak-tflops {args.peak_tflops:g}" if args.peak_tflops else "the device's peak (bench/flops.py)"
            print(f"warning: MFU above 100% ({', '.join(over)}): {peak} is below the rate the step reached; give the "
                  f"chip's dense {args.dtype} peak in TFLOP/s (--peak-tflops)", file=sys.stderr)
        write_report(args.json, report, complete=True)
        if args.plot:
            from bench.plot import plot_results

            plot_results(report, args.plot)
    if args.parallel:  # a torchrun rank (parse_args sets it there alone): leave without torch's teardown at exit
        from torch_model.distributed import exit_rank

        exit_rank()


def check_jobs_memory(args, specs: list, backends: list[str], seq: int, decoded: int) -> None:
    """Refuse (ResourceError), before anything is allocated, a job that cannot fit in memory, and, on a machine without
    an accelerator, the jobs together: every (variant, backend) keeps its model and optimizer state between the
    interleaved rounds, so a sweep whose jobs each fit one at a time was killed by the machine mid-run. Together:
    each job's framework state (train: weights, gradients, AdamW's two moments in float32; else the weights; decode:
    its cache of the `seq` prompt tokens and the `decoded` ones), plus the most any one job needs above that while it
    steps."""
    memory = {"grad_accum_steps": args.grad_accum or 1, "remat": args.remat or "none",
              "loss_chunk": args.loss_chunk or 0}
    kept, step = [], []
    for label, spec in specs:
        need = (train_bytes(spec, args.batch, seq, **memory) if args.mode == "train"
                else forward_bytes(spec, args.batch, seq))
        if args.mode == "decode":  # and the cache of the prompt and every token decoded
            need += cache_bytes(spec, args.batch, seq + decoded)
        check_memory(need, f"the {args.mode} job of {label} at batch {args.batch} x seq {seq}",
                     "lower --batch-size or --seq-len, or the model's sizes")
        state = (16 if args.mode == "train" else 4) * layout_size(spec)[1]
        kept += [state] * len(backends)
        step.append(need - state)
    if len(kept) > 1 and not accelerator_present():  # on an accelerator the states live in its memory
        check_memory(sum(kept) + max(step), f"{len(kept)} {args.mode} jobs resident at once ({len(specs)} "
                     f"variant(s) x {len(backends)} backend(s)) at batch {args.batch} x seq {seq}",
                     "time fewer variants or backends in one run (one backend a process), or lower the sizes")


def machine_load(args, before: dict, during: list[dict]) -> dict:
    """The machine's load for the JSON: snapshots before the run and after each round (bench/load.py) and the
    threads each framework was given."""
    return {"before": before, "during": during, "threads": args.threads}


def print_table(report: dict) -> None:
    results, gpu = report["results"], any(r["mfu"] is not None for r in report["results"])
    width = max([28, *(len(r["variant"]) for r in results)])  # a longer label pushed every column after it
    head = (f"{'backend':<7} {'variant':<{width}} {'step ms (p10-p90)':>22} {'tokens/s':>10} "
            f"{'TFLOP/s' if gpu else 'GFLOP/s':>8} {'MFU':>6} {'compile s':>9} {'peak MiB':>8}  attention")
    print(f"# {report_title(report['env'])}")
    print(head)
    for r in results:
        s = r["step_s"]
        rate = r["tflops"] if gpu else r["tflops"] * 1e3
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_bytes'] / 2**20:.0f}" if r["peak_mem_bytes"] else "-"
        step = f"{figure(1e3 * s['median'], 2)} ({figure(1e3 * s['p10'], 2)}-{figure(1e3 * s['p90'], 2)})"
        prefill = f"  prefill {figure(1e3 * r['prefill_s']['median'], 2)} ms" if "prefill_s" in r else ""
        print(f"{r['backend']:<7} {r['variant']:<{width}} {step:>22} {figure(r['tokens_per_s'], 0):>10} "
              f"{figure(rate, 2):>8} {mfu:>6} {figure(r['compile_s'], 1):>9} {mem:>8}  {r['attention']}{prefill}")
    by = {(r["variant"], r["backend"]): r["step_s"]["median"] for r in results}
    chips = {(r["variant"], r["backend"]): r.get("chips", 1) for r in results}

    def ratio(variant: str, a: str, b: str) -> str:  # --devices 2 --backend both: JAX's 2 chips against torch's 1
        apart = chips[variant, a] != chips[variant, b]
        return (f"{a}/{b} {by[variant, a] / by[variant, b]:.2f}"
                + (f" ({a} on {chips[variant, a]} chips, {b} on {chips[variant, b]})" if apart else ""))

    ratios = []
    for variant in dict.fromkeys(r["variant"] for r in results):
        parts = []
        if (variant, "jax") in by and (variant, "torch") in by:
            parts.append(ratio(variant, "jax", "torch"))
        for twin in ("jax", "torch"):
            if (variant, twin) in by and (variant, "hf") in by:
                parts.append(ratio(variant, twin, "hf"))
        if parts:
            ratios.append(f"{variant}: {', '.join(parts)}")
    if ratios:
        print("step-time ratio (lower is faster): " + "; ".join(ratios))


if __name__ == "__main__":
    run(main)
