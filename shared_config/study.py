"""The plumbing the norm and routing studies share (scripts/compare_norms.py, scripts/compare_routing.py): their
command line, one short run per configuration and twin on the embedded corpus, each run's metrics read once, and
the report files. Framework-neutral: a study passes in the tools' `twin` lookup, which imports a twin's trainer."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from .cli import (Parser, UsageError, at_least, check_out_dir, names, no_repeats, printable,
                  utf8_argument)
from .config_file import did_you_mean, parse_overrides
from .data import TokenData, synthetic_corpus
from .files import atomic_write, first_missing, json_text
from .formats.safetensors import check_tensor_count
from .init import init_weights
from .limits import quote, spelled
from .loop import Loop, NonFiniteError, finite_step, trainer_factory
from .progress import progress
from .run import (BACKENDS, DEFAULT_TRAIN_CONFIG, SPEC_KEYS, TRAIN_KEYS, Run, check_train_memory, fresh_state,
                  with_changes)
from .run_dir import METRICS_FILE, MOMENTS, lock_run
from .metrics import read_metrics
from .spec import ModelSpec
from .train_config import load_train_config


# the tiny preset whose initial values (alpha, shift) suit each norm type: the norm study's runs and the trajectory
# tests start from these
NORM_PRESETS = {"rms": "tiny", "layernorm": "tiny", "dyt": "tiny-dyt", "derf": "tiny-derf"}


def study_run(spec: ModelSpec, cfg_changes: dict, steps: int, data: TokenData, out: Path, config: str,
              backend: str, seed: int | None = None) -> Run:
    """A study's run of one configuration in one twin, into OUT/runs/CONFIG-BACKEND: the cpu train preset with
    `cfg_changes`, `steps` updates, fresh weights from the config's seed, four evaluations, no checkpoints but the
    last. A `seed` (one of --seeds) replaces the config's seed, for the initial weights and the batch order, and names
    the run OUT/runs/CONFIG-BACKEND-seedSEED. Raises UsageError (or SpecError) when the changes, the spec or the data
    do not fit together."""
    seeded = {} if seed is None else {"seed": seed}
    cfg = with_changes(load_train_config(DEFAULT_TRAIN_CONFIG), {**cfg_changes, "steps": steps, **seeded})
    spec = cfg.model_spec(spec)  # as train.py runs it: compute_dtype from the train config, seq_len checked
    data.check(cfg.seq_len, spec.V)
    # before anything is allocated (--set batch_size=1000000000 would be a MemoryError from inside the loop's set-up)
    check_train_memory(spec, cfg, "lower --set batch_size or seq_len, or the model's sizes")
    check_tensor_count(spec, len(MOMENTS))  # its last checkpoint, readable
    weights = init_weights(spec, cfg.seed)
    name = f"{config}-{backend}" + ("" if seed is None else f"-seed{seed}")
    return Run(spec, cfg, data, out / "runs" / name, lambda: fresh_state(weights), cfg.steps,
               log_every=10, eval_every=max(1, cfg.steps // 4), save_every=0, keep=1,
               info={"backend": backend, "study": config, **seeded})


def train_one(run: Run, make_trainer: Callable) -> tuple[list[dict], int | None]:
    """Train (replacing an earlier result); the run's metrics records and the step a non-finite loss or gradient
    stopped it at, else None."""
    if run.out.is_symlink() or run.out.is_file():  # a link goes, never what it leads to
        run.out.unlink()
    elif run.out.exists():  # an error if it stays: ignored, its checkpoints were read as this run's (histograms)
        shutil.rmtree(run.out)
    stopped = False
    try:
        Loop(run, make_trainer, progress=False)()
    except NonFiniteError as e:
        tqdm.write(f"{run.out.name}: {e}", file=sys.stderr)
        stopped = True
    except BaseException:  # Ctrl-C or an error: an unfinished run is no result (Ctrl-C left its run.json and metrics)
        shutil.rmtree(run.out, ignore_errors=True)
        with contextlib.suppress(OSError):
            run.out.parent.rmdir()  # OUT/runs, when this run was its first
        raise
    records = read_metrics(run.out / METRICS_FILE)
    stopped_at = (next(r["step"] for r in records if r.get("kind") == "train" and not finite_step(r)) if stopped
                  else None)
    return records, stopped_at


def train_all(configs: list[str], backends: list[str], make: Callable[[str, str, TokenData, int | None], Run],
              summarize: Callable[[Run, list[dict], int | None], dict], twin: Callable[[str, str], ModuleType],
              desc: str, quiet: bool, seeds: list[int] | None = None, constants: tuple[str, ...] = ()
              ) -> tuple[dict, dict]:
    """({config: {backend: row}}, {config: {backend: records}}) for `make(config, backend, data, seed)`'s run of every
    pair on the embedded corpus, one after the other, with one progress bar of `desc` (runs). Without `seeds` a row is
    `summarize(run, records, stopped_at)`; with them each pair trains once per seed and its row is over_seeds of
    {seed: row} and `constants`, its records the first seed's. `twin` is the tools' way to a twin
    (shared_config.twins.twin), passed in: the core calls no twin by name."""
    results, metrics, data = {}, {}, synthetic_corpus(0)
    each = [None] if seeds is None else seeds
    with progress(total=len(configs) * len(backends) * len(each), desc=desc, unit="run", quiet=quiet) as bar:
        for config in configs:
            for backend in backends:
                rows = {}
                for seed in each:
                    bar.set_postfix_str(f"{config} {backend}" + ("" if seed is None else f" seed {seed}"))
                    run = make(config, backend, data, seed)
                    records, stopped_at = train_one(run, trainer_factory(twin(backend, "trainer").Trainer, run))
                    rows[seed] = summarize(run, records, stopped_at)
                    metrics.setdefault(config, {}).setdefault(backend, records)  # the first seed's: the curves'
                    bar.update()
                results.setdefault(config, {})[backend] = rows[None] if seeds is None else over_seeds(rows, constants)
    return results, metrics


def over_seeds(rows: dict[int, dict], constants: tuple[str, ...] = ()) -> dict:
    """One configuration's row over the seeds it trained under, from {seed: summarize's row}: each number the mean
    over the seeds with its sample standard deviation (ddof 1; None for one seed) as KEY_std, None where a seed has
    None (a run a NaN/Inf stopped has no final loss: the others' mean read as the configuration's); the keys of
    `constants`, numbers of the configuration that no seed changes (the corpus's entropy, the FLOPs per token), kept
    without a KEY_std where every seed has the same (the JSON gave them a spread of 0.0, as if measured); `stopped_at`
    the earliest stop, `stopped_seed` its seed; `nonfinite_steps` summed over the seeds (the runs that met one); any
    other value (a list, a dict) kept where every seed has the same, else None; each seed's own row under `seeds`."""
    first, out = next(iter(rows.values())), {}
    for key in first:
        values = [row[key] for row in rows.values()]
        if key == "stopped_at":
            stops = {seed: row[key] for seed, row in rows.items() if row[key] is not None}
            out[key] = min(stops.values()) if stops else None
            out["stopped_seed"] = min(stops, key=stops.get) if stops else None
        elif key == "nonfinite_steps":
            out[key] = sum(values)
        elif key in constants and all(v == first[key] for v in values):
            out[key] = first[key]
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key], out[f"{key}_std"] = mean_std(values)
        elif any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = out[f"{key}_std"] = None  # some seed has none
        else:
            out[key] = first[key] if all(v == first[key] for v in values) else None
    return {**out, "seeds": {str(seed): row for seed, row in rows.items()}}


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """The mean of `values` and their sample standard deviation (None for one value), computed on the values scaled
    by a power of 2 to at most 1, which changes no bit: the squares of perplexities past ~1e154 (a loss past 355
    nats, a diverging run) overflowed, and the table read `± inf`, the JSON null, with a numpy warning on stderr."""
    finite = [abs(v) for v in values if math.isfinite(v)]
    scale = 2.0 ** math.frexp(max(finite, default=0.0))[1]
    x = np.asarray(values, dtype=np.float64) / scale
    with np.errstate(invalid="ignore", over="ignore"):  # an inf among them: the mean inf, the deviation nan
        return float(np.mean(x) * scale), float(np.std(x, ddof=1) * scale) if len(x) > 1 else None


def seeds_said(seeds: list[str]) -> str:
    """What a study's table heading says its numbers are over: `means ± standard deviations over seeds 0, 1`, or
    `seed 5` for one (`--seeds 5` read "means ± standard deviations over seeds 5" above numbers without a ±)."""
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"means ± standard deviations over seeds {', '.join(seeds)}"


def plus_minus(row: dict, key: str, spec: str, missing: str) -> str:
    """A table cell: `row[key]` formatted by `spec`, with ± its standard deviation over the seeds where the row has
    one (over_seeds, formatted by `spread`), `missing` for None."""
    if row.get(key) is None:
        return missing
    std = row.get(f"{key}_std")
    return format(row[key], spec) + ("" if std is None else f" ± {spread(std, spec)}")


def spread(std: float, spec: str) -> str:
    """A standard deviation formatted by `spec`, or to 3 significant digits where `spec` shows one that is not 0 as
    zero: an α's 0.0004 over three seeds read `± 0.000`, as if every seed had the same."""
    text = format(std, spec)
    return f"{std:.3g}" if std and not any(digit in text for digit in "123456789") else text


@contextlib.contextmanager
def study_dir(out: Path, name: str, *others: str) -> Iterator[None]:
    """Hold OUT (created if need be) for this study alone while it runs (run_dir.lock_run: a second study on the same
    --out is refused in one line, exit 3; two at once replaced each other's runs and mixed their metrics, and both
    reported success), and remove an earlier study's results from it (NAME.md, NAME.json and `others`, such as its
    plot) as this study starts replacing its runs: a study stopped midway leaves no table describing runs it has
    since replaced. A study stopped (Ctrl-C, an error) removes the unfinished run, and the OUT it made, whole: its
    finished runs without their table are no result either. Those files are an earlier study's where NAME.json, its
    report (write_results writes it first), is there: any of them without it is someone else's (a user's own
    curves.png was deleted, then replaced by the study's plot) and refused in one line, before any run."""
    made, files = first_missing(out), (f"{name}.md", f"{name}.json", *others)
    with lock_run(out):
        try:
            if not os.path.lexists(out / f"{name}.json") and (
                    theirs := [file for file in files if os.path.lexists(out / file)]):
                raise UsageError(f"--out {out}: {theirs[0]} there is no earlier study's (no {name}.json beside it), "
                                 f"and the study writes its own {theirs[0]}; move it away or pass another --out")
            for file in files:
                (out / file).unlink(missing_ok=True)
            yield
        except BaseException:
            if made:
                shutil.rmtree(made, ignore_errors=True)
            raise


def study_report(args, changes: tuple[dict, dict], results: dict, **more) -> dict:
    """A study's JSON report: what was run (the command, --steps, --backends, --seeds, the --set changes: routing.json
    had none of them, so its numbers could not be told from another study's), then `results` and `more`."""
    return {"command": args.command, "steps": args.steps, "backends": args.backends, "seeds": args.seeds,
            "changes": dict(zip(("spec", "train_config"), changes)), "results": results, **more}


def write_results(out: Path, name: str, table: str, report: dict) -> None:
    """OUT/NAME.json (`report`) and OUT/NAME.md (the Markdown table), each written atomically; the report first, as
    what tells the next study on OUT that the study's files there are an earlier study's (study_dir)."""
    atomic_write(out / f"{name}.json", lambda tmp: tmp.write_text(json_text(report, indent=1) + "\n"))
    atomic_write(out / f"{name}.md", lambda tmp: tmp.write_text(table))


class Once(argparse.Action):
    """A list option given once (--seeds, --configs, --backends): argparse keeps the last of several without a word,
    and `--seeds 0,1 --seeds 2` trained seed 2 alone under a table that read like the study asked for."""

    def __call__(self, parser, namespace, values, option_string=None):
        if (earlier := getattr(namespace, self.dest, self.default)) is not self.default:
            raise argparse.ArgumentError(self, f"given twice ({quote(earlier)}, then {quote(values)}); list every "
                                               f"value in one {option_string}, comma-separated")
        setattr(namespace, self.dest, values)


def study_parser(doc: str, steps: int, configs: list[str], configs_help: str, out: str, out_help: str,
                 backends_help: str = "comma-separated: jax, torch") -> Parser:
    """The options of every study script: --steps, --backends, --configs, --set, --seeds, --out, --quiet; the
    description is the first paragraph of the script's docstring `doc`, as one sentence."""
    p = Parser(description=" ".join(doc.split("\n\n")[0].split()))
    p.add_argument("--steps", type=int, default=steps, help="updates per run")
    p.add_argument("--backends", action=Once, default=",".join(BACKENDS), help=backends_help)
    p.add_argument("--configs", action=Once, default=",".join(configs), help=configs_help)
    p.add_argument("--set", action="append", type=p.key_item(SPEC_KEYS + TRAIN_KEYS, "spec or train config"),
                   metavar="KEY=VALUE", help="a spec or train config change for every run")
    p.add_argument("--seeds", action=Once, help="comma-separated seeds (initial weights and batch order): every run "
                   "trains once per seed, into runs/CONFIG-BACKEND-seedSEED, and the table gives the mean ± standard "
                   "deviation over them (default: the train config's seed, one run each)")
    p.add_argument("--out", type=Path, default=Path(out), help=out_help)
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


# what every study sets itself, so a --set of it would be overridden or collide: {key: why}
STUDY_SETS = {"vocab_size": "the study sets it from its embedded corpus, whose token ids the model must cover",
              "steps": "the study sets it from --steps; pass --steps N"}


SEEDS_SET = "--seeds sets it per run; give the seeds there"


NAME_MAX = 255  # bytes in one file name (ext4, XFS, APFS, tmpfs): a run directory's name must fit


def check_seed_names(configs: list[str], backends: list[str], seeds: list[int]) -> None:
    """Refuse (UsageError) a seed whose run directory, CONFIG-BACKEND-seedSEED, is a name too long for the file
    system: `--seeds 0,1,<300 digits>` trained seeds 0 and 1 and then failed, 'File name too long', naming no flag.
    A CONFIG-BACKEND that leaves no room for a seed is left to the check of --configs."""
    base = max(len(f"{config}-{backend}".encode()) for config in configs for backend in backends)
    if base + len("-seed0") <= NAME_MAX and (long := [s for s in seeds if base + len(f"-seed{s}") > NAME_MAX]):
        raise UsageError(f"--seeds: seed {quote(spelled(long[0]))[1:-1]} makes a run directory name (runs/CONFIG-"
                         f"BACKEND-seedSEED) longer than the {NAME_MAX} bytes a file name may have; give a seed of at "
                         f"most {NAME_MAX - base - len('-seed')} digits")


def seed_number(text: str) -> int:
    """One seed of --seeds: an integer >= 0, as train.py's --seed takes it; else UsageError naming it."""
    try:
        return at_least(0)(text)
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"--seeds: each seed {e}") from None


def study_args(args, script: str, argv, sets: dict[str, str] | None = None):
    """`args` of a study_parser with --backends and --configs split into lists, --seeds into a list of ints (None when
    not given), and `command` (how the study was run); raises UsageError for an unknown backend, --steps < 1, a seed
    that is not an integer >= 0 or is given twice, a --set seed beside --seeds, or a --set of a key the study sets
    itself (STUDY_SETS, and the script's own `sets`: {key: why}), which the study would override or collide with."""
    args.backends, args.configs = (no_repeats(flag, names(flag, text)) for flag, text in
                                   (("--backends", args.backends), ("--configs", args.configs)))
    if bad := [b for b in args.backends if b not in BACKENDS]:
        raise UsageError(f"--backends: unknown backend(s) {', '.join(bad)}"
                         f"{did_you_mean(bad[0], BACKENDS)} (jax, torch)")
    if args.steps < 1:
        raise UsageError("--steps must be >= 1")
    check_out_dir("--out", args.out)  # a file there was "File exists" after the first run's set-up
    if args.seeds is not None:
        seeds = names("--seeds", utf8_argument("--seeds", args.seeds))  # '\udcff' named a byte 0xff
        args.seeds = no_repeats("--seeds", [seed_number(text) for text in seeds])
        check_seed_names(args.configs, args.backends, args.seeds)
    fixed = {**STUDY_SETS, **(sets or {}), **({} if args.seeds is None else {"seed": SEEDS_SET})}
    if taken := [key for key in parse_overrides(args.set) if key in fixed]:
        raise UsageError(f"--set {taken[0]}: {fixed[taken[0]]}")
    # printable: an argument that is not UTF-8 (`--out $'r\\xff'`) failed the table's write after the whole study
    words = [f"python scripts/{script}", *(sys.argv[1:] if argv is None else argv)]
    args.command = " ".join(printable(word) for word in words)
    return args
