"""Everything a lent GPU should measure, in one command (README, "Bench": GPU check).

    python bench/gpu_check.py                        # on the GPU machine: < 8 min on one H200
    python bench/gpu_check.py --dry-run --out DIR    # the same plan at tiny sizes on a CPU (the test suite runs it)
    bash bench/gpu_check.sh                          # the same, from a shell

Runs, each as its own process (a fresh device), bench/compare.py and scripts/parity_report.py over:
train steps of `small` (batch 8 and 16) and `llama-1b` (batch 4) at seq 2048 in bf16 for both twins and
transformers (small batch 16: the twins); the twins with the chunked loss and remat; the norm sweep (rms, dyt, derf) on llama-1b;
bf16 parity of the twins on the GPU; the GLA mixer and routing sweeps where the spec has those fields.
Writes DIR/<check>.json (+ .png) and DIR/summary.json, DIR = bench/results/<device>-<date>/ by default,
and prints a short summary: every check is reported ok, failed (with its last error line) or not run
(with the reason: a missing spec field, the time budget); none is dropped silently. Exit 1 if any failed.
The targets it prints (MFU ≥ 50% on `small`, JAX/torch 0.95–1.05, both twins ahead of transformers,
DyT/Derf within 2% of RMSNorm) are benchmarks, never test assertions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # shared_config, when run as a script from anywhere

from shared_config import ModelSpec, atomic_write, did_you_mean  # noqa: E402
from shared_config.cli import Parser, UsageError, run  # noqa: E402

EXPECTED = {"torch": "2.11", "jax": "0.11"}  # the GPU image's versions (the README's H200 figures)
BUDGET_S = 450  # the whole plan: under 8 minutes on one H200


@dataclass
class Check:
    name: str
    argv: list[str]  # a script under the checkout and its arguments
    needs: str | None = None  # a ModelSpec field the check sweeps (a mixer, routing): not run without it
    plot: bool = True


# --dry-run: the same commands with these sizes
TINY = {"--spec": "tiny", "--seq": "32", "--batch": "4", "--steps": "2", "--warmup": "0", "--rounds": "1",
        "--loss-chunk": "48"}


def plan() -> list[Check]:
    """The checks, in order, at the GPU's sizes."""
    compare, timing = "bench/compare.py", ["--dtype", "bfloat16", "--seq", "2048", "--steps", "10", "--warmup", "2",
                                           "--rounds", "2"]
    small, llama = [compare, "--spec", "small", *timing], [compare, "--spec", "llama-1b", "--batch", "4", *timing]
    return [
        Check("small-train-b8", [*small, "--backend", "all", "--batch", "8"]),
        Check("small-train-b16", [*small, "--backend", "both", "--batch", "16"]),
        Check("small-train-b16-chunked", [*small, "--backend", "both", "--batch", "16", "--loss-chunk", "4096"]),
        Check("llama1b-train-b4", [*llama, "--backend", "all"]),
        Check("llama1b-train-b4-chunked-remat", [*llama, "--backend", "both", "--loss-chunk", "4096", "--remat", "block"]),
        # the norm sweep one twin a process: three llama-1b jobs resident at once, not six
        *(Check(f"llama1b-norms-{twin}", [*llama, "--backend", twin, "--sweep", "norm_type=rms,dyt,derf"])
          for twin in ("jax", "torch")),
        Check("bf16-parity", ["scripts/parity_report.py", "--spec", "small", "--dtype", "bfloat16", "--seq", "512"],
              plot=False),
        Check("gla-sweep", [compare, "--spec", "gla-small", *timing, "--backend", "both", "--batch", "8", "--sweep",
                            "mixer=attention,gla"], needs="mixer"),  # gla-small: position none, which GLA needs
        Check("routing-sweep", [*small, "--backend", "both", "--batch", "8", "--sweep", "routing=none,mod"],
              needs="routing"),
    ]


def shrink(argv: list[str]) -> list[str]:
    """`argv` with every size flag set to its TINY value (the dry run); a gla-* spec shrinks to gla-tiny."""
    def tiny(flag: str, value: str) -> str:
        return "gla-tiny" if flag == "--spec" and value.startswith("gla-") else TINY.get(flag, value)

    return [tiny(argv[i - 1], a) if i > 0 else a for i, a in enumerate(argv)]


def parse_args(argv):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="every check at tiny sizes, on whatever device is here")
    p.add_argument("--out", type=Path, default=None, help="results directory (default: bench/results/<device>-<date>)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for the whole plan (default {BUDGET_S})")
    p.add_argument("--quiet", action="store_true", help="no progress lines, only the summary")
    p.add_argument("--only", default=None, help="comma-separated check names to run (default: every check)")
    args = p.parse_args(argv)
    if args.budget <= 0:
        raise UsageError(f"--budget must be > 0, got {args.budget}")
    names = [c.name for c in plan()]
    args.only = names if args.only is None else args.only.split(",")
    if unknown := [n for n in args.only if n not in names]:
        raise UsageError(f"--only: unknown check {unknown[0]!r}{did_you_mean(unknown[0], names)} (one of {', '.join(names)})")
    return args


def environment(dry_run: bool) -> dict:
    """Versions and the device, with a note for every version that is not the GPU image's."""
    import jax
    import torch

    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "jax": jax.__version__}
    for name in ("flax", "optax", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError as e:
            versions[name] = f"missing ({e})"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    notes = [f"{k} {versions[k]} (the GPU image has {v})" for k, v in EXPECTED.items() if not versions[k].startswith(v)]
    if gpu is None and not dry_run:
        raise UsageError("no CUDA device: run on the GPU machine, or pass --dry-run")
    if gpu is not None and jax.default_backend() != "gpu":
        notes.append(f"jax runs on {jax.default_backend()}, not the GPU: its rows are not comparable")
    device = gpu or f"cpu-{os.cpu_count()}vcpu"
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "device": device, "versions": versions,
            "dry_run": dry_run, "notes": notes}


def slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower().replace("nvidia", "")).strip("-")


def run_check(check: Check, out: Path, dry_run: bool, timeout: float) -> dict:
    """One check in its own process: its JSON (and PNG) under `out`; ok / failed with the last error line."""
    argv = shrink(check.argv) if dry_run else list(check.argv)
    argv += ["--json", str(out / f"{check.name}.json")]
    if check.plot:
        argv += ["--plot", str(out / f"{check.name}.png")]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"over its {timeout:.0f} s share of the budget", "argv": argv}
    seconds = time.perf_counter() - t0
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    if proc.returncode != 0:
        last = next((line for line in reversed(lines) if line.strip()), "no output")
        return {"status": "failed", "reason": f"exit {proc.returncode}: {last}", "argv": argv, "seconds": seconds}
    return {"status": "ok", "argv": argv, "seconds": seconds, "output": proc.stdout.strip().splitlines()[-12:]}


def targets(out: Path) -> list[str]:
    """The benchmark targets, read off the bench reports: met or not, never asserted."""
    lines = []
    for path in sorted(out.glob("*.json")):
        if path.name == "summary.json":
            continue
        report = json.loads(path.read_text())
        if "results" not in report:
            continue
        by = {(r["variant"], r["backend"]): r for r in report["results"]}
        for (variant, backend), r in by.items():
            if r.get("mfu") is not None and path.stem.startswith("small"):
                lines.append(f"{path.stem} {backend}: MFU {100 * r['mfu']:.1f}% (target >= 50%)")
            if backend == "jax" and (variant, "torch") in by:
                ratio = r["step_s"]["median"] / by[variant, "torch"]["step_s"]["median"]
                lines.append(f"{path.stem} {variant}: jax/torch {ratio:.2f} (target 0.95-1.05)")
            if backend in ("jax", "torch") and (variant, "hf") in by:
                ratio = r["step_s"]["median"] / by[variant, "hf"]["step_s"]["median"]
                lines.append(f"{path.stem} {variant}: {backend}/hf {ratio:.2f} (target < 1)")
        for backend in ("jax", "torch"):
            rms = by.get(("norm_type=rms", backend))
            for other in ("dyt", "derf"):
                if rms and (r := by.get((f"norm_type={other}", backend))):
                    ratio = r["step_s"]["median"] / rms["step_s"]["median"]
                    lines.append(f"{path.stem} {backend}: {other}/rms {ratio:.3f} (target <= 1.02)")
    return lines


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    env = environment(args.dry_run)
    out = args.out or ROOT / "bench" / "results" / f"{slug(env['device'])}-{env['date']}"
    out.mkdir(parents=True, exist_ok=True)
    spec_fields = {f.name for f in fields(ModelSpec)}
    checks, results = plan(), {}
    for i, check in enumerate(checks):
        left = args.budget - (time.perf_counter() - started)
        if check.name not in args.only:
            results[check.name] = {"status": "not run", "reason": "not in --only"}
        elif check.needs and check.needs not in spec_fields:
            results[check.name] = {"status": "not run", "reason": f"this checkout's spec has no `{check.needs}` field"}
        elif left <= 5:
            results[check.name] = {"status": "not run", "reason": "the time budget is spent"}
        else:
            if not args.quiet:
                print(f"[{i + 1}/{len(checks)}] {check.name} ...", file=sys.stderr, flush=True)
            # a check may use what is left after a fair share of the rest, at least its own share
            share = max(left / (len(checks) - i), left - 60 * (len(checks) - i - 1))
            results[check.name] = run_check(check, out, args.dry_run, share)
    summary = {**env, "seconds": time.perf_counter() - started, "checks": results, "targets": targets(out)}
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    print(f"# gpu check: {env['device']}, {env['date']}{' (dry run)' if args.dry_run else ''}, "
          f"{summary['seconds']:.0f} s -> {out}")
    for note in env["notes"]:
        print(f"note: {note}")
    for name, r in results.items():
        print(f"{r['status']:<8} {name}" + (f": {r['reason']}" if "reason" in r else f" ({r['seconds']:.0f} s)"))
    for line in summary["targets"]:
        print(f"target   {line}")
    if any(r["status"] == "failed" for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    run(main)
