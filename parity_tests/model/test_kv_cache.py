"""Cached decoding, in each twin: a prefill and then one token at a time give the uncached
full-sequence logits at every step, for every position scheme, GQA width, qk-norm, norm type and
placement; left padding leaves each row's result as it is alone; the decode step compiles once."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jax_model
import torch_model
from jax_model.generate import Decoder as JaxDecoder
from shared_config.generation import left_pad
from shared_config.spec import CHOICES
from torch_model.generate import Decoder as TorchDecoder

from ..support import oracles
from ..support.common import (FORWARD_TOL, HYBRID, HYBRID_GQA, MIXERS, case_ids, jax_steps, make_spec, parity_weights,
                              quick_first, rel_err, tokens, torch_steps)

CASES = [
    {},  # RoPE, GQA with 2 kv heads
    {"position": "learned"},
    {"position": "none"},
    {"n_kv_heads": 1},
    {"n_kv_heads": 6},
    {"qk_norm": True, "head_dim": 10},
    {"fused_qkv": False, "tie_embeddings": True, "embed_scale": "learnable"},
    {"rope_scaling": "llama3", "rope_scaling_factor": 4.0, "rope_original_max_seq_len": 16},
]
# Every norm type and every placement (norms act per token; placement decides what the cache sees).
CASES += [
    {"norm_placement": "peri"},
    {"norm_placement": "post"},
    {"norm_type": "layernorm", "norm_bias": True},
    {"norm_type": "dyt", "norm_placement": "peri", "embed_norm": True},  # Peri-LN as published: its embedding norm too
    {"norm_type": "dyt", "norm_placement": "post", "norm_bias": True},
    {"norm_type": "derf", "norm_placement": "post"},
    {"norm_placement": "deepnorm"},
    {"norm_placement": "hybrid"},  # V normed per head before it enters the cache
    {"norm_type": "dyt", "norm_placement": "hybrid_star", "n_kv_heads": 1},
    {"norm_type": "layernorm", "norm_placement": "pre_post"},
]
# Every other token mixer: its own decoding state (block.empty_state) in place of keys and values.
CASES += [{**MIXERS["gla"], "norm_placement": "peri"}]
CASES += [HYBRID, {**HYBRID, "position": "none", "gla_attention_every": 3}]  # hybrid stacks: each layer its own state
CASES += [HYBRID_GQA]  # the attention layer's cache holds K key/value heads
P, N = 20, 12  # prompt tokens, then decode steps


def test_cases_hold_every_norm_type_and_placement():
    """CASES and RAGGED are written by hand: a norm type, placement or mixer added to the spec's CHOICES fails here
    until a case decodes with it (and, for a mixer, until its left-padded rows decode as alone)."""
    specs = [make_spec(**c) for c in CASES]
    for key in ("norm_type", "norm_placement", "mixer"):
        missing = set(CHOICES[key]) - {getattr(s, key) for s in specs}
        assert not missing, f"no KV-cache case with {key} in {sorted(missing)}"
    missing = set(CHOICES["mixer"]) - {make_spec(**c).mixer for c in RAGGED}
    assert not missing, f"no left-padding case (RAGGED) with mixer in {sorted(missing)}"



def check_cached_equals_uncached(spec, attention=("einsum", "einsum"), seq=P + N, prompt=P):
    w, toks = parity_weights(spec), tokens(spec, 2, seq)
    jm, tm = jax_model.from_weights(w, spec, attention[0]), torch_model.from_weights(w, spec, attention[1])
    for name, (cached, cache), uncached in [
        ("jax", jax_steps(jm, toks, prompt), np.asarray(nnx.jit(lambda m, t: m(t))(jm, jnp.asarray(toks)))),
        ("torch", torch_steps(tm, toks, prompt), tm(torch.as_tensor(toks)).detach().numpy()),
    ]:
        assert uncached.std() > 0.5, "test weights must give O(1) logits so that the tolerance means something"
        errs = [rel_err(cached[:, t], uncached[:, t]) for t in range(seq)]
        assert max(errs) <= FORWARD_TOL, (f"{name}: cached vs uncached, worst at step {int(np.argmax(errs))}: "
                                          f"{max(errs):.2e}")
        if spec.mixer == "attention":  # another mixer's state is its own (block.empty_state)
            assert tuple(cache.layers[0].k_BSKE.shape) == (2, seq, spec.K, spec.E)  # GQA-sized: K heads, not H
        assert int(cache.length) == seq


@pytest.mark.parametrize("changes", quick_first(CASES), ids=case_ids(CASES))
def test_cached_decoding_equals_uncached(changes):
    check_cached_equals_uncached(make_spec(**changes))


@pytest.mark.parametrize("attention", [("xla", "sdpa"), ("xla", "flash")], ids=["xla-sdpa", "xla-flash"])
def test_fused_kernels_take_the_cache_mask(attention):
    """XLA and SDPA read the cache through an explicit mask; flash (no arbitrary masks) falls back to SDPA."""
    check_cached_equals_uncached(make_spec(qk_norm=True), attention)


def test_long_prompt_where_rope_offsets_show():
    """A prompt of 180 tokens, then decode steps at positions 180..199."""
    check_cached_equals_uncached(make_spec(max_seq_len=256, n_layers=1), seq=200, prompt=180)


RAGGED = [{}, {"position": "learned", "norm_placement": "post"}, MIXERS["gla"], HYBRID]


@pytest.mark.parametrize("changes", quick_first(RAGGED), ids=case_ids(RAGGED))
def test_left_padding_leaves_each_row_as_alone(changes):
    """Prompts of 13, 5 and 9 tokens in one batch: each row's logits at every step are its unbatched ones."""
    spec = make_spec(**changes)
    prompts = [list(tokens(spec, 1, n, seed=n)[0]) for n in (13, 5, 9)]
    check_rows_decode_as_alone(spec, parity_weights(spec), prompts, tokens(spec, 3, 6, seed=1))


def check_rows_decode_as_alone(spec, w, prompts, fed_BN):
    """Left-pad `prompts` into one batch, prefill, feed `fed_BN` (N tokens per row) step by step, in both twins:
    each row's logits at every step are those of the row decoded alone."""
    for twin, Decoder in [(jax_model, JaxDecoder), (torch_model, TorchDecoder)]:
        decoder = Decoder(twin.from_weights(w, spec, "einsum"))

        def run(rows, fed_rows):
            tokens_BP, start_B = left_pad(rows, pad_id=7)  # a real token id as padding: the mask must hide it
            cache = decoder.init_cache(len(rows), tokens_BP.shape[1] + fed_rows.shape[1], start_B)
            logits_BV, cache = decoder.prefill(tokens_BP, cache)
            steps = [np.asarray(logits_BV)]
            for t in range(fed_rows.shape[1]):
                logits_BV, cache = decoder.decode_step(fed_rows[:, t], cache)
                steps.append(np.asarray(logits_BV))
            return np.stack(steps, axis=1)

        batched = run(prompts, fed_BN)
        for b, prompt in enumerate(prompts):
            alone = run([prompt], fed_BN[b : b + 1])
            assert rel_err(batched[b], alone[0]) <= FORWARD_TOL, (twin.__name__, b, rel_err(batched[b], alone[0]))


POSITION_SPECS = [{}, {"qk_norm": True, "norm_placement": "post"}]


def cache_positions_of(twin: str, spec, prompts, fed_BN):
    """Left-pad `prompts`, prefill and feed `fed_BN` in `twin`; (the RoPE position each slot's key was rotated to,
    read off layer 0's cache against the reference's unrotated keys (-1 on padding), the expected ones, worst fit)."""
    package, Decoder = {"jax": (jax_model, JaxDecoder), "torch": (torch_model, TorchDecoder)}[twin]
    w = parity_weights(spec)
    decoder = Decoder(package.from_weights(w, spec, "einsum"))
    tokens_BP, start_B = left_pad(prompts, pad_id=7)
    cache = decoder.init_cache(len(prompts), tokens_BP.shape[1] + fed_BN.shape[1], start_B)
    _, cache = decoder.prefill(tokens_BP, cache)
    for t in range(fed_BN.shape[1]):
        _, cache = decoder.decode_step(fed_BN[:, t], cache)
    k_BSKE = np.asarray(cache.layers[0].k_BSKE, np.float64)
    got, want, worst = -np.ones(k_BSKE.shape[:2], int), -np.ones(k_BSKE.shape[:2], int), 0.0
    for b, prompt in enumerate(prompts):
        start, row = int(start_B[b]), [*prompt, *fed_BN[b]]  # the row's own tokens: slot start + i holds token i
        positions, errors = oracles.cache_positions(k_BSKE[b, start:], oracles.layer0_keys(w, spec, row), spec,
                                                    k_BSKE.shape[1])
        got[b, start:], want[b, start:], worst = positions, np.arange(len(row)), max(worst, errors.max())
    return got, want, worst


@pytest.mark.parametrize("changes", POSITION_SPECS, ids=case_ids(POSITION_SPECS))
@pytest.mark.parametrize("twin", ["jax", "torch"])
def test_left_padded_rows_get_their_own_positions(twin, changes):
    """Under RoPE a shift of all of a row's positions leaves its outputs as they are, so read the positions
    themselves: row b's i-th token is rotated to position i in the cache, whatever the row's left padding."""
    spec = make_spec(**changes)
    prompts = [list(tokens(spec, 1, n, seed=n)[0]) for n in (11, 4, 7)]
    got, want, worst = cache_positions_of(twin, spec, prompts, tokens(spec, 3, 3, seed=1))
    assert worst <= 1e-5, f"{twin}: a cached key is no rotation of its token's key (worst fit {worst:.1e})"
    assert np.array_equal(got, want), f"{twin}: positions in the cache\n{got}\nexpected\n{want}"


def test_jax_decode_step_compiles_once():
    spec = make_spec()
    decoder = JaxDecoder(jax_model.from_weights(parity_weights(spec), spec, "einsum"))
    cache = decoder.init_cache(2, 40)
    logits_BV, cache = decoder.prefill(tokens(spec, 2, 8), cache)
    logits_BV, cache = decoder.decode_step(np.asarray(logits_BV).argmax(-1), cache)
    compiled = decoder._decode._cache_size()  # the jitted step is shared by models of this architecture
    for _ in range(30):
        logits_BV, cache = decoder.decode_step(np.asarray(logits_BV).argmax(-1), cache)
    assert int(cache.length) == 39
    assert decoder._decode._cache_size() == compiled, "the decode step compiled again at a later position"


COMPILED = [{}, *(m for name, m in MIXERS.items() if name != "attention"), {"routing": "mod"}, {"routing": "dtf"}]


def test_the_compiled_cases_hold_every_mixer_and_routing_kind():
    assert {make_spec(**c).mixer for c in COMPILED} == set(CHOICES["mixer"])
    assert {make_spec(**c).routing for c in COMPILED} == set(CHOICES["routing"])


@pytest.mark.parametrize("changes", quick_first(COMPILED), ids=case_ids(COMPILED))
def test_torch_decode_step_compiles_once_without_graph_breaks(changes):
    """torch.compile with fullgraph (a graph break raises) on the aot_eager backend: it traces through
    dynamo and AOTAutograd as inductor does, without inductor's C++ compile time. Each mixer's decoding state and a
    routed layer's cache go through the compiled step (torch 2.11 failed on a cache rebuilt with `_replace`)."""
    spec = make_spec(**changes)
    model = torch_model.from_weights(parity_weights(spec), spec, "sdpa")
    toks = tokens(spec, 2, 18)
    compiled, eager = TorchDecoder(model, compile="aot_eager"), TorchDecoder(model)

    def step(t, states):
        states = [d.decode_step(toks[:, t], cache) for d, (_, cache) in zip((compiled, eager), states)]
        assert rel_err(states[0][0].numpy(), states[1][0].numpy()) <= FORWARD_TOL
        return states

    states = [d.prefill(toks[:, :8], d.init_cache(2, 18)) for d in (compiled, eager)]
    states = step(8, states)  # compiles the decode step
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in range(9, 18):
            states = step(t, states)


@pytest.fixture(scope="module")
def small_twins():
    spec = make_spec(max_seq_len=16)
    w = parity_weights(spec)
    return jax_model.from_weights(w, spec), torch_model.from_weights(w, spec)


@pytest.mark.parametrize("args, says", [
    ((0, 4), "a cache's batch=0 must be an integer >= 1"),  # was made, for no row
    ((True, 4), "a cache's batch=true must be an integer >= 1"),  # JAX made one row, torch a TypeError
    ((1, 4.0), "a cache of 4.0 slots must hold 1..max_seq_len=16"),
    ((1, 17), "a cache of 17 slots must hold 1..max_seq_len=16"),
    ((2, 4, [0]), r"start_B must be 2 integer slots, one per row; got \[0\]"),  # was made, rows reading no start
    ((2, 4, [0.5, 0]), r"start_B must be 2 integer slots"),  # was truncated to 0
    ((2, 4, [4, 0]), r"start_B=\[4, 0\] must be slots in 0..3"),
    ((2, 4, [[0], [1, 2]]), r"start_B must be 2 integer slots, one per row; got \[\[0\], \[1, 2\]\]"),  # numpy's
    # ValueError about an inhomogeneous shape
])
def test_a_cache_that_cannot_be_made_is_refused_by_both_twins(small_twins, args, says):
    from shared_config.tokens import TokenError

    for model in small_twins:
        with pytest.raises(TokenError, match=says):
            model.init_cache(*args)


def test_numpy_counts_give_a_cache_its_python_size_estimate(small_twins):
    """cache_bytes (init_cache's and generate's memory check) multiplied numpy counts in their own type: np.int8(100)
    rows wrapped (a RuntimeWarning, and an estimate that could let a cache past this machine's memory through)."""
    from shared_config.resources import cache_bytes

    spec = small_twins[0].spec
    assert cache_bytes(spec, np.int8(100), np.int8(16)) == cache_bytes(spec, 100, 16)  # 0 beside an accelerator
    for model in small_twins:
        assert model.init_cache(np.int8(100), np.int8(16)).start_B.shape == (100,)


def test_a_first_write_that_leaves_a_row_without_a_token_is_refused_by_both_twins(small_twins):
    """A row starting at slot 3 (start_B) and a prefill of 2 tokens: that row's logits, read from masked slots only,
    differed between the twins (-0.060 in JAX, -0.038 in torch), and after the next step too, without a word."""
    from shared_config.tokens import TokenError
    from torch_model.generate import Decoder as TorchDecoder

    says = r"^a first write of 2 tokens ends before slot 3, where a row of the cache starts \(init_cache's start_B\)"
    for model, decoder, conv in zip(small_twins, (JaxDecoder, TorchDecoder), (jnp.asarray, torch.as_tensor)):
        for write in (lambda c: model(conv(np.array([[1, 2], [3, 4]])), cache=c),
                      lambda c: decoder(model).prefill(np.array([[1, 2], [3, 4]]), c)):
            with pytest.raises(TokenError, match=says):
                write(model.init_cache(2, 4, [0, 3]))
        assert model(conv(np.array([[1, 2, 3, 4]] * 2)), cache=model.init_cache(2, 4, [0, 3]))[1].length == 4


def test_a_step_past_the_cache_or_of_other_rows_is_refused_by_both_twins(small_twins):
    """A step past the last slot overwrote that slot in JAX (a silently wrong result) and raised an IndexError in
    torch; tokens of other rows than the cache's were a reshape TypeError in JAX, a RuntimeError in torch."""
    from shared_config.tokens import TokenError

    jm, tm = small_twins
    # the cache filled by JAX compiled (op by op, a kernel per op and shape: 3x the time); refused in eager calls
    jax_fill, torch_fill = nnx.jit(lambda m, t, c: m(t, cache=c)), lambda m, t, c: m(t, cache=c)
    for model, conv, fill in ((jm, jnp.asarray, jax_fill), (tm, torch.as_tensor, torch_fill)):
        _, cache = fill(model, conv(np.array([[1, 2, 3]])), model.init_cache(1, 4))
        _, full = fill(model, conv(np.array([[4]])), cache)
        with pytest.raises(TokenError, match="1 tokens do not fit a cache of 4 slots with 4 written"):
            model(conv(np.array([[5]])), cache=full)
        with pytest.raises(TokenError, match="2 tokens do not fit a cache of 4 slots with 3 written"):
            model(conv(np.array([[5, 6]])), cache=cache)
        with pytest.raises(TokenError, match="tokens of 2 rows do not match a cache of 1 rows"):
            model(conv(np.array([[5], [6]])), cache=cache)



def test_a_cache_passed_by_position_is_refused_by_both_twins(small_twins):
    """Every argument after the tokens is a keyword: `model(tokens, cache)` put the cache into `taps` and failed deep
    inside the call ("'KVCache' object does not support item assignment")."""
    for model, conv in ((small_twins[0], jnp.asarray), (small_twins[1], torch.as_tensor)):
        with pytest.raises(TypeError, match="positional argument"):
            model(conv(np.array([[1, 2]])), model.init_cache(1, 4))
        with pytest.raises(TypeError, match="positional argument"):
            model.model(conv(np.array([[1, 2]])), None, model.init_cache(1, 4))

def test_a_cache_of_the_other_twin_or_of_no_twin_is_refused_by_both(small_twins):
    """The other twin's cache, or a tuple, was an AttributeError from deep inside the call (`devices`, `start_B`), in
    the model and in its Decoder."""
    from shared_config.tokens import TokenError

    jm, tm = small_twins
    says = "^cache must be a KVCache made by this model's init_cache, not "
    for model, conv, other, decoder in ((jm, jnp.asarray, tm, JaxDecoder), (tm, torch.as_tensor, jm, TorchDecoder)):
        foreign = other.init_cache(1, 4)
        name = type(foreign).__module__.split(".")[0] + ".KVCache$"
        with pytest.raises(TokenError, match=says + name):
            model(conv(np.array([[1, 2]])), cache=foreign)
        with pytest.raises(TokenError, match=says + "tuple$"):
            model(conv(np.array([[1, 2]])), cache=tuple(model.init_cache(1, 4)))
        with pytest.raises(TokenError, match=says + name):
            decoder(model).prefill(np.array([[1, 2]]), foreign)


@pytest.mark.parametrize("changes, says", [
    ({"n_layers": 1}, "^a cache of 1 layers does not fit this model's n_layers=2"),  # an IndexError
    ({"n_kv_heads": 1}, r"^layer 0 of the cache holds float32 \[1, 4, 1, 8\] \(routing none\) where this model's "
                        r"init_cache makes float32 \[1, 4, 2, 8\]"),  # XLA TypeError, index_copy_ error
    ({"compute_dtype": "bfloat16"}, r"^layer 0 of the cache holds bfloat16 \[1, 4, 2, 8\]"),
    ({"routing": "mod"}, r"^layer 1 of the cache holds .* \(routing mod\) where .* \(routing none\)"),
    # GLA's recurrent state [B, H, K', V'] where keys go (state_layout)
    ({**MIXERS["gla"], "n_heads": 4, "n_kv_heads": None}, r"^layer 0 of the cache holds float32 \[1, 4, 4, 10\] "
                                                            r"\(routing none\) where this model's init_cache makes "
                                                            r"float32 \[1, 4, 2, 8\]"),
])
def test_a_cache_made_by_another_models_init_cache_is_refused_by_both_twins(changes, says):
    from shared_config.tokens import TokenError

    spec = make_spec(n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, max_seq_len=16)
    other = spec.replace(**changes)
    w, w_other = parity_weights(spec), parity_weights(other)
    for twin, conv, decoder in ((jax_model, jnp.asarray, JaxDecoder), (torch_model, torch.as_tensor, TorchDecoder)):
        model, cache = twin.from_weights(w, spec), twin.from_weights(w_other, other).init_cache(1, 4)
        with pytest.raises(TokenError, match=says):
            model(conv(np.array([[1, 2]])), cache=cache)
        with pytest.raises(TokenError, match=says):
            decoder(model).prefill(np.array([[1, 2]]), cache)
