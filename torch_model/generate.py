"""Generation with a KV cache for the PyTorch twin; jax_model/generate.py is the same file in JAX.

Notation: B batch, T new tokens, P prompt tokens (left-padded), V vocab. Prompts of different
lengths are padded on the left, so every row's next token comes from the last position and all
rows write the same cache slot at each step (see `KVCache`).
"""

from __future__ import annotations

from functools import partial
from itertools import repeat
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from shared_config.generation import (as_prompts, check_drawn, check_generation, check_model, collect, draw_blocks,
                                      in_float32, left_pad, stop_at_eos, uniform_steps)
from shared_config.tokens import check_cache_room, check_cache_type, host_tokens

from .model import KVCache, Transformer, cache_length, cache_start, compile_isolated


class Decoder:
    """A model's compiled prefill and decode step: what `generate` runs and what a benchmark times.

    Each returns the logits of the last position [B, V] and the cache with the new tokens written;
    the cache passed in is written in place (its tensors are reused). The decode step compiles once
    for every position, because the cache has a fixed size and its length is data, not a shape. The
    weights are the model's own, read at each call. `compile` is a torch.compile backend ("inductor", "aot_eager", ...),
    or None to run eagerly.
    """

    def __init__(self, model: Transformer, compile: str | None = None):
        check_model(model, Transformer)
        self.model = model
        step = partial(forward_last, model)
        # fullgraph: a graph break would silently run the step half in Python. Isolated: each Decoder's own
        # recompile budget (one graph per prompt shape, one per cache shape), whatever else the process compiled
        self._prefill = step if compile is None else compile_isolated(step, backend=compile, fullgraph=True)
        self._decode = step if compile is None else compile_isolated(step, backend=compile, fullgraph=True)

    def init_cache(self, batch: int, size: int, start_B=None) -> KVCache:
        return self.model.init_cache(batch, size, start_B)

    @torch.no_grad()
    def prefill(self, tokens_BP, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """Run the (left-padded) prompts [B, P] into an empty cache."""
        return self._prefill(cache, self.as_tokens(tokens_BP, cache))

    @torch.no_grad()
    def decode_step(self, tokens_B, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """Feed one token per row [B]."""
        return self._decode(cache, self.as_tokens(tokens_B, cache, step=True))

    def as_tokens(self, tokens, cache: KVCache, step: bool = False):
        """Token ids (a step's [B] as [B, 1]) as the step's int64 tensor, checked on the host first: inside the compiled
        step the ids are data, and so is the cache's length. TokenError for an id outside the vocabulary, or tokens
        the cache has no room for, or a first write leaving a row without a token, where its length is at hand
        (`cache_length`; a compiled step past the last slot failed in index_copy_ with an IndexError)."""
        check_cache_type(cache, KVCache)
        ids_BT = host_tokens(tokens, self.model.spec, step)
        check_cache_room(cache.start_B.shape[0], cache.size, *ids_BT.shape, cache_length(cache), cache_start(cache))
        return torch.as_tensor(ids_BT, dtype=torch.int64, device=self.model.model.embed_tokens.weight.device)


def forward_last(model: Transformer, cache: KVCache, tokens_BT):
    """The logits of the last position [B, V] and the cache with T more slots written."""
    logits_BTV, cache = model(tokens_BT, cache=cache)
    return logits_BTV[:, -1], cache


def filter_logits(logits_BV, top_k: int | None, top_p: float | None):
    """Logits [B, V] outside the top k, then outside the smallest top set holding probability `top_p`, set to -inf.

    Ties at the cut are kept. `top_k >= V` and `top_p = 1` keep every token: no float32 sum decides them. The mass
    ranked above each token is an exclusive running sum of exp(logit - max) by `exclusive_cumsum`, compared with
    `top_p` times the total: the same float32 operations in both twins, whatever their cumsum kernels.
    """
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = torch.where(logits_BV < kth_B1, -torch.inf, logits_BV)
    if top_p is not None and top_p < 1:
        sorted_BV = torch.sort(logits_BV, dim=-1, descending=True).values
        weights_BV = torch.exp(shifted(sorted_BV))  # unnormalised probabilities, the best token's 1
        above_BV = exclusive_cumsum(weights_BV)  # the mass of the tokens ranked above each
        total_B1 = above_BV[:, -1:] + weights_BV[:, -1:]
        # the best token always stays: a top_p below float32's smallest (1e-300) is 0 there and cut every token
        kept_BV = (above_BV < top_p * total_B1) | (torch.arange(sorted_BV.shape[-1], device=sorted_BV.device) == 0)
        cutoff_B1 = torch.where(kept_BV, sorted_BV, torch.inf).amin(dim=-1, keepdim=True)
        logits_BV = torch.where(logits_BV < cutoff_B1, -torch.inf, logits_BV)
    return logits_BV


def shifted(x_BV):
    """x minus its row maximum [B, V], exact at the limits: the best tokens 0, the rest <= 0; when the maximum is
    +inf, the tokens at +inf share all the mass (0) and the rest none (-inf). NaN stays NaN."""
    max_B1 = x_BV.amax(dim=-1, keepdim=True)
    return torch.where(x_BV == max_B1, 0.0, x_BV - max_B1)


def exclusive_cumsum(x_BV):
    """The sum of the entries before each one [B, V], by log2(V) elementwise additions (Hillis and Steele 1986): the
    same float32 roundings in both twins, and an error that grows with log V where a sequential sum's grows with V."""
    sums_BV = F.pad(x_BV, (1, 0))[:, :-1]  # shifted right by one: exclusive
    shift = 1
    while shift < x_BV.shape[-1]:
        sums_BV = sums_BV + F.pad(sums_BV, (shift, 0))[:, :-shift]
        shift *= 2
    return sums_BV


def draw(weights_BV, u_B2):
    """The token of each row [B] drawn from unnormalised weights [B, V] >= 0 at two uniforms u_B2 [B, 2] in [0, 1):
    a block of `draw_blocks` tokens by the first, a token in it by the second, each by `pick`; -1 where no weight is
    positive (NaN). Never a token of weight 0."""
    B, V = weights_BV.shape
    S, N = draw_blocks(V)
    w_BNS = F.pad(weights_BV, (0, N * S - V)).reshape(B, N, S)
    w_XS = w_BNS.reshape(B * N, S)  # X = B·N: one block a row
    # each block's mass by `exclusive_cumsum`, not a framework sum: the same float32 roundings in both twins
    mass_BN = (exclusive_cumsum(w_XS)[:, -1] + w_XS[:, -1]).reshape(B, N)
    n_B = pick(mass_BN, u_B2[:, 0])
    w_BS = torch.gather(w_BNS, 1, n_B.clamp(min=0)[:, None, None].expand(B, 1, S))[:, 0]  # n = -1 reads block 0
    return torch.where(n_B < 0, -1, n_B * S + pick(w_BS, u_B2[:, 1]))


def pick(weights_BX, u_B):
    """The index of each row [B] that a uniform u in [0, 1) picks by inverse CDF from weights [B, X] >= 0: the last
    of positive weight whose mass before it (`exclusive_cumsum`'s) is <= u times the total. The first positive weight
    is always a candidate and u below 1 never lands past the end nor on a weight of 0; -1 where none is positive."""
    above_BX = exclusive_cumsum(weights_BX)
    total_B1 = above_BX[:, -1:] + weights_BX[:, -1:]
    candidate_BX = (weights_BX > 0) & (above_BX <= u_B[:, None] * total_B1)
    return torch.where(candidate_BX, torch.arange(weights_BX.shape[-1], device=weights_BX.device), -1).amax(dim=-1)


@torch.no_grad()
def sample(logits_BV, u_B2, temperature: float, top_k: int | None = None, top_p: float | None = None):
    """Next tokens [B] int64: the argmax when temperature is 0, else a draw from softmax(logits / temperature),
    filtered, at the step's uniforms u_B2 [B, 2] in [0, 1) (`uniform_steps`: the same in both twins, see `draw`);
    -1 in a row whose logits hold a NaN or are all -inf (no token is right: `generate` raises GenerationError).

    Exact at the limits: a temperature that underflows float32 keeps only the best tokens, one that overflows it
    draws uniformly; +inf logits share all the mass.
    """
    valid_B = logits_BV.amax(dim=-1) > -torch.inf  # False for NaN too
    if temperature == 0:
        return torch.where(valid_B, torch.argmax(logits_BV, dim=-1), -1)
    diff_BV = shifted(logits_BV)
    # 0 and -inf stay as they are: 0 / 0 and -inf / inf are NaN where temperature is 0 or inf in float32
    scaled_BV = torch.where((diff_BV == 0) | (diff_BV == -torch.inf), diff_BV, diff_BV / in_float32(temperature))
    weights_BV = torch.exp(filter_logits(scaled_BV, top_k, top_p))  # the best tokens' 1 (scaled's max is 0), cut ones 0
    return torch.where(valid_B, draw(weights_BV, u_B2), -1)


def stream(model: Transformer, prompt_tokens, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, seed: int = 0, eos_id: int | None = None) -> Iterator[np.ndarray]:
    """Yield each step's new tokens [B] (numpy int) as soon as they are drawn; rows past `eos_id` repeat it.
    GenerationError, before any step, for prompts or settings that break a rule (`as_prompts`, `check_generation`)
    or a model that is not this twin's; ResourceError for a cache past this machine's memory."""
    check_model(model, Transformer)
    prompts, _ = as_prompts(prompt_tokens)
    check_generation(model.spec, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos_id)
    # a numpy count as a Python int: a cache size summed in np.int8 wrapped
    return stop_at_eos(_steps(Decoder(model), prompts, int(max_new_tokens), temperature, top_k, top_p, seed), eos_id)


def _steps(decoder: Decoder, prompts, max_new_tokens, temperature, top_k, top_p, seed) -> Iterator[np.ndarray]:
    """Prefill, then draw and feed back one token per row, `max_new_tokens` times."""
    tokens_BP, start_B = left_pad(prompts)
    # The last drawn token is never fed back: the cache needs P + max_new_tokens - 1 slots.
    cache = decoder.init_cache(len(prompts), tokens_BP.shape[1] + max_new_tokens - 1, start_B)
    logits_BV, cache = decoder.prefill(tokens_BP, cache)
    # drawn as the steps go (greedy decoding reads none): made up front, they cost memory and time before the
    # first token that grew with max_new_tokens x B
    B = len(prompts)
    draws = uniform_steps(seed, max_new_tokens, B) if temperature else repeat(np.zeros((B, 2), np.float32))
    for step, u_B2 in zip(range(max_new_tokens), draws):
        next_B = sample(logits_BV, torch.as_tensor(u_B2, device=logits_BV.device), temperature, top_k,
                        top_p).cpu().numpy()
        check_drawn(next_B, step)
        yield next_B
        if step + 1 < max_new_tokens:
            logits_BV, cache = decoder.decode_step(next_B, cache)


def generate(model: Transformer, prompt_tokens, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, eos_id: int | None = None):
    """The new tokens of each prompt (a list of ids; a list of them for a batch), each row ending at its first
    `eos_id`. Raises as `stream` does."""
    steps = stream(model, prompt_tokens, max_new_tokens, temperature, top_k, top_p, seed, eos_id)
    return collect(steps, prompt_tokens, eos_id)
