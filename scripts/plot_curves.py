"""Overlay the loss curves, gradient norms and DyT/Derf alpha values of training runs.

    python scripts/plot_curves.py runs/tiny runs/dyt --out curves.png

Reads each DIR/metrics.jsonl (scripts/train.py): the training loss (a moving average over --smooth
steps), the validation loss (dots), the corpus's entropy rate when known (dashed), the gradient norm,
and every `alpha` per layer (one color per run). The image is written atomically.
"""

from __future__ import annotations

from pathlib import Path

from shared_config.cli import Parser, UsageError, check_outputs, no_repeats, run
from shared_config.curves import plot
from shared_config.run_dir import METRICS_FILE, read_metrics


def load_runs(dirs: list[Path]) -> dict[str, list[dict]]:
    """{run name: metrics records}; a directory without metrics is a usage error."""
    runs = {}
    for d in dirs:
        records = read_metrics(d / METRICS_FILE)
        if not any(r.get("kind") == "train" for r in records):
            raise UsageError(f"{d}: no training metrics ({METRICS_FILE}) to plot")
        runs[d.name if d.name not in runs else str(d)] = records
    return runs


def main(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", type=Path, nargs="+", help="run directories written by scripts/train.py")
    p.add_argument("--out", type=Path, default=Path("curves.png"), help="the image (png, pdf, svg)")
    p.add_argument("--smooth", type=int, default=10, help="steps in the training loss's moving average")
    args = p.parse_args(argv)
    if args.smooth < 1:
        raise UsageError("--smooth must be >= 1")
    check_outputs(plot_path=args.out, plot_flag="--out")  # also .PNG, as bench/compare.py's --plot takes
    no_repeats("run directories", [d.resolve() for d in args.dirs])
    plot(load_runs(args.dirs), args.out, args.smooth)
    print(args.out)


if __name__ == "__main__":
    run(main)
