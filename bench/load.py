"""Whether the machine was free enough for a fair CPU comparison: its load before and during the run, and per
row the process's CPU time against wall time over the timed steps.

Other work on the CPUs does not slow the frameworks alike: a step that fans out over every thread waits for
the slowest one (on 2 loaded cores at the default thread count torch once took 1,567 ms per step against JAX's
322, where an idle machine gives JAX 1.4x torch), so a loaded machine can turn the ratio upside down. The bench records
what it saw in the JSON and warns on
stderr in one line when the numbers cannot be trusted (docs/bench.md, "A fair CPU comparison").
"""

from __future__ import annotations

import os
import time

# A row is starved when its process got less than this share of the CPU time its threads could use.
MIN_CPU_SHARE = 0.5


def usable_cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def process_threads() -> int:
    """Threads of this process now (the frameworks' pools included): /proc on Linux, else Python's own."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


def busy_cpus(interval_s: float = 0.5) -> float | None:
    """CPUs kept busy by every process over the next `interval_s` seconds (from /proc/stat: non-idle jiffies
    over all jiffies, times the machine's CPUs), or None where /proc/stat is not there. Called while this
    process sleeps, it is the other work on the machine now, unlike the 1-minute load average, which still
    holds the last minute's work (a `pip install` just before the bench)."""
    def jiffies():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # total, idle + iowait

    try:
        total0, idle0 = jiffies()
        time.sleep(interval_s)
        total1, idle1 = jiffies()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def snapshot(measure_busy: bool = False) -> dict:
    """The machine's load averages (1, 5, 15 min: runnable threads, all processes), the CPUs this process may run on
    (take the first snapshot before the bench pins its threads), this process's threads and, with `measure_busy`,
    the CPUs other work keeps busy now (busy_cpus: half a second's sleep)."""
    one, five, fifteen = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    busy = {"busy_cpus": busy_cpus()} if measure_busy else {}
    return {"time": time.time(), "loadavg_1m": one, "loadavg_5m": five, "loadavg_15m": fifteen,
            "usable_cpus": usable_cpus(), "process_threads": process_threads(), **busy}


class CpuClock:
    """This process's CPU time (every thread) against wall time over the intervals it is started and stopped."""

    def __init__(self):
        self.cpu_s = self.wall_s = 0.0

    def __enter__(self):
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu_s += time.process_time() - self._cpu
        self.wall_s += time.perf_counter() - self._wall

    @property
    def share(self) -> float | None:
        """CPU seconds per wall second: up to the thread count for a step that keeps every thread busy."""
        return self.cpu_s / self.wall_s if self.wall_s > 0 else None


def fairness_problems(before: dict, during: list[dict], threads: int, rows: list[dict]) -> list[str]:
    """Why a CPU comparison cannot be fair, from the load snapshots (`before` the run, with the CPUs the process
    may use; `during` it: one per round), the threads each framework was given and the result rows (their
    `cpu_s_per_wall_s`); empty when nothing says so.

    - Other work before the run: the CPUs it kept busy just before (`busy_cpus`; where not measured, the 1-minute
      load average) above the CPUs the bench leaves free (cpus − threads), with half a CPU's slack.
    - Other work during it: the highest 1-minute load average seen during the rounds, less what this process
      itself used (its threads busy at most), above the free CPUs.
    - A starved row: the process's CPU time over wall time, per thread it was given, below MIN_CPU_SHARE
      (its threads waited for a CPU, or sat idle, for half the step).
    """
    cpus = before["usable_cpus"]
    problems, free = [], max(cpus - threads, 0)
    if before.get("busy_cpus") is not None:  # measured just before the run: other work now
        if before["busy_cpus"] > free + 0.5:
            problems.append(f"{before['busy_cpus']:.1f} CPUs busy with other work before the run with {free} of "
                            f"{cpus} CPUs not used by the bench's {threads} threads")
    elif before["loadavg_1m"] > free + 0.5:
        problems.append(f"load average {before['loadavg_1m']:.1f} before the run with {free} of {cpus} CPUs "
                        f"not used by the bench's {threads} threads")
    if during:
        peak = max(s["loadavg_1m"] for s in during)
        if peak - threads > free + 0.5:
            problems.append(f"load average up to {peak:.1f} during it")
    swept = len({r.get("variant") for r in rows}) > 1  # a sweep's rows: "torch 0.46, torch 0.29" named no variant
    starved = [f"{r['backend']}{' ' + r['variant'] if swept else ''} {r['cpu_s_per_wall_s']:.2f}" for r in rows
               if r.get("cpu_s_per_wall_s") is not None and r["cpu_s_per_wall_s"] < MIN_CPU_SHARE * min(threads, cpus)]
    if starved:
        problems.append(f"CPU-s per wall-s far below the {threads} thread(s): {', '.join(starved)}")
    return problems


def warning_line(problems: list[str]) -> str:
    """The one stderr line that says a comparison is not fair, and what to do."""
    return ("warning: this CPU comparison is not fair (" + "; ".join(problems) + "): step times and their ratio "
            "are the machine's load, not the frameworks'; run on an idle machine, with --threads 1 "
            "(docs/bench.md: a fair CPU comparison)")
