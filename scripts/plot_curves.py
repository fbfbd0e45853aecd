"""Overlay the loss curves, gradient norms and DyT/Derf alpha values of training runs.

    python scripts/plot_curves.py runs/tiny runs/dyt --out curves.png

Reads each DIR/metrics.jsonl (scripts/train.py): the training loss (a moving average over --smooth
steps), the validation loss (dots), the corpus's entropy rate when known (dashed), the gradient norm,
and every `alpha` per layer (one color per run). The image is written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path

from shared_config.cli import Parser, UsageError, at_least, check_outputs, no_repeats, printable, run
from shared_config.config_file import FLOAT32_MAX
from shared_config.curves import plot
from shared_config.files import resolved
from shared_config.limits import quote
from shared_config.run_dir import METRICS_FILE
from shared_config.metrics import read_metrics

PLOTTED = ("step", "loss", "val_loss", "grad_norm", "entropy")  # the numbers of a record the curves read
MAX_ALPHA_CURVES = 4096  # alpha curves in one plot (a 2,000-layer DyT model's, ~2 s to draw), over all the runs


def load_runs(dirs: list[Path]) -> dict[str, list[dict]]:
    """{run name: metrics records}; a directory without training losses, or a record whose plotted fields are not
    numbers, is a usage error (unchecked, a loss "abc" or a list of scalars would be a traceback, a train record
    without a loss an empty plot and exit 0)."""
    runs, curves = {}, 0
    for d, label in zip(dirs, labels(dirs)):
        if not d.is_dir():  # a mistyped name, or a file: it was "no training metrics", as an empty run is
            raise UsageError(f"{d}: {'is not a directory' if d.exists() else 'no such directory'}; give run "
                             "directories written by scripts/train.py")
        records = read_metrics(d / METRICS_FILE)
        for i, r in enumerate(records, 1):
            if bad := [k for k in PLOTTED if k in r and type(r[k]) not in (int, float)]:
                raise UsageError(f"{d / METRICS_FILE}: record {i}: {bad[0]} must be a number, got {quote(r[bad[0]])}")
            scalars = r.get("scalars", {})
            if not isinstance(scalars, dict) or any(type(v) not in (int, float) for v in scalars.values()):
                raise UsageError(f"{d / METRICS_FILE}: record {i}: scalars must be an object of numbers, got "
                                 f"{quote(scalars)}")
            if huge := [(k, v) for k, v in [*((k, r[k]) for k in PLOTTED if k in r), *scalars.items()] if too_big(v)]:
                raise UsageError(f"{d / METRICS_FILE}: record {i}: {huge[0][0]} {quote(huge[0][1])} is past float32's "
                                 "range (train.py logs float32 numbers), the span an axis can draw")
            if ("loss" in r or "val_loss" in r or "scalars" in r) and "step" not in r:
                raise UsageError(f"{d / METRICS_FILE}: record {i} has no step")
        if not any(r.get("kind") == "train" and "loss" in r for r in records):
            raise UsageError(f"{d}: no training metrics ({METRICS_FILE}) to plot")
        # one alpha curve per name a run logs (2 per layer): 40,000 names in a 1.4 MB file drew for 36 s in 570 MB
        curves += len({name for r in records for name in r.get("scalars", {}) if name.endswith(".alpha")})
        if curves > MAX_ALPHA_CURVES:
            raise UsageError(f"{d / METRICS_FILE}: the runs up to it log {curves:,} alpha names, a curve each; one "
                             f"plot draws at most {MAX_ALPHA_CURVES:,}")
        runs[label] = records
    return runs


def too_big(x) -> bool:
    """A finite number past float32's range: ±1e308 (a metrics file edited, or made elsewhere) was matplotlib's
    traceback, an axis spanning more than float64 holds. NaN and ±inf (a diverged step's) are drawn as gaps."""
    return abs(x) > FLOAT32_MAX and not (type(x) is float and math.isinf(x))  # abs: an int past float's range too


def labels(dirs: list[Path]) -> list[str]:
    """Each run's label in the legend: its directory's name, or the path as given where names repeat (every run of
    the repeated name: `a/run run` labelled the second run by its path, "run", the first one's label, and its
    curves replaced the first run's). Printable: a name that is not UTF-8 was matplotlib's TypeError."""
    names = [d.name for d in dirs]
    return [printable(d.name if names.count(d.name) == 1 else str(d)) for d in dirs]


def main(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", type=Path, nargs="+", help="run directories written by scripts/train.py")
    p.add_argument("--out", type=Path, default=Path("curves.png"), help="the image (png, pdf, svg)")
    p.add_argument("--smooth", type=at_least(1), default=10, help="steps in the training loss's moving average")
    args = p.parse_args(argv)
    # also .PNG, as bench/compare.py's --plot takes; never a run's metrics (an --out linked to one was overwritten)
    check_outputs(plot_path=args.out, plot_flag="--out", inputs=[("DIR", d / METRICS_FILE) for d in args.dirs])
    no_repeats("run directories", [resolved(d) for d in args.dirs])
    plot(load_runs(args.dirs), args.out, args.smooth)
    print(args.out)


if __name__ == "__main__":
    run(main)
