"""The routing study: dense vs Mixture-of-Depths (γ 0.125, 0.5) vs DTF (γ 0.5), the tiny preset trained at
equal steps on the embedded corpus: validation perplexity, tokens/s and model FLOPs per token.

    python scripts/compare_routing.py --steps 200 --out runs/routing
    python scripts/compare_routing.py --configs dense,mod-0.125 --backends torch --set n_layers=4
    python scripts/compare_routing.py --seeds 0,1,2 --out runs/routing-seeds    # mean ± std over three seeds

Writes OUT/routing.md (the table, also printed) and OUT/routing.json, and trains into OUT/runs/CONFIG-BACKEND, or
OUT/runs/CONFIG-BACKEND-seedSEED with --seeds (replacing earlier results). The validation loss ("val ppl") is the
causal forward's, cross-entropy only: a routed model in predictor mode, each token routed from itself and the tokens
before it, so it compares with the dense model's; "val ppl top-k" beside it is the top-k forward's, as trained,
which reads future tokens (the top-k runs over the whole sequence) and so is not a language model's
perplexity. The train loss adds the auxiliary losses (docs/routing.md).
"""

from __future__ import annotations

from pathlib import Path

from shared_config import SpecError, load_spec
from shared_config.cli import UsageError, run
from shared_config.data import TokenData, synthetic_corpus
from shared_config.flops import flops_per_token
from shared_config.run import Run, split_overrides
from shared_config.study import (plus_minus, seeds_said, study_args, study_dir, study_parser, study_report,
                                 study_run, train_all, write_results)
from shared_config.twins import twin

CONFIGS = ["dense", "mod-0.125", "mod-0.5", "dtf-0.5"]  # ROUTING-CAPACITY, or dense
CONSTANTS = ("flops_per_token",)  # a row's numbers that no seed changes (the spec's): no spread over --seeds
SETS = {  # the spec keys each run takes from its config: a --set of one is refused
    "routing": "the study sets it per config, ROUTING in --configs ROUTING-CAPACITY (e.g. --configs mod-0.5)",
    "routing_capacity": "the study sets it per config, CAPACITY in --configs ROUTING-CAPACITY (e.g. --configs mod-0.5)",
}


def config_changes(config: str) -> dict:
    """The spec changes of one configuration name (`dense`, `mod-0.125`, `dtf-0.5`)."""
    if config == "dense":
        return {"routing": "none"}
    routing, _, capacity = config.partition("-")
    try:
        changes = {"routing": routing, "routing_capacity": float(capacity)}
    except ValueError:
        raise UsageError(f"--configs: {config!r} must be dense or ROUTING-CAPACITY (mod-0.5, dtf-0.5)") from None
    if routing == "none":  # a dense model labelled none-0.5, its capacity ignored (and dense,none-0.5 ran it twice)
        raise UsageError(f"--configs: {config!r}: a dense run routes nothing and takes no capacity; write dense")
    return changes


def make_run(config: str, backend: str, steps: int, out: Path, changes: tuple[dict, dict], data: TokenData,
             seed: int | None = None) -> Run:
    """The run of one configuration in one twin (under one of --seeds): the tiny preset, routed as `config` says, on
    the embedded corpus."""
    spec_changes, cfg_changes = changes
    try:
        spec = load_spec("tiny").replace(vocab_size=data.vocab_size, **{**spec_changes, **config_changes(config)})
    except SpecError as e:
        raise UsageError(f"{config}: {e}") from None
    return study_run(spec, cfg_changes, steps, data, out, config, backend, seed)


def summarize(run_: Run, records: list[dict], stopped_at: int | None) -> dict:
    """One run's row: final validation loss and perplexity, mean tokens/s, FLOPs per token, the last aux metrics."""
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    rates = [r["tokens_per_s"] for r in train if "tokens_per_s" in r][1:]  # the first includes compilation
    last = evals[-1] if evals and stopped_at is None else {}
    return {
        "val_loss": last.get("val_loss"), "val_ppl": last.get("val_ppl"),  # causal: predictor mode when routed
        "val_ppl_topk": last.get("val_ppl_topk"),  # routed only: the top-k forward's, which reads future tokens
        "tokens_per_s": sum(rates) / len(rates) if rates else None,
        "flops_per_token": flops_per_token(run_.spec, run_.cfg.seq_len, "train"),
        "predictor_acc": train[-1].get("predictor_acc") if train else None,
        "stopped_at": stopped_at,
    }


def study(configs: list[str], backends: list[str], steps: int, out: Path, changes: tuple[dict, dict],
          quiet: bool = False, seeds: list[int] | None = None) -> dict:
    """Train every configuration in every backend (once per seed of `seeds`); {config: {backend: row}}."""
    return train_all(configs, backends, lambda c, b, data, seed: make_run(c, b, steps, out, changes, data, seed),
                     summarize, twin, "routing study", quiet, seeds, CONSTANTS)[0]


def markdown(results: dict, backends: list[str], steps: int, command: str) -> str:
    head = ("| config | backend | val ppl | val ppl top-k | tokens/s | train GFLOP/token | FLOPs vs dense | "
            "predictor acc |")
    seeds = list(next(iter(next(iter(results.values())).values())).get("seeds", ()))
    over = f" ({seeds_said(seeds)})" if seeds else ""
    lines = [f"Routing study, {steps} steps each{over}: `{command}`", "", head, "|" + "---|" * 8]
    dense = {b: results.get("dense", {}).get(b, {}).get("flops_per_token") for b in backends}
    for config, rows in results.items():
        for b in backends:
            r = rows[b]
            ratio = r["flops_per_token"] / dense[b] if dense[b] else None
            # a run a NaN/Inf stopped has no val ppl: its "-" read like a dense run's top-k column, the stop unsaid
            seed = "" if r.get("stopped_seed") is None else f", seed {r['stopped_seed']}"
            val_ppl = (f"stopped at step {r['stopped_at']}{seed} (non-finite)" if r.get("stopped_at") is not None
                       else plus_minus(r, "val_ppl", ".3f", "-"))
            lines.append(f"| {config} | {b} | {val_ppl} | {plus_minus(r, 'val_ppl_topk', '.3f', '-')} | "
                         f"{plus_minus(r, 'tokens_per_s', ',.0f', '-')} | {r['flops_per_token'] / 1e9:.5f} | "
                         f"{fmt(ratio, '.3f')} | {plus_minus(r, 'predictor_acc', '.3f', '-')} |")
    return "\n".join(lines) + "\n"


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def parse_args(argv):
    p = study_parser(__doc__, 200, CONFIGS, "comma-separated: dense or ROUTING-CAPACITY", "runs/routing",
                     "where the table, the JSON and the runs go")
    return study_args(p.parse_args(argv), "compare_routing.py", argv, SETS)


def main(argv=None):
    args = parse_args(argv)
    changes = split_overrides(args.set)
    seen = {}
    for config in args.configs:  # bad names and values fail here, before any training
        make_run(config, args.backends[0], args.steps, args.out, changes, synthetic_corpus(0))
        same = seen.setdefault(tuple(config_changes(config).items()), config)
        if same != config:  # mod-0.5,mod-0.50: one configuration trained twice, its rows labelled apart
            raise UsageError(f"--configs: {config} is {same} again")
    with study_dir(args.out, "routing"):
        results = study(args.configs, args.backends, args.steps, args.out, changes, args.quiet, args.seeds)
        table = markdown(results, args.backends, args.steps, args.command)
        write_results(args.out, "routing", table, study_report(args, changes, results))
    print(table)


if __name__ == "__main__":
    run(main)
