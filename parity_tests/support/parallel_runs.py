"""The files a sharded run in a subprocess reads and writes (numpy only: the subprocesses import one framework).

Inputs in a directory: `init.safetensors` (canonical weights, spec in the metadata) and `train.json`.
Outputs per run: `NAME.json` (metrics, shardings), `NAME.npz` (the canonical train state) and
`NAME.safetensors` (the checkpoint the run saved).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shared_config import TrainConfig, synthetic_batch

PARTS = ("weights", "m", "v")


def read_config(directory: Path) -> TrainConfig:
    return TrainConfig.from_dict(json.loads((Path(directory) / "train.json").read_text()))


def masked_batch(cfg: TrainConfig, step: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Step `step`'s global tokens and mask: the synthetic batch, row r counting only its last (r + 1)·N/B
    targets, so that every rank and device holds a different number of counted targets (the mean of the
    per-rank means is then not the global mean: a sharded step must get this right)."""
    tokens_BN = synthetic_batch(cfg.seed, step, cfg.batch_size, cfg.seq_len, vocab_size)
    B, N = tokens_BN.shape
    keep_B1 = (np.arange(B)[:, None] + 1) * N // B
    return tokens_BN, (np.arange(N)[None, :] >= N - keep_B1).astype(np.int32)


def ignored_batch(cfg: TrainConfig, step: int, vocab_size: int, ignore: int) -> np.ndarray:
    """Step `step`'s synthetic tokens with every (r + 2)-th token of row r set to `ignore` (the twins' IGNORE_INDEX):
    each row counts a different number of targets, in a batch of tokens alone (what Trainer.eval_loss takes). Spread
    out, not a prefix: an ignored input reads as token 0, and a run of equal tokens gives equal hidden states, so
    equal router scores, whose top-k order only the tie-break decides."""
    tokens_BN = synthetic_batch(cfg.seed, step, cfg.batch_size, cfg.seq_len, vocab_size)
    B, N = tokens_BN.shape
    ignored_BN = np.arange(N)[None, :] % (np.arange(B)[:, None] + 2) == 1
    return np.where(ignored_BN, ignore, tokens_BN).astype(tokens_BN.dtype)


def save_run(directory: Path, name: str, record: dict, canonical: dict) -> None:
    """A run's record and its canonical train state {"weights", "m", "v": {name: array}}."""
    (Path(directory) / f"{name}.json").write_text(json.dumps(record))
    np.savez(Path(directory) / f"{name}.npz", **{f"{p}/{k}": v for p in PARTS for k, v in canonical[p].items()})


def load_run(directory: Path, name: str) -> tuple[dict, dict]:
    """What `save_run` wrote."""
    record = json.loads((Path(directory) / f"{name}.json").read_text())
    with np.load(Path(directory) / f"{name}.npz") as f:
        state = {p: {k.split("/", 1)[1]: f[k] for k in f.files if k.startswith(p + "/")} for p in PARTS}
    return record, state
