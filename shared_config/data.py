"""Deterministic training batches (numpy only): a pure function of (seed, step, sizes), so both twins,
and a run resumed in the other framework, read exactly the same tokens.
"""

from __future__ import annotations

import numpy as np

BRANCHING = 4  # successors per token in the synthetic corpus


def synthetic_batch(seed: int, step: int, batch_size: int, seq_len: int, vocab_size: int) -> np.ndarray:
    """int32 tokens [batch_size, seq_len + 1] from a seeded bigram chain with learnable structure.

    Every token has `BRANCHING` successors drawn once from `seed`; each next token picks one of
    them uniformly, so a model that learns the table reaches a loss of about log(BRANCHING).
    """
    successors_VK = np.random.default_rng([seed, 0]).integers(0, vocab_size, (vocab_size, BRANCHING))
    rng = np.random.default_rng([seed, 1, step])
    picks_BN = rng.integers(0, BRANCHING, (batch_size, seq_len + 1))
    tokens_BN = np.empty((batch_size, seq_len + 1), np.int32)
    tokens_BN[:, 0] = rng.integers(0, vocab_size, batch_size)
    for n in range(1, seq_len + 1):
        tokens_BN[:, n] = successors_VK[tokens_BN[:, n - 1], picks_BN[:, n]]
    return tokens_BN
