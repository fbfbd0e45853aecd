"""Where a step's time goes: kernel time per category, for each twin, from the frameworks' profilers.

    python bench/profile_step.py --backend both --spec small --compute-dtype bfloat16 --seq-len 2048 --batch-size 8
    python bench/profile_step.py --backend both --json profile.json        # tiny, on this machine

The step is the bench's (bench/runners.py: same model, data, dtype policy, attention kernel), compiled
and warmed up, then `--steps` steps run under `torch.profiler` or `jax.profiler`. Every kernel goes in
one category: matmul (GEMMs), attention (fused attention kernels: flash, cuDNN, torch's CPU SDPA),
optimizer (fused AdamW, where the kernel is named so: XLA fuses optax's update into loop fusions,
which land in `other`), copy (memcpy/memset) and other (elementwise, reductions, the cross-entropy).
JAX kernels are classified by the HLO instruction that launched them (a fusion holding a dot is a
matmul), torch kernels by name. For matmul and attention the table gives the rate their kernels
reach on the model FLOPs they compute (shared_config/flops.py: 6·N and 12·L·H·E·T per token in train mode, a
fused causal attention kernel's half of it; when attention runs as plain matmuls, all of it counts under matmul; a
GLA layer's recurrence, 12·H·K'·V', counts under matmul, as its chunk form computes it),
which says whether a low MFU is slow GEMMs or time spent outside them. On a GPU, `idle` is the step's wall
time the device ran no kernel (launch gaps, host work).

On a CPU the units are torch's aten operators (self CPU time) and XLA:CPU's thunks (one per HLO
instruction, traced with --xla_cpu_enable_xprof_traceme). XLA:CPU runs independent thunks
concurrently, so their times can sum past the step's wall time: then they are thread-time, shares
are of their sum, and no FLOP rate is given. Profiling slows a CPU step down: compare shares, and
take step times from bench/compare.py.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from shared_config.cli import Parser, UsageError, at_least, check_outputs, run
from shared_config.compile_cache import cache_state, use_compile_cache
from shared_config.report import report_on_stdout, write_report
from shared_config.resources import check_memory, forward_bytes, train_bytes

from bench.options import (
    BACKENDS, add_job_options, add_report_options, check_used_options, configure_threads, environment, job_inputs,
    kernels, memory_options, variants,
)
from bench.plot import figure
from bench.runners import without_profiler_chatter

# First match wins: attention before matmul (flash kernels' names mention gemm-like tiles).
CATEGORIES = [
    ("attention", re.compile(r"flash|fmha|sdpa|_mha|attention|scaled_dot_product")),
    ("matmul", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|triton_tem|aten::(mm|addmm|bmm|matmul|linear)$|"
                          r"(^|_)mm(_|$)|(^|[_.])dot")),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach")),
    ("copy", re.compile(r"memcpy|memset|aten::(copy_|to|_to_copy|contiguous|clone)$")),
]
ORDER = ["matmul", "attention", "other", "optimizer", "copy", "idle"]
# Both profilers keep every event of the profiled steps in memory: torch's about 4 MiB per layer and step (12 MiB a
# step of tiny's 3 layers, measured on CPU), so --steps 100000 grew until the machine killed the process. Shares
# settle within a few steps; more than this many are refused.
MAX_STEPS = 100
TRACE_BYTES_PER_LAYER_STEP = 4 * 2**20


def category(kernel: str, hlo: dict[str, str] | None = None, hlo_op: str | None = None) -> str:
    """The category of a kernel (on CPU: a torch operator or an XLA thunk): from the HLO instruction that
    launched it when the trace names one (JAX), else from the kernel's name."""
    if hlo and hlo_op in hlo and hlo[hlo_op] != "other":
        return hlo[hlo_op]
    name = kernel.lower()
    return next((c for c, pattern in CATEGORIES if pattern.search(name)), "other")


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


def hlo_categories(text: str) -> dict[str, str]:
    """{HLO instruction: matmul | attention | other} over an optimized HLO module's text: an instruction is a
    matmul if it is (or fuses) a dot or a GEMM custom call, attention if it is (or fuses) an attention custom
    call (cuDNN's fused attention). Kernel names alone cannot say this for XLA's fusions."""
    computations: dict[str, list[tuple[str, str, list[str], str]]] = {}
    body = None
    for line in text.splitlines():
        if m := _COMPUTATION.match(line):
            body = computations.setdefault(m.group(1), [])
        elif body is not None and (m := _INSTRUCTION.match(line)):
            name, rest = m.groups()
            opcode = re.search(r"([a-z][\w\-]*)\(", rest)
            target = re.search(r'custom_call_target="([^"]+)"', rest)
            calls = re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", rest)
            body.append((name, opcode.group(1) if opcode else "", calls, target.group(1).lower() if target else ""))
    kinds: dict[str, str] = {}

    def computation_kind(name: str, seen: frozenset = frozenset()) -> str:
        if name not in kinds:
            found = {instruction_kind(*i[1:], seen | {name}) for i in computations.get(name, []) if name not in seen}
            kinds[name] = next((k for k in ("attention", "matmul") if k in found), "other")
        return kinds[name]

    def instruction_kind(opcode: str, calls: list[str], target: str, seen: frozenset) -> str:
        if opcode == "custom-call" and re.search(r"fmha|flash|attention|sdpa", target):
            return "attention"
        if opcode in ("dot", "convolution") or (opcode == "custom-call" and re.search(r"gemm|cublas|matmul", target)):
            return "matmul"
        found = {computation_kind(c, seen) for c in calls}
        return next((k for k in ("attention", "matmul") if k in found), "other")

    return {name: instruction_kind(opcode, calls, target, frozenset())
            for body in computations.values() for name, opcode, calls, target in body}


def parse_args(argv):
    p = Parser(description=__doc__.splitlines()[0])
    add_job_options(p, backends=["both", "jax", "torch"], backend_help="the twins to profile",
                    modes=["train", "forward"], mode_help="what one profiled step runs",
                    steps=5, steps_help=f"profiled steps (at most {MAX_STEPS})", compiled="torch")
    p.add_argument("--top", type=at_least(1), default=12, help="kernels listed per backend")
    add_report_options(p)
    args = p.parse_args(argv)
    if args.steps > MAX_STEPS:
        raise UsageError(f"--steps {args.steps}: at most {MAX_STEPS} profiled steps (the profilers keep every event in "
                         "memory; a kernel's share settles within a few steps)")
    check_outputs(args.json, cache=args.compile_cache, inputs=job_inputs(args))
    check_used_options(args)
    memory_options(args)  # --train-config's grad_accum_steps, remat and loss_chunk, for the report's env
    # for bench/options.py's helpers
    args.sweep, args.rounds, args.mesh, args.devices, args.parallel = [], 1, None, None, None
    return args


def torch_kernels(bench, steps: int) -> tuple[dict[tuple[str, str | None], float], float]:
    """{(kernel name, None): microseconds over `steps` steps} and the wall time of those steps in seconds."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    gpu = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with without_profiler_chatter(), profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            bench.sync(bench.step())
        wall = time.perf_counter() - t0
    times = defaultdict(float)
    for e in prof.key_averages():
        if gpu and e.device_type == DeviceType.CUDA:  # a kernel, memcpy or memset
            times[e.key, None] += e.self_device_time_total
        elif not gpu and e.key.startswith("aten::"):  # operators, each counted once (self time)
            times[e.key, None] += e.self_cpu_time_total
    return dict(times), wall


def trace_kernels(events: list[dict]) -> dict[tuple[str, str | None], float]:
    """{(kernel name, HLO instruction): microseconds} from a jax.profiler trace's events (Chrome trace format).

    On a GPU, kernels sit on the "Stream #N" lines of a "/device:GPU:N" process (its "XLA Ops" and "XLA
    Modules" lines repeat them at coarser grain and are skipped). On a CPU, XLA:CPU's thunks appear on the
    host's threads when --xla_cpu_enable_xprof_traceme is on, each naming its HLO instruction.
    """
    names = {(e.get("pid"), e.get("tid")): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name")}
    gpu_streams = {(pid, tid) for (pid, tid), name in names.items() if tid is not None and name.startswith("Stream")
                   and names.get((pid, None), "").startswith("/device:GPU")}
    times = defaultdict(float)
    for e in events:
        if e.get("ph") != "X" or e["name"].startswith("end: "):
            continue
        hlo_op = e.get("args", {}).get("hlo_op")
        if (e.get("pid"), e.get("tid")) in gpu_streams or (not gpu_streams and hlo_op):
            times[e["name"], hlo_op] += float(e.get("dur", 0.0))
    return dict(times)


def jax_kernels(bench, steps: int) -> tuple[dict[tuple[str, str | None], float], float]:
    """{(kernel name, HLO instruction): microseconds over `steps` steps} from a jax.profiler trace, and the wall
    time."""
    import jax

    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            t0 = time.perf_counter()
            for _ in range(steps):
                bench.sync(bench.step())
            wall = time.perf_counter() - t0
        with gzip.open(next(Path(logdir).rglob("perfetto_trace.json.gz"))) as f:
            trace = json.load(f)
    times = trace_kernels(trace["traceEvents"] if isinstance(trace, dict) else trace)
    if not times:
        raise RuntimeError("the JAX trace has no kernel events (no GPU stream lines, no XLA:CPU thunks)")
    return times, wall


def breakdown(backend: str, spec, args, times_us: dict, wall_s: float, device: str, hlo: dict | None) -> dict:
    """Per-category milliseconds per step, shares of the step, and the model-FLOP rate of matmul and attention."""
    from shared_config.flops import flops_split, mixer_flops

    step_ms = 1e3 * wall_s / args.steps
    ms, per_kernel = defaultdict(float), defaultdict(float)
    for (name, hlo_op), us in times_us.items():
        t = us / 1e3 / args.steps
        ms[category(name, hlo, hlo_op)] += t
        per_kernel[re.sub(r"\.\d+$", "", name), category(name, hlo, hlo_op)] += t  # XLA's fusion.12, fusion.13: one row
    busy = sum(ms.values())
    # Kernel times that sum past the wall time ran concurrently (XLA:CPU's thunks on several threads): they are
    # thread-time, so shares are of their sum and no FLOP rate is given.
    overlapping = busy > step_ms
    if not device.startswith("cpu"):
        ms["idle"] = max(step_ms - busy, 0.0)
    tokens = args.batch * args.seq
    matmul, attention = flops_split(spec, args.seq, args.mode)
    # a fused kernel (flash, cuDNN, SDPA) skips the causal mask's upper half: its rate is on the causal count (on
    # all T keys it read twice the kernel's rate, past the device's peak at 55%)
    fused = flops_split(spec, args.seq, args.mode, causal=True)[1]
    # GLA layers' recurrence is no attention kernel's work (a hybrid stack's SDPA rate took it): with the matmuls,
    # as the chunk form computes it
    gla = (3 if args.mode == "train" else 1) * spec.layer_mixers.get("gla", 0) * mixer_flops(spec, "gla", args.seq)
    matmul, attention, fused = matmul + gla, attention - gla, fused - gla
    model_flops = {"matmul": matmul * tokens, "attention": fused * tokens}
    if "attention" not in ms:  # attention ran as plain matmuls (the einsum/blocked kernels): all T keys, under matmul
        model_flops["matmul"] += attention * tokens
        del model_flops["attention"]
    categories = {}
    for c in ORDER:
        if c in ms:
            categories[c] = {"ms": ms[c], "share": ms[c] / (busy if overlapping else step_ms)}
            if c in model_flops and ms[c] > 0 and not overlapping:
                categories[c]["tflops"] = model_flops[c] / (ms[c] / 1e3) / 1e12
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[: args.top]
    total_flops = tokens * (matmul + attention)
    return {"backend": backend, "step_ms": step_ms, "busy_ms": busy, "overlapping": overlapping,
            "tflops": total_flops / (step_ms / 1e3) / 1e12,
            "categories": categories, "top": [{"name": n, "ms": t, "category": c} for (n, c), t in top]}


def main(argv=None):
    args = parse_args(argv)
    with report_on_stdout(args.json):  # `--json -`: the table goes to stderr
        return profile(args)


def profile(args):
    (label, spec), = variants(args)
    args.seq = args.seq if args.seq is not None else min(256, spec.max_seq_len)
    if args.seq > spec.max_seq_len:
        raise UsageError(f"{args.seq_from} {args.seq} exceeds max_seq_len={spec.max_seq_len} of {label}")
    need = ((train_bytes if args.mode == "train" else forward_bytes)(spec, args.batch, args.seq)
            + args.steps * (spec.L + 1) * TRACE_BYTES_PER_LAYER_STEP)  # the step, then the profiler's events
    check_memory(need, f"the {args.mode} job of {label} at batch {args.batch} x seq {args.seq}",
                 "lower --batch-size or --seq-len, or the model's sizes")  # before anything is allocated
    from bench.timing import backend_options, bench_tokens, bench_train_config, check_gla_kernel  # light

    train_config = bench_train_config(args, [(label, spec)]) if args.mode == "train" else None  # before the imports
    configure_threads(args.threads, None)
    args.cache_state = cache_state(use_compile_cache(args.compile_cache))  # cold or warm: env.compile_cache
    # XLA:CPU traces its thunks (one per HLO instruction) only when asked; GPU kernels are always traced.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_enable_xprof_traceme=true".strip()
    from shared_config.progress import progress

    from bench.devices import jax_device_name, torch_device_name
    from bench.runners import setup_jax, setup_torch

    backends = BACKENDS[args.backend]
    compile, names = backend_options(args, kernels)
    check_gla_kernel(args, [(label, spec)], backends)
    tokens = bench_tokens(spec, args)
    device = jax_device_name() if "jax" in backends else torch_device_name()
    results = []
    for backend in progress(backends, desc="profile", quiet=args.quiet):
        setup, profiler = {"jax": (setup_jax, jax_kernels), "torch": (setup_torch, torch_kernels)}[backend]
        bench = setup(spec, tokens, args.mode, names[backend], train_config, compile, gla_kernel=args.gla_kernel)
        for _ in range(1 + args.warmup):  # compile, then warm up
            bench.sync(bench.step())
        times, wall = profiler(bench, args.steps)
        hlo = hlo_categories(bench.hlo()) if bench.hlo else None
        results.append({**breakdown(backend, spec, args, times, wall, device, hlo),
                        "attention_kernel": bench.attention})
        del bench
        # the JSON as of the last profiled backend: a stopped run keeps it
        write_report(args.json, {"env": environment(args, device), "results": results}, complete=False)
    report = {"env": environment(args, device), "results": results}
    print_table(report)
    write_report(args.json, report, complete=True)


def print_table(report: dict) -> None:
    env = report["env"]
    cpu = env["device"].startswith("cpu")
    unit, scale = ("GFLOP/s", 1e3) if cpu else ("TFLOP/s", 1.0)  # a CPU's rates read better in GFLOP/s
    print(f"{env['device']} · {env['spec']} · {env['mode']} · {env['dtype']} · batch {env['batch']} × seq {env['seq']}")
    for r in report["results"]:
        print(f"\n{r['backend']}: {r['step_ms']:.2f} ms per step under the profiler, "
              f"{figure(scale * r['tflops'], 1)} model {unit} ({r['attention_kernel']} attention)")
        print(f"  {'category':<10} {'ms/step':>9} {'share':>7} {unit:>8}")
        if r["overlapping"]:
            print(f"  (kernels ran concurrently: {r['busy_ms']:.1f} ms of thread-time per step; shares are of that)")
        for c, row in r["categories"].items():
            rate = f"{figure(scale * row['tflops'], 1):>8}" if "tflops" in row else f"{'':8}"
            print(f"  {c:<10} {row['ms']:9.2f} {100 * row['share']:6.1f}% {rate}")
        print("  top kernels:" if not cpu else "  top operators:")
        for k in r["top"]:
            print(f"  {k['ms']:9.3f} ms  {k['category']:<9}  {k['name'][:110]}")


if __name__ == "__main__":
    run(main)
