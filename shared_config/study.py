"""The plumbing the norm and routing studies share (scripts/compare_norms.py, scripts/compare_routing.py): their
command line, one short run per configuration and twin on the embedded corpus, each run's metrics read once, and
the report files. Framework-neutral: a study passes in the tools' `twin` lookup, which imports a twin's trainer."""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

from tqdm import tqdm

from .cli import Parser, UsageError, check_out_dir, names, no_repeats, printable
from .config_file import did_you_mean, parse_overrides
from .data import TokenData, synthetic_corpus
from .files import atomic_write, first_missing, json_text
from .formats.safetensors import check_tensor_count
from .init import init_weights
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
              backend: str) -> Run:
    """A study's run of one configuration in one twin, into OUT/runs/CONFIG-BACKEND: the cpu train preset with
    `cfg_changes`, `steps` updates, fresh weights from the config's seed, four evaluations, no checkpoints but the
    last. Raises UsageError (or SpecError) when the changes, the spec or the data do not fit together."""
    cfg = with_changes(load_train_config(DEFAULT_TRAIN_CONFIG), {**cfg_changes, "steps": steps})
    spec = cfg.model_spec(spec)  # as train.py runs it: compute_dtype from the train config, seq_len checked
    data.check(cfg.seq_len, spec.V)
    # before anything is allocated (--set batch_size=1000000000 would be a MemoryError from inside the loop's set-up)
    check_train_memory(spec, cfg, "lower --set batch_size or seq_len, or the model's sizes")
    check_tensor_count(spec, len(MOMENTS))  # its last checkpoint, readable
    weights = init_weights(spec, cfg.seed)
    return Run(spec, cfg, data, out / "runs" / f"{config}-{backend}", lambda: fresh_state(weights), cfg.steps,
               log_every=10, eval_every=max(1, cfg.steps // 4), save_every=0, keep=1,
               info={"backend": backend, "study": config})


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


def train_all(configs: list[str], backends: list[str], make: Callable[[str, str, TokenData], Run],
              summarize: Callable[[Run, list[dict], int | None], dict], twin: Callable[[str, str], ModuleType],
              desc: str, quiet: bool) -> tuple[dict, dict]:
    """({config: {backend: summarize(run, records, stopped_at)}}, {config: {backend: records}}) for `make(config,
    backend, data)`'s run of every pair on the embedded corpus, one after the other, with one progress bar of `desc`
    (runs). `twin` is the tools' way to a twin (shared_config.twins.twin), passed in: the core calls no twin by name."""
    results, metrics, data = {}, {}, synthetic_corpus(0)
    with progress(total=len(configs) * len(backends), desc=desc, unit="run", quiet=quiet) as bar:
        for config in configs:
            for backend in backends:
                bar.set_postfix_str(f"{config} {backend}")
                run = make(config, backend, data)
                records, stopped_at = train_one(run, trainer_factory(twin(backend, "trainer").Trainer, run))
                results.setdefault(config, {})[backend] = summarize(run, records, stopped_at)
                metrics.setdefault(config, {})[backend] = records
                bar.update()
    return results, metrics


@contextlib.contextmanager
def study_dir(out: Path, name: str, *others: str) -> Iterator[None]:
    """Hold OUT (created if need be) for this study alone while it runs (run_dir.lock_run: a second study on the same
    --out is refused in one line, exit 3; two at once replaced each other's runs and mixed their metrics, and both
    reported success), and remove an earlier study's results from it (NAME.md, NAME.json and `others`, such as its
    plot) as this study starts replacing its runs: a study stopped midway leaves no table describing runs it has
    since replaced. A study stopped (Ctrl-C, an error) removes the unfinished run, and the OUT it made, whole: its
    finished runs without their table are no result either."""
    made = first_missing(out)
    with lock_run(out):
        try:
            for file in (f"{name}.md", f"{name}.json", *others):
                (out / file).unlink(missing_ok=True)
            yield
        except BaseException:
            if made:
                shutil.rmtree(made, ignore_errors=True)
            raise


def study_report(args, changes: tuple[dict, dict], results: dict, **more) -> dict:
    """A study's JSON report: what was run (the command, --steps, --backends, the --set changes: routing.json had
    none of them, so its numbers could not be told from another study's), then `results` and `more`."""
    return {"command": args.command, "steps": args.steps, "backends": args.backends,
            "changes": dict(zip(("spec", "train_config"), changes)), "results": results, **more}


def write_results(out: Path, name: str, table: str, report: dict) -> None:
    """OUT/NAME.md (the Markdown table) and OUT/NAME.json (`report`), each written atomically."""
    atomic_write(out / f"{name}.md", lambda tmp: tmp.write_text(table))
    atomic_write(out / f"{name}.json", lambda tmp: tmp.write_text(json_text(report, indent=1) + "\n"))


def study_parser(doc: str, steps: int, configs: list[str], configs_help: str, out: str, out_help: str,
                 backends_help: str = "comma-separated: jax, torch") -> Parser:
    """The options of every study script: --steps, --backends, --configs, --set, --out, --quiet; the description is
    the first paragraph of the script's docstring `doc`, as one sentence."""
    p = Parser(description=" ".join(doc.split("\n\n")[0].split()))
    p.add_argument("--steps", type=int, default=steps, help="updates per run")
    p.add_argument("--backends", default=",".join(BACKENDS), help=backends_help)
    p.add_argument("--configs", default=",".join(configs), help=configs_help)
    p.add_argument("--set", action="append", type=p.key_item(SPEC_KEYS + TRAIN_KEYS, "spec or train config"),
                   metavar="KEY=VALUE", help="a spec or train config change for every run")
    p.add_argument("--out", type=Path, default=Path(out), help=out_help)
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


# what every study sets itself, so a --set of it would be overridden or collide: {key: why}
STUDY_SETS = {"vocab_size": "the study sets it from its embedded corpus, whose token ids the model must cover",
              "steps": "the study sets it from --steps; pass --steps N"}


def study_args(args, script: str, argv, sets: dict[str, str] | None = None):
    """`args` of a study_parser with --backends and --configs split into lists and `command` (how the study was run);
    raises UsageError for an unknown backend, --steps < 1, or a --set of a key the study sets itself (STUDY_SETS,
    and the script's own `sets`: {key: why}), which the study would override or collide with."""
    args.backends, args.configs = (no_repeats(flag, names(flag, text)) for flag, text in
                                   (("--backends", args.backends), ("--configs", args.configs)))
    if bad := [b for b in args.backends if b not in BACKENDS]:
        raise UsageError(f"--backends: unknown backend(s) {', '.join(bad)}"
                         f"{did_you_mean(bad[0], BACKENDS)} (jax, torch)")
    if args.steps < 1:
        raise UsageError("--steps must be >= 1")
    check_out_dir("--out", args.out)  # a file there was "File exists" after the first run's set-up
    fixed = {**STUDY_SETS, **(sets or {})}
    if taken := [key for key in parse_overrides(args.set) if key in fixed]:
        raise UsageError(f"--set {taken[0]}: {fixed[taken[0]]}")
    # printable: an argument that is not UTF-8 (`--out $'r\\xff'`) failed the table's write after the whole study
    words = [f"python scripts/{script}", *(sys.argv[1:] if argv is None else argv)]
    args.command = " ".join(printable(word) for word in words)
    return args
