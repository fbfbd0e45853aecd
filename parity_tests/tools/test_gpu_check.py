"""bench/gpu_check.py: two plans that each fit a 7-minute GPU window, the budget shared over the checks that run
(by their expected cost), the summary on disk after every check, every check's process group stopped at its
limit, and both plans run end to end at tiny sizes on this CPU (--dry-run)."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest

from bench import gpu_check
from bench import gpu_plan
from bench.gpu_check import run_check
from bench.gpu_plan import BUDGET_S, PLANS, Check, plan, runnable, share

from ..support.common import ROOT, one_line_error, run_main, run_python


def test_each_plan_fits_its_budget_by_the_measured_costs():
    names = [c.name for p in PLANS for c in plan(p)]
    assert len(names) == len(set(names)) >= 10  # one name for one check, whichever plan holds it
    for p in PLANS:
        costs = [c.cost for c in plan(p)]
        assert all(c > gpu_plan.START_S for c in costs) and sum(costs) <= BUDGET_S == 420, (p, sum(costs))
    core = {c.name for c in plan("core")}
    assert (core
            == {"small-train-b16", "small-train-b8", "llama1b-train-b4", "small-profile", "bf16-parity", "gla-kernels"})


def test_a_bench_check_s_jobs_are_its_command_s_backends_times_its_sweep_s_variants():
    """A check's expected memory and seconds follow its command: a backend or a swept value added to the command
    (a new norm in the llama-1b sweep) is in its jobs, not left to a count kept beside it."""
    norms = {c.name: c for c in plan("extra")}["llama1b-norms-jax"]
    assert norms.argv[norms.argv.index("--sweep") + 1] == "norm_type=rms,dyt,derf"
    assert norms.jobs_gib == gpu_plan.job_gib(["jax"], "llama-1b-b4", variants=3)
    assert norms.jobs_s == gpu_plan.job_seconds(["jax"], "llama-1b-b4", variants=3, steps=gpu_plan.SWEEP_STEPS)
    b8 = {c.name: c for c in plan("core")}["small-train-b8"]  # --backend all
    assert list(b8.jobs_gib) == list(b8.jobs_s) == ["jax", "torch", "hf"]


def test_the_targets_read_every_twin_row_against_its_spec_s_mfu_and_transformers(tmp_path):
    """small at >= 50% MFU and llama-1b at >= 55% (the field's figures), each twin against the other and against
    transformers where a check ran it; transformers' own MFU is no target."""
    def row(backend, mfu, ms):
        return {"variant": "base", "backend": backend, "mfu": mfu, "step_s": {"median": ms / 1e3}}

    reports = {"small-train-b8": [row("jax", 0.51, 40), row("torch", 0.49, 41), row("hf", 0.3, 60)],
               "llama1b-train-b4": [row("jax", 0.56, 150), row("torch", 0.54, 160), row("hf", 0.4, 200)]}
    other_plan = {"small-train-b32": [row("jax", 0.2, 400), row("torch", 0.2, 100)]}  # in the directory, not run
    for name, rows in {**reports, **other_plan}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"complete": True, "results": rows}))
    lines = gpu_plan.targets(tmp_path, [*reports, "not-run-here"])
    for expected in ("small-train-b8 jax: MFU 51.0% (target >= 50%)",
                     "small-train-b8 torch: MFU 49.0% (target >= 50%)",
                     "llama1b-train-b4 jax: MFU 56.0% (target >= 55%)",
                     "llama1b-train-b4 base: torch/hf 0.80 (target < 1)",
                     "llama1b-train-b4 base: jax/torch 0.94 (target 0.95-1.05)"):
        assert expected in lines, (expected, lines)
    assert not any("hf: MFU" in line or "b32" in line for line in lines), lines


@pytest.mark.slow
def test_only_this_runs_reports_give_targets_and_a_broken_one_is_named(tmp_path, monkeypatch):
    """An earlier run's report left in --out was read into the targets, also for a check this run did not run
    ("not run small-train-b16" beside "target small-train-b16 jax: MFU 99.0%"); a check's own earlier report is
    removed before it runs; a report that is not JSON was a traceback before any check ran."""
    row = {"variant": "base", "backend": "jax", "mfu": 0.99, "step_s": {"median": 0.1}}
    (tmp_path / "small-train-b16.json").write_text(json.dumps({"complete": True, "results": [row]}))
    (tmp_path / "small-train-b8.json").write_text('{"results": [')
    monkeypatch.setattr(gpu_check, "run_check", lambda check, *_: {"status": "ok", "seconds": 0.0})
    gpu_check.main(["--dry-run", "--quiet", "--out", str(tmp_path), "--only", "bf16-parity,small-train-b8"])
    summary = json.loads((tmp_path / "summary-core.json").read_text())
    assert summary["checks"]["small-train-b16"]["status"] == "not run"
    (line,) = summary["targets"]
    assert line.startswith(f"small-train-b8: its report {tmp_path / 'small-train-b8.json'} cannot be read ("), line
    stale = tmp_path / "bf16-parity.json"
    stale.write_text("{}")
    run_check(Check("bf16-parity", ["-c", "import sys; sys.exit(3)"], 10), tmp_path, False, 30, "none")
    assert not stale.exists()


@pytest.mark.slow
def test_the_device_image_constraints_pin_the_gpu_image_s_versions():
    """.ci/device-image-constraints.txt (the GPU image's versions, to try on a CPU: docs/bench.md) pins the releases
    gpu_check's EXPECTED names, so that a CPU trial and the summary's version notes speak of one image."""
    lines = (ROOT / ".ci" / "device-image-constraints.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))
    for name, version in gpu_check.EXPECTED.items():
        assert pins[name].startswith(f"{version}."), (name, pins[name], version)


def test_gpu_check_sh_keeps_a_relative_out_the_callers(tmp_path):
    """bench/gpu_check.sh changed into the checkout first, so `--out relout` given elsewhere wrote ROOT/relout."""
    import subprocess

    from ..support.common import checkout_env

    (tmp_path / "relout").write_text("a file: --out relout/sub is refused where the command was given")
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", "relout/sub",
                             "--only", "no-such-check"], cwd=tmp_path, env=checkout_env(), capture_output=True,
                            text=True, timeout=120)
    one_line_error(result, "--out relout/sub: ", "relout is a file, not a directory")


def test_every_bench_check_parses_at_the_gpu_s_sizes(tmp_path):
    """Every check of every plan, as the GPU will run it (full sizes, with the --json, --plot and --compile-cache
    run_check adds): its script's parser accepts it. A typo would otherwise
    surface only in a lent GPU's short window; the dry run runs a few checks, and at tiny sizes."""
    from bench import compare, gla_layer, profile_step

    from ..support.common import load_script

    parity_report = load_script("parity_report")
    parsers = {"bench/compare.py": compare.parse_args, "bench/profile_step.py": profile_step.parse_args,
               "bench/gla_layer.py": gla_layer.parse_args, "scripts/parity_report.py": parity_report.parse_args}
    for check in [c for p in PLANS for c in plan(p)]:
        argv = [*check.argv[1:], "--json", str(tmp_path / f"{check.name}.json")]
        argv += ["--compile-cache", "none"] if check.argv[0] in gpu_check.CACHED else []
        parsers[check.argv[0]](argv + (["--plot", str(tmp_path / f"{check.name}.png")] if check.plot else []))


def test_the_budget_is_shared_by_cost_over_the_checks_that_run():
    checks = [Check("a", ["x"], 10), Check("b", ["x"], 30), Check("c", ["x"], 60, needs="no_such_field")]
    why_not = runnable(checks, ["a", "b", "c"])
    assert why_not == {"a": None, "b": None, "c": "this checkout's spec has no `no_such_field` field"}
    assert runnable(checks, ["b"])["a"] == "not in --only"
    assert share(checks[0], [checks[1]], 100) == 25 and share(checks[1], [], 75) == 75  # what a fast check left


def test_a_check_run_alone_gets_the_whole_budget(tmp_path, monkeypatch):
    """--only small-train-b8 --budget 100: that check may use the 100 s (less what starting took), not a tenth."""
    limits = {}

    def fake_run(check, out, dry_run, timeout, cache):
        limits[check.name] = timeout
        return {"status": "ok", "seconds": 0.0}

    monkeypatch.setattr(gpu_check, "run_check", fake_run)
    started = time.perf_counter()
    gpu_check.main(["--dry-run", "--quiet", "--budget", "100", "--out", str(tmp_path), "--only", "small-train-b8"])
    assert (list(limits) == ["small-train-b8"]
            and 100 - (time.perf_counter() - started) <= limits["small-train-b8"] <= 100)


def test_the_summary_is_on_disk_after_every_check(tmp_path, monkeypatch):
    seen = []

    def fake_run(check, out, dry_run, timeout, cache):
        seen.append(json.loads((out / "summary-extra.json").read_text()))
        return {"status": "ok", "seconds": 0.0}

    monkeypatch.setattr(gpu_check, "run_check", fake_run)
    gpu_check.main(["--dry-run", "--quiet", "--out", str(tmp_path), "--plan", "extra"])
    names = [c.name for c in plan("extra")]
    assert [s["complete"] for s in seen] == [False] * len(names)
    for i, s in enumerate(seen):  # before check i: the checks before it done, it and the rest pending
        assert [s["checks"][n]["status"] for n in names] == ["ok"] * i + ["pending"] * (len(names) - i)
    final = json.loads((tmp_path / "summary-extra.json").read_text())
    assert final["complete"] and final["plan"] == "extra" and final["budget_s"] == BUDGET_S


def test_an_interrupted_plan_names_the_check_it_stopped(tmp_path, monkeypatch):
    """Ctrl-C, or a lease's SIGTERM, during a check left it "pending" in the summary, as if never started."""
    names = [c.name for c in plan("extra")]

    def fake_run(check, *_):
        if check.name == names[1]:
            raise KeyboardInterrupt
        return {"status": "ok", "seconds": 0.0}

    monkeypatch.setattr(gpu_check, "run_check", fake_run)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--dry-run", "--quiet", "--out", str(tmp_path), "--plan", "extra"])
    summary = json.loads((tmp_path / "summary-extra.json").read_text())
    assert [summary["checks"][n]["status"] for n in names] == ["ok", "stopped"] + ["pending"] * (len(names) - 2)
    assert summary["complete"] is False


def test_plans_sharing_a_directory_keep_their_own_summaries(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "run_check", lambda check, *_: {"status": "ok", "seconds": 0.0})
    for which in PLANS:
        gpu_check.main(["--dry-run", "--quiet", "--out", str(tmp_path), "--plan", which])
    for which in PLANS:
        summary = json.loads((tmp_path / f"summary-{which}.json").read_text())
        assert summary["plan"] == which and list(summary["checks"]) == [c.name for c in plan(which)]


def test_a_second_check_on_a_directory_in_use_is_refused(tmp_path, monkeypatch, capsys):
    """Two gpu_checks on one --out ran the same checks at once: each rewrote the other's logs and reports, and their
    steps were timed against each other on the one device. The second is refused (exit 3) before any check runs."""
    from shared_config.cli import run
    from shared_config.run_dir import lock_run

    ran = []
    monkeypatch.setattr(gpu_check, "run_check", lambda check, *_: ran.append(check.name))
    with lock_run(tmp_path), pytest.raises(SystemExit) as e:  # the first check, holding its directory
        run(gpu_check.main, ["--dry-run", "--quiet", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 3 and err.startswith("error: ") and "written by another process" in err and "\n" not in err
    assert ran == [] and [p.name for p in tmp_path.iterdir()] == [".lock"]
    with pytest.raises(SystemExit) as e:  # a check name given twice
        run(gpu_check.main, ["--dry-run", "--only", "bf16-parity,bf16-parity"])
    assert e.value.code == 2 and capsys.readouterr().err.strip() == "error: --only: bf16-parity is given twice"
    with pytest.raises(SystemExit) as e:  # an empty name (it was an unknown check named '')
        run(gpu_check.main, ["--dry-run", "--only", "bf16-parity,,"])
    assert e.value.code == 2 and "error: --only: 'bf16-parity,,' holds an empty name" in capsys.readouterr().err


def test_relative_paths_name_folders_where_the_command_was_given(tmp_path, monkeypatch):
    """The checks run in the checkout: `--out gc` (relative) named tmp/gc for the summary but ROOT/gc for every check's
    --json, so each failed with "gc is not a directory"; a relative --compile-cache filled ROOT/cache."""
    seen = []
    monkeypatch.setattr(gpu_check, "run_check", lambda check, out, dry, limit, cache: seen.append((out, cache)) or {
        "status": "ok", "seconds": 0.0})
    monkeypatch.chdir(tmp_path)
    gpu_check.main(["--dry-run", "--quiet", "--out", "gc", "--compile-cache", "cache", "--only", "bf16-parity"])
    assert seen == [(tmp_path.resolve() / "gc", str(tmp_path.resolve() / "cache"))]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"  # a zombie has exited
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.parametrize("stuck", [True, False])
def test_a_check_s_whole_process_group_is_stopped(tmp_path, stuck):
    """A check that starts a child which would outlive it: at the check's limit (stuck), or when it exits (not
    stuck), the child is killed too."""
    script = tmp_path / "spawner.py"
    script.write_text(textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(tmp_path / 'child.pid')!r}, "w").write(str(child.pid))
        print("started", flush=True)
        time.sleep(120 if {stuck} else 0)
    """))
    t0 = time.perf_counter()
    r = run_check(Check("spawner", [str(script)], 1.0, plot=False), tmp_path, False, 4.0 if stuck else 60.0, "none")
    child = int((tmp_path / "child.pid").read_text())
    assert not alive(child), r
    assert time.perf_counter() - t0 < 40  # nobody waited for the child's two minutes
    if stuck:
        assert r["status"] == "failed" and r["reason"] == "over its 4 s share of the budget", r
    else:
        assert r["status"] == "ok" and r["output"] == ["started"], r
    assert (tmp_path / "spawner.log").read_text().startswith("started")


@pytest.mark.parametrize("value", ["nan", "inf", "1e999", "0", "-5", "ten"])
def test_a_budget_that_is_no_finite_positive_number_is_refused(value, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(["--dry-run", "--budget", value])
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --budget: must be a finite number > 0, got "), err


def test_an_out_that_cannot_be_a_directory_is_refused_first(tmp_path):
    (tmp_path / "afile").write_text("")
    one_line_error(run_python(ROOT / "bench" / "gpu_check.py", "--dry-run", "--out", tmp_path / "afile" / "sub"),
                   "--out", "afile is a file, not a directory")
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


def test_unknown_check_names_the_plan():
    one_line_error(run_python(ROOT / "bench" / "gpu_check.py", "--dry-run", "--only", "routing-sweep"),
                   "--only: unknown check 'routing-sweep' in --plan core")


@pytest.mark.slow
@pytest.mark.parametrize("which,chosen", [
    # one train bench with the hf peer and the GLA kernels (core); a sweep of the newest spec fields (extra): the
    # others are the same commands at other sizes, and are listed as not run
    ("core", ["small-train-b8", "gla-kernels"]),  # small-profile's command: test_profile_step.py's CLI test
    ("extra", ["gla-sweep"]),
    ("tuning", ["small-xla-cublas"]),  # a check with compiler flags: they reach the bench and its report
])
def test_dry_run_of_each_plan(tmp_path, capsys, which, chosen):
    """gpu_check.main in this process (its command line: test_unknown_check_names_the_plan); each check in its own."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    printed = run_main(gpu_check.main, "--dry-run", "--quiet", "--plan", which, "--budget", "3000", "--out", out,
                       "--only", ",".join(chosen), "--compile-cache", cache, capsys=capsys)
    summary = json.loads((out / f"summary-{which}.json").read_text())
    assert summary["complete"] and summary["dry_run"] and summary["plan"] == which
    assert {"torch", "jax", "flax", "optax", "transformers", "fla-core"} <= set(summary["versions"])
    fla_note = any(n.startswith("fla-core missing") for n in summary["notes"])
    assert fla_note == (summary["versions"]["fla-core"] == "missing"), summary["notes"]
    assert list(summary["checks"]) == [c.name for c in plan(which)]
    for name, r in summary["checks"].items():
        if name in chosen:
            assert r["status"] == "ok", (name, r)
            assert json.loads((out / f"{name}.json").read_text())["complete"], name
        else:
            assert r == {"status": "not run", "reason": "not in --only"}, (name, r)
        assert f" {name}" in printed.out
    assert any((cache / "jax").iterdir())  # the benches compiled into the cache gpu_check named
    if which == "tuning":
        flags = json.loads((out / "small-xla-cublas.json").read_text())["env"]["compiler_flags"]
        assert "--xla_gpu_enable_triton_gemm=false" in flags["XLA_FLAGS"], flags
    if which == "extra":  # the mixer sweep in train mode (test_gla_tools.py times it in decode mode)
        rows = json.loads((out / "gla-sweep.json").read_text())["results"]
        assert [(r["variant"], r["backend"]) for r in rows] == [
            (f"mixer={m}", b) for m in ("attention", "gla") for b in ("jax", "torch")]
        assert {r["attention"] for r in rows if r["variant"] == "mixer=gla"} == {"gla-chunk64"}
    if which == "core":  # gla-kernels is `gla_layer.py --kernel pure,pallas,fla --if-present`: the GPU's kernels listed
        log = (out / "gla-kernels.log").read_text()
        assert "skipped the jax twin's pallas" in log and "skipped the torch twin's fla" in log, log[-3000:]
        assert (out / "small-train-b8.png").is_file()
        assert any("jax/torch" in line for line in summary["targets"])


H100_GIB = 79.2  # torch.cuda.get_device_properties(0).total_memory of an H100 80GB HBM3, in GiB


H200_GIB = 140.4  # an H200's 143771 MiB


@pytest.mark.parametrize("device_gib, parts", [
    (H200_GIB, ["both", "hf"]),  # the twins (~71 GiB) interleaved as planned, transformers (~56 GiB) apart
    (H100_GIB, ["jax", "torch", "hf"]),  # the twins together need more than 85% of 79 GiB
])
def test_a_check_too_big_for_the_device_runs_in_parts(device_gib, parts):
    """llama-1b in both twins and transformers keeps about 127 GiB of jobs resident in one process: more than either
    GPU holds beside two CUDA contexts, and on an 80 GiB H100 it would end out of memory after minutes of compiling.
    Such a check runs in parts, the twins together where they fit; the other checks, and the dry run, are as
    planned."""
    core = plan("core")
    assert gpu_plan.fit(core, None) == core
    fitted = {c.name: c for c in gpu_plan.fit(core, device_gib)}
    names = [f"llama1b-train-b4-{p}" for p in parts]
    assert list(fitted) == ["small-train-b16", "small-train-b8", *names, "small-profile", "bf16-parity", "gla-kernels"]
    whole = next(c for c in core if c.name == "llama1b-train-b4")
    for name, value in zip(names, parts):
        part = fitted[name]
        assert part.group == whole.name and part.argv[part.argv.index("--backend") + 1] == value
        assert [a for a in part.argv if a != value] == [a for a in whole.argv if a != "all"]
        assert part.gib <= gpu_plan.FITS * device_gib and part.cost < whole.cost
        backends = gpu_plan.backends_of(part.argv)
        expected = gpu_plan.START_S + sum(gpu_plan.job_seconds(backends, "llama-1b-b4").values())
        assert part.cost == expected  # its own jobs' seconds, not an equal share
    assert sum(c.cost for c in fitted.values()) <= BUDGET_S
    assert all(why is None for why in runnable(list(fitted.values()), [c.name for c in core], device_gib).values())
    assert runnable(list(fitted.values()), ["small-train-b8"], device_gib)[names[0]] == "not in --only"
    assert runnable(list(fitted.values()), ["llama1b-train-b4"], device_gib)[names[-1]] is None


def test_a_one_backend_check_too_big_for_the_device_is_not_run_and_says_why(tmp_path, monkeypatch):
    """A sweep of llama-1b's three norms in one twin (about 105 GiB) cannot be split by backend: on an H100 it is
    not run, with the reason, and takes no share of the budget; the run's summary lists the parts it ran."""
    env = {"date": "2026-12-06", "device": "NVIDIA H100 80GB HBM3", "device_gib": H100_GIB, "versions": {},
           "dry_run": False, "notes": []}
    monkeypatch.setattr(gpu_check, "environment", lambda dry_run: env)
    ran = []
    monkeypatch.setattr(gpu_check, "run_check", lambda check, *_: ran.append(check.name) or {"status": "ok",
                                                                                          "seconds": 0.0})
    gpu_check.main(["--quiet", "--out", str(tmp_path), "--plan", "extra"])
    checks = json.loads((tmp_path / "summary-extra.json").read_text())["checks"]
    for twin in ("jax", "torch"):
        assert checks[f"llama1b-norms-{twin}"]["status"] == "not run"
        assert "GiB of device memory together, more than 85% of this device's 79 GiB" in (
            checks[f"llama1b-norms-{twin}"]["reason"])
    assert "llama1b-train-b4-chunked-remat-jax" in ran and "llama1b-norms-jax" not in ran  # ~71 GiB: in parts
    assert "small-train-b16-chunked" in ran  # 41 GiB: whole


@pytest.mark.parametrize("parts", [{"jax": "jax", "torch": "torch", "hf": "hf"},  # an H100's
                                   {"jax": "both", "torch": "both", "hf": "hf"}])  # an H200's
def test_the_targets_of_a_check_s_parts_are_read_together(tmp_path, parts):
    """The parts of a split check are one check's rows: the twins' ratio and each against transformers, a ratio of
    rows from two parts said to compare steps timed in separate processes (the twins' in one part are interleaved);
    a part stopped before its first row marks the check stopped early."""
    def row(backend, mfu, ms):
        return {"variant": "base", "backend": backend, "mfu": mfu, "step_s": {"median": ms / 1e3}}

    rows = {}
    for backend, mfu, ms in (("jax", 0.56, 150), ("torch", 0.54, 160), ("hf", 0.4, 200)):
        rows.setdefault(f"llama1b-train-b4-{parts[backend]}", []).append(row(backend, mfu, ms))
    for name, part_rows in rows.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"complete": True, "results": part_rows}))
    groups = dict.fromkeys(rows, "llama1b-train-b4")
    lines = gpu_plan.targets(tmp_path, list(rows), groups)
    apart = " (backends timed in separate processes)"
    twins_apart = apart if parts["jax"] != parts["torch"] else ""
    for expected in ("llama1b-train-b4 jax: MFU 56.0% (target >= 55%)",
                     f"llama1b-train-b4 base: jax/torch 0.94 (target 0.95-1.05){twins_apart}",
                     f"llama1b-train-b4 base: torch/hf 0.80 (target < 1){apart}"):
        assert expected in lines, (expected, lines)
    (tmp_path / "llama1b-train-b4-hf.json").write_text(json.dumps({"complete": False, "results": []}))
    lines = gpu_plan.targets(tmp_path, list(rows), groups)
    assert lines and all(line.startswith("llama1b-train-b4 (stopped early) ") for line in lines), lines
