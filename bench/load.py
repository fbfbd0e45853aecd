"""Whether the machine was free enough for a fair CPU comparison: its load before and during the run, and per
row the process's CPU time against wall time over the timed steps.

Other work on the CPUs does not slow the frameworks alike: a step that fans out over every thread waits for
the slowest one (on 2 loaded cores at the default thread count torch once took 1,567 ms per step against JAX's
322, where an idle machine gives JAX 1.4x torch), so a loaded machine can turn the ratio upside down. The bench records what it saw in the JSON and warns on
stderr in one line when the numbers cannot be trusted (README "Bench" → "A fair CPU comparison").
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


def snapshot() -> dict:
    """The machine's load averages (1, 5, 15 min: runnable threads, all processes), the CPUs this process may run on
    (take the first snapshot before the bench pins its threads) and this process's threads."""
    one, five, fifteen = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"time": time.time(), "loadavg_1m": one, "loadavg_5m": five, "loadavg_15m": fifteen,
            "usable_cpus": usable_cpus(), "process_threads": process_threads()}


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

    - Other work before the run: a 1-minute load average above the CPUs the bench leaves free (cpus − threads).
    - Other work during it: the highest 1-minute load average seen during the rounds, less what this process
      itself used (its threads busy at most), above the free CPUs.
    - A starved row: the process's CPU time over wall time, per thread it was given, below MIN_CPU_SHARE
      (its threads waited for a CPU, or sat idle, for half the step).
    """
    cpus = before["usable_cpus"]
    problems, free = [], max(cpus - threads, 0)
    if before["loadavg_1m"] > free + 0.5:
        problems.append(f"load average {before['loadavg_1m']:.1f} before the run with {free} of {cpus} CPUs "
                        f"not used by the bench's {threads} threads")
    if during:
        peak = max(s["loadavg_1m"] for s in during)
        if peak - threads > free + 0.5:
            problems.append(f"load average up to {peak:.1f} during it")
    starved = [f"{r['backend']} {r['cpu_s_per_wall_s']:.2f}" for r in rows
               if r.get("cpu_s_per_wall_s") is not None and r["cpu_s_per_wall_s"] < MIN_CPU_SHARE * min(threads, cpus)]
    if starved:
        problems.append(f"CPU-s per wall-s far below the {threads} thread(s): {', '.join(starved)}")
    return problems


def warning_line(problems: list[str]) -> str:
    """The one stderr line that says a comparison is not fair, and what to do."""
    return ("warning: this CPU comparison is not fair (" + "; ".join(problems) + "): step times and their ratio "
            "are the machine's load, not the frameworks'; run on an idle machine, with --threads 1 (README "
            "\"Bench\": a fair CPU comparison)")
