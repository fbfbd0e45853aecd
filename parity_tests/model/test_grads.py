"""Loss and gradients: the twins agree with each other (every option value, every norm x placement)
and with the float64 numpy reference (the loss itself, and every tensor's gradient by central finite
differences of the reference loss, across the same grid): an error both twins share cannot pass."""

import numpy as np
import pytest

from shared_config import layout
from shared_config.parity import GRAD_TOL, LOSS_TOL, max_rel
from shared_config.spec import CHOICES

from ..support.common import HYBRID, HYBRID_GQA, MIXERS, case_ids, make_spec, parity_weights, quick_first, tokens
from ..support.oracles import finite_difference_errors
from ..support.train_common import TWINS, both_loss_and_grads, reference_loss

# Every norm type x placement once; the other options' values spread over them, so that every value
# of every option of the twins' spec matrix is differentiated at least once (init-only options
# excepted: they change the weights, not the computation).
GRID = [
    dict(norm_type="rms", norm_placement="pre"),
    dict(norm_type="rms", norm_placement="peri", qk_norm=True, n_kv_heads=1),
    dict(norm_type="rms", norm_placement="post", tie_embeddings=True, mlp="gelu"),
    dict(norm_type="layernorm", norm_placement="pre", norm_bias=True, position="learned", fused_qkv=False),
    dict(norm_type="layernorm", norm_placement="peri", mlp="relu2", n_kv_heads=6),
    dict(norm_type="layernorm", norm_placement="post", position="none", head_dim=10, norm_eps=1e-2),
    dict(norm_type="dyt", norm_placement="pre", embed_scale="learnable", mlp="gelu_tanh"),
    dict(norm_type="dyt", norm_placement="peri", norm_bias=True, embed_scale="constant", qk_norm=True,
         tie_embeddings=True),
    dict(norm_type="dyt", norm_placement="post", rope_scaling="llama3", rope_original_max_seq_len=64, n_kv_heads=3),
    dict(norm_type="derf", norm_placement="pre", embed_scale="learnable", norm_bias=True, rope_theta=500000.0),
    dict(norm_type="derf", norm_placement="peri", fused_qkv=False, position="learned", n_layers=3),
    dict(norm_type="derf", norm_placement="post", mlp="gelu", embed_scale="learnable", qk_norm=True),
]
# The norm placements (DeepNorm, HybridNorm, HybridNorm*, pre-attention/post-FFN) x every norm type.
GRID += [
    dict(norm_type="rms", norm_placement="deepnorm", fused_qkv=False),
    dict(norm_type="rms", norm_placement="hybrid", n_kv_heads=1),
    dict(norm_type="rms", norm_placement="hybrid_star", tie_embeddings=True),
    dict(norm_type="rms", norm_placement="pre_post", qk_norm=True),
    dict(norm_type="layernorm", norm_placement="deepnorm", norm_bias=True, mlp="gelu"),
    dict(norm_type="layernorm", norm_placement="hybrid", norm_bias=True, position="learned"),
    dict(norm_type="layernorm", norm_placement="hybrid_star", n_layers=3, fused_qkv=False),
    dict(norm_type="layernorm", norm_placement="pre_post", mlp="relu2"),
    dict(norm_type="dyt", norm_placement="deepnorm", embed_scale="learnable", n_layers=3),
    dict(norm_type="dyt", norm_placement="hybrid", mlp="gelu_tanh", head_dim=10),
    dict(norm_type="dyt", norm_placement="hybrid_star", norm_bias=True, n_kv_heads=6),
    dict(norm_type="dyt", norm_placement="pre_post", tie_embeddings=True, position="none"),
    dict(norm_type="derf", norm_placement="deepnorm", qk_norm=True, norm_bias=True),
    dict(norm_type="derf", norm_placement="hybrid", fused_qkv=False, embed_scale="constant"),
    dict(norm_type="derf", norm_placement="hybrid_star", embed_scale="learnable"),
    dict(norm_type="derf", norm_placement="pre_post", n_kv_heads=3, norm_bias=True),
]
# The embedding norm (Peri-LN as published) under DyT: rms or layernorm would cancel the learnable scale before
# it, whose gradient would then be rounding noise (docs/extending.md, "Gradients that are zero by symmetry")
GRID += [dict(norm_type="dyt", norm_placement="peri", embed_norm=True, embed_scale="learnable", norm_bias=True)]
# Every other token mixer (attention is every row above): its rules' changes, and a norm and placement on top.
GRID += [dict(**MIXERS["gla"], norm_type="dyt", norm_placement="peri", gla_output_norm="same")]
GRID += [dict(**HYBRID, norm_type="dyt", norm_placement="peri")]  # a hybrid stack: each layer's own gradients
GRID += [dict(**HYBRID_GQA, fused_qkv=False)]  # its attention layer's grouped k/v gather H/K heads' gradients


def test_every_norm_and_placement_is_in_the_grid():
    """GRID is written by hand: a norm type, placement or mixer added to the spec's CHOICES fails here until it has
    its rows, instead of going untested."""
    have = {(make_spec(**c).norm_type, make_spec(**c).norm_placement) for c in GRID}
    missing = [f"{n}-{p}" for n in CHOICES["norm_type"] for p in CHOICES["norm_placement"] if (n, p) not in have]
    missing += [f"mixer={m}" for m in set(CHOICES["mixer"]) - {make_spec(**c).mixer for c in GRID}]
    assert not missing, f"GRID has no case for {missing}"


def check_twins(spec, attention=("auto", "auto"), mask=False):
    w, x = parity_weights(spec), tokens(spec, seq=65)
    m = np.random.default_rng(1).random(x.shape) < 0.8 if mask else None
    (lj, gj), (lt, gt) = both_loss_and_grads(w, spec, x, m, attention)
    assert abs(lj - lt) / abs(lt) <= LOSS_TOL, f"loss: jax {lj} vs torch {lt}"
    assert set(gj) == set(gt) == {t.name for t in layout(spec)}
    errors = {name: max_rel(gj[name], gt[name]) for name in gt}
    bad = {name: f"{e:.1e}" for name, e in errors.items() if not e <= GRAD_TOL}
    assert not bad, f"max|g_jax − g_torch| / max|g_torch| above {GRAD_TOL}: {bad}"
    assert all(g.dtype == np.float32 for g in (*gj.values(), *gt.values()))
    return w, x, {"jax": gj, "torch": gt}


@pytest.mark.parametrize("changes", quick_first(GRID, 3), ids=case_ids(GRID))
def test_twins_agree_on_loss_and_every_gradient(changes):
    """...and both twins' gradients equal the float64 reference's, by finite differences along a random direction
    per tensor (two reference losses per tensor: a few seconds for the whole grid)."""
    spec = make_spec(**changes)
    w, x, grads = check_twins(spec)
    failures = finite_difference_errors(w, spec, x, grads)
    assert not failures, "gradients vs float64 finite differences of the reference:\n" + "\n".join(failures)


@pytest.mark.parametrize("attention", quick_first([("einsum", "sdpa"), ("einsum", "einsum"), ("blocked", "blocked"),
                                                   ("xla", "blocked")]))
def test_attention_kernels_agree_on_gradients(attention):
    check_twins(make_spec(qk_norm=True), attention)


@pytest.mark.slow
def test_mask_and_ignore_index():
    """Ignored targets (−100) and masked positions drop out of the mean, the same way on both sides."""
    spec = make_spec(norm_type="dyt")
    w, x = parity_weights(spec), tokens(spec, seq=33)
    x[0, 5], x[1, 20] = -100, -100  # ignored as targets, read as token 0 as inputs
    mask = np.ones_like(x)
    mask[1, :10], mask[0, -1] = 0, 0
    counted = (mask[:, 1:] != 0) & (x[:, 1:] != -100)
    expected = reference_loss(w, spec, np.where(x == -100, 0, x), counted.astype(np.float64))
    other_last = x.copy()
    other_last[0, -1] = (x[0, -1] + 1) % spec.V  # a masked target that is never an input
    for name, twin, train in TWINS:
        model = twin.from_weights(w, spec)
        loss, _ = train.loss_and_grads(model, x, mask)
        assert abs(loss - expected) / expected <= 1e-5, f"{name}: {loss} vs float64 reference {expected}"
        assert train.loss_and_grads(model, other_last, mask)[0] == loss, f"{name}: a masked target changed the loss"


@pytest.mark.slow
def test_count_makes_parts_add_up_to_the_whole():
    """With `count` (the whole batch's counted targets), the losses and gradients of row blocks holding different
    numbers of targets add up to the whole batch's mean and its gradient, as data-parallel ranks and micro-batches
    need; their plain means do not."""
    spec = make_spec()
    w, x = parity_weights(spec), tokens(spec, batch=4, seq=33)
    mask = np.ones_like(x)
    mask[:2, :29] = 0  # rows 0-1 count 8 targets, rows 2-3 count 64
    count, blocks = float((mask[:, 1:] != 0).sum()), (slice(0, 2), slice(2, 4))
    for name, twin, train in TWINS:
        model = twin.from_weights(w, spec)
        whole, grads = train.loss_and_grads(model, x, mask)
        parts = [train.loss_and_grads(model, x[rows], mask[rows], count) for rows in blocks]
        summed = parts[0][0] + parts[1][0]
        assert abs(summed - whole) / whole <= 1e-6, f"{name}: the parts' losses sum to {summed}, the whole's is {whole}"
        errors = {k: max_rel(parts[0][1][k] + parts[1][1][k], g) for k, g in grads.items()}
        assert max(errors.values()) <= 1e-5, f"{name}: summed gradients off the whole's: {errors}"
        means = [train.loss_and_grads(model, x[rows], mask[rows])[0] for rows in blocks]
        assert abs(np.mean(means) - whole) / whole > 1e-3, "the test needs blocks whose mean differs from the whole's"


@pytest.mark.parametrize("changes", quick_first([
    dict(norm_type="derf", norm_placement="peri", norm_bias=True, embed_scale="learnable", qk_norm=True),
    dict(norm_type="layernorm", norm_placement="post", norm_bias=True, position="learned", tie_embeddings=True,
         mlp="gelu"),
    dict(norm_type="dyt", norm_placement="deepnorm", norm_bias=True, fused_qkv=False),
    dict(norm_type="rms", norm_placement="hybrid_star", n_layers=3),
    dict(norm_type="layernorm", norm_placement="hybrid", norm_bias=True),
    dict(norm_type="derf", norm_placement="pre_post", tie_embeddings=True),
], 1), ids=["derf-peri", "layernorm-post-tied", "dyt-deepnorm", "rms-hybrid_star", "layernorm-hybrid", "derf-pre_post"])
def test_gradients_match_float64_finite_differences(changes):
    """Per tensor, g · d equals (L(w + hd) − L(w − hd)) / 2h of the float64 reference for a random d."""
    spec = make_spec(**changes)
    w, x = parity_weights(spec), tokens(spec, seq=17)
    grads = dict(zip(("jax", "torch"), (g for _, g in both_loss_and_grads(w, spec, x))))
    failures = finite_difference_errors(w, spec, x, grads)
    assert not failures, "\n".join(failures)
