"""Redraw a bench/compare.py report's bar chart (step time, and MFU on GPU) from its JSON.

    python bench/replot.py results.json --out results.png
"""

from __future__ import annotations

from pathlib import Path

from shared_config.cli import Parser, UsageError, check_outputs, run

from bench.plot import MAX_LINES, plot_results, read_report


def main(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("report", type=Path, help="a bench/compare.py --json report")
    p.add_argument("--out", type=Path, required=True, help="the image to write (.png, .pdf, .svg)")
    args = p.parse_args(argv)
    check_outputs(plot_path=args.out, plot_flag="--out", inputs=[("REPORT", args.report)])
    report = read_report(args.report)
    if (bars := len(report["results"])) > MAX_LINES:
        raise UsageError(f"{args.report} holds {bars:,} rows; one chart draws at most {MAX_LINES}")
    plot_results(report, args.out)
    print(args.out)


if __name__ == "__main__":
    run(main)
