"""Planted faults: each monkeypatches one bug into the code under test and expects the oracle meant to see it to
object. Every fault here passed the suite once because the test's reference shared code with what it judged
(the oracles of an earlier suite did); they now restate their rules (`oracles.py`, `reference.py`, the tests'
written-out specs).

JAX caches traces per graphdef: a fault planted into traced JAX code would linger in later tests (and an earlier
clean trace would hide it), so the tests that patch JAX code clear JAX's caches before and after.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_model
import shared_config.init
import shared_config.spec
import torch_model
from jax_model import layers as jl
from jax_model import train as jax_train
from jax_model.generate import compiled_steps
from shared_config import TrainConfig, init_weights, load_spec, lr_factor
from torch_model import layers as tl
from torch_model import train as torch_train

from ..model import test_bf16, test_kv_cache, test_layers
from ..spec import test_init
from ..training import test_optimizer
from ..support.common import make_spec, parity_weights, quick_first, tokens
from ..support.oracles import finite_difference_errors
from ..support.train_common import both_loss_and_grads


@pytest.fixture
def fresh_jax():
    """JAX's trace and compile caches cleared around the test, so that no trace outlives a planted fault."""
    jax.clear_caches()
    compiled_steps.cache_clear()
    yield
    jax.clear_caches()
    compiled_steps.cache_clear()


def test_init_weights_with_residual_factor_one_over_sqrt_l(monkeypatch):
    """1/sqrt(L) instead of 1/sqrt(2L) in the numpy init alone (the twins' native inits untouched)."""
    right = shared_config.init.init_rule

    def wrong(t, spec):
        rule = right(t, spec)
        if t.init == "residual" and spec.residual_scaled:
            return shared_config.init.InitRule(rule.dist, rule.scale * math.sqrt(2))
        return rule

    monkeypatch.setattr(shared_config.init, "init_rule", wrong)
    for name in ("normal", "xavier"):
        spec = test_init.SPECS[name]
        with pytest.raises(AssertionError,
                           match=r"numpy model\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)\.weight"):
            test_init.check_statistics(init_weights(spec, 0), spec, "numpy")


def test_norm_weights_decayed(monkeypatch):
    """Both twins' optimizers decay every tensor but the embeddings (norm weights, alpha, shift, biases too)."""
    def wrong(t, cfg):
        return cfg.decay_embeddings if t.kind == "embedding" else True

    for train in (jax_train, torch_train):
        monkeypatch.setattr(train, "decays", wrong)
    with pytest.raises(AssertionError, match="differs from numpy AdamW"):
        test_optimizer.check_against_numpy_adamw("torch", test_optimizer.CFG.replace(steps=2))


def test_schedule_warmup_off_by_one(monkeypatch):
    """Both twins' schedule starts warmup at lr 0 (update k gets the factor of update k − 1)."""
    def wrong(cfg, step, xp=np):
        return lr_factor(cfg, step - 1, xp) * (step > 0)

    for train in (jax_train, torch_train):
        monkeypatch.setattr(train, "lr_factor", wrong)
    with pytest.raises(AssertionError, match="differs from the schedule"):
        test_optimizer.check_against_numpy_adamw("torch", test_optimizer.CFG.replace(steps=2))


@pytest.mark.parametrize("changes", quick_first(test_layers.ROPE_SPECS), ids=["theta", "theta-head_dim", "llama3"])
@pytest.mark.parametrize("twin", ["jax", "torch"])
def test_model_ignores_rope_theta_and_scaling(monkeypatch, fresh_jax, twin, changes):
    """One twin's model builds its frequencies from theta 10000 and no scaling, whatever the spec says."""
    package = {"jax": jax_model, "torch": torch_model}[twin]
    right = package.model.rope_inv_freq
    monkeypatch.setattr(package.model, "rope_inv_freq",
                        lambda spec: right(spec.replace(rope_theta=10000.0, rope_scaling="none")))
    with pytest.raises(AssertionError, match=f"{twin}: layer 0 attention"):
        test_layers.check_model_rope(changes)


@pytest.mark.parametrize("twin", ["jax", "torch"])
def test_left_padding_shifts_each_rows_positions(monkeypatch, fresh_jax, twin):
    """One twin gives row b's tokens positions offset by its padding (slot instead of slot − start): invisible in
    the outputs under RoPE, so the positions are read off the cache."""
    package = {"jax": jax_model, "torch": torch_model}[twin]
    KVCache, right = package.model.KVCache, package.model.KVCache.positions_and_mask

    def wrong(self, T):
        positions_BT, mask_BTS = right(self, T)
        return positions_BT + self.start_B[:, None], mask_BTS

    monkeypatch.setattr(KVCache, "positions_and_mask", wrong)
    spec = make_spec()
    prompts = [list(tokens(spec, 1, n, seed=n)[0]) for n in (11, 4, 7)]
    got, want, worst = test_kv_cache.cache_positions_of(twin, spec, prompts, tokens(spec, 3, 3, seed=1))
    assert worst <= 1e-5  # each cached key is still a rotation of its token's key ...
    assert not np.array_equal(got, want)  # ... to the wrong position
    assert np.array_equal(got[got >= 0] - want[want >= 0], np.repeat([0, 7, 4], [14, 7, 10]))  # by the row's padding


def frozen_alpha_torch(self, x):
    alpha = self.alpha.detach() + 0 * self.alpha  # the same value, a zero gradient (defined, as the optimizer needs)
    y = torch.tanh(alpha.to(torch.float32) * x.to(torch.float32))
    return tl.affine(y, self.weight, self.bias).to(x.dtype)


def frozen_alpha_jax(self, x):
    y = jnp.tanh(jax.lax.stop_gradient(self.alpha[...]).astype(jnp.float32) * x.astype(jnp.float32))
    return jl.affine(y, self.weight, self.bias).astype(x.dtype)


@pytest.mark.slow  # a planted-fault check, not core parity: the quick tier stays under 5 minutes
def test_bf16_training_with_one_twins_alpha_frozen(monkeypatch):
    """The torch twin's DyT alpha is cut from the graph (its forward unchanged): over bf16 steps the losses still
    agree within 1e-2 (5 steps measured too); its AdamW moments (zero) do not."""
    monkeypatch.setattr(torch_model.layers.DynamicTanh, "forward", frozen_alpha_torch)
    spec = load_spec("tiny-dyt").replace(compute_dtype="bfloat16")
    bad = test_bf16.bf16_train_mismatches(spec, TrainConfig(lr=1e-3, warmup_steps=1, steps=2, batch_size=4, seq_len=32))
    assert any(name.endswith(".alpha") for name in bad), bad


def test_both_twins_share_a_gradient_fault(monkeypatch, fresh_jax):
    """Both twins cut DyT's alpha from the graph: they agree with each other, not with the reference's gradient."""
    monkeypatch.setattr(torch_model.layers.DynamicTanh, "forward", frozen_alpha_torch)
    monkeypatch.setattr(jax_model.layers.DynamicTanh, "__call__", frozen_alpha_jax)
    spec = make_spec(norm_type="dyt", n_layers=1)
    w, x = parity_weights(spec), tokens(spec, seq=17)
    (_, gj), (_, gt) = both_loss_and_grads(w, spec, x)
    assert all(np.array_equal(gj[n], gt[n]) for n in gj if n.endswith(".alpha"))  # twin vs twin: no objection
    failures = finite_difference_errors(w, spec, x, {"jax": gj, "torch": gt})
    assert failures and all(".alpha" in f for f in failures), failures
    assert {f.split()[0] for f in failures} == {"jax", "torch"}


# --- routing: one-line faults made the same way in both twins (twin-vs-twin tests cannot see them) ------------------


def plant(monkeypatch, owner, name: str, old: str, new: str) -> None:
    """`owner.name` (a function or method) replaced by its own source with `old` (occurring once) replaced by `new`,
    compiled against its module's globals: a one-line fault, undone with the monkeypatch."""
    import inspect
    import sys
    import textwrap

    func = getattr(owner, name)
    source = textwrap.dedent(inspect.getsource(func))
    assert source.count(old) == 1, f"{func.__qualname__}: {old!r} occurs {source.count(old)} times"
    scope: dict = {}
    exec(compile(source.replace(old, new), inspect.getsourcefile(func), "exec"),
         dict(sys.modules[func.__module__].__dict__), scope)
    monkeypatch.setattr(owner, name, scope[name])


ROUTING_FAULTS = {  # name: [(module, owner, attribute, right, wrong) per twin]
    "k = ceil(γ·T)": [  # one rule both twins' routers read (and the FLOP count, the train config's check)
        (shared_config.spec, "ModelSpec", "routed_tokens", "math.floor(self.routing_capacity * seq_len)",
         "math.ceil(self.routing_capacity * seq_len)"),
    ],
    "moving average without stop-gradient": [
        (jax_model.routing, "DtfRouter", "__call__", "ma(jax.lax.stop_gradient(dst_BT))", "ma(dst_BT)"),
        (torch_model.routing, "DtfRouter", "forward", "ma(dst_BT.detach())", "ma(dst_BT)"),
    ],
    "predictor input without stop-gradient": [
        (jax_model.routing, "Routes", "__call__", "layer.router_predictor(jax.lax.stop_gradient(x_BTD))",
         "layer.router_predictor(x_BTD)"),
        (torch_model.routing, "Routes", "__call__", "layer.router_predictor(x_BTD.detach())",
         "layer.router_predictor(x_BTD)"),
    ],
    "prior MSE's H_post without stop-gradient": [
        (jax_model.routing, "DtfRouter", "__call__", "jnp.square(prior32 - jax.lax.stop_gradient(post32))",
         "jnp.square(prior32 - post32)"),
        (torch_model.routing, "DtfRouter", "forward", "torch.square(prior32 - post32.detach())",
         "torch.square(prior32 - post32)"),
    ],
    "aux loss weighted by a part's share of the counted targets": [
        (jax_train, None, "model_loss", "loss + share * routing_loss(",
         "loss + (1.0 if count is None else jnp.sum(weights_BT) / count) * routing_loss("),
        (torch_train, None, "model_loss", "loss + share * routing_loss(",
         "loss + (1.0 if count is None else torch.sum(weights_BT) / count) * routing_loss("),
    ],
    "aux loss not scaled per micro-batch": [
        (jax_train, None, "model_loss", "loss + share * routing_loss(", "loss + routing_loss("),
        (torch_train, None, "model_loss", "loss + share * routing_loss(", "loss + routing_loss("),
    ],
    # DTF's four scalars, which forward parity sees only if the test weights give each its own value off its init
    "S_CE and S_CU's betas swapped": [
        (module, "DtfRouter", name, "(self.beta_ce, self.beta_cu, self.o_ce", "(self.beta_cu, self.beta_ce, self.o_ce")
        for module, name in ((jax_model.routing, "__call__"), (torch_model.routing, "forward"))
    ],
    "o_ce fixed at its init": [
        (jax_model.routing, "DtfRouter", "__call__", "log(o_ce + 1e-10)", "log(1.025 + 1e-10)"),
        (torch_model.routing, "DtfRouter", "forward", "log(o_ce + 1e-10)", "log(torch.tensor(1.025) + 1e-10)"),
    ],
    "m_cu fixed at its init": [
        (module, "DtfRouter", name, "m_cu * ma(", "1.1 * ma(")
        for module, name in ((jax_model.routing, "__call__"), (torch_model.routing, "forward"))
    ],
}


def plant_routing_fault(monkeypatch, fault: str) -> None:
    for module, owner, name, right, wrong in ROUTING_FAULTS[fault]:
        plant(monkeypatch, module if owner is None else getattr(module, owner), name, right, wrong)


@pytest.mark.slow
@pytest.mark.parametrize("fault, case", [("k = ceil(γ·T)", 0), ("aux loss not scaled per micro-batch", 0),
                                         ("aux loss not scaled per micro-batch", 1),
                                         ("aux loss weighted by a part's share of the counted targets", 0),
                                         ("aux loss weighted by a part's share of the counted targets", 1)])
def test_routing_fault_changes_the_update_or_its_reference(monkeypatch, fresh_jax, fault, case):
    """ceil: the twins' loss leaves the float64 reference's (γ·T fractional); aux terms unscaled, or scaled by the
    micro-batch's share of the counted targets: the accumulated update leaves the one-shot one (micro-batches
    counting 6 vs 32 targets)."""
    from ..training import test_routing_updates

    plant_routing_fault(monkeypatch, fault)
    with pytest.raises(AssertionError, match="jax"):  # the first twin checked already objects
        test_routing_updates.test_accumulated_update_equals_the_one_shot_update(test_routing_updates.CASES[case])


@pytest.mark.slow
@pytest.mark.parametrize("fault, case", [("moving average without stop-gradient", 1),
                                         ("predictor input without stop-gradient", 0),
                                         ("predictor input without stop-gradient", 1),
                                         ("prior MSE's H_post without stop-gradient", 1)])
def test_routing_stop_gradient_fault_fails_finite_differences(monkeypatch, fresh_jax, fault, case):
    """Both twins agree with each other; the float64 reference's central differences (stop-gradient inputs held)
    object in both."""
    from ..training import test_routing_updates

    plant_routing_fault(monkeypatch, fault)
    failures = test_routing_updates.routed_fd_failures(test_routing_updates.CASES[case])
    assert {f.split()[0] for f in failures} == {"jax", "torch"}, failures


@pytest.mark.slow  # a planted-fault check, not core parity: the quick tier stays under 5 minutes
@pytest.mark.parametrize("fault", ["o_ce fixed at its init", "S_CE and S_CU's betas swapped", "m_cu fixed at its init"])
def test_dtf_scalar_fault_leaves_the_reference(monkeypatch, fault):
    """Made in both twins, a fault in DTF's scalars moves their logits off the float64 reference's: the test
    weights (routed_weights) give beta_ce, beta_cu, o_ce and m_cu each its own value, none at its init."""
    from ..model import test_routing

    plant_routing_fault(monkeypatch, fault)
    with pytest.raises(AssertionError, match="jax_model"):  # the first twin checked already objects
        test_routing.test_twins_match_the_reference(test_routing.ROUTED[4], "topk")


def test_a_hybrid_pattern_off_by_one_is_caught_by_the_reference(monkeypatch, fresh_jax):
    """spec.mixer_of with attention at layers 0, k, 2k, ... (i % k instead of (i + 1) % k): the layout and both
    twins move together, so they agree with each other; the float64 reference writes the rule out itself
    (`layer_mixer`) and objects (attention's tensors where it computes GLA: a shape that does not reshape)."""
    from shared_config.spec import ModelSpec

    from ..model import test_logits
    from ..support.common import HYBRID

    spec = make_spec(**HYBRID)
    monkeypatch.setattr(ModelSpec, "mixer_of", lambda s, i: "attention" if i % s.gla_attention_every == 0 else "gla")
    with pytest.raises((AssertionError, KeyError, ValueError), match=r"reshape|g_proj|float64 reference"):
        test_logits.check(spec)
