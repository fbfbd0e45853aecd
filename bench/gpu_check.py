"""Everything a lent GPU should measure, in three plans of at most 7 minutes each (docs/bench.md, "GPU check").

    python bench/gpu_check.py                        # on the GPU machine: the core plan, <= 7 min on one H200
    python bench/gpu_check.py --plan extra           # the other rows: another <= 7 min
    python bench/gpu_check.py --plan tuning          # batch 32, other attention kernels, compiler flags: <= 7 min
    python bench/gpu_check.py --dry-run --out DIR    # the same plan at tiny sizes on a CPU (the test suite runs it)
    bash bench/gpu_check.sh                          # the same, from a shell

The core plan runs, each as its own process (a fresh device): bench/compare.py over train steps of `small` at
batch 16 (both twins) and batch 8 (both twins and transformers) and `llama-1b` at batch 4 (both twins and
transformers), at seq 2048 in bf16; bench/profile_step.py on `small` (both twins); scripts/parity_report.py
(bf16 parity of the twins on the GPU). The extra plan: the chunked loss and remat, the norm sweep (rms, dyt,
derf) on llama-1b, and the GLA mixer and routing sweeps where the spec has those fields. The tuning plan: the
levers after that, `small` at batch 32, the attention kernels `auto` does not pick (XLA's, SDPA's own choice),
XLA with cuBLAS for every matmul, inductor's coordinate-descent tuning (flags in the check's environment).

The budget (--budget, default 420 s) is shared over the checks that will run, by their expected cost: a check
may use its cost's share of what is left, so time a fast check leaves goes to the later ones; at its limit a
check's whole process group is stopped. A check whose jobs need more of the device's memory together than it has
runs in parts (the twins together where they fit, transformers apart), or is not run, with the reason (`fit`).
Every check writes DIR/<check>.json (+ .png, and its output in .log),
each bench rewriting its JSON after every row, so a stopped check keeps what it measured; DIR/summary-<plan>.json
is rewritten after every check ("complete": false until the end). DIR = bench/results/<device>-<date>/ by default
(a dry run's: runs/gpu_check-dry-run/<device>-<date>/, git-ignored).
Compiled programs go to a persistent cache (--compile-cache), so a rerun skips compilation. It prints a short
summary: every check is reported ok, failed (with its last error line) or not run (with the reason: a missing
spec field, the time budget); none is dropped silently. Exit 1 if any failed. The targets it prints (MFU >= 50%
on `small` and >= 55% on `llama-1b`, JAX/torch 0.95-1.05, both twins ahead of transformers, DyT/Derf within 2%
of RMSNorm) are benchmarks, never test assertions.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.gpu_plan import BUDGET_S, PLANS, Check, fit, plan, runnable, share, shrink, targets
from shared_config import did_you_mean
from shared_config.cli import Parser, UsageError, above, check_out_dir, names, no_repeats, run
from shared_config.compile_cache import add_compile_cache_option
from shared_config.files import resolved
from shared_config.report import versions, write_report
from shared_config.run_dir import lock_run

ROOT = Path(__file__).resolve().parents[1]  # the checkout: the checks' scripts and working directory

EXPECTED = {"torch": "2.11", "jax": "0.11"}  # the GPU image's versions (docs/bench.md's H200 figures)
MIN_S = 5  # a check given less than this is not started
CACHED = ("bench/compare.py", "bench/profile_step.py")  # the scripts that take --compile-cache

def parse_args(argv):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", default="core", choices=PLANS,
                   help="which checks: core (first), extra, or tuning (batch 32, attention kernels, compiler flags)")
    p.add_argument("--dry-run", action="store_true", help="every check at tiny sizes, on whatever device is here")
    p.add_argument("--out", type=Path, default=None, help="results directory (default: bench/results/<device>-<date>; "
                   "--dry-run: runs/gpu_check-dry-run/<device>-<date>)")
    p.add_argument("--budget", type=above(0), default=BUDGET_S, help="seconds for the whole plan")
    p.add_argument("--quiet", action="store_true", help="no progress lines, only the summary")
    p.add_argument("--only", default=None, help="comma-separated check names to run (default: every check of the plan)")
    add_compile_cache_option(p)
    args = p.parse_args(argv)
    if args.out is not None:
        check_out_dir("--out", args.out)
        args.out = resolved(args.out)
    # the checks run in the checkout (cwd=ROOT): a relative --out or --compile-cache named a folder there, and every
    # check failed with "--json out/x.json: out is not a directory"
    if args.compile_cache != "none":
        args.compile_cache = str(resolved(args.compile_cache))
    checks = [c.name for c in plan(args.plan)]
    args.only = checks if args.only is None else no_repeats("--only", names("--only", args.only))
    if unknown := [n for n in args.only if n not in checks]:
        raise UsageError(f"--only: unknown check {unknown[0]!r}{did_you_mean(unknown[0], checks)} in --plan "
                         f"{args.plan} (one of {', '.join(checks)})")
    return args


def environment(dry_run: bool) -> dict:
    """Versions and the device, with a note for every version that is not the GPU image's."""
    import jax
    import torch

    # fla-core: flash-linear-attention, the torch twin's GLA kernel, not in the GPU image (docs/bench.md: carry it)
    found = versions("torch", "jax", "flax", "optax", "transformers", "fla-core")
    found = {name: "missing" if version is None else version for name, version in found.items()}
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    # the device's memory (GiB), which decides how the checks split into processes (`fit`)
    device_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if gpu else None
    notes = [f"{k} {found[k]} (the GPU image has {v})" for k, v in EXPECTED.items() if not found[k].startswith(v)]
    if found["fla-core"] == "missing":
        notes.append("fla-core missing: the gla-kernels check skips fla's chunk_gla (docs/bench.md, GPU check)")
    if gpu is None and not dry_run:
        raise UsageError("no CUDA device: run on the GPU machine, or pass --dry-run")
    if gpu is not None and jax.default_backend() != "gpu":
        notes.append(f"jax runs on {jax.default_backend()}, not the GPU: its rows are not comparable")
    device = gpu or f"cpu-{os.cpu_count()}vcpu"
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "device": device, "device_gib": device_gib,
            "versions": found, "dry_run": dry_run, "notes": notes}


def slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower().replace("nvidia", "")).strip("-")


def run_check(check: Check, out: Path, dry_run: bool, timeout: float, cache: str) -> dict:
    """One check in its own process group (its output in out/<check>.log, its JSON and PNG under `out`): ok, or
    failed with the last error line. At `timeout` seconds, or when the check ends, its whole group is killed:
    no child it started outlives it (holding the GPU or a file)."""
    argv = shrink(check.argv) if dry_run else list(check.argv)
    argv += ["--json", str(out / f"{check.name}.json")]
    if check.plot:
        argv += ["--plot", str(out / f"{check.name}.png")]
    for old in (out / f"{check.name}.json", out / f"{check.name}.png"):  # an earlier run's: never read as this one's
        old.unlink(missing_ok=True)
    if argv[0] in CACHED:
        argv += ["--compile-cache", cache]
    log = out / f"{check.name}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for k, v in check.env.items():
        env[k] = f"{env.get(k, '')} {v}".strip() if k == "XLA_FLAGS" else v
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            stop_group(proc)
    seconds = time.perf_counter() - t0
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    if code is None:
        return {"status": "failed", "reason": f"over its {timeout:.0f} s share of the budget", "argv": argv,
                "seconds": seconds}
    if code != 0:
        last = lines[-1] if lines else "no output"
        return {"status": "failed", "reason": f"exit {code}: {last}", "argv": argv, "seconds": seconds}
    return {"status": "ok", "argv": argv, "seconds": seconds, "output": lines[-12:]}


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to `proc`'s process group (the check and every child it started), SIGKILL to what is left 5 s later;
    returns once the group is gone (or, when zombies that nobody reaps keep it listed, after 5 s more)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the group is gone: the check and its children have all exited
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            proc.poll()  # reaps the check itself
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def summary_path(out: Path, plan_name: str) -> Path:
    """The plan's summary in `out`: one file per plan, so that the plans can share a results directory."""
    return out / f"summary-{plan_name}.json"


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    env = environment(args.dry_run)
    # a dry run's tiny CPU figures never land beside the GPU results (bench/results/ is committed): runs/ is ignored
    where = ROOT / "runs" / "gpu_check-dry-run" if args.dry_run else ROOT / "bench" / "results"
    out = args.out or where / f"{slug(env['device'])}-{env['date']}"
    # one check at a time in `out`, and on the device: a second gpu_check there is refused (exit 3); two at once
    # rewrote each other's logs and reports and timed their steps against each other
    with lock_run(out):
        run_plan(args, env, out, started)


def run_plan(args, env: dict, out: Path, started: float) -> None:
    """Run the checks of args.plan into `out` within the budget, rewriting the summary after each; print it."""
    device_gib = None if args.dry_run else env.get("device_gib")
    checks = fit(plan(args.plan), device_gib)
    why_not = runnable(checks, args.only, device_gib)
    results = {c.name: {"status": "not run", "reason": why_not[c.name]} if why_not[c.name] else {"status": "pending"}
               for c in checks}
    env = {**env, "plan": args.plan, "budget_s": args.budget}

    def summary(complete: bool) -> dict:
        ran = [name for name, r in results.items() if r["status"] in ("ok", "failed", "stopped")]  # their rows so far
        groups = {c.name: c.group for c in checks if c.group}
        report = {**env, "seconds": time.perf_counter() - started, "checks": results,
                  "targets": targets(out, ran, groups)}
        write_report(summary_path(out, args.plan), report, complete=complete)  # after every check: kept if stopped
        return report

    summary(complete=False)
    to_run = [c for c in checks if why_not[c.name] is None]
    for i, check in enumerate(to_run):
        limit = share(check, to_run[i + 1:], args.budget - (time.perf_counter() - started))
        if limit < MIN_S:
            results[check.name] = {"status": "not run", "reason": "the time budget is spent"}
        else:
            if not args.quiet:
                print(f"[{i + 1}/{len(to_run)}] {check.name} (up to {limit:.0f} s) ...", file=sys.stderr, flush=True)
            try:
                results[check.name] = run_check(check, out, args.dry_run, limit, args.compile_cache)
            except KeyboardInterrupt:  # Ctrl-C, or the lease's SIGTERM: the summary says which check it stopped
                results[check.name] = {"status": "stopped", "reason": "interrupted while it ran (its report, if "
                                                                      "any, holds its rows so far)"}
                summary(complete=False)
                raise
        summary(complete=False)
    report = summary(complete=True)
    print(f"# gpu check, plan {args.plan}: {env['device']}, {env['date']}{' (dry run)' if args.dry_run else ''}, "
          f"{report['seconds']:.0f} s -> {out}")
    for note in env["notes"]:
        print(f"note: {note}")
    for name, r in results.items():
        print(f"{r['status']:<8} {name}" + (f": {r['reason']}" if "reason" in r else f" ({r['seconds']:.0f} s)"))
    for line in report["targets"]:
        print(f"target   {line}")
    if any(r["status"] == "failed" for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    run(main)
