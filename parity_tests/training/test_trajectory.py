"""100 AdamW steps from one canonical checkpoint on the same batches: every step's loss and the final
parameters of the two twins agree (RMSNorm, DyT and Derf, pre and peri placement; and every other
placement with one norm type each, LayerNorm's under post)."""

import numpy as np
import pytest

from shared_config import init_weights, load_spec, load_train_config
from shared_config.parity import TRAJ_LOSS_TOL, TRAJ_PARAM_TOL, max_rel
from shared_config.spec import CHOICES
from shared_config.study import NORM_PRESETS

from ..support.common import ROOT
from ..support.train_common import TWINS, trajectory

CFG = load_train_config("parity")  # lr 5e-4: see the preset and docs/parity.md on chaos at larger lr
CASES = [(norm, placement) for norm in ("rms", "dyt", "derf") for placement in ("pre", "peri")]
CASES += [("dyt", "deepnorm"), ("rms", "hybrid"), ("derf", "hybrid_star"), ("rms", "pre_post"), ("layernorm", "post")]


# Every other token mixer trains its 100 steps in its own file, with weights made for it (GLA's gates spread far from
# 1): the test that does it, by path and name.
MIXER_TRAJECTORIES = {"gla": "parity_tests/model/test_gla.py::test_hundred_adamw_steps_agree"}


def test_the_cases_hold_every_norm_type_and_placement():
    """A norm type or placement added to the spec's CHOICES is trained here only once a case uses it; a mixer, once
    MIXER_TRAJECTORIES names its trajectory test (which must exist)."""
    assert {n for n, _ in CASES} == set(CHOICES["norm_type"]) == set(NORM_PRESETS)
    assert {p for _, p in CASES} == set(CHOICES["norm_placement"])
    assert {"attention", *MIXER_TRAJECTORIES} == set(CHOICES["mixer"]), "name each mixer's trajectory test"
    for where in MIXER_TRAJECTORIES.values():
        path, name = where.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), f"no test {where}"


@pytest.mark.slow
@pytest.mark.parametrize("norm,placement", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_hundred_adamw_steps_agree(norm, placement):
    spec = load_spec(NORM_PRESETS[norm]).replace(norm_type=norm, norm_placement=placement)
    weights = init_weights(spec, seed=0)
    (jax_metrics, jax_state), (torch_metrics, torch_state) = (
        trajectory(twin, train, weights, spec, CFG) for _, twin, train in TWINS
    )
    a, b = jax_metrics["loss"], torch_metrics["loss"]
    assert b[-1] < b[0] - 0.05, "the run must learn something, or it tests nothing"
    assert (torch_metrics["grad_norm"] > CFG.grad_clip).any(), "clipping must take part"
    worst = int(np.argmax(np.abs(a - b) / b))
    assert np.abs(a[worst] - b[worst]) / b[worst] <= TRAJ_LOSS_TOL, (
        f"step {worst}: loss jax {a[worst]} vs torch {b[worst]}")
    errors = {k: max_rel(jax_state["weights"][k], p) for k, p in torch_state["weights"].items()}
    bad = {k: f"{e:.1e}" for k, e in errors.items() if not e <= TRAJ_PARAM_TOL}
    assert not bad, f"final max|Δp| / max|p| above {TRAJ_PARAM_TOL}: {bad}"
    assert jax_state["step"] == torch_state["step"] == CFG.steps
