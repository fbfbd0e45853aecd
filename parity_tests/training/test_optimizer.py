"""The optimizer: each twin's train step equals a hand-written numpy AdamW (bias correction, eps
outside the square root, decoupled weight decay on the right tensors, global-norm clipping, the
schedule's step indexing), and the schedule takes its documented values.

The numpy AdamW takes which tensors decay and the schedule from `oracles.py` (written from their
definitions), never from `shared_config.decays` / `lr_factor`, which the twins use."""

import numpy as np
import pytest

from shared_config import TrainConfig, layout, lr_factor
from shared_config.parity import max_rel

from ..support.common import make_spec, parity_weights, tokens
from ..support.oracles import decayed_names, lr_multiplier
from ..support.train_common import TWINS

# one float32 AdamW step against float64's: the update's relative error (m, v, weights, grad norm) and the lr
OPTIMIZER_TOL = 1e-5
LR_TOL = 1e-6  # the schedule's factor, a few float32 operations

SPEC = make_spec(norm_type="derf", norm_placement="peri", embed_scale="learnable", norm_bias=True)
# clipping on every step (gradients of these weights have norm > 1), warmup, decay, all visible in 4 steps
CFG = TrainConfig(lr=1e-2, weight_decay=0.5, grad_clip=0.5, warmup_steps=1, steps=4, schedule="cosine",
                  min_lr_ratio=0.2)


def numpy_adamw(weights, grads, m, v, step, cfg, spec):
    """One AdamW update in float64, written from the papers (Kingma & Ba; Loshchilov & Hutter)."""
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
    clip = min(1.0, cfg.grad_clip / norm) if cfg.grad_clip > 0 else 1.0
    lr, t, decayed = cfg.lr * lr_multiplier(cfg, step), step + 1, decayed_names(spec, cfg)
    out = {}
    for tensor in layout(spec):
        name, p, g = tensor.name, weights[tensor.name].astype(np.float64), grads[tensor.name] * clip
        m[name] = cfg.beta1 * m[name] + (1 - cfg.beta1) * g
        v[name] = cfg.beta2 * v[name] + (1 - cfg.beta2) * g**2
        m_hat, v_hat = m[name] / (1 - cfg.beta1**t), v[name] / (1 - cfg.beta2**t)
        wd = cfg.weight_decay if name in decayed else 0.0
        out[name] = p - lr * (m_hat / (np.sqrt(v_hat) + cfg.eps) + wd * p)
    return out, norm, lr


def check_against_numpy_adamw(twin, cfg=CFG, spec=SPEC):
    """Run `cfg.steps` train steps of `twin` ("jax", "torch", "torch-foreach"), each checked against numpy AdamW."""
    name, package, train = {t[0]: t for t in TWINS}[twin.split("-")[0]]
    model = package.from_weights(parity_weights(spec), spec)
    kwargs = {"fused": False} if twin == "torch-foreach" else {}
    state, step = train.init_train_state(model, cfg, **kwargs), train.make_train_step(model, cfg)
    expected = train.get_train_state(model, state)["weights"]
    m, v = ({k: np.zeros(x.shape) for k, x in expected.items()} for _ in range(2))
    for i in range(cfg.steps):
        x = tokens(spec, seq=33, seed=i)
        _, grads = train.loss_and_grads(model if name == "torch" else package.from_weights(expected, spec), x)
        expected, norm, lr = numpy_adamw(expected, grads, m, v, i, cfg, spec)
        state, metrics = step(state, x)
        assert norm > cfg.grad_clip, "the test wants clipping active"
        assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=OPTIMIZER_TOL)
        assert float(metrics["lr"]) == pytest.approx(lr, rel=LR_TOL), (
            f"step {i}: lr {float(metrics['lr'])} differs from the schedule's {lr}")
        got = train.get_train_state(model, state)
        assert got["step"] == i + 1
        for key, want in (("weights", expected), ("m", m), ("v", v)):
            errors = {k: max_rel(got[key][k], want[k]) for k in want}
            bad = {k: f"{e:.1e}" for k, e in errors.items() if not e <= OPTIMIZER_TOL}
            assert not bad, f"step {i}, {key} differs from numpy AdamW: {bad}"
        expected = got["weights"]  # the next step starts from the twin's own float32 weights


@pytest.mark.parametrize("twin", ["jax", "torch", "torch-foreach"])
def test_train_step_equals_numpy_adamw(twin):
    check_against_numpy_adamw(twin)


def test_the_decay_set_is_the_documented_one():
    """The oracle's decay set, spelled out for SPEC: Linear weights only; embeddings only when asked."""
    decayed = decayed_names(SPEC, CFG)
    assert decayed == {n for n in (t.name for t in layout(SPEC)) if n == "lm_head.weight" or n.endswith("_proj.weight")}
    assert "model.embed_tokens.weight" in decayed_names(SPEC, CFG.replace(decay_embeddings=True))
    assert not {n for n in decayed if "norm" in n or n.endswith((".alpha", ".shift", ".bias", "embed_scale"))}


@pytest.mark.parametrize("f", [lr_factor, lr_multiplier], ids=["shared_config.lr_factor", "oracle"])
def test_schedule_values(f):
    """Documented values, written out: the shared schedule and the test's own oracle both take them."""
    for schedule in ("cosine", "linear", "constant"):
        cfg = TrainConfig(schedule=schedule, warmup_steps=10, steps=110, min_lr_ratio=0.1)
        assert float(f(cfg, 0)) == pytest.approx(1 / 11)  # step 0 is not wasted on lr 0
        assert float(f(cfg, 9)) == pytest.approx(10 / 11) and float(f(cfg, 10)) == 1.0  # warmup ends at the peak
        floor = 1.0 if schedule == "constant" else 0.1
        # halfway: cosine and linear meet
        assert float(f(cfg, 60)) == pytest.approx(1.0 if schedule == "constant" else 0.55)
        if schedule == "cosine":
            assert float(f(cfg, 35)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + 2**-0.5))  # a quarter of the way: cos(π/4)
        assert float(f(cfg, 110)) == pytest.approx(floor) and float(f(cfg, 500)) == pytest.approx(floor)  # then flat
    assert float(f(TrainConfig(warmup_steps=0, steps=10), 0)) == 1.0


def test_the_shared_schedule_equals_the_oracle_at_every_step():
    for schedule in ("cosine", "linear", "constant"):
        cfg = TrainConfig(schedule=schedule, warmup_steps=7, steps=40, min_lr_ratio=0.25)
        assert ([float(lr_factor(cfg, k)) for k in range(45)]
                == pytest.approx([lr_multiplier(cfg, k) for k in range(45)]))


def test_both_twins_apply_the_same_lr_at_every_step():
    """The lr each twin reports equals cfg.lr · the schedule at update i: LambdaLR's last_epoch and optax's count
    agree."""
    cfg = TrainConfig(lr=1e-3, warmup_steps=2, steps=5, batch_size=2, seq_len=16)
    spec = make_spec()
    expected = [cfg.lr * lr_multiplier(cfg, i) for i in range(6)]
    for name, package, train in TWINS:
        model = package.from_weights(parity_weights(spec), spec)
        state, step = train.init_train_state(model, cfg), train.make_train_step(model, cfg)
        for i in range(6):
            state, metrics = step(state, tokens(spec, 2, 17, seed=i))
            assert float(metrics["lr"]) == pytest.approx(expected[i], rel=LR_TOL), f"{name}, step {i}"
