"""The train state in canonical names (weights, AdamW m and v, step): a run resumed from it continues
exactly (bit for bit in the same twin) and continues in the other twin within the trajectory bounds."""

import copy

import numpy as np
import pytest

from shared_config import TrainConfig, synthetic_batch
from shared_config.parity import TRAJ_LOSS_TOL, TRAJ_PARAM_TOL, max_rel

from ..support.common import make_spec, parity_weights, quick_first
from ..support.train_common import TWINS

SPEC = make_spec(norm_type="derf", norm_placement="peri", embed_scale="learnable", qk_norm=True)
CFG = TrainConfig(lr=1e-3, warmup_steps=2, steps=8, grad_clip=0.5, batch_size=2, seq_len=16)
HALF = CFG.steps // 2


def run(twin, train, canonical, first: int, last: int, keep: int | None = None):
    """Steps first..last-1 from a canonical train state; the losses, the canonical state after, and the canonical
    state after step `keep` (a copy, taken on the way: one compiled step serves both, where a separate run to `keep`
    compiled its own)."""
    model = twin.from_weights(canonical["weights"], SPEC)
    state = train.set_train_state(model, train.init_train_state(model, CFG), canonical)
    step, losses, kept = train.make_train_step(model, CFG), [], None
    for i in range(first, last):
        if i == keep:
            kept = copy.deepcopy(train.get_train_state(model, state))  # the next step donates the state's buffers
        state, metrics = step(state, synthetic_batch(CFG.seed, i, CFG.batch_size, CFG.seq_len, SPEC.V))
        losses.append(float(metrics["loss"]))
    return np.array(losses), train.get_train_state(model, state), kept


@pytest.fixture(scope="module")
def start():
    weights = parity_weights(SPEC)
    return {"step": 0, "weights": weights, "m": {k: 0 * v for k, v in weights.items()},
            "v": {k: 0 * v for k, v in weights.items()}}


@pytest.mark.slow  # the quick tier under 5 minutes (5 min 37 s this stop); CI runs the full suite
@pytest.mark.parametrize("name,twin,train", quick_first(TWINS, multi=True), ids=[t[0] for t in TWINS])
def test_resume_in_the_same_twin_is_exact(start, name, twin, train):
    whole_losses, whole, middle = run(twin, train, start, 0, CFG.steps, keep=HALF)
    assert middle["step"] == HALF
    resumed_losses, resumed, _ = run(twin, train, middle, HALF, CFG.steps)
    assert np.array_equal(resumed_losses, whole_losses[HALF:])
    for key in ("weights", "m", "v"):
        assert all(np.array_equal(resumed[key][k], whole[key][k]) for k in whole[key]), f"{name} {key}"


@pytest.mark.parametrize("first,second", quick_first([(0, 1), (1, 0)], multi=True),
                         ids=["jax-then-torch", "torch-then-jax"])
def test_resume_in_the_other_twin(start, first, second):
    whole_losses, whole, middle = run(*TWINS[first][1:], start, 0, CFG.steps, keep=HALF)
    assert middle["step"] == HALF
    resumed_losses, resumed, _ = run(*TWINS[second][1:], middle, HALF, CFG.steps)
    assert np.all(np.abs(resumed_losses - whole_losses[HALF:]) / whole_losses[HALF:] <= TRAJ_LOSS_TOL)
    for key in ("weights", "m", "v"):
        bad = {k: f"{max_rel(resumed[key][k], x):.1e}"
               for k, x in whole[key].items() if not max_rel(resumed[key][k], x) <= TRAJ_PARAM_TOL}
        assert not bad, f"{key} after resuming in the other twin: {bad}"
    assert resumed["step"] == CFG.steps


def test_a_torch_train_state_is_a_snapshot_not_a_view():
    """get_train_state / get_weights copy: training on must not change a state already taken (as in JAX)."""
    import torch_model
    from shared_config import load_spec, load_train_config
    from torch_model import train

    spec = load_spec("tiny").replace(n_layers=1)
    cfg = load_train_config({"batch_size": 2, "seq_len": 16, "steps": 4, "warmup_steps": 1})
    model = torch_model.Transformer(spec)
    state, step = train.init_train_state(model, cfg), train.make_train_step(model, cfg)
    state, _ = step(state, synthetic_batch(0, 0, 2, 16, spec.V))
    taken, weights = train.get_train_state(model, state), torch_model.get_weights(model)
    before = {k: v.copy() for k, v in taken["weights"].items()}
    state, _ = step(state, synthetic_batch(0, 1, 2, 16, spec.V))
    assert all((taken["weights"][k] == before[k]).all() and (weights[k] == before[k]).all() for k in before)


BAD_STATES = {  # a train state -> what the CheckpointError says
    "None": (lambda s: None, "a train state must be a mapping with keys step, weights, m, v; not NoneType"),
    "no m": (lambda s: {k: v for k, v in s.items() if k != "m"}, r"missing key\(s\) m \("),
    "step past int32": (lambda s: {**s, "step": 2**31}, r"step=2147483648 must be an integer in 0..2\*\*31-1"),
    "step float": (lambda s: {**s, "step": 4.0}, "step=4.0 must be an integer"),
    "moment of another shape": (lambda s: {**s, "v": {**s["v"], "model.norm.weight": np.zeros(3, np.float32)}},
                                r"train state v: .*model.norm.weight"),
}


@pytest.mark.parametrize("bad", BAD_STATES)
def test_a_bad_train_state_is_the_same_checkpoint_error_in_both_twins(start, bad):
    """A train state without m was a bare KeyError 'm' from inside either twin's set_train_state (Trainer: KeyError
    'weights' or 'step'), None a TypeError; a step past int32 an OverflowError in JAX and taken by torch; a moment of
    another shape failed inside the framework. Trainer(...) and train.set_train_state refuse them alike."""
    from shared_config import CheckpointError
    from shared_config.twins import twin as twin_of

    make, says = BAD_STATES[bad]
    for name, twin, train in TWINS:
        trainer = twin_of(name, "trainer").Trainer
        model = twin.from_weights(start["weights"], SPEC)
        for load in (lambda: trainer(SPEC, CFG, make(start)),
                     lambda: train.set_train_state(model, train.init_train_state(model, CFG), make(start))):
            with pytest.raises(CheckpointError, match=says):
                load()
