"""Conditional computation (routing.py): Mixture-of-Depths and DTF routing in both twins.

Spec rules, the layout, twins vs the float64 reference and vs each other, selection ties and
near-ties, capacity 1 = dense, decode = full forward in predictor mode, a few training steps.
"""

from __future__ import annotations

import pytest

from shared_config import SpecError, init_weights, layout

from ..support.common import make_spec


@pytest.mark.parametrize("changes, fragment", [
    (dict(routing="mod", routing_capacity=0.0), "routing_capacity=0.0 must be in (0, 1]"),
    (dict(routing="mod", routing_capacity=1.5), "routing_capacity=1.5 must be in (0, 1]"),
    (dict(routing="moe"), "routing='moe' must be one of none, mod, dtf"),
    (dict(routing="dtf", routing_layers="all"), "routing=dtf needs routing_layers=every_other"),
    (dict(routing="mod", n_layers=1), "needs n_layers >= 2"),
    (dict(routing="mod", routing_gate="tanh"), "routing_gate='tanh' must be one of raw, sigmoid"),
    (dict(routing="dtf", dtf_window=0), "dtf_window=0 must be in [1, 2,147,483,647]"),
    # compared with int32 positions: an OverflowError's traceback in both twins
    (dict(routing="dtf", dtf_window=2**31), "dtf_window=2147483648 must be in [1, 2,147,483,647]"),
    (dict(routing="dtf", dtf_window=2**31 - 1), None),
    # not routing's, a length all the same: an OverflowError's traceback in rope_inv_freq past float's range
    (dict(rope_scaling="llama3", rope_original_max_seq_len=10**400), "rope_original_max_seq_len=1000"),
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
    assert (len([t for t in layout(make_spec(routing="mod", routing_layers="all")) if t.name.endswith("router.weight")])
            == 2)
    dtf = make_spec(routing="dtf", n_layers=3, dtf_prior_factor=0.1)  # ceil(4.8) = 5 -> 6
    shapes = {t.name: t.shape for t in layout(dtf) if "router" in t.name}
    assert shapes["model.layers.1.router.prior_ffn.gate_proj.weight"] == (6, 48)
    assert shapes["model.layers.1.router.prior_ffn.down_proj.weight"] == (48, 6)
    assert shapes["model.layers.1.router_predictor.fc1.weight"] == (24, 48)
    assert not any(n.startswith(("model.layers.0.", "model.layers.2.")) for n in shapes)
    w = init_weights(dtf, 0)
    assert {k: float(w[f"model.layers.1.router.{k}"][0])
            for k in ("beta_ce", "beta_cu", "o_ce", "m_cu")} == pytest.approx(
        dict(beta_ce=-0.3, beta_cu=-0.6, o_ce=1.025, m_cu=1.1))
    assert make_spec(routing="dtf", d_model=4, n_heads=2, n_kv_heads=1).dtf_prior_dim == 2
    assert make_spec(routing="none").routed_layers == ()


# --- twins vs the float64 reference and vs each other ------------------------------------------------------

import math  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import jax_model  # noqa: E402
import torch_model  # noqa: E402
from jax_model import routing as jax_routing  # noqa: E402
from shared_config import TrainConfig  # noqa: E402
from shared_config.parity import GRAD_TOL, LOSS_TOL, TRAJ_LOSS_TOL, TRAJ_PARAM_TOL, max_rel  # noqa: E402
from torch_model import routing as torch_routing  # noqa: E402

from ..support import reference  # noqa: E402
from ..support.common import (  # noqa: E402
    FORWARD_TOL, case_ids, jax_steps, parity_weights, quick_first, rel_err, tokens, torch_steps,
)
from ..support.train_common import TWINS, trajectory  # noqa: E402

MARGIN = 1e-4  # a selection is tested only where float32 rounding (~1e-6 here) cannot flip it

ROUTED = [
    dict(routing="mod", routing_capacity=0.5, routing_gate="raw"),
    dict(routing="mod", routing_capacity=0.25, routing_gate="sigmoid", routing_layers="all", qk_norm=True),
    dict(routing="mod", routing_capacity=0.5, norm_placement="post", position="learned", n_layers=3),
    dict(routing="mod", routing_capacity=0.5, norm_placement="peri", norm_type="dyt", tie_embeddings=True),
    dict(routing="dtf", routing_capacity=0.5, n_layers=4),
    dict(routing="dtf", routing_capacity=0.25, dtf_window=3, dtf_prior_factor=0.1, mlp="gelu"),
]


def routed_weights(spec, seed=0):
    """parity_weights with the predictor's output scaled up, so that its logits sit far from the 0.5 threshold."""
    w = parity_weights(spec, seed)
    for i in spec.routed_layers:
        w[f"model.layers.{i}.router_predictor.fc2.weight"] *= np.float32(20)
        if spec.routing == "dtf":  # steeper S_CE and S_CU: G spread over (0, 1), not bunched at its init value
            # each scalar its own value, off its init: equal betas hid a twin that swapped them, and o_ce and m_cu
            # at their init a twin that hard-coded them
            for name, value in (("beta_ce", 40.0), ("beta_cu", 35.0), ("o_ce", 0.95), ("m_cu", 1.0)):
                w[f"model.layers.{i}.router.{name}"][:] = value
    return w


def assert_margins(ref_taps, spec, decide):
    """No selection of the reference sits within MARGIN of flipping: the k-th vs (k+1)-th score, or logit vs 0."""
    for i in spec.routed_layers:
        t = ref_taps[f"model.layers.{i}"]
        if decide == "topk":
            k = math.floor(spec.routing_capacity * t["router_score"].shape[1])
            s = -np.sort(-t["router_score"], axis=1)
            gap = (s[:, k - 1] - s[:, k]).min()
        else:
            gap = np.abs(t["router_logit"]).min()
        assert gap > MARGIN, f"layer {i}: a selection within {gap:.1e} of flipping; pick other test weights"


def twin_logits(twin, weights, spec, x, decide, aux=None):
    model = twin.from_weights(weights, spec)
    if twin is jax_model:
        return np.asarray(model(jnp.asarray(x), aux=aux, decide=decide))
    with torch.no_grad():
        return model(torch.as_tensor(x), aux=aux, decide=decide).numpy()


@pytest.mark.parametrize("decide", ["topk", "predictor"])
@pytest.mark.parametrize("changes", ROUTED, ids=case_ids(ROUTED))
def test_twins_match_the_reference(changes, decide):
    spec = make_spec(**changes)
    w, x = routed_weights(spec), tokens(spec, 2, 16)
    ref_taps, ref_aux = {}, {}
    ref = reference.forward(w, spec, x, ref_taps, decide=decide, aux=ref_aux)
    assert_margins(ref_taps, spec, decide)
    keeps = [ref_taps[f"model.layers.{i}"]["router_keep"] for i in spec.routed_layers]
    assert all(0 < k.mean() < 1 for k in keeps) or decide == "topk", "the predictor should keep some tokens, not all"
    for twin in (jax_model, torch_model):
        aux = {}
        got = twin_logits(twin, w, spec, x, decide, aux)
        assert rel_err(got, ref) <= FORWARD_TOL, (twin.__name__, rel_err(got, ref))
        if decide == "topk":
            assert set(aux) == {k for k in ref_aux if not k.startswith("_")}
            for k in aux:
                assert abs(float(aux[k]) - ref_aux[k]) <= 1e-5 * max(1.0, abs(ref_aux[k])), (twin.__name__, k)


@pytest.mark.parametrize("changes", [ROUTED[0], ROUTED[5]], ids=case_ids([ROUTED[0], ROUTED[5]]))
def test_twins_agree_on_loss_and_gradients_router_included(changes):
    spec = make_spec(**changes)
    w, x = routed_weights(spec), tokens(spec, 2, 17)
    assert_margins(reference_taps(w, spec, x[:, :-1]), spec, "topk")
    cfg = TrainConfig(router_predictor_loss_weight=0.5, dtf_prior_loss_weight=0.3)
    (lj, gj), (lt, gt) = (train.loss_and_grads(twin.from_weights(w, spec), x, cfg=cfg) for _, twin, train in TWINS)
    assert abs(lj - lt) / abs(lt) <= LOSS_TOL
    router = [n for n in gt if "router" in n]
    assert router and all(np.abs(gt[n]).max() > 0 for n in router), "every router tensor gets a gradient"
    bad = {n: max_rel(gj[n], gt[n]) for n in gt if not max_rel(gj[n], gt[n]) <= GRAD_TOL}
    assert not bad, bad
    # the float64 loss, aux terms included
    ref_aux = {}
    logits = reference.forward(w, spec, x[:, :-1], decide="topk", aux=ref_aux)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, x[:, 1:, None], -1).mean()
    expected = ce + 0.5 * ref_aux["router_bce"] + 0.3 * ref_aux.get("prior_mse", 0.0)
    assert abs(lt - expected) / expected <= 1e-5 and abs(lj - expected) / expected <= 1e-5


def reference_taps(w, spec, x, decide="topk"):
    taps = {}
    reference.forward(w, spec, x, taps, decide=decide)
    return taps


# --- selection: capacity 1 = dense, ties, decoding ----------------------------------------------------------


@pytest.mark.parametrize("layers", ["every_other", "all"])
def test_capacity_one_with_gate_one_equals_the_dense_model(layers, monkeypatch):
    """Every token selected and the gate fixed to 1: gather, RoPE at the original positions, causal attention among
    the selected and the scatter give back the dense block exactly."""
    dense = make_spec(n_layers=3)
    spec = dense.replace(routing="mod", routing_capacity=1.0, routing_layers=layers)
    w, x = routed_weights(spec), tokens(spec, 2, 16)
    dense_w = {k: v for k, v in w.items() if "router" not in k}
    for module, xp in ((jax_routing, jnp), (torch_routing, torch)):
        monkeypatch.setitem(module.GATES, "raw", lambda r_BT, xp=xp: xp.ones_like(r_BT))
    for twin in (jax_model, torch_model):
        routed, plain = twin_logits(twin, w, spec, x, "topk"), twin_logits(twin, dense_w, dense, x, None)
        assert rel_err(routed, plain) <= FORWARD_TOL, (twin.__name__, rel_err(routed, plain))
    # and without the patch the gate matters: the test can fail
    monkeypatch.undo()
    assert (rel_err(twin_logits(torch_model, w, spec, x, "topk"), twin_logits(torch_model, dense_w, dense, x, None))
            > 1e-3)


def test_tied_scores_select_the_lower_positions_in_both_twins():
    """Exactly equal scores: all zero (a zero router weight), and repeated tokens at the first routed layer
    (equal inputs there); both twins pick what the reference's (−score, position) order picks."""
    spec = make_spec(routing="mod", routing_capacity=0.5, routing_gate="sigmoid", routing_layers="all")
    w = routed_weights(spec)
    w["model.layers.1.router.weight"][:] = 0.0  # every score of layer 1 is 0: the first k positions run
    x = np.tile(tokens(spec, 2, 4), (1, 4))  # each token four times: layer 0 scores tie in groups of four
    ref_taps = reference_taps(w, spec, x)
    assert (ref_taps["model.layers.1"]["router_keep"][:, :8].all()
            and not ref_taps["model.layers.1"]["router_keep"][:, 8:].any())
    s0 = ref_taps["model.layers.0"]["router_score"]
    assert np.array_equal(s0[:, :4], s0[:, 4:8])  # the ties are real
    for twin in (jax_model, torch_model):
        taps = {}
        model = twin.from_weights(w, spec)
        with torch.no_grad():
            model(jnp.asarray(x) if twin is jax_model else torch.as_tensor(x), taps=taps)
        for i in (0, 1):
            keep = np.asarray(taps[f"model.layers.{i}"]["router_keep"])
            assert np.array_equal(keep, ref_taps[f"model.layers.{i}"]["router_keep"]), (twin.__name__, i)


@pytest.mark.parametrize("twin, select",
                         [(jax_model, jax_routing.select_top_k), (torch_model, torch_routing.select_top_k)])
def test_select_top_k_orders_by_score_then_position(twin, select):
    scores = np.array([[0.5, 0.9, 0.5, 0.9, 0.1, 0.5], [0.0, -0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
    xp = jnp.asarray if twin is jax_model else torch.as_tensor
    assert np.asarray(select(xp(scores), 3)).tolist() == [[0, 1, 3], [0, 1, 2]]


@pytest.mark.parametrize("changes", quick_first([ROUTED[0], ROUTED[4], ROUTED[5]]),
                         ids=case_ids([ROUTED[0], ROUTED[4], ROUTED[5]]))
def test_cached_decoding_equals_the_full_forward_in_predictor_mode(changes):
    spec = make_spec(**changes)
    w, x = routed_weights(spec), tokens(spec, 2, 20)
    assert_margins(reference_taps(w, spec, x, "predictor"), spec, "predictor")
    for twin, steps in ((jax_model, jax_steps), (torch_model, torch_steps)):
        full = twin_logits(twin, w, spec, x, "predictor")
        cached, cache = steps(twin.from_weights(w, spec), x, prompt=8)
        errs = [rel_err(cached[:, t], full[:, t]) for t in range(x.shape[1])]
        assert max(errs) <= FORWARD_TOL, (twin.__name__, int(np.argmax(errs)), max(errs))
        for i in spec.routed_layers:  # a skipped token wrote no key or value at a routed layer; a kept one did
            keep = np.asarray(cache.routing[i].keep_BS)
            assert 0 < keep.mean() < 1, "some tokens skipped the routed block, some ran it"
            for kv in (cache.layers[i].k_BSKE, cache.layers[i].v_BSKE):
                written = np.abs(np.asarray(kv)).max(axis=(2, 3)) > 0
                assert np.array_equal(written, keep), (twin.__name__, i)
        dense = [i for i in range(spec.L) if i not in spec.routed_layers]
        assert all((np.abs(np.asarray(cache.layers[i].k_BSKE)).max(axis=(2, 3)) > 0).all() for i in dense)
    with pytest.raises(ValueError, match="cached decoding needs decide='predictor'"):
        model = torch_model.from_weights(w, spec)
        model(torch.as_tensor(x[:, :3]), cache=model.init_cache(2, 8), decide="topk")


@pytest.mark.slow
@pytest.mark.parametrize("changes", [ROUTED[0], ROUTED[4]], ids=case_ids([ROUTED[0], ROUTED[4]]))
def test_twins_train_the_same_trajectory_with_the_aux_losses(changes):
    spec = make_spec(**changes)
    cfg = TrainConfig(steps=3, warmup_steps=1, batch_size=2, seq_len=16, lr=3e-3, router_predictor_loss_weight=0.5,
                      dtf_prior_loss_weight=0.5)
    w = routed_weights(spec)
    (mj, sj), (mt, st) = (trajectory(twin, train, w, spec, cfg) for _, twin, train in TWINS)
    assert max(abs(mj["loss"] - mt["loss"]) / mt["loss"]) <= TRAJ_LOSS_TOL
    bad = {n: max_rel(sj["weights"][n], st["weights"][n]) for n in st["weights"]
           if not max_rel(sj["weights"][n], st["weights"][n]) <= TRAJ_PARAM_TOL}
    assert not bad, bad
    assert any("router" in n and not np.array_equal(st["weights"][n], w[n]) for n in st["weights"])
    for _, twin, train in TWINS:  # the aux terms come back as metrics
        model = twin.from_weights(w, spec)
        _, m = train.make_train_step(model, cfg)(train.init_train_state(model, cfg), tokens(spec, 2, 17))
        assert {"router_bce", "predictor_acc"} <= set(m) and 0 <= float(m["predictor_acc"]) <= 1
        assert ("prior_mse" in m) == (spec.routing == "dtf")


# --- conversion -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["torch", "flax"])
@pytest.mark.parametrize("routing", ["mod", "dtf"])
def test_routed_checkpoints_round_trip_bit_exact(tmp_path, fmt, routing):
    from ..support.common import file_bytes_equal
    from ..checkpoints.test_convert import NAMES, canonical_file, convert

    spec = make_spec(routing=routing, n_layers=3)
    src = canonical_file(tmp_path / "a.safetensors", spec)
    convert(src, tmp_path / NAMES[fmt], to=fmt)
    convert(tmp_path / NAMES[fmt], tmp_path / "b.safetensors")
    file_bytes_equal(src, tmp_path / "b.safetensors")


def test_hugging_face_export_refuses_routing_by_name(tmp_path):
    from shared_config import CheckpointError
    from shared_config.formats.hf import write_hf

    spec = make_spec(routing="dtf")
    with pytest.raises(CheckpointError, match=r"no Hugging Face equivalent for routing=dtf \("):
        write_hf(tmp_path / "hf", init_weights(spec, 0), spec)
    assert not (tmp_path / "hf").exists()


# --- bench ----------------------------------------------------------------------------------------------


def test_flops_count_only_the_tokens_routed_blocks_process():
    from shared_config.flops import flops_split, matmul_params

    dense = make_spec(n_layers=4)
    block = sum(math.prod(t.shape)
                for t in layout(dense) if t.name.startswith("model.layers.1.") and t.kind == "linear")
    D, T, H, E = dense.D, 64, dense.H, dense.E
    mod = dense.replace(routing="mod", routing_capacity=0.125)  # k = 8 of 64
    predictor = D * D // 2 + D // 2
    assert matmul_params(mod, T) == matmul_params(dense) - 2 * block * (1 - 8 / 64) + 2 * (D + predictor)
    weights, attention = flops_split(mod, T, "forward")
    assert weights == 2 * (matmul_params(mod, T) - 2 * predictor)  # a forward's logits read no predictor
    # two dense layers: T keys; two routed: 8 keys, 1/8 of tokens
    assert attention == 4 * H * E * (2 * T + 2 * (8 / 64) * 8)
    dtf = dense.replace(routing="dtf", routing_capacity=0.5)
    prior = 3 * D * dtf.dtf_prior_dim
    assert matmul_params(dtf, T) == matmul_params(dense) - 2 * block * 0.5 + 2 * (prior + predictor)
    assert flops_split(dense, T, "train")[1] == 3 * 4 * H * E * 4 * T
    with pytest.raises(ValueError, match="pass seq_len"):
        matmul_params(mod)



@pytest.mark.parametrize("routing", ["mod", "dtf"])
@pytest.mark.parametrize("twin", [jax_model, torch_model], ids=["jax", "torch"])
def test_a_top_k_forward_without_aux_runs_no_predictor(twin, routing, monkeypatch):
    """What the flops count says of a forward (its logits read no predictor) holds in both twins, eager included:
    the predictor runs when the auxiliary loss reads it (aux given) or when it decides (predictor mode) only."""
    spec = make_spec(routing=routing, routing_capacity=0.5, n_layers=3)
    model, x = twin.from_weights(routed_weights(spec), spec), tokens(spec, 2, 8)
    module = jax_routing if twin is jax_model else torch_routing
    calls = []
    real = module.Predictor.__call__
    monkeypatch.setattr(module.Predictor, "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    x = jnp.asarray(x) if twin is jax_model else torch.as_tensor(x)
    model(x, decide="topk")
    assert calls == []
    aux = {}
    model(x, aux=aux, decide="topk")
    assert len(calls) == len(spec.routed_layers) and "router_bce" in aux
    model(x, decide="predictor")
    assert len(calls) == 2 * len(spec.routed_layers)

def test_routing_study_refuses_bad_configs_before_training(tmp_path):
    from shared_config.cli import UsageError

    from ..support.common import load_script

    study = load_script("compare_routing")
    assert study.config_changes("dense") == {"routing": "none"}
    assert study.config_changes("dtf-0.5") == {"routing": "dtf", "routing_capacity": 0.5}
    for configs, fragment in (("mod-x", "must be dense or ROUTING-CAPACITY"),
                              ("mod-1.5", r"routing_capacity=1.5 must be in \(0, 1\]")):
        with pytest.raises(UsageError, match=fragment):
            study.main(["--configs", f"dense,{configs}", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("changes", [ROUTED[0], ROUTED[5]], ids=case_ids([ROUTED[0], ROUTED[5]]))
def test_left_padded_routed_decoding_leaves_each_row_as_alone(changes):
    """The keep mask and dtf's moving-average window skip each row's left padding."""
    from .test_kv_cache import check_rows_decode_as_alone

    spec = make_spec(**changes)
    prompts = [list(tokens(spec, 1, n, seed=n)[0]) for n in (9, 4)]
    check_rows_decode_as_alone(spec, routed_weights(spec), prompts, tokens(spec, 2, 3, seed=1))


def test_train_cli_refuses_a_bad_routing_spec_in_one_line(tmp_path):
    from ..support.common import one_line_error, run_script

    result = run_script("train", "--backend", "torch", "--spec", "tiny", "--set", "routing=dtf", "--set",
                        "routing_layers=all", "--out", tmp_path / "run", "--quiet")
    one_line_error(result, "routing=dtf needs routing_layers=every_other")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("routing", ["mod", "dtf"])
def test_native_init_of_the_router_tensors(routing):
    """Each twin's own RNG draws the router tensors by the layout's rules: scalars exact, norms ones, weights normal."""
    from flax import nnx

    spec = make_spec(routing=routing, d_model=96, n_heads=6, init_std=0.05, n_layers=2)
    for weights in (jax_model.get_weights(jax_model.Transformer(spec, rngs=nnx.Rngs(3))),
                    torch_model.get_weights(torch_model.Transformer(spec, generator=torch.Generator().manual_seed(3)))):
        for name, x in weights.items():
            if "router" not in name:
                continue
            if name.endswith(("beta_ce", "beta_cu", "o_ce", "m_cu")):
                assert (float(x[0]) == pytest.approx({"beta_ce": -0.3, "beta_cu": -0.6, "o_ce": 1.025,
                                                      "m_cu": 1.1}[name.rsplit(".", 1)[1]]))
            elif name.endswith("prior_norm.weight"):
                assert np.all(x == 1)
            else:
                assert abs(float(np.std(x)) - 0.05) < 0.3 * 0.05 and abs(float(np.mean(x))) < 0.05, name
