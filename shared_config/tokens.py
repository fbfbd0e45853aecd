"""What a model call reads, token ids and a KV cache: the checks both twins' `TransformerModel`, `init_cache` and
`Decoder` make, with one message each, so that the same bad input raises the same TokenError in either twin.

Left unchecked, the twins disagreed on the same input: an id past the vocabulary gave NaN logits in JAX (`jnp.take`
fills out-of-range rows) and an IndexError in torch; a negative id read another token's row in JAX (wrapped, as numpy
indexing does); float ids were truncated by the decoders' casts; an empty batch raised ZeroDivisionError in JAX and
returned empty logits in torch. A cache for 0 rows, or with a row starting past its last slot, was made; a step past
its last slot overwrote that slot in JAX and raised an IndexError in torch.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .generation import is_int, type_name
from .layout import state_layout
from .limits import quote
from .resources import cache_bytes, check_memory
from .spec import ModelSpec


class TokenError(ValueError):
    """Token ids or a cache a model cannot read: the message names the shape, dtype, id or slot and what was
    expected."""


def check_token_array(shape: Sequence[int], dtype: str, what: str = "tokens", min_time: int = 1) -> None:
    """Refuse `what` that is not a [B, T] array of integer ids with B >= 1 and T >= `min_time` (`dtype`: the
    framework's name without its module, `int32`, `float32`, `bool`). Needs no values: safe under jit and
    compilation."""
    if len(shape) != 2:
        raise TokenError(f"{what} must be [batch, time] (rank 2), got shape {list(shape)}")
    if not dtype.startswith(("int", "uint")):
        raise TokenError(f"{what} must hold integer ids, got dtype {dtype}")
    if shape[0] < 1 or shape[1] < min_time:
        raise TokenError(f"{what} of shape {list(shape)}: needs at least one row of {min_time} token"
                         f"{'s' if min_time > 1 else ''}")


def check_token_type(tokens, own: tuple[type, ...]) -> None:
    """Refuse token ids a model cannot read as an array: a model call takes a numpy array or one of its own
    framework's (`own`). Unchecked, a list would be an AttributeError in both twins; the other twin's array an
    AttributeError in torch and, in JAX, a message about its dtype `torch.int64`; a numpy array an AttributeError in
    torch only."""
    if not isinstance(tokens, (np.ndarray, *own)):
        raise TokenError(f"tokens must be an array of integer ids [batch, time] (numpy, or the model's framework's), "
                         f"not {type_name(tokens)}")


def check_outputs(taps, aux, logits=True) -> None:
    """Refuse a model call's `taps` or `aux` that is neither None nor a dict (TypeError): the model writes into them,
    and a list was a TypeError 'list indices must be integers or slices, not str' from inside a block. `logits` must
    be a bool: the string "no" was taken as true and returned logits."""
    for name, x in (("taps", taps), ("aux", aux)):
        if x is not None and not isinstance(x, dict):
            raise TypeError(f"{name} must be a dict, which the model fills, or None; not {type_name(x)}")
    if not isinstance(logits, (bool, np.bool_)):
        raise TypeError(f"logits must be True (logits [B, T, V]) or False (the final hidden states [B, T, D]), not "
                        f"{type_name(logits)} {quote(logits)}")


def host_rows(tokens_BN):
    """A batch given as a list or tuple of rows (which `Trainer.step` takes, and check_batch checks) as a numpy array
    [B, N]; any other batch as it is. `Trainer.inspect` slices its batch: a list was a TypeError 'list indices must
    be integers or slices, not tuple' from inside it."""
    return np.asarray(tokens_BN) if isinstance(tokens_BN, (list, tuple)) else tokens_BN


def check_cache_type(cache, own: type) -> None:
    """Refuse a cache that is not this twin's `KVCache` (`own`): the other twin's, or a tuple, would otherwise be an
    AttributeError from deep inside the call."""
    if not isinstance(cache, own):
        raise TokenError(f"cache must be a KVCache made by this model's init_cache, not {type_name(cache)}")


def check_token_values(spec: ModelSpec, lo: int, hi: int) -> None:
    """Refuse ids outside 0..V-1, given the smallest (`lo`) and largest (`hi`) id of a call."""
    if lo < 0 or hi >= spec.V:
        raise TokenError(f"token id {lo if lo < 0 else hi} is outside the vocabulary 0..{spec.V - 1}")


def host_tokens(tokens, spec: ModelSpec, step: bool = False) -> np.ndarray:
    """`tokens` (a decoder's [B, P] prompts, or with `step` a decode step's [B] ids, one per row) as a numpy array
    [B, T] of ids in the vocabulary (a step's as [B, 1]), checked before a cast to the step's integer type could
    truncate a float id or wrap a large one; TokenError otherwise."""
    try:
        ids = np.asarray(tokens)
    except (ValueError, TypeError):  # ragged rows, [[1, 2], [3]]: numpy's inhomogeneous-shape ValueError
        raise TokenError(f"tokens must be an array of integer ids, rows of one length, not {quote(tokens)}") from None
    if step and (ids.ndim != 1 or ids.size == 0):  # [[7]] was "must be [batch, time] (rank 2), got shape [1, 1, 1]"
        raise TokenError(f"a decode step's tokens must be [batch] (rank 1: one id per row, at least one row), got "
                         f"shape {list(ids.shape)}")
    ids_BT = ids[:, None] if step else ids
    # an empty list is numpy's float64: named as empty, not as float ids
    check_token_array(ids_BT.shape, "int" if ids.size == 0 else str(ids.dtype))
    check_token_values(spec, int(ids.min()), int(ids.max()))
    return ids_BT


def check_cache_request(spec: ModelSpec, batch, size, start_B) -> np.ndarray | None:
    """Refuse a cache that cannot be made (TokenError): `batch` rows >= 1, `size` slots in 1..max_seq_len, `start_B`
    (None: every row starts at slot 0) one integer slot per row in 0..size-1; `start_B` as numpy. ResourceError for
    a cache past this machine's memory (`resources.cache_bytes`), before it is made."""
    if not is_int(batch, 1):
        raise TokenError(f"a cache's batch={quote(batch)} must be an integer >= 1")
    if not is_int(size, 1, spec.max_seq_len):
        raise TokenError(f"a cache of {quote(size)} slots must hold 1..max_seq_len={spec.max_seq_len}")
    check_memory(cache_bytes(spec, batch, size), f"a cache of {batch:,} rows x {size:,} slots ({spec.L} layers)",
                 "fewer rows or slots")
    if start_B is None:
        return None
    try:
        start = np.asarray(start_B)
    except (ValueError, TypeError):  # ragged, [[0], [1, 2]]: numpy's inhomogeneous-shape ValueError
        start = np.asarray(start_B, dtype=object)
    if start.shape != (batch,) or start.dtype.kind not in "iu":
        raise TokenError(f"start_B must be {batch} integer slots, one per row; got {quote(start.tolist())}")
    if start.min() < 0 or start.max() >= size:
        raise TokenError(f"start_B={quote(start.tolist())} must be slots in 0..{size - 1} (each row's first token)")
    return start


def check_cache_fits(spec: ModelSpec, layers: Sequence[tuple[Sequence[int], str, str]], batch: int, size: int) -> None:
    """Refuse a cache of this twin that another model's `init_cache` made (TokenError): `layers`, per layer of the
    cache, the shape and dtype of its state (as `layout.state_layout` gives them) and its routing kind ("none", "mod",
    "dtf"), for `batch` rows of `size` slots. Fewer layers than the model's were an IndexError; other heads, head
    sizes or dtypes an XLA TypeError in JAX and an index_copy_ RuntimeError in torch. Shapes only: nothing is read
    from a device."""
    if len(layers) != spec.L:
        raise TokenError(f"a cache of {len(layers)} layers does not fit this model's n_layers={spec.L} "
                         "(made by another model's init_cache?)")
    for i, (shape, dtype, routed) in enumerate(layers):
        # each layer's own mixer (a hybrid stack's differ)
        want_shape, want_dtype = state_layout(spec, spec.mixer_of(i), batch, size)
        want_routed = spec.routing if i in spec.routed_layers else "none"
        if (tuple(shape), dtype, routed) != (want_shape, want_dtype, want_routed):
            raise TokenError(f"layer {i} of the cache holds {dtype} {list(shape)} (routing {routed}) where this "
                             f"model's init_cache makes {want_dtype} {list(want_shape)} (routing {want_routed}): "
                             "a cache made by another model's init_cache")


def check_cache_room(cache_B: int, cache_size: int, B: int, T: int, length: int | None,
                     start: int | None = None) -> None:
    """Refuse a step whose B rows are not the cache's, or whose T tokens do not fit after its `length` written slots
    (None: the length is data, under jit or compilation, and the caller's to keep within the cache), or a first write
    that ends before `start`, the last row's first slot (the largest of start_B; None: not read): that row would hold
    no token of its own, and its logits, read from masked slots only, differed between the twins without a word."""
    if start is not None and length == 0 and T <= start:
        raise TokenError(f"a first write of {T} tokens ends before slot {start}, where a row of the cache starts "
                         "(init_cache's start_B): every row needs at least one token of its own")
    if B != cache_B:
        raise TokenError(f"tokens of {B} rows do not match a cache of {cache_B} rows")
    if T > cache_size:
        raise TokenError(f"{T} tokens do not fit a cache of {cache_size} slots")
    if length is not None and length + T > cache_size:
        raise TokenError(f"{T} tokens do not fit a cache of {cache_size} slots with {length} written")


def check_batch_array(shape: Sequence[int], dtype: str) -> None:
    """`check_token_array` of a training batch [B, N]: rows of at least 2 tokens (inputs and the next tokens they
    predict). A float batch was truncated by torch's `.long()`."""
    check_token_array(shape, dtype, "a batch", min_time=2)


def check_batch(tokens_BN, spec: ModelSpec, ignore: int, mask_BN=None, host=None, count=None) -> None:
    """A training batch whose ids are at hand, checked whole: `check_batch_array`, then every id in the vocabulary or
    `ignore` (IGNORE_INDEX). At hand: a numpy array, or a framework's array that `host` (the twin's `loss.host_ids`)
    reads without waiting on a device (on the CPU, outside jit or compilation), else None. Inside a jitted step the
    ids are data: an id past the vocabulary as a target would be a NaN loss in JAX and an IndexError in torch;
    hence a JAX array or a torch tensor on the CPU is read too. Other arrays are left to `check_batch_array`.
    A mask (of any framework) must have the tokens' shape: one of [1, N] weighted every row by row 0's mask without a
    word, and other shapes failed inside the framework; a numpy mask must hold numbers. `count`: `check_count`.
    Raises TokenError."""
    if mask_BN is not None and tuple(np.shape(mask_BN)) != tuple(np.shape(tokens_BN)):
        raise TokenError(f"mask_BN of shape {list(np.shape(mask_BN))} must have the tokens' shape "
                         f"{list(np.shape(tokens_BN))}: one entry per token")
    if isinstance(mask_BN, np.ndarray) and mask_BN.dtype.kind not in "biuf":  # a str mask: a TypeError in either
        raise TokenError(f"mask_BN must hold numbers (0: not counted), got dtype {mask_BN.dtype}")
    check_count(count)
    if isinstance(tokens_BN, (list, tuple)):  # rows on the host: their ids are at hand (a NaN loss in JAX otherwise)
        try:
            tokens_BN = np.asarray(tokens_BN)
        except (ValueError, TypeError):  # ragged rows: numpy's inhomogeneous-shape ValueError
            raise TokenError(f"a batch must be rows of one length, not {quote(tokens_BN)}") from None
    ids = tokens_BN if isinstance(tokens_BN, np.ndarray) else None if host is None else host(tokens_BN)
    if ids is None:
        return
    check_batch_array(ids.shape, str(ids.dtype))
    lo, hi = int(ids.min()), int(ids.max())
    if lo <= ignore <= hi:  # IGNORE_INDEX entries are not ids: the range of the others
        ids = ids[ids != ignore]
        lo, hi = (int(ids.min()), int(ids.max())) if ids.size else (0, 0)
    check_token_values(spec, lo, hi)


def check_batch_type(tokens_BN, own: type) -> None:
    """Refuse a batch that is neither numpy, a list or tuple of rows, nor an array of the twin's framework (`own`):
    a torch tensor would otherwise be a TypeError from inside jax.jit in JAX's step, where torch's reads a JAX array."""
    if not isinstance(tokens_BN, (np.ndarray, list, tuple, own)):
        raise TokenError(f"a batch must be integer ids [batch, tokens]: a numpy array, a list or the model's "
                         f"framework's array, not {type_name(tokens_BN)}")


def check_count(count) -> None:
    """Refuse a `count` (what the summed loss is divided by) given as a number that is not finite and > 0: 0 was an
    inf loss, a negative count a negative loss, NaN a NaN one, all without a word, and a str a TypeError from inside
    the framework. None (the batch's own count) and a framework's array (data: a rank's share of a global count) pass.
    Raises TokenError."""
    if count is None or (hasattr(count, "shape") and not isinstance(count, (np.ndarray, np.generic))):
        return
    value = count.item() if isinstance(count, np.ndarray) and count.shape == () else count
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not (number and math.isfinite(value) and value > 0):
        raise TokenError(f"count={quote(count)} must be a finite number > 0, a scalar: the number of counted targets "
                         "the summed loss is divided by (None: this batch's)")


class CheckedStep:
    """A train or eval step `(state, tokens_BN, mask_BN=None, ...)`: its batch is checked (`check_batch`) first;
    other attributes (jax.jit's `lower`, ...) are the step's own."""

    def __init__(self, step, spec: ModelSpec, ignore: int, host=None):
        self.step, self.spec, self.ignore, self.host = step, spec, ignore, host

    def __call__(self, state, tokens_BN, *args, **kwargs):
        mask_BN, count = (list(args) + [kwargs.get("mask_BN"), kwargs.get("count")][len(args):])[:2]
        check_batch(tokens_BN, self.spec, self.ignore, mask_BN, self.host, count)
        return self.step(state, tokens_BN, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.step, name)
