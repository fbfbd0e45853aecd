"""generate() in both twins: identical greedy continuations with per-step logits that agree at the
forward tolerance; seeded sampling that respects top-k and top-p; per-row stops at eos; checked arguments."""

import re

import jax.numpy as jnp

import numpy as np
import pytest
import torch

import jax_model
import torch_model
from jax_model import generate as jg
from shared_config.generation import GenerationError, uniform_steps
from shared_config.tokens import TokenError
from torch_model import generate as tg

from ..support.common import FORWARD_TOL, HYBRID, MIXERS, make_spec, parity_weights, rel_err, tokens


def twins(spec, attention=("einsum", "einsum")):
    w = parity_weights(spec)
    return jax_model.from_weights(w, spec, attention[0]), torch_model.from_weights(w, spec, attention[1])


@pytest.fixture(scope="module")
def base():
    """The base spec and its two models, shared by the tests that need no particular architecture."""
    spec = make_spec()
    return (spec, *twins(spec))


def step_logits(decoder, prompt, continuation):
    """The logits [N, V] that chose each token of `continuation`, teacher-forced through the decoder."""
    cache = decoder.init_cache(1, len(prompt) + len(continuation) - 1)
    logits_BV, cache = decoder.prefill(np.asarray([prompt]), cache)
    steps = [np.asarray(logits_BV)[0]]
    for token in continuation[:-1]:
        logits_BV, cache = decoder.decode_step(np.asarray([token]), cache)
        steps.append(np.asarray(logits_BV)[0])
    return np.stack(steps)


SPECS = [{}, {"position": "learned", "norm_type": "dyt", "norm_placement": "peri", "qk_norm": True, "n_kv_heads": 1}]


@pytest.mark.parametrize("changes", SPECS, ids=["rope-gqa", "learned-dyt-peri-qknorm-mqa"])
def test_twins_generate_the_same_greedy_continuation(changes):
    spec = make_spec(**changes)
    jm, tm = twins(spec, ("xla", "sdpa"))
    prompt = list(tokens(spec, 1, 40)[0])
    j, t = jg.generate(jm, prompt, 80), tg.generate(tm, prompt, 80)
    assert j == t and len(j) == 80
    jl, tl = step_logits(jg.Decoder(jm), prompt, j), step_logits(tg.Decoder(tm), prompt, t)
    errs = [rel_err(jl[i], tl[i]) for i in range(len(j))]
    assert max(errs) <= FORWARD_TOL, f"step {int(np.argmax(errs))}: {max(errs):.2e}"
    assert (jl.argmax(-1) == np.asarray(j)).all()  # the logits chose the tokens: greedy is their argmax


@pytest.mark.slow
def test_batch_of_ragged_prompts_generates_each_row_as_alone():
    spec = make_spec(position="learned")
    jm, tm = twins(spec)
    prompts = [list(tokens(spec, 1, n, seed=n)[0]) for n in (11, 3, 7)]
    for model, gen in [(jm, jg), (tm, tg)]:
        assert gen.generate(model, prompts, 20) == [gen.generate(model, p, 20) for p in prompts]


def test_each_row_stops_at_eos(base):
    spec, jm, tm = base
    prompts = [list(tokens(spec, 1, n, seed=n)[0]) for n in (9, 6)]
    free = jg.generate(jm, prompts, 24)
    eos = free[0][5]  # row 0 stops at its 6th token (or earlier, if it drew that token before)
    for model, gen in [(jm, jg), (tm, tg)]:
        rows = gen.generate(model, prompts, 24, eos_id=eos)
        for row, unstopped in zip(rows, free):
            stop = unstopped.index(eos) + 1 if eos in unstopped else len(unstopped)
            assert row == unstopped[:stop]
        assert len(rows[0]) <= 6


def test_sampling_is_seeded_and_top_k_1_is_greedy(base):
    spec, jm, tm = base
    prompt = list(tokens(spec, 1, 12)[0])
    for model, gen in [(jm, jg), (tm, tg)]:
        a, b = (gen.generate(model, prompt, 24, temperature=1.0, seed=1),
                gen.generate(model, prompt, 24, temperature=1.0, seed=1))
        assert a == b
        assert a != gen.generate(model, prompt, 24, temperature=1.0, seed=2)
        assert gen.generate(model, prompt, 24, temperature=0.7, top_k=1, seed=3) == gen.generate(model, prompt, 24)


def test_filter_logits_keeps_the_top_k_and_the_top_p_set():
    # probabilities 0.5, 0.3, 0.15, 0.05, in a shuffled order
    logits = np.log(np.array([[0.15, 0.5, 0.05, 0.3]], np.float32))
    cases = [  # (top_k, top_p) -> tokens kept
        ((None, None), {0, 1, 2, 3}), ((2, None), {1, 3}), ((None, 0.5), {1}), ((None, 0.79), {1, 3}),
        ((None, 0.81), {0, 1, 3}), ((3, 0.99), {0, 1, 3}), ((None, 1.0), {0, 1, 2, 3}), ((9, None), {0, 1, 2, 3}),
    ]
    for (top_k, top_p), kept in cases:
        j = np.asarray(jg.filter_logits(jnp.asarray(logits), top_k, top_p))[0]
        t = tg.filter_logits(torch.as_tensor(logits), top_k, top_p).numpy()[0]
        assert set(np.flatnonzero(np.isfinite(j))) == kept == set(np.flatnonzero(np.isfinite(t))), (top_k, top_p)
        np.testing.assert_array_equal(j[list(kept)], logits[0, list(kept)])


def test_samples_stay_inside_top_k_and_top_p():
    """4000 draws over a 97-token vocabulary: every draw is one of the kept tokens, and every kept token is drawn."""
    logits = np.random.default_rng(0).standard_normal((4000, 97)).astype(np.float32)
    logits[:] = logits[0]  # one distribution, drawn 4000 times
    top5 = set(np.argsort(-logits[0])[:5])
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()
    order = np.argsort(-p)
    top_p_set = set(order[: int(np.searchsorted(np.cumsum(p[order]), 0.6)) + 1])
    u = next(uniform_steps(0, 1, 4000))
    for top_k, top_p, kept in [(5, None, top5), (None, 0.6, top_p_set)]:
        j = np.asarray(jg.sample(jnp.asarray(logits), jnp.asarray(u), 1.0, top_k, top_p))
        t = tg.sample(torch.as_tensor(logits), torch.as_tensor(u), 1.0, top_k, top_p).numpy()
        assert set(j) == kept == set(t)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_tokens=[5, 97], max_new_tokens=4), "outside the vocabulary"),
    (dict(prompt_tokens=[5] * 120, max_new_tokens=9), "exceeds max_seq_len=128"),
    (dict(prompt_tokens=[[5], []], max_new_tokens=4), "at least one token"),
    (dict(prompt_tokens=[5], max_new_tokens=0), "max_new_tokens=0"),
    (dict(prompt_tokens=[5], max_new_tokens=4, top_p=0.0), "top_p=0.0"),
    (dict(prompt_tokens=[5], max_new_tokens=4, temperature=-1.0), "temperature=-1.0"),
    (dict(prompt_tokens=[5.5], max_new_tokens=4), "integer ids"),
    (dict(prompt_tokens=[True, 5], max_new_tokens=4), "integer ids"),  # True was read as token 1
    (dict(prompt_tokens=[5, [6]], max_new_tokens=4), "integer ids"),  # numpy's ValueError
    (dict(prompt_tokens=None, max_new_tokens=4), "integer ids.*not NoneType"),  # a TypeError from len()
    (dict(prompt_tokens={5, 6}, max_new_tokens=4), "integer ids.*not set"),  # 'set' object is not subscriptable
    (dict(prompt_tokens=[5], max_new_tokens=4, temperature=None), "^temperature=None must be"),  # abs()'s TypeError
    (dict(prompt_tokens=[5], max_new_tokens=4, temperature=1.0, seed=None), "^seed=None must be"),  # Philox(None):
    # fresh entropy from the OS, a sample that never repeats (jax.random and torch.Generator had raised)
    (dict(prompt_tokens=[5], max_new_tokens=4, temperature=1.0, seed=-1), r"^seed=-1 must be an integer in 0"),
    (dict(prompt_tokens=[5], max_new_tokens=4, temperature=1.0, seed=2**32), r"^seed=4294967296 must be"),
    (dict(prompt_tokens=[5], max_new_tokens=4, temperature=1.0, seed=1.5), r"^seed=1\.5 must be"),  # numpy's Philox
    # refuses -1 and 1.5 with a ValueError and a TypeError, and takes 2**32: the range is the twins' rule
    (dict(prompt_tokens={0: 5}, max_new_tokens=4), "integer ids.*not dict"),
    (dict(prompt_tokens=np.array(5), max_new_tokens=4), "integer ids.*not a 0-d numpy.ndarray$"),  # len()'s
    (dict(prompt_tokens=torch.tensor(5), max_new_tokens=4), "integer ids.*not a 0-d torch.Tensor$"),  # TypeError
    (dict(prompt_tokens=[5], max_new_tokens=4, temperature=10**400), r"^temperature=1000000000\.\.\..*\(401 digits\) "
     "must be a finite"),  # math.isfinite's OverflowError, and the number echoed whole
    (dict(prompt_tokens=[5], max_new_tokens=4, temperature=1.0, top_p=-10**400), "^top_p=-1000000000\\.\\.\\."),
    (dict(prompt_tokens=[5], max_new_tokens=4, temperature=1.0, seed=10**5000), "^seed=<an integer of about 5,000 "
     "digits> must be"),  # repr's ValueError (past Python's 4,300 digits)
])
def test_bad_arguments_raise_one_clear_error(base, kwargs, message):
    _, jm, tm = base
    for model, gen in [(jm, jg), (tm, tg)]:
        with pytest.raises(GenerationError, match=message):
            gen.generate(model, **kwargs)


def test_numpy_integer_counts_are_read_as_python_ints(base):
    """max_new_tokens as a numpy integer: np.int8(2), a valid count, was an OverflowError from the memory estimate;
    np.uint64(2**64 - 1) wrapped past the max_seq_len check (3 + it is 2 in uint64) to a TokenError about a cache of 1
    slot. Both twins give np.int8(2)'s tokens as 2's, and name the huge count."""
    _, jm, tm = base
    for model, gen in [(jm, jg), (tm, tg)]:
        assert gen.generate(model, [5, 6], np.int8(2)) == gen.generate(model, [5, 6], 2)
        with pytest.raises(GenerationError, match="^a prompt of 2 tokens plus max_new_tokens=18446744073709551615 "):
            gen.generate(model, [5, 6], np.uint64(2**64 - 1))


def test_a_model_that_is_not_the_twins_own_is_a_generation_error(base):
    """None was an AttributeError ('NoneType' object has no attribute 'spec'); the other twin's model a TokenError
    about its cache from deep inside the steps."""
    _, jm, tm = base
    for gen, other, name in ((jg, tm, "torch_model.Transformer"), (tg, jm, "jax_model.Transformer")):
        own = gen.Transformer.__module__.split(".")[0]
        for model, kind in ((None, "NoneType"), (other, name)):
            with pytest.raises(GenerationError, match=f"^model must be a {own}.Transformer, not {kind}$"):
                gen.generate(model, [1, 2], 4)
            with pytest.raises(GenerationError, match=f"^model must be a {own}.Transformer, not {kind}$"):
                gen.Decoder(model)


BAD_TOKENS = {  # model input -> what the TokenError says
    "past the vocabulary": (np.array([[1, 97]]), "token id 97 is outside the vocabulary 0..96"),
    "negative": (np.array([[1, -1]]), "token id -1 is outside the vocabulary"),
    "float": (np.array([[1.0, 2.0]], np.float32), "integer ids, got dtype float32"),
    "bool": (np.array([[True, False]]), "integer ids, got dtype bool"),
    "rank 1": (np.array([1, 2]), r"rank 2\), got shape \[2\]"),
    "rank 3": (np.array([[[1, 2]]]), r"rank 2\), got shape \[1, 1, 2\]"),
    "empty batch": (np.zeros((0, 3), np.int32), r"of shape \[0, 3\]: needs at least one row of 1 token$"),
    "no time": (np.zeros((1, 0), np.int32), r"of shape \[1, 0\]: needs at least one row of 1 token$"),
    "past max_seq_len": (np.zeros((1, 129), np.int32), "sequence length 129 exceeds max_seq_len=128"),
}


@pytest.mark.parametrize("name", BAD_TOKENS)
def test_bad_tokens_raise_the_same_token_error_in_both_twins(base, name):
    """Unchecked, an id past the vocabulary gave NaN logits in JAX and an IndexError in torch, a negative id read
    another token's row in JAX, an empty batch was a ZeroDivisionError in JAX and empty logits in torch."""
    _, jm, tm = base
    tokens, message = BAD_TOKENS[name]
    with pytest.raises(TokenError, match=message) as j:
        jm(jnp.asarray(tokens))
    with pytest.raises(TokenError, match=message) as t:
        tm(torch.as_tensor(tokens))
    assert str(j.value) == str(t.value)


def test_narrow_integer_tokens_read_the_same_rows_in_both_twins(base):
    _, jm, tm = base
    tokens = np.array([[3, 96, 0]], np.uint8)
    a = np.asarray(jm(jnp.asarray(tokens)))
    b = tm(torch.as_tensor(tokens)).detach().numpy()
    assert rel_err(a, b) <= FORWARD_TOL
    assert rel_err(a, np.asarray(jm(jnp.asarray(tokens, jnp.int32)))) == 0


def test_tokens_that_are_not_an_array_of_the_model_are_the_same_token_error_in_both_twins(base):
    """A list was an AttributeError in both twins; the other twin's array an AttributeError in torch and, in JAX, a
    message about its dtype `torch.int64`."""
    _, jm, tm = base
    says = r"^tokens must be an array of integer ids \[batch, time\] \(numpy, or the model's framework's\), not "
    for model, other, name in ((jm, torch.tensor([[1, 2]]), "torch.Tensor"), (tm, jnp.array([[1, 2]]), "jaxlib.")):
        with pytest.raises(TokenError, match=says + "list$"):
            model([[1, 2]])
        with pytest.raises(TokenError, match=says + name):
            model(other)


@pytest.mark.parametrize("dtype", [np.int64, np.uint16, np.uint32, np.uint64])
def test_numpy_tokens_and_wide_unsigned_ids_read_the_same_rows_in_both_twins(base, dtype):
    """JAX reads numpy ids as they are, torch's twin was an AttributeError on them; a torch tensor of uint16, uint32
    or uint64 ids was a NotImplementedError (torch has no min of them) where JAX read them."""
    _, jm, tm = base
    ids = np.array([[3, 96, 0]], dtype)
    want = np.asarray(jm(jnp.asarray(ids, jnp.int32)))
    assert rel_err(np.asarray(jm(ids)), want) == 0
    assert rel_err(tm(ids).detach().numpy(), want) <= FORWARD_TOL
    assert rel_err(tm(torch.as_tensor(ids)).detach().numpy(), want) <= FORWARD_TOL
    with pytest.raises(TokenError, match="token id 97 is outside") as j:
        jm(np.array([[3, 97]], dtype))
    with pytest.raises(TokenError, match="token id 97 is outside") as t:
        tm(np.array([[3, 97]], dtype))
    assert str(j.value) == str(t.value)


def test_decoders_refuse_ragged_rows_as_a_token_error(base):
    """Rows of unequal lengths were numpy's ValueError about an inhomogeneous shape."""
    _, jm, tm = base
    for decoder in (jg.Decoder(jm), tg.Decoder(tm)):
        with pytest.raises(TokenError, match=r"rows of one length, not \[\[1, 2\], \[3\]\]"):
            decoder.prefill([[1, 2], [3]], decoder.init_cache(2, 8))


@pytest.mark.parametrize("tokens, message", [
    (np.array([[1.7, 2.0]]), "integer ids, got dtype float64"),  # was truncated to ids 1, 2 by the decoders' cast
    (np.array([[5, 97]]), "token id 97 is outside"),
    (np.array([[5, 2**40]]), "token id 1099511627776 is outside"),  # was wrapped to 0 by JAX's int32 cast
])
def test_decoder_checks_ids_on_the_host_before_casting(base, tokens, message):
    _, jm, tm = base
    for decoder in (jg.Decoder(jm), tg.Decoder(tm)):
        with pytest.raises(TokenError, match=message):
            decoder.prefill(tokens, decoder.init_cache(1, 8))
        _, cache = decoder.prefill(np.array([[5, 6]]), decoder.init_cache(1, 8))
        with pytest.raises(TokenError, match="token id 97 is outside"):
            decoder.decode_step(np.array([97]), cache)


@pytest.mark.parametrize("tokens, message", [  # the same TokenError from both twins' Decoder
    ([], r"^tokens must be \[batch, time\] \(rank 2\), got shape \[0\]$"),  # was "got dtype float64"
    ([[]], r"^tokens of shape \[1, 0\]: needs at least one row"),
    ([1, 2], r"^tokens must be \[batch, time\] \(rank 2\), got shape \[2\]$"),
])
def test_decoder_prompts_of_no_token_or_the_wrong_rank_are_named(base, tokens, message):
    _, jm, tm = base
    for decoder in (jg.Decoder(jm), tg.Decoder(tm)):
        with pytest.raises(TokenError, match=message):
            decoder.prefill(tokens, decoder.init_cache(1, 8))


@pytest.mark.parametrize("tokens", [[], [[7]], 7, np.zeros((1, 1), np.int32)])
def test_a_decode_step_takes_one_id_per_row(base, tokens):
    """A step's [[7]] said "tokens must be [batch, time] (rank 2), got shape [1, 1, 1]" (the shape after the step's
    own reshape), and [] "tokens must hold integer ids, got dtype float64"."""
    _, jm, tm = base
    says = r"^a decode step's tokens must be \[batch\] \(rank 1: one id per row, at least one row\), got shape "
    for decoder in (jg.Decoder(jm), tg.Decoder(tm)):
        _, cache = decoder.prefill(np.array([[5, 6]]), decoder.init_cache(1, 8))
        with pytest.raises(TokenError, match=says + re.escape(str(list(np.shape(tokens)))) + "$"):
            decoder.decode_step(tokens, cache)


def test_decoders_refuse_a_step_past_the_last_slot_of_the_cache(base):
    """The cache's length is data inside a compiled step: JAX's jitted decode step wrote past the last slot without
    a word (the length went on to 4, 5 in a cache of 3 slots) and torch's compiled one failed in index_copy_ with an
    IndexError. Each Decoder checks it on the host first, as the eager torch model did."""
    _, jm, tm = base
    for decoder in (jg.Decoder(jm), tg.Decoder(tm), tg.Decoder(tm, compile="aot_eager")):
        _, cache = decoder.prefill(np.array([[5, 6]]), decoder.init_cache(1, 3))
        _, cache = decoder.decode_step(np.array([7]), cache)
        with pytest.raises(TokenError, match="^1 tokens do not fit a cache of 3 slots with 3 written$"):
            decoder.decode_step(np.array([8]), cache)
        with pytest.raises(TokenError, match="^2 tokens do not fit a cache of 3 slots with 3 written$"):
            decoder.prefill(np.array([[5, 6]]), cache)


def test_a_cache_length_off_the_cpu_is_never_read():
    """Reading the length of a cache on an accelerator waits for the device: `Decoder` checks the cache's room before
    every step, so JAX's decode steps would have run one at a time (torch's were never read there). Both twins leave
    the length unread off the CPU; here a length that raises when read, on a device that is not a CPU."""
    from types import SimpleNamespace

    from jax_model.model import cache_length as jax_length
    from torch_model.model import cache_length as torch_length

    class OnAGpu:  # a jax.Array on a GPU
        platform = "gpu"  # as a jax.Device's

        def devices(self):  # as jax.Array.devices(): the set of devices holding it
            return {self}

        def __int__(self):
            raise AssertionError("read the length on the device")

    assert jax_length(SimpleNamespace(length=OnAGpu())) is None
    assert torch_length(SimpleNamespace(length=torch.zeros((), dtype=torch.int64, device="meta"))) is None
    assert jax_length(SimpleNamespace(length=jnp.asarray(3))) == 3  # on the CPU: read
    assert torch_length(SimpleNamespace(length=torch.tensor(3))) == 3


def test_an_unknown_remat_is_named_by_both_twins(base):
    _, jm, tm = base
    for call in (lambda: jm(jnp.asarray([[1, 2]]), remat="blok"), lambda: tm(torch.as_tensor([[1, 2]]), remat="blok")):
        with pytest.raises(ValueError, match="remat='blok' must be one of none, block, full"):  # was KeyError 'blok'
            call()


@pytest.mark.parametrize("name", ["taps", "aux"])
def test_taps_or_aux_that_is_not_a_dict_is_named_by_both_twins(base, name):
    """The model fills them: a list was a TypeError 'list indices must be integers or slices, not str' from inside a
    block (aux: on a routed spec only; elsewhere a list was taken without a word)."""
    _, jm, tm = base
    for call in (lambda: jm(jnp.asarray([[1, 2]]), **{name: []}), lambda: tm(torch.as_tensor([[1, 2]]), **{name: []})):
        with pytest.raises(TypeError, match=f"^{name} must be a dict, which the model fills, or None; not list$"):
            call()


@pytest.mark.parametrize("value, shown", [("no", "str 'no'"), (0, "int 0"), (None, "NoneType null")])
def test_logits_that_is_not_a_bool_is_named_by_both_twins(base, value, shown):
    """`m(tokens, logits="no")` took the string as true and returned logits; 0 and None are no bool either."""
    _, jm, tm = base
    for call in (lambda: jm(jnp.asarray([[1, 2]]), logits=value), lambda: tm(torch.as_tensor([[1, 2]]), logits=value)):
        with pytest.raises(TypeError, match=re.escape(f"logits must be True (logits [B, T, V]) or False (the final "
                                                      f"hidden states [B, T, D]), not {shown}")):
            call()
    assert jm(jnp.asarray([[1, 2]]), logits=np.bool_(False)).shape[-1] == jm.spec.D  # numpy's bool is a bool


LONG = 2**31 - 1  # a max_seq_len that lets max_new_tokens ask for any cache


@pytest.mark.parametrize("changes", [{}, HYBRID], ids=["attention", "hybrid"])
def test_a_cache_past_the_machines_memory_is_refused_before_it_is_made(changes, monkeypatch):
    """max_new_tokens 10**9 at max_seq_len 2**31 - 1 asked the kernel for a 128 GB cache, refused by it only where it
    does not overcommit; both twins now refuse it by the cache's size (resources.cache_bytes) before any step. A
    GLA layer's state does not grow with the slots, so a pure GLA model's cache is the same at any length."""
    from shared_config import resources

    monkeypatch.setattr(resources, "accelerator_present", lambda: False)
    monkeypatch.setattr(resources, "machine_memory", lambda: (16 * 2**30, "of memory on this machine"))
    spec = make_spec(**changes, max_seq_len=LONG)
    for gen, model in zip((jg.generate, tg.generate), twins(spec)):
        with pytest.raises(resources.ResourceError, match=r"^decoding 1 rows with a cache of 1,000,000,001 slots"):
            gen(model, [1, 2], 10**9)
    slot = spec.layer_mixers["attention"] * 2 * spec.K * spec.E * 4  # keys and values, float32
    assert resources.cache_bytes(spec, 1, 11) - resources.cache_bytes(spec, 1, 1) == 10 * slot
    gla = make_spec(**MIXERS["gla"], max_seq_len=LONG)
    assert resources.cache_bytes(gla, 3, 10**9) == resources.cache_bytes(gla, 3, 1) > 0
    for model in twins(make_spec(**changes)):  # a Decoder's own cache (init_cache), rows or slots
        for rows, slots in ((10**9, 128), (1, 10**9)):
            with pytest.raises((resources.ResourceError, TokenError), match=r"^a cache of 1"):
                model.init_cache(rows, slots)


@pytest.mark.parametrize("changes", [{}, MIXERS["gla"], HYBRID], ids=["attention", "gla", "hybrid"])
def test_a_cache_weighs_what_both_twins_make(changes, monkeypatch):
    """resources.cache_bytes, read before a cache is made, is the bytes of the state arrays (every layer's [B, S, K, E]
    keys and values, GLA's [B, H, K', V'] state) that both twins' init_cache then make: a count from the layout table
    (state_layout, state_arrays) that left out values, or counted GLA's state per slot, would not be."""
    from shared_config import resources

    monkeypatch.setattr(resources, "accelerator_present", lambda: False)
    spec = make_spec(**changes)
    for model in twins(spec):
        leaves = [leaf for layer in model.init_cache(3, 7).layers for leaf in layer if leaf is not None]
        made = sum(leaf.nbytes for leaf in leaves if leaf.ndim == 4)  # the states; not the lengths or slot markers
        assert made == resources.cache_bytes(spec, 3, 7) > 0, type(model)
