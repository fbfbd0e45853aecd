"""What one training run is, resolved from the command line's arguments (framework-neutral): the spec, the train
config and the data, fresh or from the checkpoint it resumes, with every check a resume must pass. The loop that
trains it is shared_config/loop.py; the run directory's files are shared_config/run_dir.py's."""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from .cli import UsageError, check_out_dir, check_shorthands
from .config_file import SpecError, check_keys, check_type, parse_overrides
from .data import TOKEN_DTYPES, DataError, TokenData, eval_bytes, load_data, read_meta, reads_raw_tokens
from .files import CheckpointError
from .formats.checks import check_weights
from .formats.safetensors import check_tensor_count
from .init import init_weights
from .limits import quote, spelled
from .parallel import env_int
from .resources import check_memory, train_bytes
from .run_dir import (MOMENTS, STATE_FILE, TOKENIZER_FILE, checkpoint_step, earlier_run_files, invocation,
                      latest_checkpoint, load_train_checkpoint, read_state, refuse_used_out, same_bytes)
from .spec import ALIASES, CHOICES, ModelSpec, load_spec
from .train_config import COMPUTE_OPTIONS, MEMORY_OPTIONS, TRAIN_CHOICES, TrainConfig, load_train_config

BACKENDS = ("jax", "torch")  # the twins that train: jax_model and torch_model, each through its trainer.py
DEFAULT_SPEC = "tiny"  # with the data's vocabulary size when no --spec is given
DEFAULT_TRAIN_CONFIG = "cpu"
DEFAULT_EVAL_BATCHES = 8  # a run's validation set: fixed windows of the validation split, this many batches of them
DEFAULT_CADENCE = {"log_every": 10, "eval_every": 100, "save_every": 100, "keep": 3}  # run_dir.CADENCE_MIN's options
SPEC_KEYS = [f.name for f in fields(ModelSpec)]
TRAIN_KEYS = [f.name for f in fields(TrainConfig)]  # a key in both (compute_dtype) is the run's setting


@dataclass
class Run:
    """Everything one run needs, resolved from the command line (and the checkpoint it resumes)."""

    spec: ModelSpec  # the model as this run computes it (the train config's compute_dtype applied)
    cfg: TrainConfig
    data: TokenData
    out: Path
    start: Callable[[], dict]  # the canonical train state to start from: a checkpoint's, or step 0
    stop: int  # the last update of this invocation (cfg.steps, or --stop-at)
    log_every: int = DEFAULT_CADENCE["log_every"]
    eval_every: int = DEFAULT_CADENCE["eval_every"]  # 0: evaluate at the end only
    save_every: int = DEFAULT_CADENCE["save_every"]  # 0: save at the end only
    keep: int = DEFAULT_CADENCE["keep"]  # 0: keep every checkpoint
    eval_batches: int = DEFAULT_EVAL_BATCHES
    info: dict | None = None  # recorded in run.json: the command, the backend, "invocations" (this one)

    def record(self) -> dict:
        """run.json's contents: `info`, the spec, the train config and the data."""
        return {**(self.info or {}), "spec": self.spec.to_dict(), "train_config": self.cfg.to_dict(),
                "data": self.data.describe()}

    def batch(self, step: int) -> np.ndarray:
        """The batch of update `step` (1-based): a pure function of the seed and the step."""
        return self.data.batch(self.cfg.seed, step - 1, self.cfg.batch_size, self.cfg.seq_len)


def split_overrides(items: list[str] | None) -> tuple[dict, dict]:
    """`--set key=value` items as (spec changes, train config changes), each value as its field reads it (an alias
    resolved, an int given for a float as the float: a study's JSON recorded `norm_type: tanh` where its runs used
    dyt); unknown keys get the closest one suggested, a value of the wrong type is a SpecError naming the key."""
    spec_changes, cfg_changes = {}, {}
    overrides = parse_overrides(items)
    check_keys(overrides, list(dict.fromkeys(SPEC_KEYS + TRAIN_KEYS)), "--set")
    for key, value in overrides.items():
        train = key in TRAIN_KEYS
        field = next(f for f in fields(TrainConfig if train else ModelSpec) if f.name == key)
        value = check_type(field, value, TRAIN_CHOICES, {}) if train else check_type(field, value, CHOICES, ALIASES)
        (cfg_changes if train else spec_changes)[key] = value
    return spec_changes, cfg_changes


def resolve_run(args) -> Run:
    """The run scripts/train.py's arguments ask for: a fresh one, or the checkpoint in --out continued (--resume).
    Raises UsageError (bad or conflicting arguments), CheckpointError (an unreadable checkpoint) or ResourceError
    (a run that cannot fit in memory), before anything is written."""
    spec_changes, cfg_changes = split_overrides(args.set)
    shorthands = {k: getattr(args, k) for k in ("steps", "seed") if getattr(args, k) is not None}
    check_shorthands(cfg_changes, {k: (f"--{k}", v) for k, v in shorthands.items()})
    cfg_changes.update(shorthands)
    given = given_options(args)
    checkpoint, stored = resumed_checkpoint(args) if args.resume else (None, None)
    done = checkpoint_step(checkpoint) if stored else 0
    if stored and cfg_changes.get("steps", math.inf) < done:
        raise UsageError(f"{given['steps']}: the run in {args.out} has done {done} steps; --steps is the number of "
                         f"steps to reach (at least {done})")
    if stored and args.stop_at is not None and args.stop_at < done:  # exit 0 having done nothing, a note saying the
        # schedule changed
        raise UsageError(f"--stop-at {args.stop_at}: the run in {args.out} has done {done} steps; --stop-at is the "
                         f"update to stop after (at least {done})")
    # `is not None` throughout: an empty --spec/--data/--train-config is an error, not "not given"
    source = args.data if args.data is not None else stored["data"]["source"] if stored else "synthetic"
    if args.data is None and stored and not str(source).startswith("synthetic") and not Path(source).exists():
        raise UsageError(f"{source}: the data the run in {args.out} trained on is not there any more; pass --data "
                         "where it is now (the resumed run checks that it holds the same tokens)")
    dtype = resumed_data_dtype(args, checkpoint, stored, source)
    kept_dtype = f"read as {dtype}: {checkpoint / STATE_FILE}'s data_dtype" if dtype != args.data_dtype else None
    try:
        data = load_data(source, dtype)
    except DataError as e:  # named the data alone: the dtype came from state.json, not from an option
        if kept_dtype is None:
            raise
        raise DataError(f"{e} ({kept_dtype}; --data-dtype reads them as another)") from None
    named = partial(option_of, args, given, ", ".join(filter(None, [
        args.data is not None and f"--data {args.data}", args.data_dtype and f"--data-dtype {args.data_dtype}",
        kept_dtype])))
    if stored:  # before the data meets the spec: other data (an edited data_dtype) was refused for ids past the
        # vocabulary, with advice to --set vocab_size, which the resume then refused
        check_resume({"data": data.describe()}, stored, named)
        check_resumed_tokenizer(checkpoint, data, args.out)
    file_spec = load_spec(args.spec) if args.spec is not None else None
    if stored:  # a change the resume refuses, refused as such before a rule it breaks with the run's other values
        # (`--set warmup_steps=20` of a run of 10 steps was "warmup_steps=20 must be <= steps=10"), a --spec or
        # --train-config file's too (the rule's error offered --stop-at, then the file's change was refused), the
        # --set items merged into either file unchecked (`--spec tiny --set n_heads=5` was "n_kv_heads=2 must divide
        # n_heads=5", `--set n_heads=5` alone the refusal). `--set n_kv_heads=null` names no value but the one the
        # spec derives, and a train config's compute_dtype overrides the spec's: both compared once resolved, below
        # (a key the file leaves to be derived too: `--spec F --set d_model=96` derives F's head_dim from 96)
        given_keys = {**(asdict(file_spec) if file_spec is not None else {}), **spec_changes}
        check_resume({"spec": {k: v for k, v in given_keys.items() if v is not None and
                               (k != "compute_dtype" or k in spec_changes)},
                      "train_config": cfg_changes if args.train_config is None else
                      {**load_train_config(args.train_config).to_dict(), **cfg_changes}}, stored, named)
    init = read_init(args.init_from, file_spec.replace(**spec_changes) if file_spec is not None else None)
    base = base_spec(args, stored, init, data).replace(**spec_changes)
    try:
        cfg = with_changes(base_config(args, stored), cfg_changes, shorten_warmup=not stored)
        spec = cfg.model_spec(base)
    except SpecError as e:
        if not stored:
            raise
        raise resumed_rule(e, named, stored, checkpoint / STATE_FILE, "steps" in given) from None
    if stored and cfg.steps < done:  # a --train-config file's steps (--set's were refused above): "nothing to do",
        # exit 0, after a note that the schedule changed
        raise UsageError(f"{named('train_config', 'steps')}: steps {cfg.steps}, but the run in {args.out} has done "
                         f"{done} steps; steps is the number of steps to reach (at least {done}: --steps N)")
    if args.init_from is not None and data.vocab_size > spec.V:  # "--set vocab_size=N" (data.check) was refused
        raise DataError(f"{data.source}: token ids go up to {data.vocab_size - 1}, past the vocabulary of --init-from "
                        f"{args.init_from} (vocab_size {spec.V}: no embedding rows for them); train on data whose ids "
                        "fit it, or start from other weights")
    data.check(cfg.seq_len, spec.V)
    lower = RESUME_MEMORY if stored else "lower batch_size/seq_len (--set batch_size=N) or the model's sizes"
    # a raw .bin read as the wrong dtype: ids of garbage, beyond any tokenizer's (the largest hold ~262k tokens)
    if data.vocab_from_ids and spec.V == data.vocab_size > IMPLAUSIBLE_VOCAB:
        lower += (f"; the vocabulary is the largest token id in {data.source} + 1 (no meta.json vocab_size): ids that "
                  f"large mean the file does not hold {data.train.dtype.name} tokens (--data-dtype)")
    check_train_memory(spec, cfg, lower)  # before init
    check_tensor_count(spec, len(MOMENTS))  # the run's checkpoints, readable
    # the validation batches are built once, up front, checked here: else --eval-batches 10**9 would be a 60 GiB
    # allocation reported as the training job running out of memory (lower batch_size), 10**6 a Python loop of minutes
    eval_batches = resumed_eval_batches(args, checkpoint, stored)
    # a resumed run's are its own (a --eval-batches that differs is refused): "lower --eval-batches" would lead there
    kept = stored is not None and stored.get("eval_batches") is not None
    what = f"the resumed run's eval_batches (state.json of {checkpoint})" if kept else "--eval-batches"
    lower = ("resume it on a machine with more memory (a resume keeps its validation set), or start a new --out with "
             "a lower --eval-batches") if kept else "lower --eval-batches"
    check_memory(eval_bytes(eval_batches, cfg.batch_size, cfg.seq_len),
                 f"{what} {eval_batches:,} (validation batches of {cfg.batch_size} x {cfg.seq_len + 1} tokens, kept "
                 "for every evaluation)", lower)
    if stored:
        check_resume({"spec": spec.to_dict(), "train_config": cfg.to_dict()}, stored, named)
        # the compute dtype the run had, given again or left to the spec (resumed_value): recorded as the run
        # recorded it, as every unchanged value is (else run.json and the next state.json disagree, check_run_json)
        cfg = cfg.replace(compute_dtype=stored["train_config"].get("compute_dtype"))
        if (steps := stored["train_config"]["steps"]) != cfg.steps and is_main_process():  # once, not per rank
            print(f"note: steps {steps} -> {cfg.steps}: the lr schedule changes from here", file=sys.stderr)
        start = partial(checkpoint_state, checkpoint)
    else:
        # after the inputs, the first error a user sees is the real one; process 0's run.json is this run's own
        refuse_used_out(args.out, records=is_main_process(), tokenizer=data.tokenizer)
        weights = init[0] if init else init_weights(spec, cfg.seed)
        sets = "".join(f" --set {k}={spelled(v)}" for k, v in spec_changes.items())  # a --set that reshapes the model
        check_weights(weights, spec, f"--init-from {args.init_from}{sets and ' with'}{sets}" if init else "init")
        start = partial(fresh_state, weights)
    if args.stop_at is not None and args.stop_at > cfg.steps:  # capped silently, it read as a run stopped early
        raise UsageError(f"--stop-at {args.stop_at}: past the schedule's {cfg.steps} steps; --stop-at is the update "
                         f"to stop after, before the schedule's end (at most {cfg.steps}: --steps sets the end)")
    stop = args.stop_at or cfg.steps
    return Run(spec, cfg, data, args.out, start, stop, **resumed_cadence(args, stored), eval_batches=eval_batches,
               info={"backend": args.backend, "argv": args.argv,
                     "invocations": [invocation(args.backend, args.argv, done, stop)]})


def resumed_data_dtype(args, checkpoint: Path | None, stored: dict | None, source) -> str | None:
    """--data-dtype, else the dtype the resumed run read its tokens as (state.json's data_dtype) where `source` holds
    raw .bin tokens and no meta.json beside them names one, else None (unkept, a run of uint32 tokens resumed without
    --data-dtype would read them as uint16 and be refused for training on other data). A data_dtype that meta.json
    beside the tokens contradicts (one of them edited) is refused naming both."""
    if args.data_dtype is not None or not stored or stored.get("data_dtype") is None or not reads_raw_tokens(source):
        return args.data_dtype
    dtype, directory = stored["data_dtype"], Path(source) if Path(source).is_dir() else Path(source).parent
    if (meta := read_meta(directory).get("dtype")) not in (None, dtype):
        # load_data refuses a --data-dtype that meta.json contradicts: only meta.json's own dtype can be passed
        meta_dtype = (f"if they are {meta}, pass --data-dtype {meta} (the resume checks that they are the run's); if "
                      f"{dtype}, " if meta in TOKEN_DTYPES else "")
        raise UsageError(f"{checkpoint / STATE_FILE}: data_dtype {dtype} (how the run read {source}), but "
                         f"{directory / 'meta.json'} says dtype {quote(meta)}: {meta_dtype}correct meta.json's dtype "
                         "(a --data-dtype that it contradicts is refused)")
    return dtype if meta is None else None  # meta.json names it: load_data reads it from there, as the run did


def given_options(args) -> dict[str, str]:
    """{spec or train config key: the option that set it, as given}: its --set item, or --steps N / --seed N."""
    options = {item.partition("=")[0].strip(): f"--set {item}" for item in args.set or []}
    options.update({k: f"--{k} {getattr(args, k)}" for k in ("steps", "seed") if getattr(args, k) is not None})
    return options


def option_of(args, given: dict[str, str], data: str, part: str, key: str) -> str:
    """The options that set `key` of `part` (spec, train_config, data) in a resume, else "" (the resumed run's own,
    from its state.json). `data`: the data's, whatever the key."""
    if part == "data":
        return data
    if key in given:
        return given[key]
    file = args.spec if part == "spec" else args.train_config
    return "" if file is None else f"--{part.replace('_', '-')} {file}"


def resumed_rule(e: SpecError, named: Callable[[str, str], str], stored: dict, state_file: Path,
                 steps_given: bool) -> UsageError:
    """A train config or spec rule broken in a resume, named by the options given and the resumed run's values it
    meets: `--steps 4` of a run whose warmup is 8 was "warmup_steps=8 must be <= steps=4", neither the option nor
    where the 8 came from named (a resume keeps its schedule's warmup)."""
    keys = dict.fromkeys(k for k in re.findall(r"\b(\w+)=", str(e)) if k in TRAIN_KEYS or k in SPEC_KEYS)
    options, kept = [], []
    for key in keys:
        part = "train_config" if key in TRAIN_KEYS else "spec"
        if option := named(part, key):
            options.append(option)
        elif key in stored[part]:
            kept.append(f"{key} {quote(stored[part][key])}")
    text = f"{', '.join(dict.fromkeys(options)) or '--resume'}: {e}"
    if kept:
        text += f" ({', '.join(kept)}: the resumed run's, from {state_file})"
    if steps_given and {"steps", "warmup_steps"} <= keys.keys():
        text += "; --stop-at N ends this invocation after update N without changing the schedule"
    return UsageError(text)


def resumed_cadence(args, stored: dict | None) -> dict:
    """--log-every, --eval-every, --save-every and --keep as given, else the resumed run's (its checkpoint's
    state.json), else DEFAULT_CADENCE. A resume without them fetched, evaluated and saved at the defaults' steps, and
    pruned to 3 checkpoints a run that kept them all. Unlike --eval-batches, a resume may change them: they move when
    the loop reads, evaluates and saves, not the numbers it computes."""
    before = stored.get("cadence", {}) if stored else {}
    return {key: given if (given := getattr(args, key)) is not None else before.get(key, default)
            for key, default in DEFAULT_CADENCE.items()}


def resumed_eval_batches(args, checkpoint: Path | None, stored: dict | None) -> int:
    """--eval-batches, else the resumed run's (its checkpoint's state.json), else DEFAULT_EVAL_BATCHES. A resumed run
    evaluated on the default's 8 batches where it had been given 1, its later val_loss on another validation set
    than its earlier ones, without a word: a resume that changes it is refused."""
    before = stored.get("eval_batches") if stored else None
    if args.eval_batches is not None and before is not None and args.eval_batches != before:
        raise UsageError(f"--eval-batches {args.eval_batches}: the run in {args.out} evaluates on {before} batches "
                         f"({checkpoint / STATE_FILE}); its val_loss would change with its validation set (start a "
                         "new --out to change it)")
    return args.eval_batches or before or DEFAULT_EVAL_BATCHES


# a resumed run's batch and model are its checkpoint's (check_resume): what it may lower is the step's memory
RESUME_MEMORY = ("resume it on a machine with more memory, or lower the step's memory, which a resume may change "
                 "(--set grad_accum_steps=N, --set remat=block or full, --set loss_chunk=N)")
IMPLAUSIBLE_VOCAB = 2**20  # token ids past this in a raw .bin are read as the sign of a wrong --data-dtype


def check_train_memory(spec: ModelSpec, cfg: TrainConfig, lower: str) -> None:
    """Refuse (ResourceError) a training job of `spec` under `cfg` that cannot fit in this machine's memory, before
    anything is allocated: train_bytes with every memory option of `cfg`; `lower` says what to lower."""
    memory = {k: getattr(cfg, k) for k in MEMORY_OPTIONS}
    check_memory(train_bytes(spec, cfg.batch_size, cfg.seq_len, **memory),
                 f"training {spec.L} layers of d_model {spec.D}, vocab {spec.V:,} at batch {cfg.batch_size} x seq "
                 f"{cfg.seq_len}", lower)


def resumed_checkpoint(args) -> tuple[Path, dict]:
    """The latest checkpoint in --out and its state.json (--resume)."""
    check_out_dir("--out", args.out)  # a file on its path, no write permission: refused before any work
    checkpoint = latest_checkpoint(args.out)
    if checkpoint is None:
        if earlier := earlier_run_files(args.out):  # "run without --resume to start" led to refuse_used_out's refusal
            raise UsageError(f"{args.out}: no checkpoint to resume: it holds {' and '.join(earlier)} of a run that "
                             f"wrote none; delete {'them' if len(earlier) > 1 else 'it'} to start a new run there, or "
                             "pass another --out")
        raise UsageError(f"{args.out}: no checkpoint to resume (run without --resume to start)")
    if args.init_from:
        raise UsageError("--init-from starts a new run and --resume continues one: pass one of them")
    stored = read_state(checkpoint)  # every copy of the spec and config in the checkpoint agrees, or refused
    if missing := [k for k in ("spec", "train_config", "data") if not isinstance(stored.get(k), dict)]:
        raise CheckpointError(f"{checkpoint / STATE_FILE}: missing {', '.join(missing)}")
    return checkpoint, stored


def check_resumed_tokenizer(checkpoint: Path, data: TokenData, out: Path) -> None:
    """The data's tokenizer.json is the one the checkpoint copied, byte for byte, or DataError: another one (the same
    token files, a tokenizer.json replaced) went into the run and every later checkpoint, where generate.py decoded
    the ids the model learned as other text."""
    kept, now = checkpoint / TOKENIZER_FILE, data.tokenizer
    if kept.is_file() and (now is None or not same_bytes(kept, now)):
        said = (f"{now}: not the tokenizer the run in {out} trained with ({kept}), by which its ids decode" if now else
                f"{data.source}: no tokenizer.json, and the run in {out} trained with {kept}, by which its ids decode")
        raise DataError(f"{said}; put that one back in the data (or start a new --out)")


def checkpoint_state(path: Path) -> dict:
    return load_train_checkpoint(path)[0]


def read_init(path: Path | None, spec: ModelSpec | None) -> tuple[dict, ModelSpec] | None:
    """--init-from's weights and spec, in any format convert.py reads (shared_config.formats); a given spec must
    match."""
    if path is None:
        return None
    from .formats import quiet_libraries, read_checkpoint

    quiet_libraries()
    return read_checkpoint(path, spec)


def base_spec(args, stored, init, data: TokenData) -> ModelSpec:
    """--spec, else the resumed run's, else the --init-from file's, else tiny with the data's vocabulary."""
    if args.spec is not None:
        return load_spec(args.spec)
    if stored:
        return load_spec(stored["spec"])
    if init:
        return init[1]
    return load_spec(DEFAULT_SPEC).replace(vocab_size=data.vocab_size)


def base_config(args, stored) -> TrainConfig:
    """--train-config, else the resumed run's, else the cpu preset."""
    if args.train_config is not None:
        return load_train_config(args.train_config)
    return TrainConfig.from_dict(stored["train_config"]) if stored else load_train_config(DEFAULT_TRAIN_CONFIG)


def with_changes(cfg: TrainConfig, changes: dict, shorten_warmup: bool = True) -> TrainConfig:
    """`cfg` with --set/--steps/--seed applied; a --steps below the warmup shortens the warmup with it (a new run
    only: a resumed run keeps its schedule's warmup)."""
    if shorten_warmup and "steps" in changes and "warmup_steps" not in changes:
        changes = {**changes, "warmup_steps": min(cfg.warmup_steps, changes["steps"])}
    return cfg.replace(**changes)


def check_resume(now: dict[str, dict], stored: dict, named: Callable[[str, str], str] = lambda part, key: "") -> None:
    """A resumed run is the run that was checkpointed: `now`, {part: {key: value}} of its spec, train config (but
    steps and the compute options) and data (but its source), is state.json's, or a UsageError lists each difference
    with the options that made it, `named(part, key)` (option_of), once after the last difference in a row it made
    ("lr: checkpoint 0.001, now 1" named the key alone)."""
    label = {"spec": "spec ", "train_config": "", "data": "data "}
    diffs = [(f"{label[part]}{k}: checkpoint {quote(before)}, now {quote(v)}", named(part, k))
             for part, values in now.items() for k, v in values.items()
             if k not in ("steps", "source", *COMPUTE_OPTIONS) and (before := resumed_value(stored, part, k, v)) != v]
    if diffs:
        text = "; ".join(f"{diff} ({option})" if option and option != (diffs[i + 1][1] if i + 1 < len(diffs) else "")
                         else diff for i, (diff, option) in enumerate(diffs))
        raise UsageError(f"--resume continues the run as it was checkpointed, but {text}; start a new --out to change "
                         "them")


def resumed_value(stored: dict, part: str, key: str, now):
    """The value of `key` of `part` that the resumed run had, as `now` is compared with it: its state.json's, but for
    the train config's compute_dtype, which overrides the spec's (null: the spec's). That one is the dtype the run
    computed in, state.json's spec's (it has the override applied), so that `--set compute_dtype=float32` of a float32
    run is no change; a null leaves it to the spec, compared as such."""
    if part == "train_config" and key == "compute_dtype":
        return now if now is None else stored["spec"].get(key, ModelSpec.compute_dtype)  # absent: the default
    return stored[part].get(key)


def fresh_state(weights: dict) -> dict:
    """A canonical train state at step 0: `weights` and AdamW moments of zero."""
    return {"step": 0, "weights": weights,
            **{key: {k: np.zeros_like(w) for k, w in weights.items()} for key in ("m", "v")}}


def is_main_process() -> bool:
    """Process 0 of a torchrun (RANK) or multi-process JAX (JAX_PROCESS_ID) run, or the only process: the one that
    writes the run directory and reports. Every process trains; all of them take part in gathering a checkpoint."""
    return (env_int("RANK") if "RANK" in os.environ else env_int("JAX_PROCESS_ID")) == 0
