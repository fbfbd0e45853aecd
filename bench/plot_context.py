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

from pathlib import Path

from shared_config.cli import Parser, UsageError, check_outputs, no_repeats, run
from shared_config.curves import plain_text
from shared_config.files import resolved, save_figure

from bench.plot import MAX_LINES, read_report

COMPARABLE = ("device", "dtype", "batch", "spec", "set")  # env keys every report of one plot shares: one job each line


def same_key(value):
    """An env value as compared across reports: --set's list in any order (one model either way), without
    max_seq_len, which bounds the context each report's --seq-len needed, not the work of a decoded token."""
    if not isinstance(value, list):
        return value
    return sorted(item for item in map(str, value) if item.partition("=")[0].strip() != "max_seq_len")


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


@plain_text
def plot_context(series: dict, path: Path, title: str) -> None:
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
    check_outputs(plot_path=args.out, plot_flag="--out", inputs=[("reports", path) for path in args.reports])
    no_repeats("reports", [resolved(path) for path in args.reports])
    reports = [read_report(path) for path in args.reports]
    env = reports[0]["env"]
    for path, report in zip(args.reports, reports):  # named here: context_series sees no file names
        if report["env"]["mode"] != "decode":
            raise UsageError(f"{path}: a {report['env']['mode']} report: pass decode reports "
                             "(compare.py --mode decode)")
        # one line per (variant, backend) across the files: a point measured at another batch, dtype or device
        # (which the title names from the first file) is another curve, and so is one of another model: a variant's
        # label is its --sweep values alone (--spec where none), so `--spec tiny` and `--spec tiny --set n_layers=1`
        # were both "tiny", drawn as one curve
        if differ := [k for k in COMPARABLE if same_key(report["env"].get(k)) != same_key(env.get(k))]:
            key = differ[0]
            raise UsageError(f"{path} has {key} {report['env'].get(key)} and {args.reports[0]} {key} {env.get(key)}: "
                             "pass reports of one device, dtype, batch, spec and --set")
    series = context_series(reports)
    if len(series) > MAX_LINES:
        raise UsageError(f"the reports hold {len(series):,} (variant, backend) lines; one plot draws at most "
                         f"{MAX_LINES}")
    plot_context(series, args.out, f"{env['device']} | decode | {env['dtype']} | batch {env['batch']}")
    for (variant, backend), points in series.items():
        print(f"{variant:24s} {backend:6s} " + "  ".join(f"seq {s}: {1e3 * m:.2f} ms" for s, m, _, _ in points))


if __name__ == "__main__":
    run(main)
