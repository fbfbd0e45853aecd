"""The transformer block of the JAX twin (Flax NNX): norm slots around a token mixer and an MLP, placed as the spec
says (shared_config/placement.py); torch_model/block.py is the same file in PyTorch.

Notation: B batch, T tokens, D model dim.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from shared_config import ModelSpec
from shared_config.layout import state_layout
from shared_config.placement import Placement, residual_alpha

from .attention import Attention, LayerCache
from .gla import GLA, GLAState
from .layers import DTYPES, MLP, make_norm
from .routing import DtfRouter, ModRouter, Predictor


def maybe(norm, x_BTD):
    """norm(x), or x where the block's placement leaves that slot out."""
    return x_BTD if norm is None else norm(x_BTD)


# The two halves of a block, one small function per way of placing its norms (shared_config/placement.py):
# n1 = input_layernorm, n2 = post_attention_layernorm, α = residual_alpha (DeepNorm's, else 1).
def pre_attention(b, x_BTD, attend):
    """x + n_out(attn(n1(x))): Pre-LN (no n_out), Peri-LN, HybridNorm (no n1). Returns (x, branch,
    the mixer's state)."""
    a_BTD, cache = attend(maybe(b.input_layernorm, x_BTD))
    a_BTD = maybe(b.attn_output_norm, a_BTD)
    return x_BTD + a_BTD, a_BTD, cache


def post_attention(b, x_BTD, attend):
    """n1(α·x + attn(x)): Post-LN (α = 1) and DeepNorm."""
    a_BTD, cache = attend(x_BTD)
    return b.input_layernorm(b.alpha * x_BTD + a_BTD), a_BTD, cache


def pre_mlp(b, x_BTD):
    """x + n_out(mlp(n2(x))). Returns (x, branch)."""
    m_BTD = maybe(b.mlp_output_norm, b.mlp(b.post_attention_layernorm(x_BTD)))
    return x_BTD + m_BTD, m_BTD


def post_mlp(b, x_BTD):
    """n2(α·x + mlp(x))."""
    m_BTD = b.mlp(x_BTD)
    return b.post_attention_layernorm(b.alpha * x_BTD + m_BTD), m_BTD


def hybrid_mlp(b, x_BTD):
    """y + mlp(y) with y = n2(x): HybridNorm's Post-Norm FFN."""
    y_BTD = b.post_attention_layernorm(x_BTD)
    m_BTD = b.mlp(y_BTD)
    return y_BTD + m_BTD, m_BTD


ATTENTION_HALVES = {"pre": pre_attention, "post": post_attention}
MLP_HALVES = {"pre": pre_mlp, "post": post_mlp, "hybrid": hybrid_mlp}


def make_mixer(spec: ModelSpec, mixer: str, attention: str, rngs: nnx.Rngs) -> Attention | GLA:
    """The block's token mixer, `mixer` (its layer's: `spec.mixer_of(i)`, one file per mixer); `attention`: the
    attention kernel's name.
    Raises ValueError for a mixer with no module here (a value added to the spec's CHOICES alone)."""
    if mixer == "attention":
        return Attention(spec, attention, rngs=rngs)
    if mixer == "gla":
        return GLA(spec, rngs=rngs)
    raise ValueError(f"make_mixer: no module for mixer={mixer!r} (docs/extending.md)")


def empty_state(spec: ModelSpec, mixer: str, batch: int, size: int) -> LayerCache | GLAState:
    """An empty decoding state of `size` slots for one block's token mixer, `mixer` (its layer's): attention's keys and
    values [batch, size, K, E] in the compute dtype, GLA's recurrent state. Raises ValueError for a mixer with no
    state here (one added to make_mixer alone would decode with attention's cache)."""
    if mixer == "attention":
        shape, dtype = state_layout(spec, mixer, batch, size)
        return LayerCache(jnp.zeros(shape, DTYPES[dtype]), jnp.zeros(shape, DTYPES[dtype]), jnp.zeros((), jnp.int32))
    if mixer == "gla":
        return GLAState.empty(spec, batch, size)
    raise ValueError(f"empty_state: no decoding state for mixer={mixer!r} (docs/extending.md)")


def make_router(spec: ModelSpec, rngs: nnx.Rngs) -> ModRouter | DtfRouter:
    """A routed block's router for `spec.routing`; raises ValueError for a routing kind with no router here."""
    if spec.routing == "mod":
        return ModRouter(spec)
    if spec.routing == "dtf":
        return DtfRouter(spec, rngs)
    raise ValueError(f"make_router: no router for routing={spec.routing!r} (docs/extending.md)")


class Block(nnx.Module):
    """One transformer block: its `placement` says which norm slots it has and which halves above run."""

    def __init__(self, spec: ModelSpec, mixer: str, attention: str, placement: Placement, routed: bool = False, *,
                 rngs: nnx.Rngs):
        self.placement, self.alpha = placement, residual_alpha(spec)
        self.input_layernorm = make_norm(spec) if placement.input_norm else None
        # token mixer
        self.self_attn = make_mixer(spec, mixer, attention, rngs)
        self.attn_output_norm = make_norm(spec) if placement.output_norms else None
        self.post_attention_layernorm = make_norm(spec)
        self.mlp = MLP(spec, rngs=rngs)
        self.mlp_output_norm = make_norm(spec) if placement.output_norms else None
        if routed:  # conditional computation (routing.py), canonical names `model.layers.{i}.router...`
            self.router = make_router(spec, rngs)
            self.router_predictor = Predictor(spec, rngs)

    def __call__(self, x_BTD, cos_BTE, sin_BTE, taps: dict | None = None, cache: LayerCache | GLAState | None = None,
                 mask_BTS=None, route=None, run=None):
        """Output [B, T, D] and the token mixer's updated state (`cache`: this block's slot of the model's cache,
        attention's keys and values or GLA's recurrent state; None without one). `run`: the block's computation
        (`body`, or its rematted call in training). A routed block gets `route` (routing.Routes, bound to its index):
        its router and predictor run here, inside the block's own call, as every module a sharding unit owns must
        (FSDP2 gathers a unit's weights for its forward only), and `run` on the tokens they select."""
        run = self.body if run is None else run
        if route is None:
            return run(x_BTD, cos_BTE, sin_BTE, taps, cache, mask_BTS)
        return route(self, x_BTD, cos_BTE, sin_BTE, taps, cache, mask_BTS, run)

    def body(self, x_BTD, cos_BTE, sin_BTE, taps: dict | None = None, cache: LayerCache | GLAState | None = None,
             mask_BTS=None):
        """The block on x [B, T, D], every token: output [B, T, D] and the token mixer's updated state (None without
        one)."""
        def attend(h_BTD):
            return self.self_attn(h_BTD, cos_BTE, sin_BTE, cache, mask_BTS)

        x_BTD, a_BTD, cache = ATTENTION_HALVES[self.placement.attention](self, x_BTD, attend)
        x_BTD, m_BTD = MLP_HALVES[self.placement.mlp](self, x_BTD)
        if taps is not None:
            taps.update(attn_out=a_BTD, mlp_out=m_BTD, residual=x_BTD)
        return x_BTD, cache
