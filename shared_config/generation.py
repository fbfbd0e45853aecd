"""What both twins' generation shares, in numpy: checking the arguments, the seeded uniforms, left padding, stopping
rows at eos."""

from __future__ import annotations

import math
from typing import Iterable, Iterator, Sequence

import numpy as np

from .limits import quote
from .resources import cache_bytes, check_memory, weights_bytes
from .spec import ModelSpec


class GenerationError(ValueError):
    """A generation argument that breaks a rule; the message names it, its value and the rule."""


PROMPT_RULE = "prompt tokens must be integer ids: one sequence of them, or one sequence per row"


def as_prompts(prompt_tokens) -> tuple[list[list[int]], bool]:
    """Prompts as lists of ids, from one sequence of ids or a batch of them (ragged, or [B, P]); and whether it was
    one. Anything else is a GenerationError (None, 5 or a dict were a TypeError or KeyError, [1, [2]] numpy's
    ValueError; a 0-d array, np.array(5) or torch.tensor(5), len()'s TypeError)."""
    if getattr(prompt_tokens, "ndim", None) == 0:
        raise GenerationError(f"{PROMPT_RULE}, not a 0-d {type_name(prompt_tokens)}")
    if (isinstance(prompt_tokens, (str, bytes, dict)) or not hasattr(prompt_tokens, "__len__")
            or not hasattr(prompt_tokens, "__getitem__")):  # a set: else 'set' object is not subscriptable
        raise GenerationError(f"{PROMPT_RULE}, not {type(prompt_tokens).__name__}")
    single = len(prompt_tokens) > 0 and np.ndim(prompt_tokens[0]) == 0
    return [_ids(p) for p in ([prompt_tokens] if single else prompt_tokens)], single


def _ids(prompt) -> list[int]:
    try:
        ids = np.asarray(prompt)
    except ValueError:  # ragged inside one prompt: [1, [2]]
        raise GenerationError(PROMPT_RULE) from None
    # a bool among ints ([True, 1]) was read as id 1: numpy makes that list an int array
    bools = any(isinstance(t, (bool, np.bool_)) for t in (prompt if isinstance(prompt, (list, tuple)) else ()))
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu") or bools:
        raise GenerationError(PROMPT_RULE)
    return ids.astype(np.int64).tolist()


def check_generation(spec: ModelSpec, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                     eos_id: int | None = None) -> None:
    """Raise GenerationError unless the prompts fit the model and the settings make sense; the defaults are the twins'
    `generate`'s, where None is a value (unchecked, temperature=None would be a TypeError from abs(), seed=None a
    ValueError in JAX and a RuntimeError in torch), and top_k, top_p, eos_id None: not set. ResourceError where the
    decoding cache and the weights (twice: numpy's and the twin's) cannot fit this machine's memory
    (`resources.cache_bytes`)."""
    require(is_int(max_new_tokens, 1), "max_new_tokens", max_new_tokens, "an integer >= 1")
    require(is_number(temperature, 0), "temperature", temperature, "a finite number >= 0 (0: greedy)")
    require(top_k is None or is_int(top_k, 1), "top_k", top_k, "an integer >= 1")
    require(top_p is None or is_number(top_p, 0, 1) and top_p > 0, "top_p", top_p, "a number in (0, 1]")
    require(is_int(seed, 0, 2**32 - 1), "seed", seed, "an integer in 0..2**32-1")
    require(eos_id is None or is_int(eos_id, 0, spec.V - 1), "eos_id", eos_id, f"a token id in 0..{spec.V - 1}")
    if not prompts or min(map(len, prompts)) == 0:
        raise GenerationError("every prompt needs at least one token")
    for i, prompt in enumerate(prompts):
        bad = [t for t in prompt if not 0 <= t < spec.V]
        if bad:
            raise GenerationError(f"prompt {i}: token id {bad[0]} is outside the vocabulary 0..{spec.V - 1}")
    # in Python ints: numpy's wrap (np.uint64(2**64 - 1) + 3 is 2) or overflow (np.int8(2), a valid count, was an
    # OverflowError from the memory estimate)
    longest, max_new_tokens = max(map(len, prompts)), int(max_new_tokens)
    if longest + max_new_tokens > spec.max_seq_len:
        raise GenerationError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds max_seq_len={spec.max_seq_len}"
        )
    # before the cache is allocated: max_new_tokens 10**9 at max_seq_len 2**31 - 1 asked the kernel for 128 GB
    rows, slots = len(prompts), longest + max_new_tokens - 1
    check_memory(2 * weights_bytes(spec) + cache_bytes(spec, rows, slots),
                 f"decoding {rows} rows with a cache of {slots:,} slots ({spec.L} layers)",
                 "generate fewer new tokens (max_new_tokens, --max-new-tokens), or fewer or shorter prompts")


def check_model(model, own: type, error: type[Exception] = GenerationError) -> None:
    """Refuse (`error`) a model that is not the twin's own `Transformer` (`own`) where a twin's `generate`, `stream` or
    `Decoder` (GenerationError) or `to_safetensors` (TypeError) is given one: unchecked, None would be an
    AttributeError ('NoneType' object has no attribute 'spec'), the other twin's model a message about a cache from
    deep inside the steps, or an IndexError (JAX) or AttributeError (torch) from inside the framework when saved."""
    if not isinstance(model, own):
        raise error(f"model must be a {own.__module__.split('.')[0]}.Transformer, not {type_name(model)}")


def type_name(x) -> str:
    """`x`'s type as a message names it: `list`, `numpy.ndarray`, `torch.Tensor`, `jaxlib.ArrayImpl`."""
    kind = type(x)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__.split('.')[0]}.{kind.__name__}"


def require(ok: bool, name: str, value, rule: str) -> None:
    """GenerationError naming `value` as Python writes it, an int by `quote` (seed=10**400 was echoed whole, and
    10**5000 raised ValueError from repr: past Python's 4,300 digits)."""
    if not ok:
        raise GenerationError(f"{name}={quote(value) if type(value) is int else repr(value)} must be {rule}")


def is_int(x, lo: int, hi: int | None = None) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and lo <= x and (hi is None or x <= hi)


def is_number(x, lo: float, hi: float | None = None) -> bool:
    """Whether `x` is a real number in lo..hi, finite in float64: an int past its range (temperature=10**400) is not
    (math.isfinite raised OverflowError)."""
    if not isinstance(x, (int, float, np.integer, np.floating)) or isinstance(x, bool):
        return False
    try:
        finite = math.isfinite(x)
    except OverflowError:
        return False
    return finite and lo <= x and (hi is None or x <= hi)


def check_drawn(next_B: np.ndarray, step: int) -> None:
    """Raise GenerationError where a twin's `sample` marked a row -1: its logits held a NaN or were all -inf."""
    if (bad := np.flatnonzero(np.asarray(next_B) < 0)).size:
        raise GenerationError(f"new token {step + 1}: the logits of row {bad[0]} hold a NaN or are all -inf "
                              "(non-finite weights?): no token can be drawn")


UNIFORM_CHUNK = 256  # steps of uniforms made at a time


def uniform_steps(seed: int, steps: int, batch: int) -> Iterator[np.ndarray]:
    """The uniforms that seeded sampling draws with, one step [B, 2] float32 in [0, 1) at a time, `steps` of them, two
    per draw (each twin's `sample` takes a step's [B, 2]: one picks a block of tokens, the other a token in it, see
    `draw_blocks`): bits 40..63 and 16..39 of one 64-bit word of numpy's Philox seeded by `seed`, times 2**-24, so
    every value is exact in float32 and below 1. Row b reads its own stream, the generator advanced by b·2**64
    counters, so a row's draws do not depend on how many rows are sampled beside it (a prompt sampled alone or as row
    0 of a batch gets the same tokens, as greedy decoding does). Philox's docstring guarantees that a fixed seed always
    gives the same integer stream; the words are read raw (`random_raw`) and the bits cut by integer arithmetic,
    because `Generator`'s methods may change their algorithms between numpy versions (numpy's compatibility policy).
    A seed numpy refuses (negative, not an integer) is refused first by `check_generation`.

    Made UNIFORM_CHUNK steps at a time (Philox's raw stream is the same read in pieces): made whole up front they took
    ~50 bytes and ~200 ns per step and row before the first token, 3 GiB and 13 s at max_new_tokens 2**20 with 64
    rows, however early eos stopped the rows."""
    rows = [np.random.Philox(seed).advance(b * 2**64) for b in range(batch)]
    for start in range(0, steps, UNIFORM_CHUNK):
        n = min(UNIFORM_CHUNK, steps - start)
        words = np.array([row.random_raw(n) for row in rows], np.uint64).reshape(batch, n).T  # [n, B]
        bits = (words[..., None] >> np.array([40, 16], np.uint64)) & np.uint64(2**24 - 1)
        yield from (bits.astype(np.float32) * np.float32(2.0**-24)).astype(np.float32)


def draw_blocks(V: int) -> tuple[int, int]:
    """The twins' `draw` picks a block of S = ceil(sqrt(V)) tokens (N of them, the last padded with weights 0), then a
    token in it, each with its own uniform: (S, N). Where the twins' float32 running sums round apart, a draw can
    differ only at the N + S boundaries it crosses, not at all V (~2**-25 each)."""
    S = math.isqrt(V - 1) + 1
    return S, -(-V // S)


def in_float32(x: float) -> float:
    """`x` as float32 rounds it, with inf for values past float32's range (casting those warns in numpy and JAX); a
    Python float, also for a numpy scalar (np.float16(0.7) warned 'overflow encountered in cast': numpy compared it
    with float32's largest cast to float16)."""
    try:
        x = float(x)
    except OverflowError:  # an int past float64's range
        return math.inf if x > 0 else -math.inf
    return x if abs(x) <= float(np.finfo(np.float32).max) else math.copysign(math.inf, x)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Prompts as one [B, P] array padded on the left with `pad_id`, and the slot where each row starts [B]."""
    P = max(map(len, prompts))
    tokens_BP = np.full((len(prompts), P), pad_id, dtype=np.int32)
    start_B = np.array([P - len(p) for p in prompts], dtype=np.int32)
    for row, p in zip(tokens_BP, prompts):
        row[P - len(p):] = p
    return tokens_BP, start_B


def stop_at_eos(steps: Iterable[np.ndarray], eos_id: int | None) -> Iterator[np.ndarray]:
    """Pass each step's tokens [B] on, rows that have emitted `eos_id` repeating it; end when every row has."""
    done_B = None
    for next_B in steps:
        if eos_id is not None:
            done_B = np.zeros(next_B.shape, bool) if done_B is None else done_B
            next_B = np.where(done_B, eos_id, next_B)
            done_B = done_B | (next_B == eos_id)
        yield next_B
        if done_B is not None and done_B.all():
            return


def collect(steps: Iterable[np.ndarray], prompt_tokens, eos_id: int | None) -> list:
    """Each row's new tokens up to and including its first `eos_id`; one list for one prompt, else one per row."""
    rows = [list(map(int, row)) for row in np.stack(list(steps), axis=1)]
    if eos_id is not None:
        rows = [row[: row.index(eos_id) + 1] if eos_id in row else row for row in rows]
    return rows[0] if as_prompts(prompt_tokens)[1] else rows
