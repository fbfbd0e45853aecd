"""A training run's directory (numpy only): checkpoints that either twin resumes, and the --out a fresh run may
write into; its metrics.jsonl is shared_config/metrics.py's.

    OUT/run.json                  spec, train config, data and command of the run, written at its start; every
                                  invocation (command, backend, start step, time, versions) in "invocations"
    OUT/metrics.jsonl             one JSON object per line: {"kind": "train" | "eval", "step": ..., ...}
    OUT/tokenizer.json            the data's tokenizer, when it has one
    OUT/.lock                     the PID of the one process writing the run (an flock while it runs)
    OUT/step-00000200/            one checkpoint, built under a temporary name and renamed whole
        model.safetensors         the canonical weights, spec in the metadata (either twin, convert.py, generate.py)
        optimizer.safetensors     AdamW's moments by canonical name: "m.<name>", "v.<name>"
        state.json                step, data position, spec, train config, data (and its token dtype), backend,
                                  eval_batches, cadence
        tokenizer.json            a copy, so that generate.py --weights .../model.safetensors decodes text

A checkpoint's `step` is the number of updates applied; the next batch is `batch(seed, step)`.
"""

from __future__ import annotations

import contextlib
import fcntl
import filecmp
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .data import TOKEN_DTYPES
from .cli import UsageError, check_out_dir
from .config_file import SpecError
from .files import CheckpointError, atomic_dir, atomic_write, json_text, read_json, recover, umask, write_errors
from .formats.checks import check_tensors, spec_from_json
from .formats.safetensors import (ADAMW_FORMAT, load_checkpoint, read_header, read_safetensors, save_checkpoint,
                                  save_safetensors)
from .layout import layout
from .limits import quote
from .report import versions
from .resources import ResourceError
from .spec import ModelSpec
from .train_config import COMPUTE_OPTIONS, TrainConfig

# Every name a run directory holds (the layout above); no other module spells them.
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
TOKENIZER_FILE = "tokenizer.json"  # in OUT and in each checkpoint
LOCK_FILE = ".lock"
WEIGHTS_FILE = "model.safetensors"  # in each checkpoint, as the files below
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
CHECKPOINT = re.compile(r"step-(\d{8})")
MOMENTS = ("m", "v")  # AdamW's first and second moments, named as in the train state
# the options that time a run's metric fetches, evaluations and checkpoints and count the checkpoints it keeps, with
# their least values: state.json records them, and a resume keeps them unless given again (run.resumed_cadence)
CADENCE_MIN = {"log_every": 1, "eval_every": 0, "save_every": 0, "keep": 0}


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint directory, read off its name."""
    return int(CHECKPOINT.fullmatch(path.name).group(1))


def list_checkpoints(out: str | Path) -> list[Path]:
    """The complete checkpoints in `out`, oldest first (partial ones live under hidden temporary names)."""
    out = Path(out)
    found = [p for p in out.iterdir() if CHECKPOINT.fullmatch(p.name) and p.is_dir()] if out.is_dir() else []
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(out: str | Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def save_train_checkpoint(out: str | Path, train_state: dict, spec: ModelSpec, info: dict,
                          tokenizer: Path | None = None) -> Path:
    """Write `out/step-NNNNNNNN/` atomically from a canonical train state {"step", "weights", "m", "v"}."""
    step = train_state["step"]
    path = Path(out) / checkpoint_name(step)
    with atomic_dir(path, overwrite=True) as tmp:
        save_checkpoint(tmp / WEIGHTS_FILE, train_state["weights"], spec)
        moments = {f"{key}.{name}": np.ascontiguousarray(x) for key in MOMENTS for name, x in train_state[key].items()}
        with write_errors(tmp / OPTIMIZER_FILE):
            save_safetensors(moments, tmp / OPTIMIZER_FILE, {"format": ADAMW_FORMAT, "step": str(step)})
        os.chmod(tmp / OPTIMIZER_FILE, 0o666 & ~umask())  # save_file creates it 0600
        (tmp / STATE_FILE).write_text(json_text({"step": step, **info}, indent=1) + "\n")
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
    return path


def read_state(path: str | Path) -> dict:
    """state.json of a checkpoint directory, checked against the other copies of what it records: its spec must
    equal model.safetensors' and its step optimizer.safetensors' and its data position's (only headers are read).
    An edited copy is refused, naming both values, rather than trained on with another architecture."""
    path = Path(path)
    state_file = path / STATE_FILE
    info = read_json(state_file)
    if not isinstance(info.get("step"), int) or isinstance(info["step"], bool) or info["step"] < 0:
        raise CheckpointError(f"{state_file}: 'step' must be an integer >= 0")
    for key in ("spec", "train_config", "data", "data_position"):
        if key in info and not isinstance(info[key], dict):
            raise CheckpointError(f"{state_file}: {key} must be a JSON object, got {quote(info[key])}")
    check_resumed_config(state_file, info)
    _check_count(state_file, "eval_batches", info.get("eval_batches", 1), 1)  # run.resumed_eval_batches' validation set
    if info.get("data_dtype") not in (None, *TOKEN_DTYPES):  # run.resumed_data_dtype's dtype of raw .bin tokens
        raise CheckpointError(f"{state_file}: 'data_dtype' must be one of {', '.join(TOKEN_DTYPES)}, got "
                              f"{quote(info['data_dtype'])}")
    cadence = info.get("cadence", {})
    if not isinstance(cadence, dict):
        raise CheckpointError(f"{state_file}: cadence must be a JSON object, got {quote(cadence)}")
    for key, least in CADENCE_MIN.items():
        if key in cadence:
            _check_count(state_file, f"cadence {key}", cadence[key], least)
    filled(info)
    if "spec" in info:
        state_spec = spec_from_json(json_text(info["spec"]), state_file, "spec")
        if "spec" not in (metadata := _metadata(path / WEIGHTS_FILE)):  # it said "got None", a null no file held
            raise CheckpointError(f"{path / WEIGHTS_FILE}: its metadata holds no spec (a checkpoint's weights record "
                                  "their spec, as state.json does)")
        model_spec = spec_from_json(metadata["spec"], path / WEIGHTS_FILE, "spec in metadata")
        if diffs := _differences(state_spec.to_dict(), model_spec.to_dict()):
            raise CheckpointError(f"{path}: state.json and model.safetensors record different specs: "
                                  + "; ".join(f"{k}: state.json {a} vs model.safetensors {b}" for k, a, b in diffs))
    position = info.get("data_position", {})
    optimizer = _metadata(path / OPTIMIZER_FILE)
    if (written := optimizer.get("format")) != ADAMW_FORMAT:  # model weights in its place were "at step None"
        said = "names no format" if written is None else f"says format {quote(written)}"
        raise CheckpointError(f"{path / OPTIMIZER_FILE}: its metadata {said}, not {ADAMW_FORMAT!r}: not a run's "
                              "AdamW moments (m.<name>, v.<name>)")
    copies = {OPTIMIZER_FILE: optimizer.get("step")}
    if "step" in position:
        copies["state.json data_position"] = position["step"]
    if CHECKPOINT.fullmatch(path.name):  # step-00000002 holding step 3 (a copy renamed) resumed as the newest
        copies["its name"] = checkpoint_step(path)
    for where, step in copies.items():
        if str(step) != str(info["step"]):
            shown = step[:40] if isinstance(step, str) else quote(step)  # the metadata's text, state.json's JSON
            raise CheckpointError(f"{path}: {where} is at step {shown}, state.json at {info['step']}")
    if "seed" in position and "train_config" in info and position["seed"] != info["train_config"].get("seed"):
        raise CheckpointError(f"{state_file}: data_position seed {quote(position.get('seed'))} vs train_config seed "
                              f"{quote(info['train_config'].get('seed'))}")
    check_run_json(path.parent / RUN_FILE, info, state_file)
    return info


def filled(record: dict) -> None:
    """`record`'s spec and train_config (state.json's, run.json's) with every key they lack set to its default: a
    run written before a key existed computed with that default, and a resume compares it with the key's value now
    (a missing embed_norm read as null refused every resume of such a run). A spec or config the dataclass refuses
    is left as it is, for its check to name."""
    for part, cls in (("spec", ModelSpec), ("train_config", TrainConfig)):
        if isinstance(record.get(part), dict):
            with contextlib.suppress(ValueError):
                record[part] = {**cls.from_dict(record[part]).to_dict(), **record[part]}


def check_resumed_config(state_file: Path, info: dict) -> None:
    """state.json's train config (its `steps` too) and data source as a resume reads them (run.base_config,
    check_resume, resolve_run), or a CheckpointError naming state.json: one without `steps` or a `source` was a
    KeyError's traceback, a source of 5 a TypeError's, and steps: "8" an error naming no file."""
    if "train_config" in info:
        try:
            TrainConfig.from_dict(info["train_config"])
        except SpecError as e:
            raise CheckpointError(f"{state_file}: train_config: {e}") from None
        if "steps" not in info["train_config"]:
            raise CheckpointError(f"{state_file}: train_config has no steps (the schedule's length)")
    if "data" in info and "source" not in info["data"]:  # it said "got None", a null the file did not hold
        raise CheckpointError(f"{state_file}: data has no source (the data the run trained on)")
    if "data" in info and not isinstance(source := info["data"].get("source"), str):
        raise CheckpointError(f"{state_file}: data source must be a string (the data the run trained on), got "
                              f"{quote(source)}")


def _check_count(state_file: Path, key: str, value, least: int) -> None:
    """Refuse (CheckpointError) a count in state.json that is not an integer >= `least`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise CheckpointError(f"{state_file}: '{key}' must be an integer >= {least}, got {quote(value)}")


def check_run_json(run_json: Path, info: dict, state_file: Path) -> None:
    """The run's run.json (when there is one) and a checkpoint's state.json record the same spec, data and train
    config, but `steps` and the memory options (which any --resume may change, each time: run.json keeps the
    first invocation's; its "invocations" list each one's command)."""
    if not run_json.exists():  # a FIFO or device in its place is refused by read_json
        return
    run = read_json(run_json)
    filled(run)
    for key in ("spec", "train_config", "data"):
        if key not in info:
            continue
        if not isinstance(run.get(key), dict):
            raise CheckpointError(f"{run_json}: missing {key}")
        skip = ("steps", *COMPUTE_OPTIONS) if key == "train_config" else ("source",) if key == "data" else ()
        # data's floats (the entropy rate) are recomputed by each process: never compared for identity
        a, b = ({k: v for k, v in d.items() if k not in skip and not (key == "data" and isinstance(v, float))}
                for d in (run[key], info[key]))
        if diffs := _differences(a, b):
            raise CheckpointError(f"{state_file}: disagrees with {run_json}: "
                                  + "; ".join(f"{key} {k}: run.json {x} vs state.json {y}" for k, x, y in diffs))


def _differences(a: dict, b: dict) -> list[tuple[str, str, str]]:
    return [(k, quote(a.get(k)), quote(b.get(k))) for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]


def _metadata(path: Path) -> dict:
    try:
        return read_header(path).get("__metadata__") or {}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file: {e}") from None


def load_train_checkpoint(path: str | Path) -> tuple[dict, ModelSpec, dict]:
    """The canonical train state, the spec and state.json of a checkpoint directory, everything checked."""
    path = Path(path)
    info = read_state(path)
    weights, spec = load_checkpoint(path / WEIGHTS_FILE)
    moments = read_safetensors(path / OPTIMIZER_FILE)[0]  # its format and step: read_state
    check_moments(moments, spec, path / OPTIMIZER_FILE)
    state = {"step": info["step"], "weights": weights}
    state.update({key: {t.name: moments[f"{key}.{t.name}"] for t in layout(spec)} for key in MOMENTS})
    return state, spec, info


def check_moments(moments: dict[str, np.ndarray], spec: ModelSpec, path: Path) -> None:
    """Every canonical tensor has an m and a v of its shape, float, all finite; v >= 0 (the next update's sqrt: NaN)."""
    check_tensors(moments, {f"{key}.{t.name}": t.shape for key in MOMENTS for t in layout(spec)}, path)
    if neg := [k for k, x in moments.items() if k.startswith("v.") and np.any(x < 0)]:
        raise CheckpointError(f"{path}: {neg[0]} has negative values: AdamW's v is a mean of squares (a damaged file?)")


def prune_checkpoints(out: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints; each is renamed aside first so none is ever half there."""
    for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        doomed = old.with_name(f".{old.name}.deleting")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


# --- JSON files -----------------------------------------------------------------------------------


def write_json(path: str | Path, data: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json_text(data, indent=1) + "\n"))


def write_run_info(out: str | Path, info: dict) -> None:
    """OUT/run.json: what the run is (spec, train config, data, command), written at its start."""
    write_json(Path(out) / RUN_FILE, info)


def record_invocation(out: str | Path, info: dict, whole: Callable[[], dict]) -> None:
    """Add a resume's invocation (`info["invocations"]`, run.Run.info) to OUT/run.json's, after every earlier one: a
    resume, in either twin, left no trace there. The first invocation's "argv" and "backend" stay as they were (and a
    run.json from before "invocations" has them made its first); where there is no run.json, `whole()` is written."""
    path = Path(out) / RUN_FILE
    if not path.exists():
        return write_run_info(out, whole())
    run = read_json(path)
    earlier = run.get("invocations")
    if not isinstance(earlier, list):
        earlier = [{k: run[k] for k in ("argv", "backend") if k in run} | {"start_step": 0}] if "argv" in run else []
    write_run_info(out, {**run, "invocations": [*earlier, *info["invocations"]]})


FRAMEWORKS = {"jax": ("jax", "jaxlib", "flax", "optax"), "torch": ("torch",)}  # the distributions each twin runs on


def invocation(backend: str, argv: list[str], start_step: int, stop: int) -> dict:
    """One entry of run.json's "invocations": a scripts/train.py command's arguments, the twin, the step it started
    from and the update it stops after, when it started (UTC) and the versions it ran under."""
    return {"argv": argv, "backend": backend, "start_step": start_step, "stop": stop,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions("numpy", *FRAMEWORKS.get(backend, ()))}


def copy_tokenizer(out: str | Path, tokenizer: Path) -> None:
    """OUT/tokenizer.json: the data's tokenizer, beside the run's metrics (atomically). One there with its bytes stays
    as it is (a link to the data's own file too); a link to other bytes is replaced by the copy, never written
    through: atomic_write writes a link's target, which rewrote the data's tokenizer.json, or a user's file outside
    the run directory on a --resume."""
    path = Path(out) / TOKENIZER_FILE
    if same_bytes(path, Path(tokenizer)):
        return
    text = Path(tokenizer).read_bytes()
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(text), follow_links=False)


@contextlib.contextmanager
def lock_run(out: str | Path) -> Iterator[None]:
    """Hold the run directory `out` (created if need be) for this process alone: an exclusive `flock` on
    OUT/.lock, which holds the writer's PID. A second writer gets a ResourceError naming that PID. The OS drops
    the lock when the process ends, however it ends (fcntl rather than the filelock package, whose open
    truncates the file and so would erase the holder's PID)."""
    out = Path(out)
    out.resolve().mkdir(parents=True, exist_ok=True)  # through a symbolic link, also one whose target is not made yet
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ResourceError(f"{out}: the run directory is being written by another process (PID {holder}); "
                            "wait for it to finish, or pass another --out") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # the file stays: deleting it would let a waiting opener lock a file no longer there


def run_file_ids(out: str | Path) -> dict[str, tuple[int, int]]:
    """{name: (inode, mtime)} of the run files (run.json, metrics.jsonl, tokenizer.json) in `out`."""
    paths = [Path(out) / name for name in (RUN_FILE, METRICS_FILE, TOKENIZER_FILE)]
    return {p.name: (s.st_ino, s.st_mtime_ns) for p in paths if p.exists() and (s := p.stat())}


def remove_run_files(out: str | Path, before: dict[str, tuple[int, int]]) -> None:
    """Remove the run files a fresh run that stopped before its first checkpoint wrote into a directory it did not
    make (the lock stays, as lock_run says); one there before it (`before`: run_file_ids as it started) and untouched
    stays: a user's tokenizer.json beside a run of data without one went."""
    for name, ids in run_file_ids(out).items():
        if before.get(name) != ids:
            (Path(out) / name).unlink(missing_ok=True)


def earlier_run_files(out: Path) -> list[str]:
    """The record (run.json, metrics.jsonl) that a run in `out` left; a tokenizer.json alone may be a user's (a run
    writes run.json first)."""
    return [name for name in (RUN_FILE, METRICS_FILE) if os.path.lexists(out / name)]


def refuse_used_out(out: Path, records: bool = True, tokenizer: Path | None = None) -> None:
    """A fresh run never writes into a run directory that holds checkpoints or an earlier run's files, into a file,
    or into a directory of other files: a run written into a Hugging Face directory or a data directory was then
    deleted with it by the other tools' --force (which replace a directory of their own kind), and one written over
    the run.json and metrics.jsonl of a run that stopped before its first checkpoint (a non-finite step, a kill)
    replaced that run's record and cut its metrics, without a word. `records`: whether run.json and metrics.jsonl
    count, false on a torchrun's or JAX run's other processes, which start while process 0 writes this run's own.
    `tokenizer`: the data's tokenizer.json, which the run copies to OUT/tokenizer.json: one there that differs (a
    user's own) is refused, not replaced."""
    check_out_dir("--out", out)  # a file on its path, no write permission: refused before any work
    if latest_checkpoint(out) is not None:
        raise UsageError(f"{out} holds checkpoints already: pass --resume to continue that run, or another --out")
    if records and (earlier := earlier_run_files(out)):
        raise UsageError(f"{out} holds {' and '.join(earlier)} of an earlier run, which wrote no checkpoint (nothing "
                         f"to --resume): pass another --out, or delete {'them' if len(earlier) > 1 else 'it'} to start "
                         "a new run there")
    mine = out / TOKENIZER_FILE
    if tokenizer is not None and os.path.lexists(mine) and not same_bytes(mine, tokenizer):
        raise UsageError(f"{mine} is not the data's tokenizer ({tokenizer}), which a run copies there: pass another "
                         "--out, or move it away to start a new run there")
    if others := foreign_files(out):
        raise UsageError(f"{out} is not a run directory (it holds {quote(others[0])}"
                         f"{f' and {len(others) - 1:,} other files' if len(others) > 1 else ''}): pass a new or empty "
                         "--out")


def same_bytes(a: Path, b: Path) -> bool:
    """Whether `a` is a regular file, or a link to one, with the bytes of regular file `b` (a directory, a special
    file or a broken link at `a` is not: never read, so a FIFO does not block; tokenizer.json files are capped where
    they are read, at MAX_JSON_BYTES). A link to the data's own tokenizer.json was refused as not the data's."""
    return a.is_file() and filecmp.cmp(a, b, shallow=False)


def foreign_files(out: str | Path) -> list[str]:
    """The names in `out` that no run writes (sorted; [] for a directory that does not exist): what a fresh run must
    not write beside. A run's own: run.json, metrics.jsonl, tokenizer.json, the lock, checkpoints and temp files."""
    own = {RUN_FILE, METRICS_FILE, TOKENIZER_FILE, LOCK_FILE}
    names = sorted(p.name for p in Path(out).iterdir()) if Path(out).is_dir() else []
    return [n for n in names if n not in own and not CHECKPOINT.fullmatch(n) and not n.startswith(".")]


def recover_run_dir(out: str | Path) -> None:
    """Remove what killed writers left in a run directory (call with the lock held): checkpoint directories
    half-built under temporary names, a prune cut short (`.step-N.deleting`), temp files; a checkpoint moved
    aside by a replace is put back."""
    out = Path(out)
    for path in list(out.iterdir()) if out.is_dir() else []:
        if path.name.endswith(".deleting") and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(".") and path.name.endswith(".old"):
            recover(out / path.name[1:].removesuffix(".old"))
    for name in {p.name[1:].removesuffix(".tmp").rsplit(".", 2)[0] for p in out.glob(".*.*.*.tmp")}:
        recover(out / name)  # temps are named .NAME.PID.RANDOM.tmp
