"""Bar charts of a bench report: step time (and MFU on GPU) per variant and backend (compare.py --plot, and
bench/replot.py from a report's JSON), and the reading of a report that plot_context.py and replot.py share."""

from __future__ import annotations

import sys
from pathlib import Path

from shared_config.cli import UsageError
from shared_config.curves import plain_text
from shared_config.files import read_json, save_figure
from shared_config.limits import quote

MAX_STEP_S = 1e6  # seconds: no step takes longer; 1e308 was matplotlib's "cannot be log-scaled" traceback
MAX_MFU = 1e6  # a fraction of the peak: past 1 with too low a --peak-tflops; bounded as step times are
MAX_LINES = 64  # (variant, backend) lines or bars one plot can show: a report of 20,000 rows drew for minutes


def is_time(x) -> bool:
    """A step time in seconds: a number (not true, NaN, Infinity), > 0 and at most MAX_STEP_S."""
    return type(x) in (int, float) and 0 < x <= MAX_STEP_S


def read_report(path: Path) -> dict:
    """A compare.py --json report, its shape checked (else any other JSON would be a KeyError
    traceback), with timed rows (else an empty plot and exit 0) whose times are step times (else NaN, negative, 0
    or true would draw a meaningless plot and exit 0); a stopped run's report (`"complete": false`) is named on
    stderr."""
    report = read_json(path)
    env, results = report.get("env"), report.get("results")
    fields = (("mode", str, "a string"), ("seq", int, "an integer"), ("device", str, "a string"),
              ("dtype", str, "a string"), ("batch", int, "an integer"))  # every field the plot and its title read
    # and the memory options and --set that the title names, where the report has them (a KeyError or TypeError
    # traceback when one was missing or not a string)
    memory = (("grad_accum_steps", int, "an integer"), ("remat", str, "a string"), ("loss_chunk", int, "an integer"))
    problem = ("no env object" if not isinstance(env, dict)
               else next((f"env.{k} is not {noun}" for k, kind, noun in fields if type(env.get(k)) is not kind), None)
               or next((f"env.{k} is not >= 1" for k in ("seq", "batch") if env[k] < 1), None)
               or next((f"env.{k} is not {noun}" for k, kind, noun in memory
                        if "remat" in env and type(env.get(k)) is not kind), None)
               or ("env.set is not a list of strings" if env.get("set") and not (
                   isinstance(env["set"], list) and all(isinstance(item, str) for item in env["set"])) else None)
               or ("no results list" if not isinstance(results, list) else None))
    rows = set()  # (variant, backend): a repeated one was drawn over the other, one bar for two rows
    for i, r in enumerate(results if problem is None else []):
        step = r.get("step_s") if isinstance(r, dict) else None
        if not (isinstance(step, dict) and isinstance(r.get("variant"), str) and isinstance(r.get("backend"), str)):
            problem = f"results[{i}] lacks variant, backend or step_s (median, p10, p90)"
        elif (r["variant"], r["backend"]) in rows:
            problem = f"results[{i}] repeats variant {r['variant']!r} of backend {r['backend']!r}"
        elif not all(is_time(step.get(k)) for k in ("median", "p10", "p90")):
            problem = (f"results[{i}].step_s must hold median, p10 and p90 in seconds, each a number > 0 and <= "
                       f"{MAX_STEP_S:g}")
        elif not step["p10"] <= step["median"] <= step["p90"]:
            problem = f"results[{i}].step_s must have p10 <= median <= p90"
        # past 1 where a --peak-tflops was below the rate reached (compare.py warns): the report holds it
        elif (mfu := r.get("mfu")) is not None and not (type(mfu) in (int, float) and 0 <= mfu <= MAX_MFU):
            problem = f"results[{i}].mfu must be null or a number in [0, {MAX_MFU:g}]"
        if problem:
            break
        rows.add((r["variant"], r["backend"]))
    # drawn as text: a lone surrogate (JSON's "\udcff") was matplotlib's TypeError traceback
    if problem is None and (odd := next((t for t in drawn_text(report) if not is_utf8(t)), None)) is not None:
        problem = f"{quote(odd)} is not UTF-8 text (a lone surrogate escape)"
    if problem:
        raise UsageError(f"{path}: not a bench/compare.py --json report: {problem}")
    if not results:
        raise UsageError(f"{path}: no timed rows to plot (a run stopped before its first round of timed steps)")
    if report.get("complete") is False:
        print(f"warning: {path} is a stopped run's report (\"complete\": false): its rows are over the steps it had "
              "(n_steps)", file=sys.stderr)
    return report


def drawn_text(report: dict) -> list[str]:
    """The strings of a checked report that a plot's labels and title show."""
    env = report["env"]
    return [env["mode"], env["device"], env["dtype"], env.get("remat", ""), *(env.get("set") or []),
            *(t for r in report["results"] for t in (r["variant"], r["backend"]))]


def is_utf8(text: str) -> bool:
    """Whether `text` can be written as UTF-8 (no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def figure(x: float, decimals: int) -> str:
    """`x` for a table: `decimals` decimals, or 3 significant digits where those would show less of it (a CPU's
    0.037 GFLOP/s read 0.0, a decoded 0.33 tokens/s read 0: rates of nothing, in a table of measured runs)."""
    return f"{x:.{decimals}f}" if x == 0 or abs(x) >= 10 ** (2 - decimals) else f"{x:.3g}"


def report_title(env: dict) -> str:
    """What a report (compare.py's JSON) measured, in one line: the title of its table and of its plot."""
    memory = (f" | grad_accum {env['grad_accum_steps']}, remat {env['remat']}, loss_chunk {env['loss_chunk']}"
              if env["mode"] == "train" and "remat" in env else "")
    changed = f" | --set {' '.join(env['set'])}" if env.get("set") else ""  # the variants' labels never show it
    shape = f"batch {env['batch']} x seq {env['seq']}"
    return f"{env['device']} | {env['mode']} | {env['dtype']} | {shape}{memory}{changed}"


@plain_text
def plot_results(report: dict, path: Path) -> None:
    """The bars of `report` (compare.py's JSON) to `path` (.png, .pdf or .svg)."""
    import matplotlib.pyplot as plt

    results = report["results"]
    variants = list(dict.fromkeys(r["variant"] for r in results))
    backends = list(dict.fromkeys(r["backend"] for r in results))
    panels = [("step time (ms)", lambda r: 1e3 * r["step_s"]["median"])]
    if all(r.get("mfu") is not None for r in results):
        panels.append(("MFU (%)", lambda r: 100 * r["mfu"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 + 2 * len(variants), 4), squeeze=False)
    width = 0.8 / len(backends)
    for ax, (title, value) in zip(axes[0], panels):
        for i, backend in enumerate(backends):
            rows = {r["variant"]: r for r in results if r["backend"] == backend}
            xs = [j + i * width for j, v in enumerate(variants) if v in rows]
            ys = [value(rows[v]) for v in variants if v in rows]
            bars = ax.bar(xs, ys, width, label=backend)
            if title.startswith("step"):
                lo = [1e3 * (rows[v]["step_s"]["median"] - rows[v]["step_s"]["p10"]) for v in variants if v in rows]
                hi = [1e3 * (rows[v]["step_s"]["p90"] - rows[v]["step_s"]["median"]) for v in variants if v in rows]
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt="none", ecolor="black", capsize=3)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks([j + width * (len(backends) - 1) / 2 for j in range(len(variants))], variants, rotation=15,
                      fontsize=8)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(report_title(report["env"]), fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)

