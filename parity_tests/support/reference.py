"""An independent float64 numpy implementation of the model semantics (docs/spec.md, "Semantics").

Written from the semantics, not from either twin: it shares no code with them beyond the spec,
and computes RoPE frequencies (with llama3 scaling), masks and GQA its own way.
"""

from __future__ import annotations

import math

import numpy as np
erf = np.vectorize(math.erf, otypes=[np.float64])  # float64 erf without scipy


def norm(x, w: dict, prefix: str, spec):
    """One norm slot, from the canonical tensors under `prefix`."""
    weight = w[f"{prefix}.weight"]
    if spec.norm_type == "rms":
        y = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + spec.norm_eps)
    elif spec.norm_type == "layernorm":
        mu = np.mean(x, axis=-1, keepdims=True)
        y = (x - mu) / np.sqrt(np.var(x, axis=-1, keepdims=True) + spec.norm_eps)
    elif spec.norm_type == "dyt":
        y = np.tanh(w[f"{prefix}.alpha"][0] * x)
    elif spec.norm_type == "derf":
        y = erf(w[f"{prefix}.alpha"][0] * x + w[f"{prefix}.shift"][0])
    else:
        raise ValueError(f"reference.norm: norm_type={spec.norm_type!r} is not written here")
    y = y * weight
    return y + w[f"{prefix}.bias"] if spec.norm_bias else y


def rms(x, weight, eps):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * weight


def inv_frequencies(spec) -> np.ndarray:
    E = spec.E
    freqs = np.array([spec.rope_theta ** (-2.0 * j / E) for j in range(E // 2)])
    if spec.rope_scaling != "llama3":
        return freqs
    out = []
    low_wavelen = spec.rope_original_max_seq_len / spec.rope_low_freq_factor
    high_wavelen = spec.rope_original_max_seq_len / spec.rope_high_freq_factor
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / spec.rope_scaling_factor)
        else:
            s = (spec.rope_original_max_seq_len / wavelen - spec.rope_low_freq_factor) / (
                spec.rope_high_freq_factor - spec.rope_low_freq_factor
            )
            out.append((1 - s) * f / spec.rope_scaling_factor + s * f)
    return np.array(out)


def rope(x, spec, positions=None):
    """x [B, T, heads, E]: rotate pairs (i, i + E/2) by angle position * freq_i; positions [T] (default 0..T-1)."""
    T, E = x.shape[1], x.shape[-1]
    positions = np.arange(T) if positions is None else np.asarray(positions, np.float64)
    angle = positions[:, None] * inv_frequencies(spec)[None, :]  # [T, E/2]
    cos, sin = np.cos(angle)[None, :, None, :], np.sin(angle)[None, :, None, :]
    a, b = x[..., : E // 2], x[..., E // 2 :]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def layer_mixer(spec, i: int) -> str:
    """Layer i's token mixer, from the definition of `gla_attention_every` (docs/gla.md, "Hybrid stacks"), not from
    the spec's own helper: with mixer gla and k >= 1, layers i with (i + 1) % k == 0 are softmax attention."""
    k = getattr(spec, "gla_attention_every", 0)
    if spec.mixer == "gla" and k >= 1 and (i + 1) % k == 0:
        return "attention"
    return spec.mixer


def attention(x, w: dict, p: str, spec, positions=None, i: int = 0):
    """Layer i's token mixer (the reference's mixer dispatch despite its name): causal softmax attention over the T
    tokens of x [B, T, D], at positions [T] (default 0..T-1: RoPE's angles), or GLA, which takes no positions."""
    mixer = layer_mixer(spec, i)
    if mixer == "gla":
        return gla(x, w, p, spec)
    if mixer != "attention":
        raise ValueError(f"reference.attention: mixer={mixer!r} is not written here")
    B, T, _ = x.shape
    H, K, E = spec.H, spec.K, spec.E
    q = (x @ w[f"{p}.q_proj.weight"].T).reshape(B, T, H, E)
    k = (x @ w[f"{p}.k_proj.weight"].T).reshape(B, T, K, E)
    v = (x @ w[f"{p}.v_proj.weight"].T).reshape(B, T, K, E)
    if spec.qk_norm or spec.norm_placement in HYBRID:
        q, k = rms(q, w[f"{p}.q_norm.weight"], spec.norm_eps), rms(k, w[f"{p}.k_norm.weight"], spec.norm_eps)
    if spec.norm_placement in HYBRID:  # HybridNorm's QKV-norm: V too, per head over E, RMSNorm
        v = rms(v, w[f"{p}.v_norm.weight"], spec.norm_eps)
    if spec.position == "rope":
        q, k = rope(q, spec, positions), rope(k, spec, positions)
    out = np.zeros((B, T, H, E))
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    for h in range(H):
        kv = h // (H // K)  # each kv head serves H/K consecutive query heads
        s = np.einsum("bte,bse->bts", q[:, :, h], k[:, :, kv]) / math.sqrt(E)
        s = np.where(future, -np.inf, s)
        s = np.exp(s - s.max(-1, keepdims=True))
        out[:, :, h] = np.einsum("bts,bse->bte", s / s.sum(-1, keepdims=True), v[:, :, kv])
    return out.reshape(B, T, H * E) @ w[f"{p}.o_proj.weight"].T


def mlp(x, w: dict, p: str, spec):
    up = x @ w[f"{p}.up_proj.weight"].T
    gate = x @ w[f"{p}.gate_proj.weight"].T if spec.mlp == "swiglu" else None
    return hidden(spec.mlp, up, gate) @ w[f"{p}.down_proj.weight"].T


def hidden(kind: str, up, gate=None):
    """The MLP's hidden activations from x·W_upᵀ (and x·W_gateᵀ for SwiGLU)."""
    if kind == "swiglu":
        return gate / (1 + np.exp(-gate)) * up
    if kind == "gelu":
        return 0.5 * up * (1 + erf(up / math.sqrt(2)))
    if kind == "gelu_tanh":
        return 0.5 * up * (1 + np.tanh(math.sqrt(2 / math.pi) * (up + 0.044715 * up**3)))
    if kind == "relu2":
        return np.maximum(up, 0) ** 2
    raise ValueError(f"reference.mlp: mlp={kind!r} is not written here")


# --- norm placements: each written out from its definition (docs/spec.md, "Semantics") -------------------
HYBRID = ("hybrid", "hybrid_star")


def block(x, w: dict, p: str, i: int, spec, positions=None):
    """Block i: (its output, the attention branch, the MLP branch), with n1, n2 the slots named below; the tokens
    of x [B, T, D] at positions [T] (default 0..T-1), each attending to itself and the ones before it."""
    attn = lambda h: attention(h, w, f"{p}.self_attn", spec, positions, i)  # noqa: E731
    ffn = lambda h: mlp(h, w, f"{p}.mlp", spec)  # noqa: E731
    n1 = lambda h: norm(h, w, f"{p}.input_layernorm", spec)  # noqa: E731
    n2 = lambda h: norm(h, w, f"{p}.post_attention_layernorm", spec)  # noqa: E731
    placement = spec.norm_placement
    if placement == "hybrid_star" and i == 0:
        placement = "pre"  # HybridNorm*: block 0 is Pre-Norm (its attention keeps the QKV norms)
    if placement in ("post", "deepnorm"):  # x = n1(α·x + attn(x)); x = n2(α·x + mlp(x))
        alpha = (2 * spec.L) ** 0.25 if placement == "deepnorm" else 1.0  # DeepNet, decoder-only
        a = attn(x)
        x = n1(alpha * x + a)
        m = ffn(x)
        return n2(alpha * x + m), a, m
    if placement == "pre_post":  # x = x + attn(n1(x)); x = n2(x + mlp(x))
        a = attn(n1(x))
        x = x + a
        m = ffn(x)
        return n2(x + m), a, m
    if placement in HYBRID:  # x = x + attn_qkvnorm(x); y = n2(x); x = y + mlp(y)
        a = attn(x)
        y = n2(x + a)
        m = ffn(y)
        return y + m, a, m
    if placement not in ("pre", "peri"):  # it ran Pre-LN, and passed against twins computing Pre-LN too
        raise ValueError(f"reference.block: norm_placement={placement!r} is not written here")
    a = attn(n1(x))  # pre: x = x + attn(n1(x)); x = x + mlp(n2(x)); peri norms each branch's output too
    if placement == "peri":
        a = norm(a, w, f"{p}.attn_output_norm", spec)
    x = x + a
    m = ffn(n2(x))
    if placement == "peri":
        m = norm(m, w, f"{p}.mlp_output_norm", spec)
    return x + m, a, m


def embed(w: dict, spec, tokens: np.ndarray) -> np.ndarray:
    """The embeddings [B, T, D] of int tokens [B, T]: token rows (+ learned positions), × the scale, then the
    embedding norm if `embed_norm` (Peri-LN, Kim et al. 2025, and OLMo-core's embedding_norm: after the scale)."""
    x = w["model.embed_tokens.weight"][tokens]
    if spec.position == "learned":
        x = x + w["model.embed_positions.weight"][: tokens.shape[1]]
    if spec.embed_scale == "learnable":
        x = x * w["model.embed_scale"][0]
    elif spec.embed_scale == "constant":
        x = x * math.sqrt(spec.D)
    return norm(x, w, "model.embed_norm", spec) if spec.embed_norm else x


def forward(weights: dict, spec, tokens: np.ndarray, taps: dict | None = None, decide: str = "topk",
            aux: dict | None = None, held: dict | None = None) -> np.ndarray:
    """float64 logits [B, T, V] for int tokens [B, T]; routed specs: `decide`, `aux` and `held` as in `route`."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    x = embed(w, spec, tokens)
    if taps is not None:
        taps["model.embed"] = x
    h = x  # the input of the block before (a dtf dynamic block reads it)
    for i in range(spec.L):
        p = f"model.layers.{i}"
        if i in spec.routed_layers:  # conditional computation: `route` below
            x, h = route(x, h, w, p, spec, decide, aux, taps, held), x
            continue
        h = x
        x, a, m = block(x, w, p, i, spec)
        if taps is not None:
            taps[p] = {"attn_out": a, "mlp_out": m, "residual": x}
    if spec.norm_placement not in ("post", "deepnorm"):
        x = norm(x, w, "model.norm", spec)
    if taps is not None:
        taps["model.norm"] = x
    head = w["model.embed_tokens.weight"] if spec.tie_embeddings else w["lm_head.weight"]
    return x @ head.T


# --- Gated Linear Attention (mixer: gla) --------------------------------------------------------------
def gla(x, w: dict, p: str, spec, S=None, valid=None):
    """GLA (Yang et al. 2023, arXiv 2312.06635) by its recurrence, one token at a time, in float64:
    log a_t = logsigmoid(gk_t) / normalizer, S_t = diag(a_t) S_{t-1} + k_t^T v_t, o_t = (q_t / sqrt(K')) S_t,
    y_t = W_o concat_h(norm(o_t) * swish(g_t)). `S` [B, H, K', V'] the state before x (zero when None);
    `valid` [B, T] False for padding tokens, which leave the state unchanged. With `S` given: (y, last state)."""
    B, T, _ = x.shape
    H = spec.n_heads
    Kh, Vh = round(spec.gla_expand_k * spec.d_model) // H, round(spec.gla_expand_v * spec.d_model) // H
    q = (x @ w[f"{p}.q_proj.weight"].T).reshape(B, T, H, Kh) / math.sqrt(Kh)
    k = (x @ w[f"{p}.k_proj.weight"].T).reshape(B, T, H, Kh)
    v = (x @ w[f"{p}.v_proj.weight"].T).reshape(B, T, H, Vh)
    g = x @ w[f"{p}.g_proj.weight"].T
    gk = (x @ w[f"{p}.gk_proj.0.weight"].T) @ w[f"{p}.gk_proj.1.weight"].T + w[f"{p}.gk_proj.1.bias"]
    log_a = (-np.logaddexp(0.0, -gk) / spec.gla_gate_normalizer).reshape(B, T, H, Kh)  # stable logsigmoid
    state = np.zeros((B, H, Kh, Vh)) if S is None else np.array(S, dtype=np.float64)
    o, state = gla_recurrence(q, k, v, log_a, state, valid)
    if spec.gla_output_norm == "rms":
        o = rms(o, w[f"{p}.g_norm.weight"], spec.norm_eps)
    else:
        o = norm(o, w, f"{p}.g_norm", spec)
    y = (o.reshape(B, T, H * Vh) * (g / (1 + np.exp(-g)))) @ w[f"{p}.o_proj.weight"].T
    return y if S is None else (y, state)


def gla_recurrence(q, k, v, log_a, S, valid=None):
    """GLA's recurrence in float64, token by token: S_t = diag(exp(log_a_t)) S_{t-1} + k_t^T v_t, o_t = q_t S_t.
    q, k, log_a [B, T, H, K'], v [B, T, H, V'], S [B, H, K', V'] the state before; `valid` [B, T] False for tokens
    that leave the state unchanged. Returns o [B, T, H, V'] and the last state."""
    q, k, v, log_a, state = (np.asarray(a, np.float64) for a in (q, k, v, log_a, S))
    o = np.zeros(v.shape)
    for t in range(q.shape[1]):
        new = np.exp(log_a[:, t])[..., None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        state = new if valid is None else np.where(valid[:, t, None, None, None], new, state)
        o[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], state)
    return o, state


# --- conditional computation (docs/routing.md): Mixture-of-Depths and DTF, from the definitions -------------


def block_at(x, positions, w: dict, p: str, spec):
    """Block p on the tokens x [B, n, D] at the increasing positions [n] (a routed block's selection): RoPE at
    those positions, each token attending to itself and the tokens before it in the list."""
    return block(x, w, p, int(p.rsplit(".", 1)[1]), spec, positions)[0]


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def softplus(z):
    return np.log1p(np.exp(z))


def stopgrad(held: dict | None, key: str, value):
    """A stop-gradient as a finite difference sees it: `value`, or, with `held` (a dict), the value first recorded
    under `key` (at the unperturbed weights), so that a perturbation of the weights does not reach it."""
    return value if held is None else held.setdefault(key, value)


def router_scores(x, h, w: dict, p: str, spec, held: dict | None = None):
    """(score, gate [B, T], prior MSE or None) of routed block p: mod's r = wᵀx, or dtf's G from the decision
    block's input h and output x; `held`: see `stopgrad`."""
    if spec.routing == "mod":
        r = x @ w[f"{p}.router.weight"]
        return r, (r if spec.routing_gate == "raw" else sigmoid(r)), None
    if spec.routing != "dtf":
        raise ValueError(f"reference.router_scores: routing={spec.routing!r} is not written here")
    q = f"{p}.router"
    z = rms(h, w[f"{q}.prior_norm.weight"], spec.norm_eps)
    g = z @ w[f"{q}.prior_ffn.gate_proj.weight"].T
    prior = h + (g * sigmoid(g) * (z @ w[f"{q}.prior_ffn.up_proj.weight"].T)) @ w[f"{q}.prior_ffn.down_proj.weight"].T
    d_st = np.mean((x - h) ** 2, axis=-1)
    d_ch = np.mean((x - prior) ** 2, axis=-1)
    T, W = x.shape[1], spec.dtf_window
    d_held = stopgrad(held, f"{q}.d_st", d_st)  # MA_W(stopgrad(D_st))
    ma = np.stack([d_held[:, max(0, t - W + 1) : t + 1].mean(axis=1) for t in range(T)], axis=1)  # docs/routing.md
    ce = d_st - d_ch + np.log(w[f"{q}.o_ce"][0] + 1e-10)
    cu = d_st - w[f"{q}.m_cu"][0] * ma
    s_ce, s_cu = sigmoid(softplus(w[f"{q}.beta_ce"][0]) * ce), sigmoid(softplus(w[f"{q}.beta_cu"][0]) * cu)
    G = s_ce + s_cu - s_ce * s_cu
    return G, G, np.mean((prior - stopgrad(held, f"{q}.post", x)) ** 2)  # MSE(H_prior, stopgrad(H_post))


def route(x, h, w: dict, p: str, spec, decide: str = "topk", aux: dict | None = None, taps: dict | None = None,
          held: dict | None = None):
    """Routed block p on x [B, T, D]: the selected tokens of each row, gathered, run `block_at` at their own
    positions, and get x + gate·(block − x) back; the others pass unchanged.

    decide="topk": the floor(γ·T) highest scores, ties to the lower position; "predictor": the tokens whose
    predictor logit is > 0. `aux` (top-k) collects router_bce, predictor_acc and prior_mse, each the mean over
    the routed blocks so far. `held` (a dict): the stop-gradient inputs (the predictor's x, dtf's D_st under the
    moving average and H_post in the prior MSE) are read from it, recorded there at the first call (`stopgrad`).
    """
    B, T, _ = x.shape
    score, gate, prior_mse = router_scores(x, h, w, p, spec, held)
    hidden = stopgrad(held, f"{p}.predictor_input", x) @ w[f"{p}.router_predictor.fc1.weight"].T
    logit = (hidden * sigmoid(hidden)) @ w[f"{p}.router_predictor.fc2.weight"][0]
    out, keep = x.copy(), np.zeros((B, T), bool)
    for b in range(B):
        if decide == "topk":
            chosen = sorted(sorted(range(T), key=lambda t: (-score[b, t], t))[: math.floor(spec.routing_capacity * T)])
        else:
            chosen = [t for t in range(T) if logit[b, t] > 0]
        keep[b, chosen] = True
        if chosen:
            y = block_at(x[b, chosen][None], chosen, w, p, spec)[0]
            out[b, chosen] = x[b, chosen] + gate[b, chosen, None] * (y - x[b, chosen])
    if aux is not None and decide == "topk":
        terms = {"router_bce": np.mean(np.where(keep, -np.log(sigmoid(logit)), -np.log(1 - sigmoid(logit)))),
                 "predictor_acc": np.mean((logit > 0) == keep)}
        if prior_mse is not None:
            terms["prior_mse"] = prior_mse
        for name, value in terms.items():
            aux.setdefault(f"_{name}", []).append(value)
            aux[name] = float(np.mean(aux[f"_{name}"]))
    if taps is not None:
        taps[p] = {"residual": out, "router_score": score, "router_keep": keep, "router_logit": logit}
    return out
