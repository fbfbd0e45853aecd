"""Forward+backward of one GLA layer's core, per twin and kernel: time, peak memory and distance to the pure form.

    python bench/gla_layer.py [--batch 1 --heads 4 --tokens 2048 --key 96 --value 192 --repeats 5]
    python bench/gla_layer.py --kernel pure,pallas,fla --batch 8 --json gla.json      # on a GPU
    python bench/gla_layer.py --compile-step gla-small --batch 8 --tokens 2048

Times each twin's kernels (--kernel, comma-separated: pure, the two-level chunk form `chunked_gla`; recurrent,
`recurrent_gla`; pallas, the JAX twin's Pallas kernel; fla, flash-linear-attention's chunk_gla in the torch twin)
of the checkout on PYTHONPATH: the gradient of Σ o·co + Σ S·cS (random cotangents, as a real backward gets: a
plain sum's broadcast gradient sends torch's bmm down a slow path) with respect to q, k, v, gates and the initial
state. JAX: the jitted gradient, compile time (first call) reported separately. One row per (twin, kernel): median
and min of the repeats in seconds, peak memory in MiB (JAX: XLA's memory analysis of the compiled gradient; torch:
CUDA's peak during the last repeat alone, the one before freed first; none on a CPU) and `max_rel_err`, the
largest max|Δ| / max|pure| over the outputs, the last state and every gradient against the same twin's pure form
in float32 (0 for pure itself). The table goes to stdout a row at a time (`--json -`: the JSON alone, the table to
stderr); progress on stderr, a call at a time (a bar on a terminal, a plain line every 10 s otherwise; --quiet:
none). Gates are logsigmoid(4·N(0, 1)) / 16 (gla's normalizer), float32. A GPU kernel is refused in one line
where it cannot run. To compare two checkouts, run the script under each one's PYTHONPATH. --compile-step SPEC:
instead, the seconds XLA takes to lower and compile the JAX twin's jitted train step (forward, backward, AdamW; the
default train config) of SPEC at --batch x --tokens, with progress by stage (build, lower, compile), its elapsed
time shown again during each (every second on a terminal, every 10 s otherwise; --quiet: none).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shared_config import SpecError
from shared_config.cli import Parser, UsageError, at_least, check_outputs, no_repeats, nonempty, run
from shared_config.progress import PlainBar, progress
from shared_config.report import report_on_stdout, write_report
from shared_config.resources import check_memory, layout_size
from shared_config.twins import twin


def inputs(B, H, T, K, V, seed=0):
    """q, k, v, log-gates [B, H, T, ·] and a state [B, H, K, V], then the cotangents of the outputs [B, H, T, V]
    and of the last state [B, H, K, V]: float32 numpy."""
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((B, H, T, K), np.float32) * K**-0.5 for _ in range(2))
    v = rng.standard_normal((B, H, T, V), np.float32)
    g = (-np.logaddexp(0, -4 * rng.standard_normal((B, H, T, K))) / 16).astype(np.float32)
    co, cS = rng.standard_normal((B, H, T, V), np.float32), rng.standard_normal((B, H, K, V), np.float32)
    return (q, k, v, g, np.zeros((B, H, K, V), np.float32)), (co, cS)


KERNELS = {"jax": ("pure", "recurrent", "pallas"), "torch": ("pure", "recurrent", "fla")}


def gla_form(name: str, kernel: str):
    """The function timed, from twin `name`: outputs and last state of q, k, v, gates, state."""
    gla = twin(name, "gla")
    if kernel == "recurrent":
        return gla.recurrent_gla
    if kernel == "pure":
        return lambda *a: gla.chunked_gla(*a, gla.CHUNK)
    kernels = twin(name, "gla_kernel")
    return kernels.pallas_gla if kernel == "pallas" else kernels.fla_gla


def max_rel_err(got: list, want: list) -> float:
    """The largest max|Δ| / max|want| over paired float32 arrays (outputs, state, gradients)."""
    return max(float(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30)) for g, w in zip(got, want))


def time_jax(args, arrays, cotangents, kernel, on_call=None):
    """(compile s, step seconds, peak bytes, results: outputs and gradients as numpy); `on_call()` after every call
    (progress)."""
    import jax
    import jax.numpy as jnp

    form = gla_form("jax", kernel)
    loss = lambda xs, cs: sum(jnp.sum(x * c) for x, c in zip(form(*xs), cs))  # noqa: E731
    grad = jax.jit(jax.value_and_grad(loss))
    xs, cs = [jnp.asarray(a) for a in arrays], [jnp.asarray(a) for a in cotangents]
    memory = grad.lower(xs, cs).compile().memory_analysis()
    peak = (None if memory is None
            else memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes)
    t0 = time.perf_counter()
    jax.block_until_ready(grad(xs, cs))
    compile_s, times, on_call = time.perf_counter() - t0, [], on_call or (lambda: None)
    on_call()
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(grad(xs, cs))
        times.append(time.perf_counter() - t0)
        on_call()
    outputs = [np.asarray(y) for y in form(*xs)] + [np.asarray(g) for g in grad(xs, cs)[1]]
    return compile_s, times, peak, outputs


class NoPeak:
    """A device whose allocator the bench does not read (CPU): nothing to reset or wait for, no peak."""

    def reset(self) -> None:
        pass

    def sync(self) -> None:
        pass

    def peak(self) -> None:
        return None


class CudaPeak(NoPeak):
    """torch's CUDA allocator: bytes allocated at most since the last `reset`, read after the device has finished."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda

    def reset(self) -> None:
        self.cuda.synchronize()
        self.cuda.reset_peak_memory_stats()

    def sync(self) -> None:
        self.cuda.synchronize()

    def peak(self) -> int:
        return self.cuda.max_memory_allocated()


def measure(repeats: int, make_inputs, run, memory: NoPeak, on_call=None):
    """`run(make_inputs())` 1 + `repeats` times, the first untimed (a warm-up: fla's Triton autotuning): the seconds
    of each timed call (inputs made before the clock starts), the last call's peak bytes (`memory`: a NoPeak or
    CudaPeak; None from NoPeak) and the last call's (inputs, outputs). Each peak covers its own call alone: the
    previous call's inputs, outputs and gradients are freed before `memory.reset()` (kept, they were counted in the
    next call's peak: ~50 MB at gla-small's geometry). `on_call()` after every call (progress)."""
    times, peak, last = [], None, None
    for r in range(repeats + 1):
        last = None  # the previous call's tensors go before the peak counter restarts
        memory.reset()
        inputs = make_inputs()
        t0 = time.perf_counter()
        outputs = run(inputs)
        memory.sync()
        if r:
            times.append(time.perf_counter() - t0)
        peak = memory.peak()
        last = (inputs, outputs)
        del inputs, outputs  # `last` alone holds them, so that the next call's `last = None` frees them
        if on_call:
            on_call()
    return times, peak, last


def time_torch(args, arrays, cotangents, kernel, on_call=None):
    """(None: eager torch compiles nothing, step seconds, peak bytes (CUDA; None on a CPU), results: outputs and
    gradients as numpy)."""
    import torch

    form, device = gla_form("torch", kernel), "cuda" if torch.cuda.is_available() else "cpu"

    def make_inputs():
        return ([torch.tensor(a, device=device, requires_grad=True) for a in arrays],
                [torch.tensor(a, device=device) for a in cotangents])

    def run(inputs):
        xs, cs = inputs
        ys = form(*xs)
        sum((y * c).sum() for y, c in zip(ys, cs)).backward()
        return ys

    memory = CudaPeak() if device == "cuda" else NoPeak()
    times, peak, ((xs, _), ys) = measure(args.repeats, make_inputs, run, memory, on_call)
    outputs = [y.detach().cpu().numpy() for y in ys] + [x.grad.cpu().numpy() for x in xs]
    return None, times, peak, outputs


def check_kernels(kernels: list[str], backends: list[str], if_present: bool = False) -> list[tuple[str, str]]:
    """(twin, kernel) pairs to run; a kernel no asked twin has, or a GPU kernel this machine cannot run, is a
    UsageError naming it (with `if_present`, the latter is left out, with a note on stderr)."""
    from shared_config.hardware import HardwareError, resolve_gla_kernel

    jobs = [(b, k) for b in backends for k in kernels if k in KERNELS[b]]
    for k in kernels:
        if not any(k in KERNELS[b] for b in backends):
            have = "; ".join(f"{b}: " + ", ".join(KERNELS[b]) for b in backends)
            raise UsageError(f"--kernel {k}: no asked twin has it ({have})")
    skipped = []
    for b, k in list(jobs):
        if k in ("pallas", "fla"):
            platform = twin(b, "attention").device_platform()
            try:
                resolve_gla_kernel(k, b, platform,
                                   twin("torch", "gla_kernel").fla_installed() if b == "torch" else False)
            except HardwareError as e:
                if not if_present:
                    raise UsageError(f"--kernel {k}: {e}") from None
                skipped.append(f"the {b} twin's {k}: {e}")
                jobs.remove((b, k))
    if not jobs:  # every kernel skipped: an empty table and exit 0, as if they had been timed
        raise UsageError(f"--if-present: every asked kernel is skipped here, nothing to time ({skipped[0]}); add pure "
                         "to --kernel, or run on a machine that has them")
    for note in skipped:
        print(f"note: skipped {note}", file=sys.stderr)
    return jobs


def compile_step(spec_name, batch, tokens, quiet=True):
    """Seconds to lower and compile the JAX twin's train step of `spec_name` on [batch, tokens] int32 tokens; progress
    on stderr by stage (build, lower, compile), shown again every while during each (XLA's compile is one call of
    12 s or more: it showed nothing), none when `quiet`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jax_model
    from jax_model import train
    from shared_config import load_spec, load_train_config

    spec, cfg = load_spec(spec_name), load_train_config(None)
    if tokens > spec.max_seq_len:  # refused here in one line: the trace raised it as a traceback
        raise UsageError(f"--tokens {tokens} exceeds max_seq_len={spec.max_seq_len} of {spec_name}")
    # the model and its train state (weights and AdamW's two moments, float32) are built to be lowered
    check_memory(3 * 4 * layout_size(spec)[1], f"--compile-step {spec_name}'s train state", "a smaller spec")
    # stages take their own times: no rate, no ETA
    with progress(total=3, desc=f"jax train step of {spec_name}", postfix="build the model and its train state",
                  bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} stages [{elapsed}{postfix}]", quiet=quiet) as bar, \
            ticking(bar):
        def next_stage(name):
            bar.set_postfix_str(name, refresh=False)
            bar.update()
            bar.refresh()  # the stage now, whether or not the update showed a line

        model = jax_model.Transformer(spec, rngs=nnx.Rngs(0))
        state, step = train.init_train_state(model, cfg), train.make_train_step(model, cfg)
        next_stage("lower")
        t0 = time.perf_counter()
        lowered = step.lower(state, jax.ShapeDtypeStruct((batch, tokens), jnp.int32))
        next_stage("compile")
        lowered.compile()
        seconds = time.perf_counter() - t0
        next_stage("done")
    return seconds


@contextlib.contextmanager
def ticking(bar):
    """Show `bar` again every while (a second on a terminal, its line interval otherwise) from a thread, so that its
    elapsed time moves during one long call that reports nothing (XLA's compile)."""
    done = threading.Event()

    def tick():
        while not done.wait(bar.mininterval if isinstance(bar, PlainBar) else 1.0):
            with bar.get_lock():
                bar.display(str(bar))  # a message: PlainBar leaves out a redraw of a position it has shown

    thread = threading.Thread(target=tick, name="compile-progress", daemon=True)
    if not bar.disable:
        thread.start()
    try:
        yield
    finally:
        done.set()
        if thread.is_alive():
            thread.join()


# the layer's options (--compile-step times a train step of --batch x --tokens and reads none of them) and defaults
LAYER_OPTIONS = {"heads": 4, "key": 96, "value": 192, "repeats": 5, "kernel": "pure", "backend": "both"}
SHAPE_OPTIONS = {"batch": 1, "tokens": 2048}  # read by both


def parse_args(argv):
    p = Parser(description=__doc__.splitlines()[0])
    for flag in ("batch", "heads", "tokens", "key", "value", "repeats"):
        p.add_argument(f"--{flag}", type=at_least(1), default=SHAPE_OPTIONS.get(flag),  # the layer's: set below
                       help=f"(default {SHAPE_OPTIONS.get(flag, LAYER_OPTIONS.get(flag))})")
    p.add_argument("--kernel", help="comma-separated: pure, recurrent, pallas (JAX), fla (torch) (default: pure)")
    p.add_argument("--recurrent", action="store_true", help="the same as --kernel recurrent")
    p.add_argument("--if-present", action="store_true",
                   help="skip (and list) a GPU kernel this machine cannot run instead of refusing the run")
    p.add_argument("--backend", choices=("jax", "torch", "both"), help="(default: both)")
    p.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--compile-step", type=nonempty, metavar="SPEC",
                   help="time the compile of the JAX train step of SPEC instead")
    args = p.parse_args(argv)
    # refused, not ignored: `--compile-step tiny --json t.json` wrote no JSON and exited 0
    given = [f"--{k.replace('_', '-')}" for k in (*LAYER_OPTIONS, "recurrent", "if_present", "json")
             if getattr(args, k) not in (None, False)]
    if args.compile_step and given:
        raise UsageError(f"{given[0]}: an option of the layer's timing; --compile-step times the JAX train step of "
                         f"--batch x --tokens alone and prints its seconds (drop {given[0]})")
    if args.recurrent and args.kernel is not None:  # --kernel pure --recurrent ran recurrent alone
        raise UsageError("--recurrent is --kernel recurrent: pass one of them")
    for k, default in LAYER_OPTIONS.items():
        setattr(args, k, default if getattr(args, k) is None else getattr(args, k))
    return args


def input_bytes(B, H, T, K, V) -> int:
    """float32 bytes of `inputs`' arrays: q, k, gates [B, H, T, K]; v and its cotangent [B, H, T, V]; two states."""
    return 4 * B * H * (3 * T * K + 2 * T * V + 2 * K * V)


def table_row(row: dict) -> str:
    """One row of the table on stdout: twin, kernel, median and min seconds, compile s, peak MiB, max_rel_err."""
    peak, error = row["peak_mem_bytes"], row["max_rel_err"]
    # three significant digits: `.3f` showed a GPU kernel's 0.4 ms as 0.000 s
    cells = [row["twin"], row["kernel"], f"{row['median_s']:.3g}", f"{row['min_s']:.3g}",
             "" if row["compile_s"] is None else f"{row['compile_s']:.2f}", f"{peak / 2**20:.0f}" if peak else "-",
             "-" if error is None else f"{error:.1e}"]
    return f"| {' | '.join(cells)} |"


def main(argv=None):
    args = parse_args(argv)
    # before JAX starts its GPU client: preallocating 75% of the GPU would leave torch's kernels the rest
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    check_outputs(args.json)  # before any work: a bad --json failed after every kernel had run
    with report_on_stdout(args.json):  # `--json -`: the table goes to stderr
        return time_kernels(args)


def time_kernels(args):
    if args.compile_step:
        try:
            seconds = compile_step(args.compile_step, args.batch, args.tokens, args.quiet)
        except SpecError as e:
            raise UsageError(f"--compile-step: {e}") from None
        print(f"# jax train step of {args.compile_step}, batch {args.batch} x {args.tokens}: compile {seconds:.1f} s")
        return 0
    kernels = ["recurrent"] if args.recurrent else [k.strip() for k in args.kernel.split(",") if k.strip()]
    no_repeats("--kernel", kernels)
    if not kernels:  # `--kernel ''` ran nothing and reported success
        raise UsageError(f"--kernel {args.kernel!r} names no kernel: one or more of pure, recurrent, pallas, fla")
    if unknown := [k for k in kernels if k not in KERNELS["jax"] + KERNELS["torch"]]:
        raise UsageError(f"--kernel {unknown[0]}: one of pure, recurrent, pallas, fla")
    jobs = check_kernels(kernels, ["jax", "torch"] if args.backend == "both" else [args.backend], args.if_present)
    shape = (args.batch, args.heads, args.tokens, args.key, args.value)
    # a lower bound: the inputs, the gradients of as much again and the outputs (before numpy allocates them)
    check_memory(3 * input_bytes(*shape), f"the gla layer at B {args.batch} H {args.heads} T {args.tokens} K "
                 f"{args.key} V {args.value}", "lower --batch, --heads, --tokens, --key or --value")
    arrays, cotangents = inputs(*shape)
    checkout = os.path.dirname(os.path.dirname(twin("jax", "gla").__file__))
    print(f"# gla fwd+bwd, B {args.batch} H {args.heads} T {args.tokens} K {args.key} V {args.value}, from {checkout}")
    print("| twin | kernel | median s | min s | compile s | peak MiB | max_rel_err |\n|---|---|---|---|---|---|---|")
    rows, pure = [], {}
    # progress on stderr, a call at a time (a first call can take minutes: fla's autotuning, Pallas' compile)
    with progress(total=len(jobs) * (args.repeats + 1), desc="gla fwd+bwd", unit="call", quiet=args.quiet) as bar:
        for name, kernel in sorted(jobs, key=lambda job: (job[0], job[1] != "pure")):  # each twin's pure form first
            bar.set_postfix(refresh=False, job=f"{name} {kernel}")
            compile_s, times, peak, outputs = (time_jax if name == "jax" else time_torch)(args, arrays, cotangents,
                                                                                          kernel, bar.update)
            if kernel == "pure":
                pure[name] = outputs
            error = max_rel_err(outputs, pure[name]) if name in pure else None
            rows.append({"twin": name, "kernel": kernel, "median_s": statistics.median(times), "min_s": min(times),
                         "compile_s": compile_s, "peak_mem_bytes": peak, "max_rel_err": error})
            tqdm.write(table_row(rows[-1]), file=sys.stdout)  # above a bar on a terminal, not into it
            sys.stdout.flush()
            if args.json:
                write_report(args.json, {"env": vars(args) | {"json": str(args.json)}, "results": rows},
                             complete=False)
    if args.json:
        write_report(args.json, {"env": vars(args) | {"json": str(args.json)}, "results": rows}, complete=True)
    return 0

if __name__ == "__main__":
    run(main)
