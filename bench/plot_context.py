"""Per-token decode time against the context length, from decode reports of compare.py at several --seq-len.

    for s in 32 64 128 256 512; do
        python bench/compare.py --mode decode --spec gla-tiny --set max_seq_len=1024 --sweep mixer=attention,gla \\
            --seq-len $s --json ctx-$s.json
    done
    python bench/plot_context.py ctx-*.json --out decode-context.png

One line per (variant, backend): the median decode step (ms per token, p10-p90 band) at each prompt length.
Attention reads a cache that grows with the context; a GLA layer's state [B, H, K', V'] does not.
"""

from __future__ import annotations

import sys
from pathlib import Path

from shared_config.cli import Parser, UsageError, check_outputs, no_repeats, run
from shared_config.files import read_json, save_figure


MAX_STEP_S = 1e6  # seconds: no decode step takes longer; 1e308 was matplotlib's "cannot be log-scaled" traceback
MAX_LINES = 64  # (variant, backend) lines one plot can show: a report of 20,000 rows drew for minutes


def is_time(x) -> bool:
    """A step time in seconds: a number (not true, NaN, Infinity), > 0 and at most MAX_STEP_S."""
    return type(x) in (int, float) and 0 < x <= MAX_STEP_S


def read_report(path: Path) -> dict:
    """A compare.py --json report, its shape checked (any other JSON was a KeyError traceback), with timed rows (one
    without drew an empty plot and exited 0) whose times are step times (NaN, negative, 0 or true drew a meaningless
    plot and exited 0); a stopped run's report (`"complete": false`) is named on stderr."""
    report = read_json(path)
    env, results = report.get("env"), report.get("results")
    fields = (("mode", str, "a string"), ("seq", int, "an integer"), ("device", str, "a string"),
              ("dtype", str, "a string"), ("batch", int, "an integer"))  # every field the plot and its title read
    problem = ("no env object" if not isinstance(env, dict)
               else next((f"env.{k} is not {noun}" for k, kind, noun in fields if type(env.get(k)) is not kind), None)
               or next((f"env.{k} is not >= 1" for k in ("seq", "batch") if env[k] < 1), None)
               or ("no results list" if not isinstance(results, list) else None))
    for i, r in enumerate(results if problem is None else []):
        step = r.get("step_s") if isinstance(r, dict) else None
        if not (isinstance(step, dict) and isinstance(r.get("variant"), str) and isinstance(r.get("backend"), str)):
            problem = f"results[{i}] lacks variant, backend or step_s (median, p10, p90)"
        elif not all(is_time(step.get(k)) for k in ("median", "p10", "p90")):
            problem = (f"results[{i}].step_s must hold median, p10 and p90 in seconds, each a number > 0 and <= "
                       f"{MAX_STEP_S:g}")
        elif not step["p10"] <= step["median"] <= step["p90"]:
            problem = f"results[{i}].step_s must have p10 <= median <= p90"
        if problem:
            break
    if problem:
        raise UsageError(f"{path}: not a bench/compare.py --json report: {problem}")
    if not results:
        raise UsageError(f"{path}: no timed rows to plot (a run stopped before its first round of timed steps)")
    if report.get("complete") is False:
        print(f"warning: {path} is a stopped run's report (\"complete\": false): its rows are over the steps it had "
              "(n_steps)", file=sys.stderr)
    return report


def context_series(reports: list[dict]) -> dict[tuple[str, str], list[tuple[int, float, float, float]]]:
    """{(variant, backend): [(seq, median, p10, p90) of the decode step in seconds], by seq}; decode reports only."""
    series: dict = {}
    for report in reports:
        if report["env"]["mode"] != "decode":
            raise UsageError(f"a {report['env']['mode']} report: pass decode reports (compare.py --mode decode)")
        for r in report["results"]:
            s, points = r["step_s"], series.setdefault((r["variant"], r["backend"]), [])
            if any(seq == report["env"]["seq"] for seq, *_ in points):  # the line went back and forth at one seq
                raise UsageError(f"{r['variant']} {r['backend']} at --seq-len {report['env']['seq']} is in two "
                                 "reports: pass one report per prompt length")
            points.append((report["env"]["seq"], s["median"], s["p10"], s["p90"]))
    return {k: sorted(v) for k, v in series.items()}


def plot_context(series: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (variant, backend), points in series.items():
        seq, med, lo, hi = zip(*points)
        ax.plot(seq, [1e3 * m for m in med], marker="o", label=f"{variant} {backend}")
        ax.fill_between(seq, [1e3 * x for x in lo], [1e3 * x for x in hi], alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (prompt tokens)")
    ax.set_ylabel("decode step (ms per token)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", type=Path, help="compare.py --json files of --mode decode runs")
    p.add_argument("--out", type=Path, required=True, help="the image to write (.png, .pdf, .svg)")
    args = p.parse_args(argv)
    check_outputs(plot_path=args.out, plot_flag="--out")
    no_repeats("reports", [path.resolve() for path in args.reports])
    reports = [read_report(path) for path in args.reports]
    env = reports[0]["env"]
    for path, report in zip(args.reports, reports):  # named here: context_series sees no file names
        if report["env"]["mode"] != "decode":
            raise UsageError(f"{path}: a {report['env']['mode']} report: pass decode reports "
                             "(compare.py --mode decode)")
        # one line per (variant, backend) across the files: a point measured at another batch, dtype or device
        # (which the title names from the first file) is another curve
        if differ := [k for k in ("device", "dtype", "batch") if report["env"][k] != env[k]]:
            key = differ[0]
            raise UsageError(f"{path} has {key} {report['env'][key]} and {args.reports[0]} {key} {env[key]}: pass "
                             "reports of one device, dtype and batch")
    series = context_series(reports)
    if len(series) > MAX_LINES:
        raise UsageError(f"the reports hold {len(series):,} (variant, backend) lines; one plot draws at most "
                         f"{MAX_LINES}")
    plot_context(series, args.out, f"{env['device']} | decode | {env['dtype']} | batch {env['batch']}")
    for (variant, backend), points in series.items():
        print(f"{variant:24s} {backend:6s} " + "  ".join(f"seq {s}: {1e3 * m:.2f} ms" for s, m, _, _ in points))


if __name__ == "__main__":
    run(main)
