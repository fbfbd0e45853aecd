"""A training run's directory (numpy only): checkpoints that either twin resumes, and metrics.

    OUT/run.json                  spec, train config, data and command of the run, written at its start
    OUT/metrics.jsonl             one JSON object per line: {"kind": "train" | "eval", "step": ..., ...}
    OUT/tokenizer.json            the data's tokenizer, when it has one
    OUT/step-00000200/            one checkpoint, built under a temporary name and renamed whole
        model.safetensors         the canonical weights, spec in the metadata (either twin, convert.py, generate.py)
        optimizer.safetensors     AdamW's moments by canonical name: "m.<name>", "v.<name>"
        state.json                step, data position, spec, train config, data, backend
        tokenizer.json            a copy, so that generate.py --weights .../model.safetensors decodes text

A checkpoint's `step` is the number of updates applied; the next batch is `batch(seed, step)`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from safetensors.numpy import save_file

from .io import (
    CheckpointError, atomic_dir, atomic_write, check_tensors, load_checkpoint, read_json, read_safetensors,
    save_checkpoint,
)
from .layout import layout
from .spec import ModelSpec

CHECKPOINT = re.compile(r"step-(\d{8})")
MOMENTS = ("m", "v")  # AdamW's first and second moments, named as in the train state


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


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
        save_checkpoint(tmp / "model.safetensors", train_state["weights"], spec)
        moments = {f"{key}.{name}": np.ascontiguousarray(x) for key in MOMENTS for name, x in train_state[key].items()}
        save_file(moments, tmp / "optimizer.safetensors", metadata={"format": "twinlm-adamw", "step": str(step)})
        (tmp / "state.json").write_text(json.dumps({"step": step, **info}, indent=1) + "\n")
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
    return path


def load_train_checkpoint(path: str | Path) -> tuple[dict, ModelSpec, dict]:
    """The canonical train state, the spec and state.json of a checkpoint directory, everything checked."""
    path = Path(path)
    info = read_json(path / "state.json")
    if not isinstance(info.get("step"), int) or info["step"] < 0:
        raise CheckpointError(f"{path / 'state.json'}: 'step' must be an integer >= 0")
    weights, spec = load_checkpoint(path / "model.safetensors")
    moments, meta = read_safetensors(path / "optimizer.safetensors")
    check_moments(moments, spec, path / "optimizer.safetensors")
    if meta.get("step") != str(info["step"]):
        raise CheckpointError(f"{path}: optimizer.safetensors is at step {meta.get('step')}, state.json at {info['step']}")
    state = {"step": info["step"], "weights": weights}
    state.update({key: {t.name: moments[f"{key}.{t.name}"] for t in layout(spec)} for key in MOMENTS})
    return state, spec, info


def check_moments(moments: dict[str, np.ndarray], spec: ModelSpec, path: Path) -> None:
    """Every canonical tensor has an m and a v of its shape, float, all finite."""
    check_tensors(moments, {f"{key}.{t.name}": t.shape for key in MOMENTS for t in layout(spec)}, path)


def prune_checkpoints(out: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints; each is renamed aside first so none is ever half there."""
    for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        doomed = old.with_name(f".{old.name}.deleting")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


# --- JSON files -----------------------------------------------------------------------------------


def write_json(path: str | Path, data: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1) + "\n"))


def append_metrics(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Append one JSON line per record (whole lines, flushed, so a reader never sees half a record)."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    if text:
        with open(path, "a") as f:
            f.write(text)
            f.flush()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; a last line cut short by a crash is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def truncate_metrics(path: str | Path, step: int) -> None:
    """Keep the records up to `step` (a resumed run logs the steps after its checkpoint again)."""
    path = Path(path)
    if path.is_file():
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in kept)))
