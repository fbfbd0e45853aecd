"""Seeded sampling gives the same tokens in both twins: the uniforms come from one numpy stream (`uniform_steps`), and
each twin's `sample` inverts the same float32 CDFs (a block of tokens, then a token in it); on a grid of uniforms the
draws' frequencies are the exact probabilities, top-k, top-p and the limits included."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jax_model import generate as jg
from shared_config.generation import UNIFORM_CHUNK, draw_blocks, uniform_steps
from torch_model import generate as tg

from ..support.common import make_spec, quick_first, tokens
from .test_generate import twins


@pytest.fixture(scope="module")
def base():
    spec = make_spec()
    return (spec, *twins(spec))


def step_uniforms(seed: int, steps: int, batch: int) -> np.ndarray:
    """The uniforms [steps, B, 2] the twins draw with, whole."""
    return np.stack(list(uniform_steps(seed, steps, batch)))


def both(logits, u, temperature, top_k=None, top_p=None) -> tuple[np.ndarray, np.ndarray]:
    """Each twin's `sample` of float32 logits [B, V] at the uniforms u [B, 2]."""
    logits, u = np.asarray(logits, np.float32), np.asarray(u, np.float32)
    j = np.asarray(jg.sample(jnp.asarray(logits), jnp.asarray(u), temperature, top_k, top_p))
    t = tg.sample(torch.as_tensor(logits), torch.as_tensor(u), temperature, top_k, top_p).numpy()
    return j, t


def test_uniform_steps_are_a_fixed_float32_stream_in_the_unit_interval():
    u = step_uniforms(0, 5, 3)
    assert u.shape == (5, 3, 2) and u.dtype == np.float32 and 0 <= u.min() and u.max() < 1
    assert np.all(u * 2**24 == np.floor(u * 2**24))  # multiples of 2**-24: exact in float32
    # Philox's integer stream for seed 0 is fixed (its docstring's guarantee): a change here changes every sample
    assert (u[0] * 2**24).astype(int).tolist() == [[236005, 11674296], [11605062, 7082730], [10174039, 8016333]]
    # each row its own stream: the same draws whatever the batch beside it (row 0 read 15 steps is the rows' start)
    np.testing.assert_array_equal(step_uniforms(0, 5, 2), u[:, :2])
    np.testing.assert_array_equal(step_uniforms(0, 5, 1)[:, 0], u[:, 0])
    assert not np.array_equal(u[:, 0], u[:, 1])
    assert not np.array_equal(step_uniforms(1, 5, 3), u)
    assert step_uniforms(2**32 - 1, 1, 1).dtype == np.float32  # the largest seed check_generation allows


SETTINGS = [(0.8, 10, 0.9), (1.0, None, None), (0.8, None, None), (0.8, 5, None), (1.0, None, 0.7), (3.0, 1, None)]


@pytest.mark.parametrize("temperature, top_k, top_p", quick_first(SETTINGS, 1, multi=True))
def test_twins_draw_the_same_tokens_from_the_same_logits_and_uniforms(temperature, top_k, top_p):
    """2,000 rows of 64 logits: exp may differ by an ulp between the twins, so a uniform within ~1e-7 of a boundary
    could pick a neighbour; none of these does."""
    rng = np.random.default_rng(0)
    logits = 2 * rng.standard_normal((2000, 64))
    u = rng.random((2000, 2))
    j, t = both(logits, u, temperature, top_k, top_p)
    np.testing.assert_array_equal(j, t)
    assert (j >= 0).all() and len(set(j)) > (1 if top_k == 1 else 20)


def exact_probabilities(logits, temperature, top_k, top_p) -> np.ndarray:
    """softmax(logits / temperature) in float64 over the tokens the twins' filter keeps (that set tested against
    float64 and transformers in test_sampling_limits.py)."""
    x = np.asarray(logits, np.float64) / temperature
    kept = np.isfinite(np.asarray(jg.filter_logits(jnp.asarray([logits], jnp.float32) / temperature, top_k, top_p)))[0]
    p = np.where(kept, np.exp(x - x.max()), 0.0)
    return p / p.sum()


M = 64
GRID = (np.arange(M) + 0.5) / M  # exact in float32
U_XY = np.stack(np.meshgrid(GRID, GRID, indexing="ij"), axis=-1).reshape(M * M, 2)  # row x·M + y: (u_x, u_y)


def check_frequencies(logits, temperature, top_k, top_p, p):
    """Both twins on the M x M grid of uniform pairs: the first uniform picks each block about M·P_block times, and
    for each of its values the second picks each token of that block about M·p/P_block times, both within 1 (M points
    spaced 1/M fill an interval of P), so each token is drawn with probability p; a token of p = 0 never."""
    S, N = draw_blocks(len(logits))
    j, t = both(np.repeat(np.asarray(logits, np.float32)[None], M * M, axis=0), U_XY, temperature, top_k, top_p)
    np.testing.assert_array_equal(j, t)
    tokens_XY = j.reshape(M, M)
    assert (tokens_XY >= 0).all() and (p[tokens_XY] > 0).all()
    block_X = tokens_XY[:, 0] // S
    assert (tokens_XY // S == block_X[:, None]).all()  # the second uniform never moves to another block
    P_N = np.bincount(np.arange(len(p)) // S, weights=p, minlength=N)
    assert np.all(np.abs(np.bincount(block_X, minlength=N) - M * P_N) <= 1), (M * P_N, np.bincount(block_X))
    for n, row_Y in zip(block_X, tokens_XY):
        q = p[n * S:(n + 1) * S] / P_N[n]
        assert np.all(np.abs(np.bincount(row_Y - n * S, minlength=len(q)) - M * q) <= 1), (n, M * q)


@pytest.mark.parametrize("top_k, top_p", quick_first([(20, 0.95), (None, None), (7, None), (None, 0.8)], 1, multi=True))
@pytest.mark.parametrize("temperature", quick_first([0.6, 1.0]))
def test_draws_on_a_grid_of_uniforms_have_the_exact_frequencies(top_k, top_p, temperature):
    logits = 1.5 * np.random.default_rng(3).standard_normal(64)
    check_frequencies(logits, temperature, top_k, top_p, exact_probabilities(logits, temperature, top_k, top_p))


BIG = np.finfo(np.float32).max
LIMITS = [  # (logits, temperature, the exact probabilities); the first three in the quick tier
    ([0.0, 2.0, 1.0, 2.0], 1e-30, [0, 0.5, 0, 0.5]),  # a tiny temperature: the tied best tokens only
    ([0.0, np.inf, 1.0, np.inf], 1.0, [0, 0.5, 0, 0.5]),  # +inf logits share all the mass
    ([0.0, 0.0, -np.inf, -np.inf, -np.inf, -np.inf, np.log(2.0), -np.inf, np.log(4.0)], 1.0,
     [1 / 8, 1 / 8, 0, 0, 0, 0, 2 / 8, 0, 4 / 8]),  # blocks of 3: the middle one weighs 0
    ([0.0, 2.0, 1.0, 2.0], 1e-300, [0, 0.5, 0, 0.5]),  # 0 in float32
    ([0.0, 2.0, -np.inf, 5.0], 1e30, [1 / 3, 1 / 3, 0, 1 / 3]),  # a huge temperature: uniform over the finite
    ([0.0, 2.0, -np.inf, 5.0], 1e300, [1 / 3, 1 / 3, 0, 1 / 3]),  # inf in float32
    ([-np.inf, -np.inf, 3.0, -np.inf], 0.7, [0, 0, 1, 0]),
    ([BIG, -BIG, BIG, 0.0], 1.0, [0.5, 0, 0.5, 0]),  # differences overflow to -inf, not NaN
    ([-np.inf, 0.0, -np.inf, np.log(3.0)], 1.0, [0, 0.25, 0, 0.75]),  # 0 weights first and last
]


@pytest.mark.parametrize("logits, temperature, p", quick_first(LIMITS, 3, multi=True))
def test_draws_at_the_limits_have_the_exact_frequencies(logits, temperature, p):
    for top_k, top_p in [(None, None), (len(logits), 1.0), (None, 0.999)]:
        check_frequencies(logits, temperature, top_k, top_p, np.asarray(p))


def test_uniforms_at_the_ends_of_the_unit_interval_draw_the_first_and_last_kept_tokens():
    """u = (0, 0) picks the first token of positive weight, u = (1 - 2**-24, 1 - 2**-24) (the largest `uniform_steps`
    gives) the last: never a token of weight 0 before, between or after them (blocks of 3 tokens here)."""
    logits = np.array([[-np.inf, 1.0, -np.inf, 0.5, 2.0, -np.inf]] * 2)
    j, t = both(logits, [[0.0, 0.0], [1 - 2**-24, 1 - 2**-24]], 1.0)
    np.testing.assert_array_equal(j, [1, 4])
    np.testing.assert_array_equal(t, [1, 4])


@pytest.mark.parametrize("bad", [[np.nan, 1.0, 2.0], [-np.inf] * 3])
def test_undrawable_rows_are_minus_one_whatever_the_uniform(bad):
    logits = np.array([bad, bad, [0.0, 1.0, 0.5]])
    for temperature in (0.0, 1.0):
        j, t = both(logits, [[0.0, 0.0], [0.99, 0.99], [0.5, 0.5]], temperature)
        np.testing.assert_array_equal(j, t)
        assert list(j[:2]) == [-1, -1] and 0 <= j[2] < 3


CASES = {  # name -> (temperature, top_k, top_p)
    "both": (0.8, 20, 0.95), "plain": (1.0, None, None), "cooler": (0.8, None, None), "top_k": (0.8, 12, None),
    "top_p": (1.0, None, 0.9),
}


@pytest.mark.parametrize("name", quick_first(list(CASES)))
def test_twins_generate_the_same_seeded_sample(base, name):
    """The same checkpoint, the same seed: the same tokens in JAX and in torch (they differed: jax.random against
    torch.Generator); another seed, other tokens."""
    spec, jm, tm = base
    temperature, top_k, top_p = CASES[name]
    prompt = list(tokens(spec, 1, 12)[0])
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    j, t = (gen.generate(model, prompt, 8, seed=5, **kwargs) for model, gen in [(jm, jg), (tm, tg)])
    assert j == t and len(j) == 8
    assert jg.generate(jm, prompt, 8, seed=6, **kwargs) != j


@pytest.mark.slow
def test_twins_generate_the_same_seeded_sample_for_a_ragged_batch_with_eos(base):
    """Each row stops at its first eos; the others go on drawing their own rows' uniforms; and each row draws what it
    draws sampled alone (its own stream: the row's uniforms were read from one stream of the whole batch's)."""
    spec, jm, tm = base
    prompts = [list(tokens(spec, 1, n, seed=n)[0]) for n in (9, 3, 6)]
    kwargs = dict(temperature=1.0, top_p=0.95, seed=11)
    free = jg.generate(jm, prompts, 8, **kwargs)
    eos = free[0][3]  # row 0 stops at its 4th token or earlier
    stopped = [row[: row.index(eos) + 1] if eos in row else row for row in free]
    assert jg.generate(jm, prompts, 8, eos_id=eos, **kwargs) == stopped
    assert tg.generate(tm, prompts, 8, eos_id=eos, **kwargs) == stopped
    assert len(stopped[0]) <= 4 and stopped != free
    assert jg.generate(jm, prompts[0], 8, **kwargs) == free[0]
    assert tg.generate(tm, prompts[:2], 8, **kwargs) == free[:2]


def test_uniforms_are_drawn_as_the_steps_go():
    """The uniforms made [steps, B, 2] whole before the first token took 3 GiB and 13 s at 2**20 steps of 64 rows,
    however early eos stopped the rows; uniform_steps makes them a chunk at a time, the same stream across chunks
    (Philox read in one piece here)."""
    import tracemalloc

    steps = 2 * UNIFORM_CHUNK + 3
    words = np.stack([np.random.Philox(7).advance(b * 2**64).random_raw(steps) for b in range(3)], 1)  # [steps, B]
    whole = np.stack([words >> np.uint64(40), (words >> np.uint64(16)) & np.uint64(2**24 - 1)], -1) * 2.0**-24
    np.testing.assert_array_equal(step_uniforms(7, steps, 3), whole.astype(np.float32))
    np.testing.assert_array_equal(step_uniforms(7, steps, 3)[UNIFORM_CHUNK - 2:UNIFORM_CHUNK + 2],
                                  np.stack(list(uniform_steps(7, UNIFORM_CHUNK + 2, 3))[UNIFORM_CHUNK - 2:]))
    tracemalloc.start()
    first = next(uniform_steps(0, 2**20, 64))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert first.shape == (64, 2) and peak < 2**22, peak


@pytest.mark.slow  # ~4 s: the decode step's compilations
def test_greedy_generation_draws_no_uniforms(base, monkeypatch):
    import shared_config.generation as generation

    def refuse(*args):
        raise AssertionError("greedy decoding read Philox")

    monkeypatch.setattr(generation.np.random, "Philox", refuse)
    spec, jm, tm = base
    assert jg.generate(jm, [1, 2, 3], 4) == tg.generate(tm, [1, 2, 3], 4)
