"""The PyTorch twin's decoder; jax_model/model.py is the same file in JAX.

Notation: B batch, T tokens, S cache slots, D model dim, V vocab. Attribute paths follow the canonical
names (`model.layers.0.self_attn.q_proj`), so `state_dict()` keys are the canonical names (q/k/v as one
`qkv_proj` when `fused_qkv`, the default: `shared_config.model_layout`).
"""

from __future__ import annotations

import inspect
import math
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from shared_config import ModelSpec, load_spec, rope_inv_freq
from shared_config.placement import PLACEMENTS, block_placement
from shared_config.resources import check_model_memory
from shared_config.train_config import TRAIN_CHOICES
from shared_config.tokens import (TokenError, check_cache_fits, check_cache_request, check_cache_room,
                                  check_cache_type, check_outputs, check_token_array, check_token_type,
                                  check_token_values)

from . import routing
from .attention import LayerCache, resolve_attention, rope_cos_sin
from .block import Block, empty_state
from .layers import DTYPES, Linear, at_hand, make_norm
from .weights import draw_weights


class KVCache(NamedTuple):
    """Decoding state: every layer's keys and values in S preallocated slots per row, rows left-padded
    (another mixer's layer holds its own state instead, in a hybrid stack layer by layer: `block.empty_state`;
    `length` and `size` read layer 0 whatever its mixer: every state has both, the same in every layer).

    Row b's tokens fill slots start_B[b], start_B[b] + 1, ...; the slots before are padding, which no
    real token reads. All rows write the same slot at each step, so one scalar `length` indexes them.
    The caches are rebuilt with their constructors, never NamedTuple's `_replace`: torch 2.11's dynamo returns an
    empty tuple from a compiled `_replace`, and the next compiled step failed on it.
    A write past the last slot is refused where the length is at hand (`cache_length`); inside a compiled step the
    length is data, so generate.Decoder reads it on the host before each of its steps (on the CPU).
    """

    layers: tuple[LayerCache, ...]
    start_B: torch.Tensor  # int64 [B]: the slot of each row's first token
    routing: tuple = ()  # per layer, the routed layers' RoutingCache (routing.py), else None

    @property
    def length(self) -> torch.Tensor:
        return self.layers[0].length

    @property
    def size(self) -> int:
        return self.layers[0].size

    def layouts(self) -> list[tuple[tuple[int, ...], str, str]]:
        """Per layer, the shape and dtype of its state (keys, or GLA's state) and its routing kind, as
        `check_cache_fits` compares them with the model's."""
        routing = self.routing or (None,) * len(self.layers)
        return [(tuple(layer[0].shape), str(layer[0].dtype).removeprefix("torch."),
                 "none" if route is None else "mod" if route.dst_BS is None else "dtf")
                for layer, route in zip(self.layers, routing)]

    def positions_and_mask(self, T: int):
        """Positions [B, T] of the next T tokens, and the slots each reads [B, T, S]: start_b ≤ s ≤ its own slot."""
        slots_T = self.length + torch.arange(T, device=self.start_B.device)
        positions_BT = (slots_T - self.start_B[:, None]).clamp(min=0)  # padding gets 0: never read, but a valid index
        s_S = torch.arange(self.size, device=self.start_B.device)
        mask_BTS = (s_S <= slots_T[:, None])[None] & (s_S >= self.start_B[:, None])[:, None]
        return positions_BT, mask_BTS


class TransformerModel(nn.Module):
    """Embeddings, blocks and the final norm (Hugging Face's `LlamaModel`)."""

    def __init__(self, spec: ModelSpec, attention: str):
        super().__init__()
        self.spec = spec
        D, dtypes = spec.D, dict(dtype=DTYPES[spec.param_dtype])
        self.embed_tokens = nn.Embedding(spec.V, D, **dtypes)
        learned = spec.position == "learned"
        self.embed_positions = nn.Embedding(spec.max_seq_len, D, **dtypes) if learned else None
        learnable = spec.embed_scale == "learnable"
        self.embed_scale = (nn.Parameter(torch.full((1,), math.sqrt(D), dtype=DTYPES[spec.param_dtype])) if learnable
                            else None)
        self.embed_norm = make_norm(spec) if spec.embed_norm else None  # after the embeddings' scale (embed)
        self.layers = nn.ModuleList([Block(spec, spec.mixer_of(i), attention, block_placement(spec, i),
                                           i in spec.routed_layers) for i in range(spec.L)])
        self.norm = make_norm(spec) if PLACEMENTS[spec.norm_placement].final_norm else None
        self.compute_dtype = DTYPES[spec.compute_dtype]  # the embeddings' output dtype (embed)

    def forward(self, tokens_BT, *, taps: dict | None = None, cache: KVCache | None = None, aux: dict | None = None,
                decide: str | None = None, remat: str = "none"):
        """Final hidden states [B, T, D] and the updated cache (None without one); routing: routing.Routes;
        `remat`: see `rematted`."""
        tokens_BT = own_tokens(tokens_BT, self.spec, self.embed_tokens.weight.device)
        spec, T = self.spec, check_tokens(tokens_BT, self.spec)
        if cache is None:
            if T > spec.max_seq_len:
                raise TokenError(f"sequence length {T} exceeds max_seq_len={spec.max_seq_len}")
            # positions [T], shared by every row; causal
            positions, mask_BTS = torch.arange(T, device=tokens_BT.device), None
        else:
            check_cache_type(cache, KVCache)
            check_cache_fits(spec, cache.layouts(), cache.start_B.shape[0], cache.size)
            check_cache_room(cache.start_B.shape[0], cache.size, tokens_BT.shape[0], T, cache_length(cache),
                             cache_start(cache))
            positions, mask_BTS = cache.positions_and_mask(T)
        x_BTD = self.embed(tokens_BT, positions)
        cos, sin = rope_cos_sin(rope_inv_freq(spec), positions) if spec.position == "rope" else (None, None)
        record(taps, "model.embed", x_BTD)
        routes = routing.Routes(spec, None if cache is None else cache.routing, decide, aux)
        layer_caches, h_BTD = [], x_BTD
        for i, layer in enumerate(self.layers):
            layer_taps = None if taps is None else taps.setdefault(f"model.layers.{i}", {})
            run = rematted(layer, remat) if taps is None and cache is None else None  # training only
            route = partial(routes, i, h_BTD) if i in spec.routed_layers else None  # called inside the block's call
            y_BTD, layer_cache = layer(x_BTD, cos, sin, layer_taps, None if cache is None else cache.layers[i],
                                       mask_BTS, route=route, run=run)
            h_BTD, x_BTD = x_BTD, y_BTD  # h: the block's input, which dtf's next (dynamic) block reads
            layer_caches.append(layer_cache)
        routing_cache = routes.finish()
        if self.norm is not None:
            x_BTD = self.norm(x_BTD)
        record(taps, "model.norm", x_BTD)
        return x_BTD, None if cache is None else KVCache(tuple(layer_caches), cache.start_B, routing_cache)

    def embed(self, tokens_BT, positions):
        """Token (+ learned position) embeddings [B, T, D] in the compute dtype, scaled and normed (`embed_norm`) as the
        spec says; positions [T] or [B, T]. Looked up, added, scaled and normed in float32, then cast once: each table's
        gradient sums a token's (or a position's) rows in float32, and the scale's its B·T·D terms (in bf16, a token
        seen 1,000 times in a batch had a row gradient stuck at 256, and the scale's gradient was off by its own
        size). The norm comes after the scale, as OLMo-core's embedding_norm (Peri-LN, Kim et al. 2025, arXiv
        2502.02732: the embeddings' output normalised before the first block)."""
        x_BTD = lookup(self.embed_tokens, tokens_BT)
        if self.embed_positions is not None:
            x_BTD = x_BTD + lookup(self.embed_positions, positions)
        if self.spec.embed_scale == "learnable":
            x_BTD = x_BTD * self.embed_scale.to(torch.float32)
        elif self.spec.embed_scale == "constant":
            x_BTD = x_BTD * math.sqrt(self.spec.D)
        if self.embed_norm is not None:
            x_BTD = self.embed_norm(x_BTD)  # a float32 input: the norm computes and returns float32
        return x_BTD.to(self.compute_dtype)


def own_tokens(tokens_BT, spec: ModelSpec, device):
    """Token ids as this twin reads them: a tensor, or a numpy array as an int64 tensor on `device`, its ids checked
    first (the JAX twin reads numpy as it is); TokenError for anything else, a list or a JAX array
    (check_token_type)."""
    check_token_type(tokens_BT, (torch.Tensor,))
    if not isinstance(tokens_BT, np.ndarray):
        return tokens_BT
    check_token_array(tokens_BT.shape, str(tokens_BT.dtype))
    check_token_values(spec, int(tokens_BT.min()), int(tokens_BT.max()))
    return torch.as_tensor(tokens_BT.astype(np.int64), device=device)


WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)  # torch has no min or max of them (NotImplementedError)


def check_tokens(tokens_BT, spec: ModelSpec) -> int:
    """T of token ids [B, T], refused (TokenError) unless integer ids with B, T >= 1; their values too where they are
    at hand: on the CPU, uncompiled (on a GPU, reading them would wait for the device: the embedding's own
    device-side assert refuses ids out of range; `Decoder` checks them on the host first)."""
    check_token_array(tokens_BT.shape, str(tokens_BT.dtype).removeprefix("torch."))
    if at_hand(tokens_BT):
        ids = tokens_BT.long() if tokens_BT.dtype in WIDE_UNSIGNED else tokens_BT  # min/max not implemented for these
        check_token_values(spec, int(ids.min()), int(ids.max()))
    return tokens_BT.shape[1]


def cache_start(cache: KVCache) -> int | None:
    """The last row's first slot (the largest of start_B) before a cache's first write, where at hand (as
    `cache_length`); None once written (the first write gave every row a token: `check_cache_room`)."""
    return int(cache.start_B.max()) if cache_length(cache) == 0 and at_hand(cache.start_B) else None


def cache_length(cache: KVCache) -> int | None:
    """The cache's written slots where they are at hand: on the CPU, uncompiled (elsewhere reading the length would wait
    for the device: `Decoder` reads it before every step)."""
    return int(cache.length) if at_hand(cache.length) else None


def lookup(table, ids):
    """The rows `ids` [...] of an embedding table, float32 [..., D]: gathered from the table in float32, so that the
    backward scatter-adds its row gradients in float32 (nnx.Embed gathers from the table cast to its compute dtype)."""
    return F.embedding(ids.long(), table.weight.to(torch.float32))  # F.embedding takes int32/int64 ids only


class Transformer(nn.Module):
    """Decoder-only LM (Hugging Face's `LlamaForCausalLM`): int tokens [B, T] -> float32 logits [B, T, V].

    Weights are drawn natively from the layout table's init rules with `generator`; load a canonical
    file with `from_safetensors` for bit-identical weights across the twins.
    """

    def __init__(self, spec, *, generator: torch.Generator | None = None, attention: str = "auto"):
        super().__init__()
        spec = load_spec(spec)
        check_model_memory(spec)  # a spec too large for this machine: refused before any allocation
        self.spec = spec
        attention = resolve_attention(attention, spec)
        self.model = TransformerModel(spec, attention)
        self.lm_head = None if spec.tie_embeddings else Linear(spec.D, spec.V, spec)
        draw_weights(self, generator)

    def forward(self, tokens_BT, *, taps: dict | None = None, cache: KVCache | None = None, aux: dict | None = None,
                decide: str | None = None, remat: str = "none", logits: bool = True):
        """float32 logits [B, T, V]; with a `cache`, (logits, the cache with T more slots written). `logits=False`:
        the final hidden states [B, T, D] instead (a chunked loss applies `head` itself, a chunk at a time).

        Routed specs: `decide` is "topk" or "predictor" (None: top-k without a cache, the predictor with one); `aux`,
        a dict, receives the mean router_bce, predictor_acc (and dtf's prior_mse) of a top-k forward. `taps`, a
        dict, receives every tapped activation. TokenError for tokens or a cache the model cannot read
        (shared_config.tokens); TypeError for `taps` or `aux` that is not a dict, or `logits` that is not a bool.
        """
        check_outputs(taps, aux, logits)
        x_BTD, new_cache = self.model(tokens_BT, taps=taps, cache=cache, aux=aux, decide=decide, remat=remat)
        if not logits:
            return x_BTD if cache is None else (x_BTD, new_cache)
        logits_BTV = self.head(x_BTD)
        record(taps, "logits", logits_BTV)
        return logits_BTV if cache is None else (logits_BTV, new_cache)

    def head(self, x_BTD):
        """float32 logits [..., V] of final hidden states [..., D]: the LM head, or the tied embeddings."""
        if self.lm_head is None:
            logits_BTV = x_BTD @ self.model.embed_tokens.weight.to(x_BTD.dtype).T  # nnx.Embed.attend
        else:
            logits_BTV = self.lm_head(x_BTD)
        return logits_BTV.to(torch.float32)  # logits in float32

    def head_weight(self):
        """The LM head's weight [V, D] in the parameter dtype: lm_head's, or the tied embeddings (what `head`
        multiplies by, for head_loss.fused_head_loss)."""
        if self.lm_head is None:
            return self.model.embed_tokens.weight
        return self.lm_head.weight  # nn.Linear stores [V, D]

    def init_cache(self, batch: int, size: int, start_B=None) -> KVCache:
        """An empty cache of `size` slots per row; `start_B` [batch] is each row's left padding (default 0)."""
        spec, w = self.spec, self.model.embed_tokens.weight  # w: new tensors go to the model's device
        start_B = check_cache_request(spec, batch, size, start_B)
        # distinct buffers per layer: a decode step donates (JAX) or writes in place (torch) each one
        layers = tuple(empty_state(spec, spec.mixer_of(i), batch, size, w) for i in range(spec.L))
        start_B = (w.new_zeros(batch, dtype=torch.int64) if start_B is None
                   else torch.as_tensor(start_B, dtype=torch.int64, device=w.device))
        return KVCache(layers, start_B, routing.init_cache(spec, batch, size, w.device))


# What a rematted block keeps for the backward: "block" the outputs of its matmuls without batch dims (the
# projections, aten.mm; attention scores, norms and activations are recomputed), "full" nothing but its input
REMAT_SAVED = {"block": (torch.ops.aten.mm.default,), "full": ()}


def rematted(layer, remat: str):
    """`layer`'s computation (Block.body), its activations recomputed in the backward as `remat` says ("none": kept;
    the train config's option, docs/training.md, "Training bigger models"); the same values, less memory
    (torch.utils.checkpoint, non-reentrant, with a selective policy: works under torch.compile and FSDP2)."""
    if remat not in TRAIN_CHOICES["remat"]:  # a KeyError 'bogus' from the policy table
        raise ValueError(f"remat={remat!r} must be one of {', '.join(TRAIN_CHOICES['remat'])}")
    if remat == "none":
        return layer.body
    saved = REMAT_SAVED[remat]

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    context_fn = partial(create_selective_checkpoint_contexts, policy)
    return partial(checkpoint, layer.body, use_reentrant=False, context_fn=context_fn)


def record(taps: dict | None, name: str, x) -> None:
    """Keep an intermediate activation for the parity report."""
    if taps is not None:
        taps[name] = x


# graphs one compiled region may hold before dynamo gives up on it: torch.compile's default recompile_limit
REGION_RECOMPILE_LIMIT = 8
# torch >= 2.13: torch.compile keeps each call's compiled graphs and its recompile limit apart (isolate_recompiles)
ISOLATES_RECOMPILES = "isolate_recompiles" in inspect.signature(torch.compile).parameters


def compile_isolated(fn, **options):
    """torch.compile(fn, **options) with a recompile budget of its own. Dynamo keeps compiled graphs per code object:
    every Decoder's step (a partial), every model's blocks (nn.Module._call_impl) and every eval loss shared one
    budget of 8 graphs in a process, so the 9th model compiled there ran eager without a word (a benchmark sweep's
    later rows timed eager torch as compiled), or raised FailOnRecompileLimitHit under fullgraph. torch >= 2.13:
    `isolate_recompiles`; older torch: the process's `recompile_limit` grows by one region's budget at each call.
    (JAX's jit keeps a cache per jitted function, without such a limit: no counterpart in jax_model.)"""
    if ISOLATES_RECOMPILES:
        return torch.compile(fn, isolate_recompiles=True, **options)
    torch._dynamo.config.recompile_limit += REGION_RECOMPILE_LIMIT
    return torch.compile(fn, **options)
