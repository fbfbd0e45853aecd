"""Loss curves, gradient norms and DyT/Derf alpha values of training runs, drawn from their metrics records
(shared_config/run_dir.py's metrics.jsonl) into one image: scripts/plot_curves.py and the norm study's curves.png;
and `plain_text`, which every plot of the project draws under."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from .files import save_figure


def plain_text(draw):
    """`draw` (a function that makes and saves a figure) run with matplotlib's Agg backend and its text taken as
    written: the labels and titles come from the user (a run directory's name, a --weights path, a report's variants
    and device), and matplotlib read a pair of `$` in them as math, `$x$` drawn as an italic x and `$\\frac{$` a
    ParseSyntaxException traceback, after the work (parity_report.py's plot, after its training)."""
    @functools.wraps(draw)
    def plain(*args, **kwargs):
        import matplotlib

        matplotlib.use("Agg")
        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return plain


def series(records: list[dict], kind: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` in the records of `kind` that have it."""
    rows = [(r["step"], r[key]) for r in records if r.get("kind") == kind and key in r]
    return tuple(np.array(c, dtype=float) for c in zip(*rows)) if rows else (np.array([]), np.array([]))


def alphas(records: list[dict]) -> dict[str, tuple[list, list]]:
    """{alpha name: (steps, values)} from the records that carry the scalars."""
    out: dict[str, tuple[list, list]] = {}
    for r in records:
        for name, value in r.get("scalars", {}).items():
            if name.endswith(".alpha"):
                out.setdefault(name, ([], []))
                out[name][0].append(r["step"])
                out[name][1].append(value)
    return out


def moving_average(x: np.ndarray, n: int) -> np.ndarray:
    """The mean of each value and the n − 1 before it (fewer at the start)."""
    n = min(n, len(x))  # the same means: plot_curves.py --smooth 10**20 overflowed a C long
    c = np.cumsum(np.insert(x, 0, 0.0))
    lo = np.maximum(np.arange(1, len(x) + 1) - n, 0)
    return (c[1:] - c[lo]) / (np.arange(1, len(x) + 1) - lo)


@plain_text
def plot(runs: dict[str, list[dict]], out: Path, smooth: int = 10) -> None:
    """Loss, gradient norm and (when any run has them) alpha panels, one color per run."""
    import matplotlib.pyplot as plt

    with_alpha = any(alphas(r) for r in runs.values())
    fig, axes = plt.subplots(1, 3 if with_alpha else 2, figsize=(15 if with_alpha else 10, 4.2))
    loss_ax, grad_ax = axes[0], axes[1]
    entropies = set()
    for (name, records), color in zip(runs.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10):
        steps, loss = series(records, "train", "loss")
        loss_ax.plot(steps, moving_average(loss, smooth), color=color, lw=1.2, label=name)
        val_steps, val = series(records, "eval", "val_loss")
        loss_ax.plot(val_steps, val, "o", color=color, ms=4)
        entropies.update(r["entropy"] for r in records if r.get("entropy") is not None)
        grad_ax.plot(*series(records, "train", "grad_norm"), color=color, lw=0.8, label=name)
        for i, (steps_, values) in enumerate(alphas(records).values()):  # none unless with_alpha
            axes[2].plot(steps_, values, color=color, lw=0.9, alpha=0.7, label=name if i == 0 else None)
    for h in entropies:
        loss_ax.axhline(h, color="k", ls="--", lw=0.8, label=f"entropy rate {h:.3f}")
    loss_ax.set(xlabel="step", ylabel=f"loss (train: mean of {smooth} steps; dots: validation)", title="loss")
    grad_ax.set(xlabel="step", ylabel="gradient norm (before clipping)", yscale="log", title="gradient norm")
    if with_alpha:
        axes[2].set(xlabel="step", ylabel="alpha", title="DyT / Derf alpha, every layer")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out, dpi=110)
    plt.close(fig)
