"""The GPU plans of bench/gpu_check.py as data: each check's command, its expected cold-H200 seconds and device
memory, how a plan is fitted to the device (`fit`: a check too big for its memory runs in parts, or not at all),
how the budget is shared (`share`), and the targets read off the checks' reports (`targets`). The runner, which
starts the checks and writes the summary, is bench/gpu_check.py (docs/bench.md, "GPU check")."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from shared_config import ModelSpec

from bench.options import BACKENDS

BUDGET_S = 420  # one plan: 7 minutes of a 15-minute GPU window that also holds the machine's start and a rerun

# Expected seconds on a cold H200 (empty caches), from what one H200 measured (2026-12-04, FIELD_NOTES). The
# first GPU run's summary-<plan>.json files give every check's seconds: recalibrate these from it.
START_S = 15  # a fresh process before its first step (imports, CUDA and cuDNN start, model init); the least sure
#   figure: the old plan's ~900 s over its 9 processes implies ~10 s, a 100 s two-twin run of small ~50 s
COMPILE_S = {"jax": 13, "torch": 20, "hf": 36}  # first step of `small`: jax.jit 12-13 s; torch.compile of a whole
#   step 30-36 s (hf), of the twin block by block ~0.55x that (the ratio this CPU measured at 6 layers, docs/bench.md)
LLAMA_JAX = 1.3  # llama-1b's 16 layers against small's 12: XLA compiles every layer, torch (by blocks) one
STEP_S = {"small-b32": 0.160, "small-b16": 0.080, "small-b8": 0.040, "llama-1b-b4": 0.154}  # at 40% / 54% MFU
# Device memory one job keeps (GiB): its peak on one H200 (bench/results/h200-2026-11-22-*.json); compare.py keeps
# every job's model, optimizer state and allocator pool resident between its rounds, so a check needs the sum over
# its jobs. small at batch 32 doubled from 16; transformers' job ~1.55x the torch twin's (small at batch 8).
JOB_GIB = {"small-b32": {"jax": 39.8, "torch": 42.2}, "small-b16": {"jax": 19.9, "torch": 21.1},
           "small-b8": {"jax": 10.8, "torch": 11.4, "hf": 17.6}, "llama-1b-b4": {"jax": 34.7, "torch": 36.1}}
HF_VS_TORCH = 1.55
FITS = 0.85  # of the device's memory: two frameworks' CUDA contexts and their allocators' fragmentation beside it
STEPS = 12  # timed (10) and warmup (2) steps of every backend, after the compiling one
SWEEP_STEPS = 9  # a sweep's: 8 timed, 1 warmup (its result is a ratio between variants timed in the same rounds)


def job_gib(backends: list[str], step: str, variants: int = 1) -> dict[str, float]:
    """Expected device memory (GiB) of each backend's jobs in one bench process: every variant's peak, kept."""
    per = JOB_GIB[step]
    return {b: variants * per.get(b, HF_VS_TORCH * per["torch"]) for b in backends}


def job_seconds(backends: list[str], step: str, variants: int = 1, cached: float = 1.0,
                steps: int = STEPS) -> dict[str, float]:
    """Expected cold-H200 seconds of each backend's jobs in one bench process: per variant its compilation
    (`cached`: the part not found in the compile cache) and `steps` steps."""
    scale = {"jax": LLAMA_JAX if step.startswith("llama") else 1.0}
    return {b: variants * (scale.get(b, 1.0) * cached * COMPILE_S[b] + steps * STEP_S[step]) for b in backends}


@dataclass
class Check:
    """One command of a GPU plan: its name (and files' stem), the script and arguments, its expected cold-H200
    seconds (`cost`: its share of the budget) and device memory, the spec field it needs and the environment it
    adds."""

    name: str
    argv: list[str]  # a script under the checkout and its arguments
    fixed_s: float  # expected cold-H200 seconds besides its timed jobs': the process's start (START_S), and for a
    #   check with no `jobs_s` (a report, a layer's kernels) all of it
    needs: str | None = None  # a ModelSpec field the check sweeps (a mixer, routing): not run without it
    jobs_gib: dict[str, float] = field(default_factory=dict)  # expected device memory of each backend's jobs (GiB);
    #   none: small beside any GPU's
    jobs_s: dict[str, float] = field(default_factory=dict)  # their expected seconds (`job_seconds`)
    group: str | None = None  # the check this one is a part of (`fit`: backends of a check that did not fit)
    plot: bool = True
    env: dict[str, str] = field(default_factory=dict)  # compiler flags (docs/bench.md, "Compiler options"); XLA_FLAGS
    #   is appended to the caller's

    @property
    def cost(self) -> float:
        """Its expected seconds on a cold H200 (its weight when the budget is shared): `fixed_s` and its jobs'."""
        return self.fixed_s + sum(self.jobs_s.values())

    @property
    def gib(self) -> float:
        """The device memory (GiB) its jobs need together: compare.py keeps every job resident."""
        return sum(self.jobs_gib.values())


# --dry-run: the same commands with these sizes (the bench's options by their train-config names; parity_report.py's
# --seq and --batch are its own)
TINY = {"--spec": "tiny", "--seq-len": "32", "--seq": "32", "--batch-size": "4", "--batch": "4", "--steps": "2",
        "--warmup": "0", "--rounds": "1", "--loss-chunk": "48", "--tokens": "64", "--repeats": "1"}
PLANS = ("core", "extra", "tuning")


def plan(name: str = "core") -> list[Check]:
    """The checks of one plan, in order, at the GPU's sizes; each plan's costs add up to at most BUDGET_S."""
    compare, timing = "bench/compare.py", ["--compute-dtype", "bfloat16", "--seq-len", "2048", "--steps", "10",
                                           "--warmup", "2", "--rounds", "2"]
    sweep = [*timing[:4], "--steps", "8", "--warmup", "1", "--rounds", "2"]
    small, llama = [compare, "--spec", "small", *timing], [compare, "--spec", "llama-1b", "--batch-size", "4", *timing]
    twins = ["jax", "torch"]

    def bench(name: str, argv: list[str], step: str, **options) -> Check:
        """A compare.py check of its backends (`--backend`) x its variants (the product of its `--sweep`s' values, as
        compare.py runs them; one without) jobs at `step`'s size: its cost and device memory."""
        backends = backends_of(argv)
        variants = math.prod(len(argv[i + 1].split(",")) for i, a in enumerate(argv) if a == "--sweep")  # as compare
        seconds = {k: options.pop(k) for k in ("cached", "steps") if k in options}
        return Check(name, argv, START_S, jobs_gib=job_gib(backends, step, variants),
                     jobs_s=job_seconds(backends, step, variants, **seconds), **options)

    if name == "tuning":  # the levers after the core plan: batch 32, the attention kernel, the compilers' options
        b16 = [*small, "--batch-size", "16"]
        return [
            bench("small-train-b32", [*small, "--backend", "both", "--batch-size", "32"], "small-b32"),
            # the kernels `auto` does not pick on a GPU: XLA's attention (JAX), SDPA's own choice (torch: flash)
            bench("small-attention-sdpa", [*b16, "--backend", "both", "--attention", "sdpa"], "small-b16"),
            bench("llama1b-attention-sdpa", [*llama, "--backend", "both", "--attention", "sdpa"], "llama-1b-b4"),
            bench("small-xla-cublas", [*b16, "--backend", "jax"], "small-b16",
                  env={"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false"}),
            # inductor times its candidate block sizes while compiling: assumed twice the plain compile
            bench("small-inductor-tuned", [*b16, "--backend", "torch"], "small-b16", cached=2.0,
                  env={"TORCHINDUCTOR_COORDINATE_DESCENT_TUNING": "1"}),
        ]
    if name == "core":
        return [
            bench("small-train-b16", [*small, "--backend", "both", "--batch-size", "16"], "small-b16"),
            bench("small-train-b8", [*small, "--backend", "all", "--batch-size", "8"], "small-b8"),
            bench("llama1b-train-b4", [*llama, "--backend", "all"], "llama-1b-b4"),
            # small-train-b8's programs again (same shapes): compiled ones come from the cache; profiling and
            # reading the traces cost about 10 s
            Check("small-profile", ["bench/profile_step.py", "--spec", "small", "--backend", "both", "--compute-dtype",
                                    "bfloat16", "--seq-len", "2048", "--batch-size", "8", "--steps", "3", "--warmup",
                                    "1"],
                  START_S + 10, jobs_gib=job_gib(twins, "small-b8"), jobs_s=job_seconds(twins, "small-b8", cached=0.3),
                  plot=False),
            Check("bf16-parity", ["scripts/parity_report.py", "--spec", "small", "--dtype", "bfloat16", "--seq", "512"],
                  45, plot=False),  # measured: just over 40 s
            # one GLA layer at gla-small's geometry: each twin's pure form and GPU kernel (fla where installed),
            # time, peak memory and distance to the pure form; Pallas' compile and fla's autotuning dominate
            Check("gla-kernels", ["bench/gla_layer.py", "--kernel", "pure,pallas,fla", "--if-present", "--batch", "8",
                                  "--tokens", "2048", "--repeats", "5"], 60, plot=False),
        ]
    return [
        bench("small-train-b16-chunked", [*small, "--backend", "both", "--batch-size", "16", "--loss-chunk", "4096"],
              "small-b16"),
        bench("llama1b-train-b4-chunked-remat",
              [*llama, "--backend", "both", "--loss-chunk", "4096", "--remat", "block"], "llama-1b-b4"),
        # the norm sweep one twin a process: three llama-1b jobs resident at once, not six
        *(bench(f"llama1b-norms-{twin}", [compare, "--spec", "llama-1b", "--batch-size", "4", *sweep, "--backend", twin,
                                          "--sweep", "norm_type=rms,dyt,derf"], "llama-1b-b4",
                steps=SWEEP_STEPS) for twin in twins),
        bench("gla-sweep", [compare, "--spec", "gla-small", *sweep, "--backend", "both", "--batch-size", "8", "--sweep",
                            "mixer=attention,gla"], "small-b8", steps=SWEEP_STEPS,
              needs="mixer"),  # gla-small: position none, which GLA needs
        bench("routing-sweep", [compare, "--spec", "small", *sweep, "--backend", "both", "--batch-size", "8", "--sweep",
                                "routing=none,mod"], "small-b8", steps=SWEEP_STEPS, needs="routing"),
    ]


def shrink(argv: list[str]) -> list[str]:
    """`argv` with every size flag set to its TINY value (the dry run); a gla-* spec shrinks to gla-tiny."""
    def tiny(flag: str, value: str) -> str:
        return "gla-tiny" if flag == "--spec" and value.startswith("gla-") else TINY.get(flag, value)

    return [tiny(argv[i - 1], a) if i > 0 else a for i, a in enumerate(argv)]


def backends_of(argv: list[str]) -> list[str]:
    """The backends a check's command times (compare.py's --backend; none named: the one process it is)."""
    value = argv[argv.index("--backend") + 1] if "--backend" in argv else ""
    return BACKENDS.get(value, [])


def fit(checks: list[Check], device_gib: float | None) -> list[Check]:
    """The plan for a device of `device_gib` GiB (None: the dry run, as planned). A check whose jobs together need
    more than FITS of it (`Check.gib`: llama-1b in both twins and transformers, ~127 GiB) runs in parts instead:
    the twins together where they fit (their steps interleaved, the fair ratio), else one backend a process, and
    transformers apart. A part is `<check>-<backend>` (compare.py's --backend value), with the check as its `group`
    (the targets read the parts as one report) and its backends' memory and seconds. A check of one backend stays
    whole (`too_big` then says why it is not run)."""
    if device_gib is None:
        return checks
    out = []
    for c in checks:
        backends = backends_of(c.argv)
        if c.gib <= FITS * device_gib or len(backends) < 2:
            out.append(c)
            continue
        twins = [b for b in backends if b in ("jax", "torch")]
        together = len(twins) == 2 and sum(c.jobs_gib[b] for b in twins) <= FITS * device_gib
        parts = [["jax", "torch"]] if together else [[b] for b in twins]
        parts += [[b] for b in backends if b not in twins]
        at = c.argv.index("--backend") + 1
        for part in parts:
            value = "both" if len(part) == 2 else part[0]
            out.append(replace(c, name=f"{c.name}-{value}", argv=[*c.argv[:at], value, *c.argv[at + 1:]],
                               group=c.name,
                               jobs_gib={b: c.jobs_gib[b] for b in part}, jobs_s={b: c.jobs_s[b] for b in part}))
    return out


def too_big(check: Check, device_gib: float | None) -> str | None:
    """Why `check` is not run on a device of `device_gib` GiB, or None: its jobs together need more than FITS of it
    (a sweep of llama-1b's three norms in one twin: about 105 GiB), which would end in an out-of-memory error after
    minutes of compiling."""
    if device_gib is None or check.gib <= FITS * device_gib:
        return None
    return (f"its jobs need about {check.gib:.0f} GiB of device memory together, more than {100 * FITS:.0f}% of this "
            f"device's {device_gib:.0f} GiB (an H200's 141 GiB hold it)")


def runnable(checks: list[Check], only: list[str], device_gib: float | None = None) -> dict[str, str | None]:
    """{check: None if it will run, else why not}: a check --only leaves out (by its name, or its group's), one
    sweeping a spec field this checkout lacks, or one too big for the device's memory (`too_big`) is not run (and
    takes no share of the budget)."""
    spec_fields = {f.name for f in fields(ModelSpec)}
    return {c.name: "not in --only" if (c.group or c.name) not in only else
            f"this checkout's spec has no `{c.needs}` field" if c.needs and c.needs not in spec_fields else
            too_big(c, device_gib) for c in checks}


def share(check: Check, rest: list[Check], left: float) -> float:
    """Seconds `check` may use: its cost's share of the `left` seconds over itself and the checks still to run
    after it (`rest`)."""
    return left * check.cost / (check.cost + sum(c.cost for c in rest))


MFU_TARGETS = {"small": 0.50, "llama1b": 0.55}  # the twins' train step by check name: the field's MFU (nanoGPT's)


def targets(out: Path, checks: list[str], groups: dict[str, str] | None = None) -> list[str]:
    """The benchmark targets, read off the reports of `checks` in `out`, the checks this run ran (another plan's, or
    an earlier run's left in the directory, are not this run's): met or not, never asserted. The reports of a
    check's parts (`groups`: part -> check, `fit`) are read as the check's one report. A report that cannot be read
    is said so in its line."""
    lines, merged = [], {}
    for path in [out / f"{name}.json" for name in checks if (out / f"{name}.json").is_file()]:
        try:
            report = json.loads(path.read_text())
            results = report.get("results") or []
            if results and "variant" not in results[0]:  # profiles, parity: no timings
                continue
            merge = merged.setdefault((groups or {}).get(path.stem, path.stem), {"results": [], "complete": True})
            merge["results"] += [{**r, "part": path.stem} for r in results]  # a part stopped before its first row
            merge["complete"] = merge["complete"] and report.get("complete", True)  # stops the whole check early
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:  # ValueError: JSON's own
            lines.append(f"{path.stem}: its report {path} cannot be read ({type(e).__name__}: {str(e)[:120]})")
    for name, report in merged.items():
        try:
            lines += report_targets(name, report)
        except (TypeError, KeyError, AttributeError, IndexError) as e:
            lines.append(f"{name}: its report cannot be read ({type(e).__name__}: {str(e)[:120]})")
    return lines


def report_targets(check: str, report: dict) -> list[str]:
    """The target lines of one compare.py report, the check `check`'s; a ratio of rows from different parts of it
    (each row's "part", `fit`) says that its steps were not interleaved."""
    lines, name = [], check if report.get("complete", True) else f"{check} (stopped early)"

    def apart(a: dict, b: dict) -> str:
        return " (backends timed in separate processes)" if a.get("part") != b.get("part") else ""

    by = {(r["variant"], r["backend"]): r for r in report["results"]}
    for (variant, backend), r in by.items():
        target = next((t for prefix, t in MFU_TARGETS.items() if name.startswith(prefix)), None)
        if r.get("mfu") is not None and target and backend in ("jax", "torch"):
            lines.append(f"{name} {backend}: MFU {100 * r['mfu']:.1f}% (target >= {100 * target:.0f}%)")
        if backend == "jax" and (variant, "torch") in by:
            ratio = r["step_s"]["median"] / by[variant, "torch"]["step_s"]["median"]
            lines.append(f"{name} {variant}: jax/torch {ratio:.2f} (target 0.95-1.05){apart(r, by[variant, 'torch'])}")
        if backend in ("jax", "torch") and (variant, "hf") in by:
            ratio = r["step_s"]["median"] / by[variant, "hf"]["step_s"]["median"]
            lines.append(f"{name} {variant}: {backend}/hf {ratio:.2f} (target < 1){apart(r, by[variant, 'hf'])}")
    for backend in ("jax", "torch"):
        rms = by.get(("norm_type=rms", backend))
        for other in ("dyt", "derf"):
            if rms and (r := by.get((f"norm_type={other}", backend))):
                ratio = r["step_s"]["median"] / rms["step_s"]["median"]
                lines.append(f"{name} {backend}: {other}/rms {ratio:.3f} (target <= 1.02)")
    return lines
