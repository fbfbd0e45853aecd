"""The embedded synthetic corpus (numpy only), `synthetic:SEED` in `data.load_data`: a Markov chain over 256 tokens,
Zipf unigrams plus favoured successors, generated from the seed, whose entropy rate (the loss a perfect model
reaches) is known exactly (docs/training.md quotes it for seed 0).

Notation: V vocab, S favoured successors per token, L steps of C parallel chains.
"""

from __future__ import annotations

import numpy as np

SYNTHETIC_VOCAB = 256
ZIPF_EXPONENT = 1.1  # unigram probability of the token of rank r ∝ 1 / r^1.1
SUCCESSORS = 8  # each token has 8 favoured successors...
SUCCESSOR_MASS = 0.8  # ...that take 80% of its next-token probability; the rest is a unigram draw


def markov_chain(seed: int, vocab_size: int = SYNTHETIC_VOCAB) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The chain's parts: Zipf unigrams [V], each token's favoured successors [V, S] and their weights [S].

    The next token is one of the current token's successors (probability SUCCESSOR_MASS, the k-th
    with weight ∝ 1/k), else a draw from the unigrams; token ranks are a seeded permutation.
    """
    rng = np.random.default_rng([seed, 0])
    unigram_V = 1.0 / (rng.permutation(vocab_size) + 1.0) ** ZIPF_EXPONENT
    unigram_V /= unigram_V.sum()
    successors_VS = np.stack([rng.choice(vocab_size, SUCCESSORS, replace=False, p=unigram_V)
                              for _ in range(vocab_size)])
    weights_S = 1.0 / np.arange(1, SUCCESSORS + 1)
    return unigram_V, successors_VS, weights_S / weights_S.sum()


def transition_matrix(unigram_V, successors_VS, weights_S) -> np.ndarray:
    """P[a, b] = probability that b follows a, float64 [V, V]."""
    V, S = successors_VS.shape
    P_VV = np.tile((1 - SUCCESSOR_MASS) * unigram_V, (V, 1))
    np.add.at(P_VV, (np.repeat(np.arange(V), S), successors_VS.ravel()), SUCCESSOR_MASS * np.tile(weights_S, V))
    return P_VV


def stationary(P_VV: np.ndarray) -> np.ndarray:
    """The distribution π with π P = π, Σπ = 1 (the chain is irreducible: every row holds the unigrams)."""
    V = len(P_VV)
    A = P_VV.T - np.eye(V)
    A[-1] = 1.0  # replace one (redundant) balance equation by the normalisation
    return np.linalg.solve(A, np.eye(V)[-1])


def entropy_rate(P_VV: np.ndarray) -> float:
    """Σ_a π_a H(P[a, :]) in nats: the expected loss of a model that knows the chain."""
    with np.errstate(divide="ignore", invalid="ignore"):
        h_V = -np.sum(np.where(P_VV > 0, P_VV * np.log(P_VV), 0.0), axis=1)
    return float(stationary(P_VV) @ h_V)


def chain_tokens(seed: int, vocab_size: int, n_tokens: int) -> tuple[np.ndarray, float]:
    """`n_tokens` tokens (uint16 [n_tokens]) of `markov_chain(seed)`, sampled as 256 parallel chains, each started
    from π, and the chain's entropy rate in nats.

    Chains are laid end to end; the 255 joins (one transition in ~4,000) are the only tokens not
    drawn from P, which moves the achievable loss by < 1e-3 nats.
    """
    unigram_V, successors_VS, weights_S = markov_chain(seed, vocab_size)
    P_VV = transition_matrix(unigram_V, successors_VS, weights_S)
    C = 256
    L = -(-n_tokens // C)
    rng = np.random.default_rng([seed, 1])
    follow_LC = rng.random((L, C)) < SUCCESSOR_MASS
    pick_LC = rng.choice(SUCCESSORS, (L, C), p=weights_S)
    fresh_LC = rng.choice(vocab_size, (L, C), p=unigram_V)
    tokens_LC = np.empty((L, C), np.uint16)
    tokens_LC[0] = rng.choice(vocab_size, C, p=stationary(P_VV))
    for n in range(1, L):
        tokens_LC[n] = np.where(follow_LC[n], successors_VS[tokens_LC[n - 1], pick_LC[n]], fresh_LC[n])
    return tokens_LC.T.reshape(-1)[:n_tokens], entropy_rate(P_VV)
