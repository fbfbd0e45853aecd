"""The JAX twin's decoder (Flax NNX); torch_model/model.py is the same file in PyTorch.

Notation: B batch, T tokens, S cache slots, D model dim, V vocab. Attribute paths follow the canonical
names (`model.layers.0.self_attn.q_proj`), so the NNX state is the canonical layout up to leaf names (q/k/v as
one `qkv_proj` when `fused_qkv`, the default: `shared_config.model_layout`).
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

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
from .gla import GLA
from .layers import DTYPES, ZEROS, Linear, at_hand, gathered, make_norm, split_rows
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
    start_B: jax.Array  # int32 [B]: the slot of each row's first token
    routing: tuple = ()  # per layer, the routed layers' RoutingCache (routing.py), else None

    @property
    def length(self) -> jax.Array:
        return self.layers[0].length

    @property
    def size(self) -> int:
        return self.layers[0].size

    def layouts(self) -> list[tuple[tuple[int, ...], str, str]]:
        """Per layer, the shape and dtype of its state (keys, or GLA's state) and its routing kind, as
        `check_cache_fits` compares them with the model's."""
        routing = self.routing or (None,) * len(self.layers)
        return [(tuple(layer[0].shape), str(layer[0].dtype),
                 "none" if route is None else "mod" if route.dst_BS is None else "dtf")
                for layer, route in zip(self.layers, routing)]

    def positions_and_mask(self, T: int):
        """Positions [B, T] of the next T tokens, and the slots each reads [B, T, S]: start_b ≤ s ≤ its own slot."""
        slots_T = self.length + jnp.arange(T)
        positions_BT = jnp.maximum(slots_T - self.start_B[:, None], 0)  # padding gets 0: never read, but a valid index
        s_S = jnp.arange(self.size)
        mask_BTS = (s_S <= slots_T[:, None])[None] & (s_S >= self.start_B[:, None])[:, None]
        return positions_BT, mask_BTS


class TransformerModel(nnx.Module):
    """Embeddings, blocks and the final norm (Hugging Face's `LlamaModel`)."""

    def __init__(self, spec: ModelSpec, attention: str, *, rngs: nnx.Rngs):
        self.spec = spec
        D, dtypes = spec.D, dict(dtype=DTYPES[spec.compute_dtype], param_dtype=DTYPES[spec.param_dtype])
        self.embed_tokens = nnx.Embed(spec.V, D, embedding_init=ZEROS, **dtypes, rngs=rngs)
        learned = spec.position == "learned"
        self.embed_positions = (nnx.Embed(spec.max_seq_len, D, embedding_init=ZEROS, **dtypes, rngs=rngs) if learned
                                else None)
        learnable = spec.embed_scale == "learnable"
        self.embed_scale = nnx.Param(jnp.full((1,), math.sqrt(D), DTYPES[spec.param_dtype])) if learnable else None
        self.embed_norm = make_norm(spec) if spec.embed_norm else None  # after the embeddings' scale (embed)
        self.layers = nnx.List([Block(spec, spec.mixer_of(i), attention, block_placement(spec, i),
                                      i in spec.routed_layers, rngs=rngs) for i in range(spec.L)])
        self.norm = make_norm(spec) if PLACEMENTS[spec.norm_placement].final_norm else None
        self.compute_dtype = DTYPES[spec.compute_dtype]  # the embeddings' output dtype (embed)
        self.mesh: Mesh | None = None  # the device mesh a sharded step runs on (set_mesh): hidden states split by rows

    def __call__(self, tokens_BT, *, taps: dict | None = None, cache: KVCache | None = None, aux: dict | None = None,
                 decide: str | None = None, remat: str = "none"):
        """Final hidden states [B, T, D] and the updated cache (None without one); routing: routing.Routes;
        `remat`: see `rematted`."""
        tokens_BT = own_tokens(tokens_BT, self.spec)
        spec, T = self.spec, check_tokens(tokens_BT, self.spec)
        if cache is None:
            if T > spec.max_seq_len:
                raise TokenError(f"sequence length {T} exceeds max_seq_len={spec.max_seq_len}")
            # positions [T], shared by every row; causal
            positions, mask_BTS = jnp.arange(T), None
        else:
            check_cache_type(cache, KVCache)
            check_cache_fits(spec, cache.layouts(), cache.start_B.shape[0], cache.size)
            check_cache_room(cache.start_B.shape[0], cache.size, tokens_BT.shape[0], T, cache_length(cache),
                             cache_start(cache))
            positions, mask_BTS = cache.positions_and_mask(T)
        x_BTD = split_rows(self.embed(tokens_BT, positions), self.mesh)
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
            y_BTD = split_rows(y_BTD, self.mesh)
            h_BTD, x_BTD = x_BTD, y_BTD  # h: the block's input, which dtf's next (dynamic) block reads
            layer_caches.append(layer_cache)
        routing_cache = routes.finish()
        if self.norm is not None:
            x_BTD = self.norm(x_BTD)
        record(taps, "model.norm", x_BTD)
        if cache is None:
            return x_BTD, None
        return x_BTD, split_cache_rows(KVCache(tuple(layer_caches), cache.start_B, routing_cache), self.mesh)

    def embed(self, tokens_BT, positions):
        """Token (+ learned position) embeddings [B, T, D] in the compute dtype, scaled and normed (`embed_norm`) as the
        spec says; positions [T] or [B, T]. Looked up, added, scaled and normed in float32, then cast once: each table's
        gradient sums a token's (or a position's) rows in float32, and the scale's its B·T·D terms (in bf16, a token
        seen 1,000 times in a batch had a row gradient stuck at 256, and the scale's gradient was off by its own
        size). The norm comes after the scale, as OLMo-core's embedding_norm (Peri-LN, Kim et al. 2025, arXiv
        2502.02732: the embeddings' output normalised before the first block)."""
        x_BTD = lookup(self.embed_tokens, tokens_BT, self.mesh)
        if self.embed_positions is not None:
            x_BTD = x_BTD + lookup(self.embed_positions, positions, self.mesh)
        if self.spec.embed_scale == "learnable":
            x_BTD = x_BTD * self.embed_scale[...].astype(jnp.float32)
        elif self.spec.embed_scale == "constant":
            x_BTD = x_BTD * math.sqrt(self.spec.D)
        if self.embed_norm is not None:
            x_BTD = self.embed_norm(x_BTD)  # a float32 input: the norm computes and returns float32
        return x_BTD.astype(self.compute_dtype)


def split_cache_rows(cache: KVCache, mesh: Mesh | None) -> KVCache:
    """`cache` with every array whose rows are the batch's ([B, ...]: keys, values, GLA states, routing slots, start_B)
    split over `mesh` as `split_rows` splits the hidden states; scalars (lengths) as they are. No mesh: `cache`.

    Prefill and decode then return a cache of one sharding, so the decode step compiles once on a mesh too. Left to
    XLA, a GLA layer's prefill returned its state [B, H, K, V] whole on every device and decode returned it split by
    rows: the second decode step compiled again, and the recurrence replicated its operands to mix the two."""
    B = cache.start_B.shape[0]
    return jax.tree.map(lambda x: split_rows(x, mesh) if x.ndim and x.shape[0] == B else x, cache)


def set_mesh(model: nnx.Module, mesh: Mesh | None) -> None:
    """Tell `model` the device mesh its steps run on (distributed.py): its hidden states stay split by rows
    (`split_rows`), every Linear reads its weight whole (`layers.gathered`), and every GLA layer's Pallas kernel runs
    per device (gla.per_device). None: one device."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, (TransformerModel, GLA, Linear)):
            module.mesh = mesh


def own_tokens(tokens_BT, spec: ModelSpec):
    """Token ids as this twin reads them: a JAX array, or a numpy array as it is (jnp reads it; torch's twin makes it
    a tensor); TokenError for anything else, a list or a torch tensor (check_token_type)."""
    check_token_type(tokens_BT, (jax.Array,))
    return tokens_BT


def check_tokens(tokens_BT, spec: ModelSpec) -> int:
    """T of token ids [B, T], refused (TokenError) unless integer ids with B, T >= 1; their values too where they are
    at hand: outside jit (inside, ids out of range read NaN rows; `Decoder` checks them on the host first)."""
    check_token_array(tokens_BT.shape, str(tokens_BT.dtype))
    if not isinstance(tokens_BT, jax.core.Tracer):
        check_token_values(spec, int(tokens_BT.min()), int(tokens_BT.max()))
    return tokens_BT.shape[1]


def cache_start(cache: KVCache) -> int | None:
    """The last row's first slot (the largest of start_B) before a cache's first write, where at hand (as
    `cache_length`); None once written (the first write gave every row a token: `check_cache_room`)."""
    return int(cache.start_B.max()) if cache_length(cache) == 0 and at_hand(cache.start_B) else None


def cache_length(cache: KVCache) -> int | None:
    """The cache's written slots where they are at hand: on the CPU, outside jit (elsewhere reading the length would
    wait for the device: `Decoder` reads it before every step)."""
    return int(cache.length) if at_hand(cache.length) else None


def lookup(table, ids, mesh: Mesh | None = None):
    """The rows `ids` [...] of an embedding table, float32 [..., D]: gathered from the table in float32, so that the
    backward scatter-adds its row gradients in float32 (nnx.Embed gathers from the table cast to its compute dtype).
    On a `mesh`, from the table whole (`layers.gathered`)."""
    return jnp.take(gathered(table.embedding[...], mesh).astype(jnp.float32), ids, axis=0)


class Transformer(nnx.Module):
    """Decoder-only LM (Hugging Face's `LlamaForCausalLM`): int tokens [B, T] -> float32 logits [B, T, V].

    Weights are drawn natively from the layout table's init rules with `rngs`; load a canonical
    file with `from_safetensors` for bit-identical weights across the twins.
    """

    def __init__(self, spec, *, rngs: nnx.Rngs, attention: str = "auto"):
        spec = load_spec(spec)
        check_model_memory(spec)  # a spec too large for this machine: refused before any allocation
        self.spec = spec
        attention = resolve_attention(attention, spec)
        self.model = TransformerModel(spec, attention, rngs=rngs)
        self.lm_head = None if spec.tie_embeddings else Linear(spec.D, spec.V, spec, rngs)
        draw_weights(self, rngs)

    def __call__(self, tokens_BT, *, taps: dict | None = None, cache: KVCache | None = None, aux: dict | None = None,
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
            logits_BTV = self.model.embed_tokens.attend(x_BTD)
        else:
            logits_BTV = self.lm_head(x_BTD)
        return logits_BTV.astype(jnp.float32)  # logits in float32

    def head_weight(self):
        """The LM head's weight [V, D] in the parameter dtype: lm_head's, or the tied embeddings (what `head`
        multiplies by, for head_loss.fused_head_loss)."""
        if self.lm_head is None:
            return self.model.embed_tokens.embedding[...]
        return self.lm_head.kernel[...].T  # nnx.Linear stores [D, V]

    def init_cache(self, batch: int, size: int, start_B=None) -> KVCache:
        """An empty cache of `size` slots per row; `start_B` [batch] is each row's left padding (default 0)."""
        spec, start_B = self.spec, check_cache_request(self.spec, batch, size, start_B)
        # distinct buffers per layer: a decode step donates (JAX) or writes in place (torch) each one
        layers = tuple(empty_state(spec, spec.mixer_of(i), batch, size) for i in range(spec.L))
        start_B = jnp.zeros((batch,), jnp.int32) if start_B is None else jnp.asarray(start_B, jnp.int32)
        return KVCache(layers, start_B, routing.init_cache(spec, batch, size))


# What a rematted block keeps for the backward: "block" the outputs of its matmuls without batch dims (the
# projections; attention scores, norms and activations are recomputed), "full" nothing but its input
REMAT_POLICIES = {"block": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                  "full": jax.checkpoint_policies.nothing_saveable}


def rematted(layer, remat: str):
    """`layer`'s computation (Block.body), its activations recomputed in the backward as `remat` says ("none": kept;
    the train config's option, docs/training.md, "Training bigger models"); the same values, less memory
    (jax.checkpoint via nnx.remat)."""
    if remat not in TRAIN_CHOICES["remat"]:  # a KeyError 'bogus' from the policy table
        raise ValueError(f"remat={remat!r} must be one of {', '.join(TRAIN_CHOICES['remat'])}")
    if remat == "none":
        return layer.body
    return partial(nnx.remat(_call, policy=REMAT_POLICIES[remat]), layer)


def _call(layer, *args):
    return layer.body(*args)


def record(taps: dict | None, name: str, x) -> None:
    """Keep an intermediate activation for the parity report."""
    if taps is not None:
        taps[name] = x
