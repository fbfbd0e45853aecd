"""The optimizer: each twin's train step equals a hand-written numpy AdamW (bias correction, eps
outside the square root, decoupled weight decay on the right tensors, global-norm clipping, the
schedule's step indexing), and the schedule takes its documented values."""

import numpy as np
import pytest

from shared_config import TrainConfig, decays, layout, lr_factor
from shared_config.parity import max_rel

from .common import make_spec, parity_weights, tokens
from .train_common import TWINS

SPEC = make_spec(norm_type="derf", norm_placement="peri", embed_scale="learnable", norm_bias=True)
# clipping on every step (gradients of these weights have norm > 1), warmup, decay, all visible in 4 steps
CFG = TrainConfig(lr=1e-2, weight_decay=0.5, grad_clip=0.5, warmup_steps=1, steps=4, schedule="cosine", min_lr_ratio=0.2)


def numpy_adamw(weights, grads, m, v, step, cfg, spec):
    """One AdamW update in float64, written from the papers (Kingma & Ba; Loshchilov & Hutter)."""
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
    clip = min(1.0, cfg.grad_clip / norm) if cfg.grad_clip > 0 else 1.0
    lr, t = cfg.lr * float(lr_factor(cfg, step)), step + 1
    out = {}
    for tensor in layout(spec):
        name, p, g = tensor.name, weights[tensor.name].astype(np.float64), grads[tensor.name] * clip
        m[name] = cfg.beta1 * m[name] + (1 - cfg.beta1) * g
        v[name] = cfg.beta2 * v[name] + (1 - cfg.beta2) * g**2
        m_hat, v_hat = m[name] / (1 - cfg.beta1**t), v[name] / (1 - cfg.beta2**t)
        wd = cfg.weight_decay if decays(tensor, cfg) else 0.0
        out[name] = p - lr * (m_hat / (np.sqrt(v_hat) + cfg.eps) + wd * p)
    return out, norm, lr


@pytest.mark.parametrize("twin", ["jax", "torch", "torch-foreach"])
def test_train_step_equals_numpy_adamw(twin):
    name, package, train = {t[0]: t for t in TWINS}[twin.split("-")[0]]
    model = package.from_weights(parity_weights(SPEC), SPEC)
    kwargs = {"fused": False} if twin == "torch-foreach" else {}
    state, step = train.init_train_state(model, CFG, **kwargs), train.make_train_step(model, CFG)
    expected = train.get_train_state(model, state)["weights"]
    m, v = ({k: np.zeros(x.shape) for k, x in expected.items()} for _ in range(2))
    for i in range(CFG.steps):
        x = tokens(SPEC, seq=33, seed=i)
        _, grads = train.loss_and_grads(model if name == "torch" else package.from_weights(expected, SPEC), x)
        expected, norm, lr = numpy_adamw(expected, grads, m, v, i, CFG, SPEC)
        state, metrics = step(state, x)
        assert norm > CFG.grad_clip, "the test wants clipping active"
        assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-5)
        assert float(metrics["lr"]) == pytest.approx(lr, rel=1e-6)
        got = train.get_train_state(model, state)
        assert got["step"] == i + 1
        for key, want in (("weights", expected), ("m", m), ("v", v)):
            bad = {k: f"{max_rel(got[key][k], want[k]):.1e}" for k in want if not max_rel(got[key][k], want[k]) <= 1e-5}
            assert not bad, f"step {i}, {key} differs from numpy AdamW: {bad}"
        expected = got["weights"]  # the next step starts from the twin's own float32 weights


def test_schedule_values():
    for schedule in ("cosine", "linear", "constant"):
        cfg = TrainConfig(schedule=schedule, warmup_steps=10, steps=110, min_lr_ratio=0.1)
        f = lambda step: float(lr_factor(cfg, step))  # noqa: E731
        assert f(0) == pytest.approx(1 / 11)  # step 0 is not wasted on lr 0
        assert f(9) == pytest.approx(10 / 11) and f(10) == 1.0  # warmup ends at the peak
        floor = 1.0 if schedule == "constant" else 0.1
        assert f(60) == pytest.approx(1.0 if schedule == "constant" else 0.55)  # halfway: cosine and linear meet
        assert f(110) == pytest.approx(floor) and f(500) == pytest.approx(floor)  # the floor at `steps`, then flat
    assert float(lr_factor(TrainConfig(warmup_steps=0, steps=10), 0)) == 1.0


def test_both_twins_apply_the_same_lr_at_every_step():
    """The lr each twin reports equals cfg.lr · lr_factor(step): LambdaLR's last_epoch and optax's count agree."""
    cfg = TrainConfig(lr=1e-3, warmup_steps=2, steps=5, batch_size=2, seq_len=16)
    spec = make_spec()
    expected = [cfg.lr * float(lr_factor(cfg, i)) for i in range(6)]
    for name, package, train in TWINS:
        model = package.from_weights(parity_weights(spec), spec)
        state, step = train.init_train_state(model, cfg), train.make_train_step(model, cfg)
        for i in range(6):
            state, metrics = step(state, tokens(spec, 2, 17, seed=i))
            assert float(metrics["lr"]) == pytest.approx(expected[i], rel=1e-6), f"{name}, step {i}"
