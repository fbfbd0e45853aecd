"""What a model call reads as token ids: the checks both twins' `TransformerModel` and `Decoder` make, with one
message each, so that the same bad tokens raise the same TokenError in either twin.

Left unchecked, the twins disagreed on the same input: an id past the vocabulary gave NaN logits in JAX (`jnp.take`
fills out-of-range rows) and an IndexError in torch; a negative id read another token's row in JAX (wrapped, as numpy
indexing does); float ids were truncated by the decoders' casts; an empty batch raised ZeroDivisionError in JAX and
returned empty logits in torch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .spec import ModelSpec


class TokenError(ValueError):
    """Token ids a model cannot read: the message names the shape, dtype or id and what was expected."""


def check_token_array(shape: Sequence[int], dtype: str) -> None:
    """Refuse tokens that are not a [B, T] array of integer ids with B, T >= 1 (`dtype`: the framework's name without
    its module, `int32`, `float32`, `bool`). Needs no values: safe under jit and compilation."""
    if len(shape) != 2:
        raise TokenError(f"tokens must be [batch, time] (rank 2), got shape {list(shape)}")
    if not dtype.startswith(("int", "uint")):
        raise TokenError(f"tokens must be integer ids, got dtype {dtype}")
    if 0 in shape:
        raise TokenError(f"tokens of shape {list(shape)} hold no token: batch and time must be >= 1")


def check_token_values(spec: ModelSpec, lo: int, hi: int) -> None:
    """Refuse ids outside 0..V-1, given the smallest (`lo`) and largest (`hi`) id of a call."""
    if lo < 0 or hi >= spec.V:
        raise TokenError(f"token id {lo if lo < 0 else hi} is outside the vocabulary 0..{spec.V - 1}")


def host_tokens(tokens, spec: ModelSpec) -> np.ndarray:
    """`tokens` (a decoder's [B, P] prompts or [B] step) as a numpy array of ids in the vocabulary, checked before a
    cast to the step's integer type could truncate a float id or wrap a large one; TokenError otherwise."""
    ids = np.asarray(tokens)
    check_token_array(ids.reshape(1, -1).shape if ids.ndim == 1 else ids.shape, str(ids.dtype))
    check_token_values(spec, int(ids.min()), int(ids.max()))
    return ids
