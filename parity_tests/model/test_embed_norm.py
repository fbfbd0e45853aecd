"""The embedding norm (`embed_norm`, Peri-LN's: docs/spec.md): both twins against the float64 reference, and its
precision in bf16. The option's logits, gradients, init, layout and conversion run in those modules' own tables."""

import jax.numpy as jnp
import numpy as np
import torch

import jax_model
import torch_model

from ..support import reference
from ..support.common import FORWARD_TOL, make_spec, parity_weights, rel_err
from ..support.oracles import rounded_more_than_once


def embeddings(spec, w, tokens_BT):
    """Both twins' `embed` of tokens [B, T] from weights `w`, as float32 numpy."""
    positions_T = np.arange(tokens_BT.shape[1])
    j = jax_model.from_weights(w, spec).model.embed(jnp.asarray(tokens_BT), jnp.asarray(positions_T))
    with torch.no_grad():
        t = torch_model.from_weights(w, spec).model.embed(torch.as_tensor(tokens_BT), torch.as_tensor(positions_T))
    return np.asarray(j.astype(jnp.float32)), t.float().numpy()


def test_embed_norm_normalises_the_embeddings():
    """`embed_norm` (Peri-LN's embedding norm): both twins' embeddings are the float64 reference's norm of the scaled
    embeddings, and doubling the norm's weight doubles them exactly (a twin that skipped the norm, or its weight, fails;
    the raw embeddings have rms 0.3, so the norm changes them)."""
    spec = make_spec(embed_norm=True, position="learned", embed_scale="constant", norm_bias=True)
    w, x = parity_weights(spec), np.random.default_rng(0).integers(0, spec.V, (2, 33))
    ref = reference.embed({k: v.astype(np.float64) for k, v in w.items()}, spec, x)
    raw = reference.embed({k: v.astype(np.float64) for k, v in w.items()}, spec.replace(embed_norm=False), x)
    assert rel_err(ref, raw) > 0.5, "the test needs embeddings the norm changes"
    doubled = {**w, "model.embed_norm.weight": 2 * w["model.embed_norm.weight"],
               "model.embed_norm.bias": 2 * w["model.embed_norm.bias"]}
    for name, got, twice in zip(("jax", "torch"), embeddings(spec, w, x), embeddings(spec, doubled, x)):
        assert rel_err(got, ref) <= FORWARD_TOL, (name, rel_err(got, ref))
        assert np.array_equal(twice, 2 * got), f"{name}: embed_norm's weight and bias do not scale the embeddings"


def test_embed_norm_on_bfloat16_is_rounded_once():
    """In bf16 the embedding norm runs on the float32 embeddings and its output is cast once: each value the float64
    norm of the float32 sum rounded once to bf16. Normed after the cast, its input rounded to bf16 first, it is off by
    up to 1.5 of bf16's spacings, which the model-level bf16 bounds let pass."""
    spec = make_spec(embed_norm=True, position="learned", compute_dtype="bfloat16", norm_bias=True)
    w, x = parity_weights(spec), np.random.default_rng(0).integers(0, spec.V, (2, 64))
    ref = reference.embed({k: v.astype(np.float64) for k, v in w.items()}, spec, x)
    terms = np.abs(ref) + 2 * np.abs(w["model.embed_norm.bias"])  # before the bias cancels
    for name, got in zip(("jax", "torch"), embeddings(spec, w, x)):
        assert (fault := rounded_more_than_once(got, ref, terms)) is None, (name, fault)
