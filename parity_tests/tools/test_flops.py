"""The model FLOP count (shared_config/flops.py) against what a step computes: each parameter group counted by the
gradients its backward takes (docs/bench.md, docs/routing.md)."""

from __future__ import annotations

import math

import pytest

from shared_config import layout
from shared_config.flops import flops_split

from ..support.common import make_spec, quick_first


def routed(routing: str, gamma: float):
    return make_spec(n_layers=4).replace(routing=routing, routing_capacity=gamma)


@pytest.mark.parametrize("routing, gamma", [("mod", 0.125), ("dtf", 0.5)])
def test_routed_train_flops_count_each_group_by_the_gradients_it_takes(routing, gamma):
    """Recounted by hand per group at T 64: the blocks' weights (k/T of a token in a routed block) and the head,
    mod's router weight [D] or dtf's prior SwiGLU (3·D·P), and the predictor's fc2 [1, D/2] at 6 per weight (their
    inputs' gradients are taken); the predictor's fc1 [D/2, D] at 4 (it reads stopgrad(x): no input gradient).
    The old count, 6 for every weight, was 2·(D/2·D) per routed block too high; in a forward it counted the
    predictor, which the logits do not read."""
    spec, T = routed(routing, gamma), 64
    D, k, blocks_routed = spec.D, math.floor(gamma * T), len(spec.routed_layers)
    share = {i: k / T if i in spec.routed_layers else 1 for i in range(spec.L)}
    blocks = sum(math.prod(t.shape) * share[int(t.name.split(".")[2])] for t in layout(spec)
                 if t.kind == "linear" and t.name.startswith("model.layers.") and ".router" not in t.name)
    head = spec.V * D  # the LM head's matmul, tied or not
    router = D if routing == "mod" else 3 * D * spec.dtf_prior_dim
    fc1, fc2 = D // 2 * D, D // 2
    want = 6 * (blocks + head) + blocks_routed * (6 * router + 4 * fc1 + 6 * fc2)
    assert flops_split(spec, T, "train")[0] == want
    assert flops_split(spec, T, "train")[0] != 3 * flops_split(spec, T, "forward")[0]  # the old count: 3 passes
    # a forward's logits read no predictor (neither twin runs it: test_a_forward_pass_computes_no_predictor)
    assert flops_split(spec, T, "forward")[0] == 2 * (blocks + head) + blocks_routed * 2 * router
    whole = sum(math.prod(t.shape) for t in layout(spec)  # decoding runs every block on every token, and the predictor
                if t.kind == "linear" and t.name.startswith("model.layers.") and ".router" not in t.name)
    assert flops_split(spec, T, "decode")[0] == 2 * (whole + head) + blocks_routed * 2 * (router + fc1 + fc2)


@pytest.mark.parametrize("routing", ["mod", "dtf"])
def test_which_router_inputs_take_a_gradient_in_a_train_step(routing):
    """The count's premise, read off the torch twin's autograd in a top-k (training) forward: the predictor's fc1
    reads a tensor that needs no gradient, its fc2, mod's router and dtf's prior FFN read ones that do (the JAX twin's
    routing.py is the same file: `router_predictor(jax.lax.stop_gradient(x))`)."""
    import torch

    import torch_model

    spec = routed(routing, 0.5)
    model = torch_model.Transformer(spec, generator=torch.Generator().manual_seed(0))
    layer = model.model.layers[1]
    needs = {}

    def record(name):
        def hook(module, inputs):  # returns None: the inputs pass unchanged
            needs.setdefault(name, inputs[0].requires_grad)
        return hook

    modules = {"fc1": layer.router_predictor.fc1, "fc2": layer.router_predictor.fc2}
    modules["router"] = layer.router if routing == "mod" else layer.router.prior_ffn
    for name, module in modules.items():
        module.register_forward_pre_hook(record(name))
    model(torch.zeros((1, 16), dtype=torch.long), aux={})
    assert needs == {"fc1": False, "fc2": True, "router": True}


@pytest.mark.parametrize("routing", quick_first(["mod", "dtf"]))
def test_a_forward_pass_computes_no_predictor(routing):
    """The forward count's premise: the JAX twin's jitted top-k forward (bench/compare.py --mode forward) holds no
    predictor matmul, as its fc1 weight [D, D/2] (JAX orientation: 48 x 24 here, no other weight of that shape) is
    absent from the compiled HLO; the predictor-decided forward reads it (the check can see it)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jax_model

    spec = routed(routing, 0.5).replace(dtf_prior_factor=0.1)  # dtf's prior gate+up [48, 12], not [48, 24]
    graphdef, params = nnx.split(jax_model.Transformer(spec, rngs=nnx.Rngs(0)))
    tokens = jnp.zeros((1, 16), jnp.int32)

    def hlo(decide):
        forward = jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens, decide=decide))
        return forward.lower(params, tokens).compile().as_text()

    fc1 = f"f32[{spec.D},{spec.D // 2}]"
    assert fc1 not in hlo(None) and fc1 in hlo("predictor")
