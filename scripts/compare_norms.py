"""The normalization study: RMSNorm, DyT and Derf, pre and peri placement (LayerNorm as a reference),
the tiny family trained in both twins on the embedded corpus, judged against the usual DyT criteria.

    python scripts/compare_norms.py --steps 300 --out runs/norms
    python scripts/compare_norms.py --steps 300 --set final_alpha_init=2.0     # a change to every run
    python scripts/compare_norms.py --mixer gla --steps 300 --out runs/gla-norms  # Pre/Peri x RMS/DyT in gla-tiny
    python scripts/compare_norms.py --configs rms-deepnorm,dyt-deepnorm,rms-hybrid,dyt-hybrid   # any placement
    python scripts/compare_norms.py --configs rms-peri,dyt-peri --set embed_norm=true  # Peri-LN as published
    python scripts/compare_norms.py --seeds 0,1,2 --backends jax   # mean ± std over three seeds, judged on the means

Writes OUT/norms.md (the table and the criteria, also printed), OUT/norms.json (every run's numbers)
and OUT/curves.png, and trains into OUT/runs/NORM-PLACEMENT-BACKEND, or NORM-PLACEMENT-BACKEND-seedSEED with
--seeds (replacing earlier results; the curves are the first seed's).
The criteria: DyT and Derf within 0.5 perplexity of RMSNorm at the same placement; no NaN/Inf in
any run; which placement has the lowest gradient-norm variance (over the steps after warmup).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from shared_config import SpecError, load_spec
from shared_config.cli import UsageError, run
from shared_config.config_file import did_you_mean
from shared_config.curves import plot
from shared_config.data import TokenData, synthetic_corpus
from shared_config.loop import finite_step
from shared_config.parity import loss_rel
from shared_config.run import Run, split_overrides
from shared_config.run_dir import WEIGHTS_FILE, latest_checkpoint
from shared_config.spec import CHOICES
from shared_config.hardware import check_gla_kernel
from shared_config.study import (NORM_PRESETS, plus_minus, seeds_said, spread, study_args, study_dir, study_parser,
                                 study_report, study_run, train_all, write_results)
from shared_config.twins import twin

CONFIGS = ["rms-pre", "rms-peri", "dyt-pre", "dyt-peri", "derf-pre", "derf-peri", "layernorm-pre"]
PPL_MARGIN = 0.5  # DyT/Derf may trail RMSNorm by this much perplexity
CONSTANTS = ("entropy",)  # a row's numbers that no seed changes (the embedded corpus's): no spread over --seeds
SETS = {  # the spec keys each run takes from its config or from --mixer: a --set of one is refused
    "norm_type": "the study sets it per config, NORM in --configs NORM-PLACEMENT (e.g. --configs dyt-pre)",
    "norm_placement": "the study sets it per config, PLACEMENT in --configs NORM-PLACEMENT (e.g. --configs rms-peri)",
    "mixer": "the study sets it from --mixer (attention or gla)",
}


def make_run(config: str, backend: str, steps: int, out: Path, changes: tuple[dict, dict], data: TokenData,
             seed: int | None = None) -> Run:
    """The run of one configuration in one twin (under one of --seeds): the tiny preset of its norm, on the embedded
    corpus."""
    norm, placement = config.split("-")
    spec_changes, cfg_changes = changes
    preset = GLA_PRESET if spec_changes.get("mixer") == "gla" else NORM_PRESETS[norm]
    try:
        spec = load_spec(preset).replace(vocab_size=data.vocab_size, norm_type=norm, norm_placement=placement,
                                         **spec_changes)
    except SpecError as e:  # named by its configuration, as compare_routing.py names them
        raise UsageError(f"{config}: {e}") from None
    return study_run(spec, cfg_changes, steps, data, out, config, backend, seed)


def summarize(run_: Run, records: list[dict], stopped_at: int | None) -> dict:
    """One run's row: final validation loss and perplexity, alpha range, grad-norm variance, non-finite steps."""
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    scalars = next((r["scalars"] for r in reversed(train) if "scalars" in r), {})
    alpha = [v for k, v in scalars.items() if k.endswith(".alpha")]
    after_warmup = [r["grad_norm"] for r in train if r["step"] > run_.cfg.warmup_steps and finite_step(r)]
    # a variance needs two values: one step after warmup was a variance of 0, the "lowest" of the study
    last = evals[-1] if evals and stopped_at is None else {}
    return {
        "val_loss": last.get("val_loss"), "val_ppl": last.get("val_ppl"),  # the loop's overflow-safe perplexity
        "alpha_min": min(alpha) if alpha else None, "alpha_max": max(alpha) if alpha else None,
        "grad_norm_var": float(np.var(after_warmup)) if len(after_warmup) > 1 else None,
        "nonfinite_steps": sum(not finite_step(r) for r in train), "stopped_at": stopped_at,
        "losses": [r["loss"] for r in train], "entropy": run_.data.entropy,
        "outputs": norm_output_histograms(run_) if stopped_at is None else None,
    }


def study(configs: list[str], backends: list[str], steps: int, out: Path, changes: tuple[dict, dict],
          quiet: bool = False, seeds: list[int] | None = None) -> tuple[dict, dict]:
    """Train every configuration in every backend (once per seed of `seeds`); ({config: {backend: row}},
    {config: {backend: metrics}})."""
    return train_all(configs, backends, lambda c, b, data, seed: make_run(c, b, steps, out, changes, data, seed),
                     summarize, twin, "norm study", quiet, seeds, CONSTANTS)


def twin_gap(rows: dict) -> float | None:
    """max over steps of |loss_jax − loss_torch| / loss_torch, where both twins ran, over the steps before either was
    stopped by a NaN/Inf (its last loss)."""
    if not {"jax", "torch"} <= rows.keys():
        return None
    if "seeds" in rows["jax"]:  # the largest gap of any seed's pair of runs
        gaps = [twin_gap({b: rows[b]["seeds"][seed] for b in ("jax", "torch")}) for seed in rows["jax"]["seeds"]]
        return max((g for g in gaps if g is not None), default=None)
    a, b = np.array(rows["jax"]["losses"]), np.array(rows["torch"]["losses"])
    n = min(len(a), len(b), *(rows[t]["stopped_at"] - 1 for t in ("jax", "torch") if rows[t]["stopped_at"]))
    return float(np.max(loss_rel(a[:n], b[:n]))) if n > 0 else None  # a loss of 0 too


def gap_cell(rows: dict) -> str:
    """The table's loss-gap cell: the gap, or, where a NaN/Inf stopped a twin's run, which twin at which step and the
    gap over the steps before (the cell was `nan`, what had happened unsaid)."""
    stops = {b: rows[b]["stopped_at"] for b in ("jax", "torch") if rows.get(b, {}).get("stopped_at") is not None}
    gap = twin_gap(rows)
    if not stops or not {"jax", "torch"} <= rows.keys():
        return fmt(gap, ".1e")
    at = {b: f"step {step}{seed_of(rows[b])}" for b, step in stops.items()}  # with --seeds, the earliest stop's seed
    if len(set(at.values())) == 1:
        said = f"{' and '.join(stops)} stopped at {next(iter(at.values()))}"
    else:
        said = ", ".join(f"{b} stopped at {where}" for b, where in at.items())
    # with --seeds the gap is the largest of any seed's, each over its own steps: "up to step N" named the earliest
    # stop's, where a seed that ran on had given it
    upto = "over each seed's steps before a stop" if "seeds" in rows["jax"] else f"up to step {min(stops.values()) - 1}"
    return f"{said} (non-finite)" + ("" if gap is None else f"; {gap:.1e} {upto}")


def criteria(results: dict, main: str) -> list[tuple[str, bool | None, str]]:
    """(criterion, passed or None, detail): the perplexity margin, finiteness, the lowest gradient-norm variance."""
    rows = {config: by_backend[main] for config, by_backend in results.items()}
    return perplexity_criteria(rows) + [finite_criterion(results)] + variance_criteria(rows) + output_criteria(rows)


def perplexity_criteria(rows: dict) -> list[tuple]:
    """DyT and Derf within PPL_MARGIN perplexity of RMSNorm at the same placement."""
    out = []
    for config, row in rows.items():
        norm, placement = config.split("-")
        ref = rows.get(f"rms-{placement}")
        if norm in ("dyt", "derf") and ref:
            name = f"{config} within {PPL_MARGIN} perplexity of rms-{placement}"
            if judged := unfinished(name, config, row, f"rms-{placement}", ref):
                out.append(judged)
                continue
            gap = row["val_ppl"] - ref["val_ppl"]  # with --seeds: of the means
            out.append((name, gap <= PPL_MARGIN, f"{plus_minus(row, 'val_ppl', '.2f', '—')} vs "
                        f"{plus_minus(ref, 'val_ppl', '.2f', '—')} ({gap:+.2f})"))
    return out


def unfinished(name: str, config: str, row: dict, ref_config: str, ref: dict) -> tuple | None:
    """A comparison with a run a NaN/Inf stopped: FAIL when it is `config`'s own, undecided (—) when the reference's,
    with the step in the detail; None when both finished. A stopped run has no final numbers: the criterion was left
    out of the table without a word, which then read as if the study had nothing to judge there."""
    if row.get("stopped_at") is not None:
        return name, False, f"{config} stopped at step {row['stopped_at']}{seed_of(row)} (non-finite)"
    if ref.get("stopped_at") is not None:
        return name, None, f"no reference: {ref_config} stopped at step {ref['stopped_at']}{seed_of(ref)} (non-finite)"
    return None


def finite_criterion(results: dict) -> tuple:
    """No run, in any backend, met a NaN/Inf."""
    runs = [(f"{config} {backend}", row) for config, by_backend in results.items()
            for backend, row in by_backend.items()]
    bad = [name for name, row in runs if row["nonfinite_steps"] or row["stopped_at"]]
    count = sum(len(row.get("seeds") or [None]) for _, row in runs)  # with --seeds, a row is several runs
    return "no NaN/Inf in any run", not bad, ", ".join(bad) or f"{count} runs finite"


def variance_criteria(rows: dict) -> list[tuple]:
    """Per norm type, the placement with the lowest gradient-norm variance; then the lowest overall. Only runs that
    finished compete: a run a NaN/Inf stopped early had the variance of its few steps (0 for one), and was named the
    study's lowest."""
    variances = {c: row["grad_norm_var"] for c, row in rows.items()
                 if row["grad_norm_var"] is not None and row["stopped_at"] is None}
    out = []
    for norm in dict.fromkeys(c.split("-")[0] for c in variances):
        mine = {c: v for c, v in variances.items() if c.startswith(f"{norm}-")}
        if len(mine) > 1:
            listed = ", ".join(f"{c} {plus_minus(rows[c], 'grad_norm_var', '.3g', '—')}" for c in mine)
            out.append((f"{norm}: lowest gradient-norm variance", None,
                        f"{min(mine, key=mine.get).split('-')[1]} ({listed})"))
    if variances:
        best = min(variances, key=variances.get)
        stopped = [c for c, row in rows.items() if row["stopped_at"] is not None]
        out.append(("lowest gradient-norm variance overall", None,
                    f"{best} ({plus_minus(rows[best], 'grad_norm_var', '.3g', '—')})"
                    + (f"; left out, stopped early: {', '.join(stopped)}" if stopped else "")))
    return out


def markdown(results: dict, backends: list[str], steps: int, command: str) -> str:
    """The table and the criteria, as Markdown: the first backend's numbers, but the non-finite steps, each backend's
    (summed over the backends beside one backend's numbers, a torch run's divergence read as the jax row's), and the
    twins' loss gap."""
    main, each = backends[0], " / ".join(backends)
    first = next(iter(next(iter(results.values())).values()))
    entropy, seeds = first["entropy"], list(first.get("seeds", ()))
    over = (f"; {seeds_said(seeds)}" + (" (non-finite steps: runs, summed; loss gap: the largest of any seed)"
                                        if len(seeds) > 1 else "") if seeds else "")
    lines = [f"Command: `{command}`", "",
             f"{steps} steps, numbers from {main} but the non-finite steps ({each}) and the twins' loss gap{over}; "
             f"the corpus's entropy rate is {entropy:.4f} nats (perplexity {math.exp(entropy):.2f}).", "",
             "| norm | placement | val loss | val ppl | α min | α max | grad-norm var | non-finite steps "
             f"{each} | max rel. Δloss jax-torch |", "|---|---|---|---|---|---|---|---|---|"]
    for config, rows in results.items():
        row = rows[main]
        cells = [*config.split("-"), *(plus_minus(row, key, spec, "—") for key, spec in (
                     ("val_loss", ".4f"), ("val_ppl", ".2f"), ("alpha_min", ".3f"), ("alpha_max", ".3f"),
                     ("grad_norm_var", ".3g"))),
                 " / ".join(str(rows[b]["nonfinite_steps"]) for b in backends), gap_cell(rows)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| criterion | result | detail |", "|---|---|---|"]
    for name, passed, detail in criteria(results, main):
        lines.append(f"| {name} | {'—' if passed is None else 'PASS' if passed else 'FAIL'} | {detail} |")
    return "\n".join(lines) + "\n"


def fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def seed_of(row: dict) -> str:
    """`, seed S` where the row is over --seeds and seed S's run stopped first; else nothing."""
    return "" if row.get("stopped_seed") is None else f", seed {row['stopped_seed']}"


# --- the GLA experiment: its configs and its fourth criterion, output distributions per norm site -------
GLA_PRESET = "gla-tiny"
GLA_CONFIGS = ["rms-pre", "dyt-pre", "rms-peri", "dyt-peri"]
HIST_BINS = np.linspace(-8, 8, 129)  # 0.125-wide bins; values beyond ±8 fall in the edge bins
TV_MAX = 0.25  # DyT's output distribution "close" to RMSNorm's: mean total-variation distance per site at most this


def norm_output_histograms(run_: Run) -> dict[str, list[float]]:
    """Per norm site (every norm module, the GLA output norm included), the histogram of its outputs on the first
    validation batch, with the run's final weights (torch twin, forward hooks): probabilities over HIST_BINS."""
    import torch

    import torch_model

    model = torch_model.from_safetensors(latest_checkpoint(run_.out) / WEIGHTS_FILE)
    outputs: dict[str, torch.Tensor] = {}
    for name, module in norm_modules(model).items():
        module.register_forward_hook(lambda m, args, y, name=name: outputs.__setitem__(name, y.detach().float()))
    with torch.no_grad():
        model(torch.as_tensor(run_.data.val_batches(1, run_.cfg.batch_size,
                                                    run_.cfg.seq_len)[0][:, : run_.cfg.seq_len]))
    hist = {name: np.histogram(np.clip(y.numpy().ravel(), -8, 8), HIST_BINS)[0] for name, y in outputs.items()}
    return {name: (h / h.sum()).tolist() for name, h in hist.items()}


def norm_modules(model) -> dict:
    """The model's norm modules by name: every module with a `normalize` method, the shape every norm class of the
    twins has (docs/extending.md), so that a new norm type is hooked without being listed here."""
    return {name: module for name, module in model.named_modules() if callable(getattr(module, "normalize", None))}


def output_criteria(rows: dict) -> list[tuple]:
    """DyT's norm outputs distributed like RMSNorm's at the same placement: the total-variation distance
    ½·Σ|p − q| of their histograms (HIST_BINS) per norm site, averaged over the sites (worst site in the detail).
    With --seeds each seed's run is compared with the reference's run of the same seed, and the distances averaged
    over the seeds (a distance between histograms averaged over seeds would read lower: TV is convex)."""
    out = []
    for config, row in rows.items():
        norm, placement = config.split("-")
        ref = rows.get(f"rms-{placement}")
        if norm not in ("dyt", "derf") or not ref:
            continue
        name = f"{config} outputs distributed like rms-{placement}'s (mean TV ≤ {TV_MAX})"
        if judged := unfinished(name, config, row, f"rms-{placement}", ref):
            out.append(judged)
            continue
        pairs = ([(row["seeds"][s], ref["seeds"][s]) for s in row["seeds"]] if "seeds" in row else [(row, ref)])
        if not all(mine.get("outputs") and theirs.get("outputs") for mine, theirs in pairs):
            continue
        tvs = [{site: 0.5 * float(np.abs(np.subtract(p, theirs["outputs"][site])).sum())
                for site, p in mine["outputs"].items()} for mine, theirs in pairs]
        tv = {site: float(np.mean([each[site] for each in tvs])) for site in tvs[0]}
        worst = max(tv, key=tv.get)
        means = [float(np.mean(list(each.values()))) for each in tvs]
        over = f" ± {spread(float(np.std(means, ddof=1)), '.3f')} ({len(means)} seeds)" if len(means) > 1 else ""
        out.append((name, bool(np.mean(means) <= TV_MAX),
                    f"mean TV {np.mean(means):.3f}{over} over {len(tv)} sites; worst {worst} {tv[worst]:.3f}"))
    return out
# --- end of the GLA experiment ---------------------------------------------------------------------------


def parse_args(argv):
    p = study_parser(__doc__, 300, CONFIGS, f"comma-separated NORM-PLACEMENT runs (default: {','.join(CONFIGS)}; "
                     f"with --mixer gla: {','.join(GLA_CONFIGS)})", "runs/norms",
                     "where the table, curves and runs go",
                     "comma-separated; the first one's numbers fill the table (the non-finite steps: each one's)")
    p.add_argument("--mixer", choices=("attention", "gla"), default="attention",
                   help="gla: the GLA experiment (gla-tiny; default configs rms-pre,dyt-pre,rms-peri,dyt-peri)")
    p.set_defaults(configs=None)  # the default depends on --mixer; a --configs given is run as given (--mixer gla
    args = p.parse_args(argv)     # replaced a --configs that spelled out the attention study's seven by its own four)
    if args.configs is None:
        args.configs = ",".join(GLA_CONFIGS if args.mixer == "gla" else CONFIGS)
    args = study_args(args, "compare_norms.py", argv, SETS)
    if bad := [c for c in args.configs if not valid_config(c)]:
        norms, placements = CHOICES["norm_type"], CHOICES["norm_placement"]
        valid = [f"{norm}-{placement}" for norm in norms for placement in placements]
        raise UsageError(f"--configs: {', '.join(bad)} must be NORM-PLACEMENT, NORM one of {', '.join(norms)}, "
                         f"PLACEMENT one of {', '.join(placements)}{did_you_mean(bad[0], valid)}")
    return args


def valid_config(config: str) -> bool:
    norm, _, placement = config.partition("-")
    return norm in CHOICES["norm_type"] and placement in CHOICES["norm_placement"]


def write_report(results: dict, metrics: dict, args, changes: tuple[dict, dict]) -> str:
    """norms.md, norms.json and curves.png (the first backend's runs) in --out (each atomically); the Markdown."""
    table = markdown(results, args.backends, args.steps, args.command)
    report = study_report(args, changes, results, criteria=[dict(zip(("criterion", "passed", "detail"), c))
                                                            for c in criteria(results, args.backends[0])])
    write_results(args.out, "norms", table, report)
    plot({c: metrics[c][args.backends[0]] for c in args.configs}, args.out / "curves.png")
    return table


def main(argv=None):
    args = parse_args(argv)
    changes = split_overrides(args.set)
    if args.mixer == "gla":
        changes = ({**changes[0], "mixer": "gla"}, changes[1])
    for config in args.configs:  # bad values fail here, before any training (the first config alone was checked:
        run_ = make_run(config, args.backends[0], args.steps, args.out, changes, synthetic_corpus(0))  # the rest later)
        check_gla_kernel(run_.cfg.gla_kernel, [run_.spec], args.backends, twin)
    with study_dir(args.out, "norms", "curves.png"):  # a stop inside removes a --out it made: not the printing's
        table = write_report(*study(args.configs, args.backends, args.steps, args.out, changes, args.quiet,
                                    args.seeds), args, changes)
    print(table)


if __name__ == "__main__":
    run(main)
