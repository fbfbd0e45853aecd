"""bench/load.py: a loaded machine is noticed (load before and during the run, a row's CPU time against wall time
per thread), with faked numbers; the bench records the load in its JSON and warns in one stderr line."""

import json
import time

import pytest

from bench import compare, load

from ..support.common import run_python


def snap(loadavg: float, cpus: int = 2) -> dict:
    return {"time": 0.0, "loadavg_1m": loadavg, "loadavg_5m": loadavg, "loadavg_15m": loadavg,
            "usable_cpus": cpus, "process_threads": 1}


def rows(*shares):
    return [{"backend": b, "cpu_s_per_wall_s": s} for b, s in zip(("jax", "torch", "hf"), shares)]


def test_a_starved_row_of_a_sweep_is_named_by_its_variant():
    """A sweep's rows share their backends: "torch 0.46, torch 0.29" did not say which variant waited."""
    sweep = [{**r, "variant": v} for r, v in zip(rows(0.3, 0.2) * 2, ("norm_type=rms",) * 2 + ("norm_type=dyt",) * 2)]
    problems = load.fairness_problems(snap(0.2), [snap(2.0)], 2, sweep)
    assert any(p.endswith("torch norm_type=rms 0.20, jax norm_type=dyt 0.30, torch norm_type=dyt 0.20") for p in
               problems), problems


def test_an_idle_machine_is_fair():
    # 2 CPUs, 1 thread: our own thread busy during the rounds (load ~1), nothing else
    assert load.fairness_problems(snap(0.3), [snap(1.1), snap(1.2)], 1, rows(0.98, 1.0)) == []
    # every CPU used by the bench: the load it makes itself is not counted against it
    assert load.fairness_problems(snap(0.2), [snap(2.3)], 2, rows(1.6, 1.9)) == []


@pytest.mark.parametrize("before, during, threads, shares, found", [
    (3.0, [1.1], 1, (1.0, 1.0), "load average 3.0 before the run with 1 of 2 CPUs not used"),
    (0.2, [1.0, 4.9], 1, (1.0, 1.0), "load average up to 4.9 during it"),
    (0.2, [2.0], 2, (0.7, 1.8), "CPU-s per wall-s far below the 2 thread(s): jax 0.70"),
    (0.2, [1.0], 1, (0.95, 0.31), "CPU-s per wall-s far below the 1 thread(s): torch 0.31"),
])
def test_a_loaded_machine_is_named(before, during, threads, shares, found):
    problems = load.fairness_problems(snap(before), [snap(x) for x in during], threads, rows(*shares))
    assert any(found in p for p in problems), problems
    line = load.warning_line(problems)
    assert "\n" not in line and line.startswith("warning: this CPU comparison is not fair") and "--threads 1" in line


CLOCKED = """
import json, time
from bench import load
idle, busy = load.CpuClock(), load.CpuClock()
with idle:
    time.sleep(0.2)  # wall time without CPU time
for _ in range(2):  # two intervals add up
    with busy:
        end = time.perf_counter() + 0.1
        while time.perf_counter() < end:
            pass
print(json.dumps({"idle": idle.share, "busy_wall": busy.wall_s, "busy_cpu": busy.cpu_s}))
"""


def test_cpu_clock_counts_busy_and_idle_time():
    """In a fresh process: the clock counts every thread of its process, and a test worker may hold threads that
    earlier tests started and that still run (a share of 0.64 was measured in one around a 50 ms sleep)."""
    r = run_python("-c", CLOCKED)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    assert got["idle"] < 0.5, got
    assert got["busy_wall"] >= 0.2 and 0 < got["busy_cpu"] <= got["busy_wall"] * 1.05, got
    assert load.CpuClock().share is None


def test_snapshot_and_the_json_record():
    s = load.snapshot()
    assert s["usable_cpus"] >= 1 and s["process_threads"] >= 1 and s["loadavg_1m"] >= 0
    args = compare.parse_args(["--threads", "1"])
    assert compare.machine_load(args, s, [s]) == {"before": s, "during": [s], "threads": 1}


def test_each_row_carries_its_cpu_time():
    from types import SimpleNamespace

    from bench import timing
    from shared_config import load_spec

    clock = load.CpuClock()
    clock.cpu_s, clock.wall_s = 0.3, 1.2  # 4 steps, each 75 ms of CPU in 300 ms of wall time: a starved row
    bench = SimpleNamespace(attention="sdpa", info={"compile": "eager", "cpu": clock})
    args = SimpleNamespace(mode="train", batch=8, seq=256, dtype="float32", peak_tflops=None)
    row = timing.result("tiny", "torch", load_spec("tiny"), bench, 1.0, [0.3] * 4, [], args, "cpu (x86_64)", 4)
    assert row["cpu_s_per_wall_s"] == pytest.approx(0.25) and row["cpu_s_per_step"] == pytest.approx(0.075)
    assert "cpu" not in row and load.fairness_problems(snap(0.1), [], 1, [row])


def test_other_work_now_outweighs_the_last_minute_s_load_average():
    """Measured just before the run, the CPUs other work keeps busy decide, not the 1-minute load average, which
    still holds the last minute's work (a `pip install` right before the README's main job)."""
    idle_now = {**snap(0.9), "busy_cpus": 0.1}
    assert load.fairness_problems(idle_now, [snap(2.2)], 2, rows(1.8, 1.9)) == []
    busy_now = {**snap(0.1), "busy_cpus": 1.7}
    problems = load.fairness_problems(busy_now, [snap(2.2)], 2, rows(1.8, 1.9))
    assert any("1.7 CPUs busy with other work before the run" in p for p in problems), problems


def test_busy_cpus_sees_a_busy_thread():
    import threading

    stop = time.perf_counter() + 1.0
    spinner = threading.Thread(target=lambda: [None for _ in iter(lambda: time.perf_counter() < stop, False)])
    spinner.start()
    busy = load.busy_cpus(0.3)
    spinner.join()
    if busy is None:
        pytest.skip("no /proc/stat on this platform")
    assert busy >= 0.5, busy  # one spinning thread keeps about one CPU busy
