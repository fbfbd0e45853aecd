"""Model FLOPs per token, for MFU (bench/, whose bench/flops.py holds the device peaks) and the routing study.

FLOPs per token, as nanoGPT and torchtitan count them (PaLM paper, appendix B):
    train:   6·N + 12·L·H·E·T
    forward: 2·N +  4·L·H·E·T
N is the number of weights that take part in a matmul: every Linear, plus the LM head (the
token embedding when tied); the input embedding lookup is not a matmul and is excluded, as are
norm and scalar parameters. The attention term counts q·kᵀ and p·v for all T keys (2·2·T·E per
head per layer forward), without discounting the causal mask; `causal=True` halves it (6·N + 6·L·H·E·T for a train
step, as llm.c counts), the count the bench reports beside the first. A GLA layer (mixer: gla) has no term in T:
per token and head its recurrence does k_tᵀv_t and q_t·S_t (2·2·K'·V' forward), whatever form computes it. A
hybrid stack (gla_attention_every) counts each layer's own mixer (`mixer_flops`).

A train step's 6 per weight is 2 forward + 4 backward: the gradients of the matmul's input and of its weight, 2
each (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", sec. 2.1). A weight whose input's gradient is
stopped gets the second alone: 4 per weight (Hobbhahn & Sevilla 2021, "What's the backward-forward FLOP ratio for
neural networks?", epoch.ai: a first layer's backward costs 1x its forward). In a routed spec that is the
predictor's first Linear, which reads stopgrad(x) (routing.py): NO_INPUT_GRAD. Its second Linear's input (the
first's activation) needs its gradient, and so do the inputs of mod's router and dtf's prior FFN (the residual
stream, not stopped): 6 each. A forward pass (mode "forward": the logits, routed by top-k) counts no predictor
(PREDICTOR): its decision is read in decoding and its loss in training, never by those logits, and neither twin
runs it there (routing.Routes runs it when the auxiliary loss or a predictor-mode decision reads it).

Routed specs (routing.py, docs/routing.md): a routed block processes k = floor(γ·T) of the T tokens of a
sequence, so its own weights count k/T of a token each and its attention k keys for k/T of the tokens;
the router tensors (mod's [D] score weight, dtf's prior FFN, and in training and decoding the predictor) run on
every token.
Decoding (mode "decode": one new token per row attending to `seq_len` keys, a forward) skips no routed block's
compute (the predictor's decision masks the block's update, the projections run for every token): every block
counts as dense there, whatever γ.
"""

from __future__ import annotations

import math

from .layout import layout
from .spec import ModelSpec


# Weights a step does less for than its 6 (train) or 2 (forward) FLOPs per weight (module docstring):
NO_INPUT_GRAD = (".router_predictor.fc1.weight",)  # reads stopgrad(x) (routing.py): no input gradient in train
PREDICTOR = (".router_predictor.fc1.weight", ".router_predictor.fc2.weight")  # unread by a top-k forward's logits


def params_named(spec: ModelSpec, suffixes: tuple[str, ...]) -> int:
    """Weights of `spec`'s layout whose names end with one of `suffixes` (router tensors: each runs on every token);
    0 where none (a dense spec)."""
    return sum(math.prod(t.shape) for t in layout(spec) if t.name.endswith(suffixes))


def weight_flops(spec: ModelSpec, seq_len: int, mode: str) -> float:
    """The weight matmuls' FLOPs per token of a train step (mode "train") or a forward pass (any other; "decode" is
    flops_split's): 6 per weight of matmul_params in train, less 2 per NO_INPUT_GRAD weight (no input gradient); 2
    per weight in a forward, the PREDICTOR's excepted (module docstring)."""
    n = matmul_params(spec, seq_len)
    if mode == "train":
        return 6 * n - 2 * params_named(spec, NO_INPUT_GRAD)
    return 2 * (n - params_named(spec, PREDICTOR))


def matmul_params(spec: ModelSpec, seq_len: int | None = None, fraction: float | None = None) -> float:
    """N: weights used in matmuls per token (Linear weights, the LM head, mod's router weight), excluding the input
    embedding; a routed block's own weights weighted by the fraction of tokens it processes at `seq_len` (or by
    `fraction`, where given: 1 in decoding, which runs every token through every block)."""
    fraction = routed_fraction(spec, seq_len) if fraction is None else fraction
    routed = tuple(f"model.layers.{i}." for i in spec.routed_layers)
    n = 0
    for t in layout(spec):
        if t.kind == "linear" or t.name.endswith(".router.weight"):
            share = fraction if t.name.startswith(routed) and ".router" not in t.name else 1
            n += math.prod(t.shape) * share
    return n + (spec.V * spec.D if spec.tie_embeddings else 0)  # a tied head still does the V·D matmul


def routed_fraction(spec: ModelSpec, seq_len: int | None) -> float:
    """k/T: the fraction of a sequence's tokens that a routed block processes (1 when nothing is routed)."""
    if not spec.routed_layers:
        return 1
    if seq_len is None:
        raise ValueError(f"routing={spec.routing}: the FLOPs depend on the sequence length; pass seq_len")
    return spec.routed_tokens(seq_len) / seq_len


def flops_per_token(spec: ModelSpec, seq_len: int, mode: str, causal: bool = False) -> float:
    """Model FLOPs per token for a train step (forward + backward), a forward pass, or a decoding step's new token
    attending to `seq_len` keys (mode "decode"); `causal`: attention's term halved (the keys a causal mask leaves, on
    average; a decoded token sees every key, so "decode" ignores it)."""
    return sum(flops_split(spec, seq_len, mode, causal))


def flops_split(spec: ModelSpec, seq_len: int, mode: str, causal: bool = False) -> tuple[float, float]:
    """(weight matmuls (weight_flops), the token mixers' own (`mixer_flops`: attention's q·kᵀ and p·v, GLA's state
    update and read-out)): model FLOPs per token; a backward costs two forwards; `causal`: attention's term for the
    keys at or before each query, half of all T (a GLA layer's has no keys to halve). Raises ValueError for a mixer
    with no count here."""
    passes = 3 if mode == "train" else 1
    if mode == "decode":  # one token: every key before it, every block run (module docstring), nothing halved
        return 2 * matmul_params(spec, fraction=1), flops_split(spec.replace(routing="none"), seq_len, "forward")[1]
    # each layer's mixer_flops, summed by counting (routed blocks are attention ones): never a loop over the layers
    routed, fraction = len(spec.routed_layers), routed_fraction(spec, seq_len)
    counts = spec.layer_mixers
    mixers = sum((n - routed if m == "attention" else n) * mixer_flops(spec, m, seq_len, 1, causal)
                 for m, n in counts.items()) + routed * mixer_flops(spec, "attention", seq_len, fraction, causal)
    return weight_flops(spec, seq_len, mode), passes * mixers


def mixer_flops(spec: ModelSpec, mixer: str, seq_len: int, fraction: float = 1, causal: bool = False) -> float:
    """A layer's own token-mixer FLOPs per token of a forward, by its mixer (`spec.mixer_of(i)`: a hybrid stack counts
    each layer's own): attention's q·kᵀ and p·v over the keys it reads (a routed block, running `fraction` of the
    tokens, reads fraction·T keys for that fraction of them; `causal` halves it), GLA's state update and read-out,
    constant in the context length. Raises ValueError for a mixer with no count here."""
    if mixer == "gla":
        return 4 * spec.H * spec.Kh * spec.Vh
    if mixer != "attention":  # it would be counted as attention's q·kᵀ and p·v
        raise ValueError(f"flops_split: no count for mixer={mixer!r} (docs/extending.md)")
    return 4 * spec.H * spec.E * fraction * (fraction * seq_len) * (0.5 if causal else 1)
