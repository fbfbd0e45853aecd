"""Conditional computation (routing.py): Mixture-of-Depths and DTF routing in both twins.

Spec rules, the layout, twins vs the float64 reference and vs each other, selection ties and
near-ties, capacity 1 = dense, decode = full forward in predictor mode, a few training steps.
"""

from __future__ import annotations

import pytest

from shared_config import SpecError, init_weights, layout

from .common import make_spec


@pytest.mark.parametrize("changes, fragment", [
    (dict(routing="mod", routing_capacity=0.0), "routing_capacity=0.0 must be in (0, 1]"),
    (dict(routing="mod", routing_capacity=1.5), "routing_capacity=1.5 must be in (0, 1]"),
    (dict(routing="moe"), "routing='moe' must be one of none, mod, dtf"),
    (dict(routing="dtf", routing_layers="all"), "routing=dtf needs routing_layers=every_other"),
    (dict(routing="mod", n_layers=1), "needs n_layers >= 2"),
    (dict(routing="mod", routing_gate="tanh"), "routing_gate='tanh' must be one of raw, sigmoid"),
    (dict(routing="dtf", dtf_window=0), "dtf_window=0 must be >= 1"),
    (dict(routing="dtf", dtf_prior_factor=-1), "dtf_prior_factor=-1.0 must be > 0"),
    (dict(routing="mod", d_model=42, n_heads=6, n_kv_heads=2, head_dim=8), None),
    (dict(routing="mod", d_model=45, n_heads=6, n_kv_heads=2, head_dim=8), "d_model=45 must be even when routing=mod"),
])
def test_bad_routing_specs_name_the_field(changes, fragment):
    if fragment is None:
        make_spec(**changes)  # a valid neighbour of the bad ones
        return
    with pytest.raises(SpecError) as e:
        make_spec(**changes)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_layout_names_every_router_tensor():
    mod = make_spec(routing="mod", n_layers=4)
    names = [t.name for t in layout(mod) if "router" in t.name]
    assert names == [f"model.layers.{i}.{n}" for i in (1, 3) for n in
                     ("router.weight", "router_predictor.fc1.weight", "router_predictor.fc2.weight")]
    assert len([t for t in layout(make_spec(routing="mod", routing_layers="all")) if t.name.endswith("router.weight")]) == 2
    dtf = make_spec(routing="dtf", n_layers=3, dtf_prior_factor=0.1)  # ceil(4.8) = 5 -> 6
    shapes = {t.name: t.shape for t in layout(dtf) if "router" in t.name}
    assert shapes["model.layers.1.router.prior_ffn.gate_proj.weight"] == (6, 48)
    assert shapes["model.layers.1.router.prior_ffn.down_proj.weight"] == (48, 6)
    assert shapes["model.layers.1.router_predictor.fc1.weight"] == (24, 48)
    assert not any(n.startswith(("model.layers.0.", "model.layers.2.")) for n in shapes)
    w = init_weights(dtf, 0)
    assert {k: float(w[f"model.layers.1.router.{k}"][0]) for k in ("beta_ce", "beta_cu", "o_ce", "m_cu")} == pytest.approx(
        dict(beta_ce=-0.3, beta_cu=-0.6, o_ce=1.025, m_cu=1.1))
    assert make_spec(routing="dtf", d_model=4, n_heads=2, n_kv_heads=1).dtf_prior_dim == 2
    assert make_spec(routing="none").routed_layers == ()
