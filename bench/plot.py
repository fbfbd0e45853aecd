"""Bar charts of a bench report: step time (and MFU on GPU) per variant and backend."""

from __future__ import annotations

from pathlib import Path

from shared_config.files import save_figure


def plot_results(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    variants = list(dict.fromkeys(r["variant"] for r in results))
    backends = list(dict.fromkeys(r["backend"] for r in results))
    panels = [("step time (ms)", lambda r: 1e3 * r["step_s"]["median"])]
    if all(r["mfu"] is not None for r in results):
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
    env = report["env"]
    fig.suptitle(f"{env['device']} | {env['mode']} | {env['dtype']} | batch {env['batch']} x seq {env['seq']}",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
