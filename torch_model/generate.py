"""Generation with a KV cache for the PyTorch twin; jax_model/generate.py is the same file in JAX.

Notation: B batch, T new tokens, P prompt tokens (left-padded), V vocab. Prompts of different
lengths are padded on the left, so every row's next token comes from the last position and all
rows write the same cache slot at each step (see `KVCache`).
"""

from __future__ import annotations

from functools import partial
from typing import Iterator

import numpy as np
import torch

from shared_config.generation import as_prompts, check_generation, collect, left_pad, stop_at_eos

from .model import KVCache, Transformer


class Decoder:
    """A model's compiled prefill and decode step: what `generate` runs and what a benchmark times.

    Each returns the logits of the last position [B, V] and the cache with the new tokens written;
    the cache passed in is written in place (its tensors are reused). The decode step compiles once
    for every position, because the cache has a fixed size and its length is data, not a shape. The
    weights are the model's own, read at each call. `compile` is a torch.compile backend ("inductor", "aot_eager", ...), or None to run eagerly.
    """

    def __init__(self, model: Transformer, compile: str | None = None):
        self.model = model
        step = partial(forward_last, model)
        # fullgraph: a graph break would silently run the step half in Python.
        self._prefill = step if compile is None else torch.compile(step, backend=compile, fullgraph=True)  # per prompt shape
        self._decode = step if compile is None else torch.compile(step, backend=compile, fullgraph=True)  # per cache shape

    def init_cache(self, batch: int, size: int, start_B=None) -> KVCache:
        return self.model.init_cache(batch, size, start_B)

    @torch.no_grad()
    def prefill(self, tokens_BP, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """Run the (left-padded) prompts [B, P] into an empty cache."""
        return self._prefill(cache, self.as_tokens(tokens_BP))

    @torch.no_grad()
    def decode_step(self, tokens_B, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """Feed one token per row [B]."""
        return self._decode(cache, self.as_tokens(tokens_B)[:, None])

    def as_tokens(self, tokens):
        return torch.as_tensor(np.asarray(tokens), dtype=torch.int64, device=self.model.model.embed_tokens.weight.device)


def forward_last(model: Transformer, cache: KVCache, tokens_BT):
    """The logits of the last position [B, V] and the cache with T more slots written."""
    logits_BTV, cache = model(tokens_BT, cache=cache)
    return logits_BTV[:, -1], cache


def filter_logits(logits_BV, top_k: int | None, top_p: float | None):
    """Logits outside the top k, then outside the smallest top set holding probability `top_p`, set to -inf."""
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = torch.where(logits_BV < kth_B1, -torch.inf, logits_BV)
    if top_p is not None:
        sorted_BV = torch.sort(logits_BV, dim=-1, descending=True).values
        probs_BV = torch.softmax(sorted_BV, dim=-1)
        above_BV = torch.cumsum(probs_BV, dim=-1) - probs_BV  # probability of the tokens ranked above each
        cutoff_B1 = torch.where(above_BV < top_p, sorted_BV, torch.inf).amin(dim=-1, keepdim=True)
        logits_BV = torch.where(logits_BV < cutoff_B1, -torch.inf, logits_BV)
    return logits_BV


@torch.no_grad()
def sample(logits_BV, generator: torch.Generator, temperature: float, top_k: int | None = None, top_p: float | None = None):
    """Next tokens [B]: the argmax when temperature is 0, else a draw from softmax(logits / temperature), filtered."""
    if temperature == 0:
        return torch.argmax(logits_BV, dim=-1)
    probs_BV = torch.softmax(filter_logits(logits_BV / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator)[:, 0]


def stream(model: Transformer, prompt_tokens, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, seed: int = 0, eos_id: int | None = None) -> Iterator[np.ndarray]:
    """Yield each step's new tokens [B] as soon as they are drawn; rows past `eos_id` repeat it."""
    prompts, _ = as_prompts(prompt_tokens)
    check_generation(model.spec, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos_id)
    return stop_at_eos(_steps(Decoder(model), prompts, max_new_tokens, temperature, top_k, top_p, seed), eos_id)


def _steps(decoder: Decoder, prompts, max_new_tokens, temperature, top_k, top_p, seed) -> Iterator[np.ndarray]:
    """Prefill, then draw and feed back one token per row, `max_new_tokens` times."""
    tokens_BP, start_B = left_pad(prompts)
    # The last drawn token is never fed back: the cache needs P + max_new_tokens - 1 slots.
    cache = decoder.init_cache(len(prompts), tokens_BP.shape[1] + max_new_tokens - 1, start_B)
    logits_BV, cache = decoder.prefill(tokens_BP, cache)
    generator = torch.Generator(logits_BV.device).manual_seed(seed)
    for step in range(max_new_tokens):
        next_B = sample(logits_BV, generator, temperature, top_k, top_p).cpu().numpy()
        yield next_B
        if step + 1 < max_new_tokens:
            logits_BV, cache = decoder.decode_step(next_B, cache)


def generate(model: Transformer, prompt_tokens, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, eos_id: int | None = None):
    """The new tokens of each prompt (a list of ids; a list of them for a batch), each row ending at its first `eos_id`."""
    steps = stream(model, prompt_tokens, max_new_tokens, temperature, top_k, top_p, seed, eos_id)
    return collect(steps, prompt_tokens, eos_id)
