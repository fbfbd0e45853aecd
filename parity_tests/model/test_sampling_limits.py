"""Sampling filters and temperatures at their limits, in both twins: top_p=1 and top_k>=V keep every token on a
128,256-token vocabulary; the top-p set is the float64 one and the twins' sets agree; transformers' logits processors
keep the same sets; extreme temperatures and +-inf/huge logits give the mathematically right tokens, and logits
from which no token can be drawn (NaN, all -inf) a GenerationError."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import jax_model
import torch_model
from jax_model import generate as jg
from shared_config.generation import GenerationError, uniform_steps
from torch_model import generate as tg

from ..support.common import make_spec, parity_weights

V_LLAMA3 = 128_256


@pytest.fixture(scope="module")
def wide_logits():
    """One row of N(0, 4^2) logits over Llama 3's vocabulary: a float32 running sum of its softmax reaches 1 early."""
    return (4 * np.random.default_rng(0).standard_normal((1, V_LLAMA3))).astype(np.float32)


def kept(logits, top_k, top_p) -> tuple[np.ndarray, np.ndarray]:
    """The indices each twin's filter keeps, for a [1, V] row."""
    j = np.asarray(jg.filter_logits(jnp.asarray(logits), top_k, top_p))[0]
    t = tg.filter_logits(torch.as_tensor(logits), top_k, top_p).numpy()[0]
    return np.flatnonzero(np.isfinite(j)), np.flatnonzero(np.isfinite(t))


def hf_kept(logits, top_k, top_p, dtype=torch.float32) -> np.ndarray:
    """The indices transformers' TopK then TopP warpers keep (their order in `generate`)."""
    scores = torch.as_tensor(logits, dtype=dtype)
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return np.flatnonzero(np.isfinite(scores.numpy()[0]))


def float64_top_p(logits, top_p) -> tuple[np.ndarray, np.ndarray]:
    """The top-p set computed in float64 (keep a token while the mass ranked above it is < top_p), and the tokens
    float32 may decide either way: those whose running sum lies within float32's rounding of a log2(V)-deep
    summation (plus a few roundings for exp and the product) of top_p."""
    x = logits[0].astype(np.float64)
    order = np.argsort(-x, kind="stable")
    p = np.exp(x[order] - x.max())
    above = (np.cumsum(p) - p) / p.sum()
    tol = (np.ceil(np.log2(x.size)) + 4) * 2.0**-24
    return np.sort(order[above < top_p]), order[np.abs(above - top_p) <= tol]


@pytest.mark.parametrize("top_k, top_p", [(None, 1.0), (V_LLAMA3, None), (V_LLAMA3 + 1, 1.0)])
def test_limits_keep_every_token_on_a_wide_vocabulary(wide_logits, top_k, top_p):
    everything = np.arange(V_LLAMA3)
    j, t = kept(wide_logits, top_k, top_p)
    np.testing.assert_array_equal(j, everything)
    np.testing.assert_array_equal(t, everything)
    np.testing.assert_array_equal(hf_kept(wide_logits, min(top_k or V_LLAMA3, V_LLAMA3), top_p), everything)


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99, 0.999])
def test_top_p_set_is_the_float64_one_in_both_twins_and_in_transformers(wide_logits, top_p):
    expected, undecided = float64_top_p(wide_logits, top_p)
    assert len(undecided) < 100  # a few tokens of ~1e-7 mass each around the cut
    j, t = kept(wide_logits, None, top_p)
    for got in (j, t, hf_kept(wide_logits, None, top_p, torch.float64)):
        assert set(np.setxor1d(got, expected)) <= set(undecided), len(np.setxor1d(got, expected))
    assert set(np.setxor1d(j, t)) <= set(undecided)


@pytest.mark.slow  # ~7 s; quick: the float64 sets (test_top_p_set_is_the_float64_one_in_both_twins_and_in_transformers)
def test_twins_and_transformers_keep_the_same_sets_on_small_vocabularies():
    rng = np.random.default_rng(1)
    for V in (2, 3, 17, 97, 1000):
        logits = (3 * rng.standard_normal((1, V))).astype(np.float32)
        for top_k, top_p in [(1, None), (2, None), (V - 1 or 1, None), (V, None), (None, 0.3), (None, 0.95), (5, 0.8)]:
            j, t = kept(logits, top_k, top_p)
            np.testing.assert_array_equal(j, t)
            np.testing.assert_array_equal(j, hf_kept(logits, top_k, top_p))


def draws(logits, temperature, n=2000, top_k=None, top_p=None) -> tuple[np.ndarray, np.ndarray]:
    """Each twin's `sample` of one row repeated n times, at the uniforms of seed 0."""
    rows = np.repeat(np.asarray(logits, np.float32)[None], n, axis=0)
    u = next(uniform_steps(0, 1, n))
    j = np.asarray(jg.sample(jnp.asarray(rows), jnp.asarray(u), temperature, top_k, top_p))
    t = tg.sample(torch.as_tensor(rows), torch.as_tensor(u), temperature, top_k, top_p).numpy()
    return j, t


BIG = np.finfo(np.float32).max
CASES = [  # (logits, temperature, the tokens that may be drawn: each must be)
    ([0.0, 2.0, 1.0, 2.0], 1e-30, {1, 3}),  # a tiny temperature: the tied best tokens only
    ([0.0, 2.0, 1.0, 2.0], 1e-300, {1, 3}),  # 0 in float32: still the best tokens, no 0 / 0
    ([0.0, 2.0, 1.0, 5.0], 1e-300, {3}),
    ([0.0, 2.0, -np.inf, 5.0], 1e30, {0, 1, 3}),  # a huge temperature: uniform over the finite tokens
    ([0.0, 2.0, -np.inf, 5.0], 1e300, {0, 1, 3}),  # inf in float32: still uniform, -inf stays excluded
    ([0.0, np.inf, 1.0, np.inf], 1.0, {1, 3}),  # +inf logits share all the mass
    ([0.0, np.inf, 1.0, np.inf], 1e300, {1, 3}),
    ([-np.inf, -np.inf, 3.0, -np.inf], 0.7, {2}),
    ([BIG, -BIG, BIG, 0.0], 1.0, {0, 2}),  # huge magnitudes: differences overflow to -inf, not NaN
    ([-BIG, -BIG, -BIG], 1.0, {0, 1, 2}),
]


@pytest.mark.parametrize("logits, temperature, allowed", CASES)
def test_extreme_temperatures_and_logits_draw_the_right_tokens(logits, temperature, allowed):
    for top_k, top_p in [(None, None), (len(logits), 1.0), (None, 0.999)]:
        j, t = draws(logits, temperature, top_k=top_k, top_p=top_p)
        assert set(j) == allowed == set(t), (top_k, top_p)
    if temperature >= 1e30:  # uniform: every allowed token about equally often (2000 draws, 5 sigma)
        for d in (j, t):
            counts = np.bincount(d, minlength=len(logits))[sorted(allowed)]
            expected = len(d) / len(allowed)
            assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), counts


@pytest.mark.parametrize("top_p", [1e-46, 1e-300])
def test_a_top_p_below_float32s_smallest_keeps_the_best_tokens(top_p):
    """top_p=1e-300 is in (0, 1], and 0 in float32: it cut every token ("no token can be drawn") where any top_p > 0
    keeps the best ones, as a tiny positive float32 top_p does."""
    j, t = draws([0.0, 2.0, 1.0, 2.0, -1.0], 1.0, n=50, top_p=top_p)
    assert set(j) == {1, 3} == set(t)


@pytest.mark.parametrize("logits", [[np.nan, 1.0, 2.0], [-np.inf] * 3])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_undrawable_rows_are_marked_not_drawn(logits, temperature):
    rows = np.asarray([logits, [0.0, 1.0, 0.5]], np.float32)
    u = next(uniform_steps(0, 1, 2))
    j = np.asarray(jg.sample(jnp.asarray(rows), jnp.asarray(u), temperature))
    t = tg.sample(torch.as_tensor(rows), torch.as_tensor(u), temperature).numpy()
    assert j[0] == t[0] == -1 and 0 <= j[1] < 3 and 0 <= t[1] < 3


def test_generate_from_nan_weights_raises_generation_error():
    spec = make_spec(n_layers=1)
    weights = parity_weights(spec)
    weights["model.embed_tokens.weight"] = np.full_like(weights["model.embed_tokens.weight"], np.nan)
    for model, gen in [(jax_model.from_weights(weights, spec), jg), (torch_model.from_weights(weights, spec), tg)]:
        for temperature in (0.0, 1.0):
            with pytest.raises(GenerationError, match="new token 1: the logits of row 0 hold a NaN"):
                gen.generate(model, [1, 2, 3], 4, temperature=temperature)


def test_generate_cli_reports_undrawable_logits_in_one_line(tmp_path, capsys):
    """Finite weights whose forward overflows (NaN logits): one error line and exit code 1, no traceback."""
    from shared_config import save_checkpoint
    from shared_config.cli import run

    from ..support.common import load_script

    spec = make_spec(n_layers=1)
    weights = parity_weights(spec)
    head = "model.embed_tokens.weight" if spec.tie_embeddings else "lm_head.weight"
    signs = np.where(np.arange(spec.D) % 2, 1.0, -1.0).astype(np.float32)
    weights[head] = np.broadcast_to(3e38 * signs, weights[head].shape).copy()  # +inf and -inf terms: NaN logits
    save_checkpoint(tmp_path / "overflow.safetensors", weights, spec)
    cli = load_script("generate")
    for backend in ("jax", "torch"):
        with pytest.raises(SystemExit) as e:
            run(cli.main,
                ["--backend", backend, "--weights", str(tmp_path / "overflow.safetensors"), "--tokens", "1,2"])
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and line.startswith("error: new token 1: the logits of row 0 hold a NaN"), line


def test_a_numpy_temperature_is_taken_without_a_warning():
    """np.float16(0.7) warned 'overflow encountered in cast' from in_float32, which compared it with float32's
    largest in float16."""
    import warnings

    from shared_config.generation import in_float32

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert in_float32(np.float16(0.5)) == 0.5 and in_float32(np.float64(1e300)) == np.inf == in_float32(10**400)
