"""What the sharded-JAX and the distributed-torch tests share: one tiny run, its single-device trajectories,
the subprocess launch, and the comparison.

The sharded runs happen in subprocesses (8 host devices must be set before JAX starts; torch needs
2 processes), which exchange files with the tests as parallel_runs.py says.
"""

from __future__ import annotations

import functools
import json
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch

import jax_model
import torch_model
from shared_config import load_checkpoint, load_train_config, save_checkpoint
from shared_config.parity import FORWARD_TOL, max_rel, rel_err

from .common import checkout_env, make_spec, parity_weights, tokens
from .parallel_runs import load_run, masked_batch  # noqa: F401  (the tests import load_run from here)
from .train_common import TWINS, trajectory

SPEC = make_spec(norm_type="dyt")  # alpha scalars among the tensors: replicated by the sharding rule
# 4 AdamW steps on 8 rows (parallel_runs.masked_batch: a different count of targets in every row): warmup and
# decay both take part; the gradient norms are 1.912, 1.912, 1.917, 2.006, so steps 2 and 3 are clipped and
# steps 0 and 1 are not (a clipped step hides the gradient's scale)
CFG = load_train_config("parity").replace(steps=4, warmup_steps=1, batch_size=8, seq_len=32, grad_clip=1.915)
TOL = 1e-5  # float32: losses |Δ| / loss, parameters and AdamW moments max|Δ| / max|reference|, per tensor


def write_inputs(directory: Path) -> Path:
    """The run every subprocess reads: canonical initial weights and the train config."""
    save_checkpoint(directory / "init.safetensors", parity_weights(SPEC), SPEC)
    (directory / "train.json").write_text(json.dumps(CFG.to_dict()))
    return directory


@functools.cache
def single_device(twin_name: str):
    """(metrics, canonical state) of the run on one device in this process, for the JAX or the torch twin."""
    _, twin, train = next(t for t in TWINS if t[0] == twin_name)
    return trajectory(twin, train, parity_weights(SPEC), SPEC, CFG, batch=lambda i: masked_batch(CFG, i, SPEC.V))


def run_processes(args: list[str], envs: list[dict[str, str]]) -> None:
    """Run `python args...` once per environment, all at once, importing this checkout (not an installed copy);
    fail the test with the output of any that fails."""
    procs = [subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=checkout_env(**env)) for env in envs]  # in the test's scratch directory
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{' '.join(args)} failed:\n{out[-3000:]}\n{err[-6000:]}"


def free_port() -> int:
    """A TCP port nobody listens on now, for a coordinator of this machine's processes."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def assert_same_run(record: dict, state: dict, twin_name: str) -> None:
    """Every step's loss and the final parameters and AdamW moments equal the single-device run's."""
    ref_metrics, ref_state = single_device(twin_name)
    for key in ("loss", "grad_norm"):  # grad_norm: before clipping, so a gradient off by a factor shows
        got, ref = np.array(record[key]), ref_metrics[key]
        assert len(got) == CFG.steps and (np.abs(got - ref) / ref).max() <= TOL, f"{key}: {got} vs {ref}"
    clipped = ref_metrics["grad_norm"] > CFG.grad_clip
    assert clipped.any() and not clipped.all(), "clipped and unclipped steps must both take part"
    for part in ("weights", "m", "v"):
        errors = {k: max_rel(state[part][k], r) for k, r in ref_state[part].items()}
        bad = {k: f"{e:.1e}" for k, e in errors.items() if not e <= TOL}
        assert not bad, f"{part}: max|Δ| / max|reference| above {TOL}: {bad}"


def assert_checkpoint_loads_in_both(path: Path, state: dict) -> None:
    """The file a sharded run saved holds its gathered weights bit for bit, and loads on one device in either twin
    with the same logits."""
    weights, spec = load_checkpoint(path)
    assert all(np.array_equal(weights[k], w) for k, w in state["weights"].items()), "the file is the run's state"
    toks = tokens(spec, 2, 64)
    jm, tm = jax_model.from_safetensors(path), torch_model.from_safetensors(path)
    with torch.no_grad():
        torch_logits = tm(torch.as_tensor(toks)).numpy()
    err = rel_err(np.asarray(jm(jnp.asarray(toks))), torch_logits)
    assert err <= FORWARD_TOL, f"{path.name}: jax vs torch logits {err:.1e}"
