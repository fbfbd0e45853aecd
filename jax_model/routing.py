"""Conditional computation for the JAX twin: Mixture-of-Depths and DTF routing over the blocks;
torch_model/routing.py is the same file in PyTorch.

A routed block runs only on the tokens its router selects; the others pass unchanged (docs/routing.md).

- mod (Raposo et al. 2024, "Mixture-of-Depths"): score r = wᵀx per token; a selected token gets
  x + gate(r)·(Block(x) − x), gate the raw score or its sigmoid (`routing_gate`).
- dtf ("Subjective Depth & Timescale Transformers", 2025, thesis eqs. 3.1-3.13, built from the equations):
  blocks pair up, a dense decision block l then the routed dynamic block l+1. From the decision block's
  input H and output H_post, and a prior H_prior = H + PriorFFN(RMSNorm_p(H)):
  D_st = mean_d (H_post − H)², D_ch = mean_d (H_post − H_prior)², CE = D_st − D_ch + log(o_ce + 1e−10),
  CU = D_st − m_cu·MA_W(stopgrad(D_st)), G = S_CE + S_CU − S_CE·S_CU with S_x = σ(softplus(β_x)·x);
  a selected token gets H_post + G·(Block(H_post) − H_post).
  MA_W at position t is the mean of D_st over positions max(0, t−W+1)..t (the first W−1 positions
  average over the t+1 they have).

Selection, `decide`:
- "topk" (training, evaluation): per sequence the k = floor(γ·T) tokens of highest score, ordered by
  (score descending, position ascending) with a stable sort, then put back in position order. The block
  runs on the gathered [B, k, D] tokens only: causal among themselves by original position, RoPE at the
  original positions, each row apart. Its updates are scattered back.
- "predictor" (causal decoding): a token runs the block iff its predictor's sigmoid > 0.5 (logit > 0).
  The block runs on every token with the keys of the skipped ones masked out, and its update is kept for
  the selected ones only; with a cache, a skipped token writes no key or value at this layer (its slot
  stays as it was, and no query reads it), so cached decoding equals this full forward.

Notation: B batch, T tokens, S cache slots (keys), k selected tokens per row, D model dim.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from shared_config import ModelSpec

from .layers import DTYPES, MLP, Linear, RMSNorm

GATES = {"raw": lambda r_BT: r_BT, "sigmoid": jax.nn.sigmoid}  # mod: what multiplies a selected token's update


class RoutingCache(NamedTuple):
    """One routed layer's decoding state: which slots ran the block (only those are read), and D_st per slot (dtf)."""

    keep_BS: jax.Array  # bool [B, S]
    dst_BS: jax.Array | None  # float32 [B, S], dtf only

    def write(self, at, keep_BT, dst_BT) -> RoutingCache:
        """The cache with slots at..at+T−1 written (`at` traced)."""
        keep_BS = jax.lax.dynamic_update_slice(self.keep_BS, keep_BT, (0, at))
        dst_BS = None if self.dst_BS is None else jax.lax.dynamic_update_slice(self.dst_BS, dst_BT, (0, at))
        return RoutingCache(keep_BS, dst_BS)


def init_cache(spec: ModelSpec, batch: int, size: int) -> tuple[RoutingCache | None, ...]:
    """Empty routing state for each layer (None where a layer is not routed)."""
    def one(i):
        if i not in spec.routed_layers:
            return None
        dst = jnp.zeros((batch, size), jnp.float32) if spec.routing == "dtf" else None
        return RoutingCache(jnp.zeros((batch, size), bool), dst)

    return tuple(one(i) for i in range(spec.L))


class Predictor(nnx.Module):
    """The causal router (MoD paper, sec. 3.5): Linear(D, D/2) → SiLU → Linear(D/2, 1), no biases; logits [B, T]
    float32."""

    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        self.fc1 = Linear(spec.D, spec.D // 2, spec, rngs)
        self.fc2 = Linear(spec.D // 2, 1, spec, rngs)

    def __call__(self, x_BTD):
        h_BTF = jax.nn.silu(self.fc1(x_BTD).astype(jnp.float32))  # activation in float32
        return self.fc2(h_BTF.astype(x_BTD.dtype)).astype(jnp.float32)[..., 0]


class ModRouter(nnx.Module):
    """r = wᵀx, one [D] weight, no bias; score and gate [B, T] float32 (the score in float32, whatever the compute
    dtype)."""

    def __init__(self, spec: ModelSpec):
        self.gate = spec.routing_gate
        self.weight = nnx.Param(jnp.zeros((spec.D,), DTYPES[spec.param_dtype]))

    def __call__(self, x_BTD, h_BTD, ma):
        r_BT = x_BTD.astype(jnp.float32) @ self.weight[...].astype(jnp.float32)
        return r_BT, GATES[self.gate](r_BT), None, None


class DtfRouter(nnx.Module):
    """DTF's surprise gate G [B, T] float32 from the decision block's input H and output H_post (module docstring)."""

    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        self.prior_norm = RMSNorm(spec.D, spec.norm_eps, False, spec.param_dtype)
        self.prior_ffn = MLP(spec.replace(d_ff=spec.dtf_prior_dim, mlp="swiglu"), rngs=rngs)
        dtype = DTYPES[spec.param_dtype]
        self.beta_ce, self.beta_cu, self.o_ce, self.m_cu = (nnx.Param(jnp.zeros((1,), dtype)) for _ in range(4))

    def __call__(self, post_BTD, h_BTD, ma):
        """G (score and gate), D_st [B, T] for the moving average's history, and MSE(H_prior, stopgrad(H_post))."""
        prior_BTD = h_BTD + self.prior_ffn(self.prior_norm(h_BTD))
        post32, h32, prior32 = (x.astype(jnp.float32) for x in (post_BTD, h_BTD, prior_BTD))  # statistics in float32
        dst_BT = jnp.mean(jnp.square(post32 - h32), axis=-1)
        dch_BT = jnp.mean(jnp.square(post32 - prior32), axis=-1)
        beta_ce, beta_cu, o_ce, m_cu = (p[...].astype(jnp.float32)[0]
                                        for p in (self.beta_ce, self.beta_cu, self.o_ce, self.m_cu))
        ce_BT = dst_BT - dch_BT + jnp.log(o_ce + 1e-10)
        cu_BT = dst_BT - m_cu * ma(jax.lax.stop_gradient(dst_BT))
        s_ce_BT = jax.nn.sigmoid(jax.nn.softplus(beta_ce) * ce_BT)
        s_cu_BT = jax.nn.sigmoid(jax.nn.softplus(beta_cu) * cu_BT)
        g_BT = s_ce_BT + s_cu_BT - s_ce_BT * s_cu_BT
        prior_mse = jnp.mean(jnp.square(prior32 - jax.lax.stop_gradient(post32)))
        return g_BT, g_BT, dst_BT, prior_mse


def select_top_k(score_BT, k: int):
    """Positions [B, k] of the k highest scores per row, in position order: a stable sort on (−score, position)."""
    order_BT = jnp.argsort(-score_BT, axis=-1, stable=True)  # ties: the lower position first
    return jnp.sort(order_BT[:, :k], axis=-1)


def window_mean(v_BS, mask_BTS, slots_T, window: int):
    """MA_W: per query, the mean of v over the slots it reads (`mask_BTS`) among its own and the W−1 before it."""
    s_S = jnp.arange(v_BS.shape[1])
    band_BTS = mask_BTS & (s_S[None, None, :] > slots_T[None, :, None] - window)
    total_BT = jnp.sum(jnp.where(band_BTS, v_BS[:, None, :], 0.0), axis=-1)
    return total_BT / jnp.sum(band_BTS, axis=-1)


class Routes:
    """The routing of one forward: each routed block calls it inside its own call (Block's `route`, bound to the
    block's index); keeps the routed blocks' auxiliary losses and decoding state.

    `decide`: "topk" or "predictor" (module docstring); None: "topk" without a cache, "predictor" with one.
    `aux`: the dict `finish` fills with the auxiliary terms (training), or None: then a top-k forward does not
    run the predictor, whose logits only the auxiliary loss reads there.
    """

    def __init__(self, spec: ModelSpec, routing_cache: tuple | None, decide: str | None, aux: dict | None):
        if decide is None:
            decide = "topk" if routing_cache is None else "predictor"
        if decide not in ("topk", "predictor"):
            raise ValueError(f"decide={decide!r} must be 'topk' or 'predictor'")
        if decide == "topk" and routing_cache is not None and spec.routing != "none":
            raise ValueError("top-k routing reads future tokens: cached decoding needs decide='predictor'")
        self.spec, self.decide, self.caches, self.aux = spec, decide, routing_cache, aux
        self.new_caches = list(routing_cache) if routing_cache is not None else None
        self.bce, self.accuracy, self.prior_mse = [], [], []

    def __call__(self, i: int, h_BTD, layer, x_BTD, cos, sin, taps, cache, mask_BTS, run):
        """Routed block i on x [B, T, D] (h: the previous block's input, for dtf), called from inside the block's own
        call (Block's `route`); `run`: the block's computation on the tokens it runs. Its output [B, T, D], its
        cache."""
        B, T, _ = x_BTD.shape
        if cache is None:  # a full forward: positions 0..T−1 in every row, causal
            slots_T, read_BTS = jnp.arange(T), jnp.tril(jnp.ones((T, T), bool))[None]
        else:  # the next T slots; each query reads the slots `mask_BTS` allows
            slots_T, read_BTS = cache.length + jnp.arange(T), mask_BTS
        rcache = None if self.caches is None else self.caches[i]

        def ma(dst_BT):  # dtf's causal moving average, over this call's values and the cached ones
            history_BS = (dst_BT if rcache is None
                          else jax.lax.dynamic_update_slice(rcache.dst_BS, dst_BT, (0, cache.length)))
            return window_mean(history_BS, read_BTS, slots_T, self.spec.dtf_window)

        score_BT, gate_BT, dst_BT, prior_mse = layer.router(x_BTD, h_BTD, ma)
        # the predictor reads stopgrad(x): it learns to imitate top-k without steering the blocks
        logit_BT = (layer.router_predictor(jax.lax.stop_gradient(x_BTD))
                    if self.decide == "predictor" or self.aux is not None else None)
        if prior_mse is not None:
            self.prior_mse.append(prior_mse)
        if self.decide == "topk":
            k = self.spec.routed_tokens(T)
            idx_BK = select_top_k(score_BT, k)
            # the scatters per row (vmap): on a mesh XLA then keeps each row's on its device; indexed by an explicit
            # arange(B) it gathered every row's indices and updates [B, k, D] onto every device
            keep_BT = jax.vmap(lambda i_K: jnp.zeros((T,), bool).at[i_K].set(True))(idx_BK)
            x_BKD = jnp.take_along_axis(x_BTD, idx_BK[..., None], axis=1)
            cos_k, sin_k = (None,
                            None) if cos is None else (jnp.take(cos, idx_BK, axis=0), jnp.take(sin, idx_BK, axis=0))
            y_BKD, _ = run(x_BKD, cos_k, sin_k, taps) if k else (x_BKD, None)
            gate_BK = jnp.take_along_axis(gate_BT, idx_BK, axis=1)
            update_BKD = (y_BKD - x_BKD) * gate_BK[..., None].astype(x_BTD.dtype)
            out_BTD = jax.vmap(lambda x_TD, i_K, u_KD: x_TD.at[i_K].add(u_KD))(x_BTD, idx_BK, update_BKD)
            if logit_BT is not None:
                target_BT = keep_BT.astype(jnp.float32)  # the predictor learns top-k membership (BCE on logits)
                self.bce.append(jnp.mean(jax.nn.softplus(logit_BT) - target_BT * logit_BT))
                self.accuracy.append(jnp.mean(((logit_BT > 0) == keep_BT).astype(jnp.float32)))
        else:
            keep_BT = logit_BT > 0  # sigmoid > 0.5
            keep_BS = (keep_BT if rcache is None
                       else jax.lax.dynamic_update_slice(rcache.keep_BS, keep_BT, (0, cache.length)))
            s_S = jnp.arange(keep_BS.shape[1])
            own_BTS = (s_S[None, :] == slots_T[:, None])[None]  # a skipped query reads itself: no empty softmax
            if cache is not None:  # a skipped token writes no key or value at this layer
                cache = cache.keeping(keep_BT)
            y_BTD, cache = run(x_BTD, cos, sin, taps, cache, read_BTS & (keep_BS[:, None, :] | own_BTS))
            update_BTD = (y_BTD - x_BTD) * gate_BT[..., None].astype(x_BTD.dtype)
            out_BTD = x_BTD + jnp.where(keep_BT[..., None], update_BTD, 0)
            if rcache is not None:
                self.new_caches[i] = rcache.write(slots_T[0], keep_BT, dst_BT)
        if taps is not None:
            taps.update(residual=out_BTD, router_score=score_BT, router_keep=keep_BT)
        return out_BTD, cache

    def finish(self) -> tuple | None:
        """Put the mean auxiliary terms over the routed blocks into `aux` (top-k only); the new routing caches."""
        aux = self.aux
        if aux is not None and self.bce:
            aux["router_bce"] = sum(self.bce) / len(self.bce)
            aux["predictor_acc"] = sum(self.accuracy) / len(self.accuracy)
            if self.prior_mse:
                aux["prior_mse"] = sum(self.prior_mse) / len(self.prior_mse)
        return None if self.new_caches is None else tuple(self.new_caches)
