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
ROUTED_STEP_TOL = 1e-6  # a routed run's losses and gradient norms against the one-shot run's
TOL = 1e-5  # float32: losses |Δ| / loss, parameters and AdamW moments max|Δ| / max|reference|, per tensor
# A GLA run's parameters and moments sit at GLA's own float32 floor: rounding every initial weight once more (a
# relative 2⁻²⁴, random sign) moves the one-device gla-peri run's AdamW moments by up to 1.3e-5 (3 draws; the
# base variant's by 2.4e-6), and a mesh, which only sums in another order, by 1.7e-5
GLA_STATE_TOL = 5e-5

# Routed variants (each in its own subdirectory of the runs' directory): every router with several placements, and
# the GLA mixer (which the spec never routes), trained 2 steps with 2 micro-batches per rank (or device) on the masked
# batches, so that parts count
# different targets; compared with the one-shot (grad_accum_steps=1) single-process run. γ·T fractional (T = 32).
ROUTED = {
    "mod": dict(routing="mod", routing_capacity=0.3, routing_gate="sigmoid"),
    "dtf": dict(routing="dtf", routing_capacity=0.35, dtf_window=3),
    "gla-peri": dict(mixer="gla", position="none", n_kv_heads=6, norm_placement="peri"),  # GLA is never routed
    "mod-hybrid_star": dict(routing="mod", routing_capacity=0.3, norm_placement="hybrid_star", routing_layers="all"),
    "dtf-deepnorm": dict(routing="dtf", routing_capacity=0.35, norm_placement="deepnorm", n_layers=4),
    "mod-pre_post": dict(routing="mod", routing_capacity=0.3, norm_placement="pre_post", norm_type="dyt"),
}
ROUTED_CFG = CFG.replace(steps=2, grad_accum_steps=2, router_predictor_loss_weight=0.5, dtf_prior_loss_weight=0.3)


def variant(name: str = ""):
    """(spec, train config, weights) of the base run ("") or of a routed variant."""
    if not name:
        return SPEC, CFG, parity_weights(SPEC)
    from ..model.test_routing import routed_weights

    spec = make_spec(**ROUTED[name])
    return spec, ROUTED_CFG, routed_weights(spec)


def write_inputs(directory: Path, routed=ROUTED) -> Path:
    """The runs every subprocess reads: canonical initial weights and the train config, the base run's in
    `directory`, each routed variant's in `directory/NAME`."""
    for name in ("", *routed):
        spec, cfg, weights = variant(name)
        (directory / name).mkdir(exist_ok=True)
        save_checkpoint(directory / name / "init.safetensors", weights, spec)
        (directory / name / "train.json").write_text(json.dumps(cfg.to_dict()))
    return directory


@functools.cache
def single_device(twin_name: str, name: str = ""):
    """(metrics, canonical state) of the run on one device in this process, for the JAX or the torch twin; a routed
    variant's one-shot (no accumulation: the parallel runs accumulate)."""
    _, twin, train = next(t for t in TWINS if t[0] == twin_name)
    spec, cfg, weights = variant(name)
    cfg = cfg.replace(grad_accum_steps=1)
    return trajectory(twin, train, weights, spec, cfg, batch=lambda i: masked_batch(cfg, i, spec.V))


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


def assert_same_run(record: dict, state: dict, twin_name: str, name: str = "",
                    reference: tuple[dict, dict] | None = None) -> None:
    """Every step's loss and the final parameters and AdamW moments equal the single-device run's (`name`: a routed
    variant's, one-shot), or those of `reference`, a (record, state) of load_run."""
    ref_metrics, ref_state = single_device(twin_name, name) if reference is None else reference
    ref_metrics = {k: np.asarray(v) for k, v in ref_metrics.items()}
    cfg = variant(name)[1]
    # a routed run's loss (aux terms included) and gradient norm are the one-shot run's at 1e-6: each aux term's
    # normalisation is the global batch's, whatever the micro-batch or rank holds (measured: <= 2e-7); parameters
    # and moments after two AdamW steps stay at TOL (AdamW's g/(|g| + eps) amplifies last bits where |g| ~ eps)
    step_tol = ROUTED_STEP_TOL if name else TOL
    state_tol = GLA_STATE_TOL if variant(name)[0].mixer == "gla" else TOL
    for key in ("loss", "grad_norm"):  # grad_norm: before clipping, so a gradient off by a factor shows
        got, ref = np.array(record[key]), ref_metrics[key]
        assert len(got) == cfg.steps and (np.abs(got - ref) / ref).max() <= step_tol, f"{key}: {got} vs {ref}"
    clipped = ref_metrics["grad_norm"] > CFG.grad_clip
    assert name or (clipped.any() and not clipped.all()), "clipped and unclipped steps must both take part"
    for part in ("weights", "m", "v"):
        errors = {k: max_rel(state[part][k], r) for k, r in ref_state[part].items()}
        bad = {k: f"{e:.1e}" for k, e in errors.items() if not e <= state_tol}
        assert not bad, f"{part}: max|Δ| / max|reference| above {state_tol}: {bad}"


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
