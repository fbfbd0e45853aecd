"""RoPE inverse frequencies: constants both twins read, including Llama 3.x frequency scaling."""

from __future__ import annotations

import math

import numpy as np

from .spec import ModelSpec


def rope_inv_freq(spec: ModelSpec) -> np.ndarray:
    """theta^(-2j/E) for j < E/2, as float32; with `rope_scaling: llama3`, rescaled as Llama 3.x does.

    Llama 3 scaling (transformers' `_compute_llama3_parameters`): wavelengths shorter than
    original_max / high_freq_factor keep their frequency, those longer than original_max /
    low_freq_factor are divided by `factor`, and the band between is interpolated smoothly.
    """
    E = spec.E
    inv_freq = 1.0 / spec.rope_theta ** (np.arange(0, E, 2, dtype=np.float64) / E)
    if spec.rope_scaling == "llama3":
        factor, low, high = spec.rope_scaling_factor, spec.rope_low_freq_factor, spec.rope_high_freq_factor
        original = spec.rope_original_max_seq_len
        wavelen = 2 * math.pi / inv_freq
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = np.where(wavelen > original / low, inv_freq / factor, inv_freq)
        is_medium = (wavelen <= original / low) & (wavelen >= original / high)
        inv_freq = np.where(is_medium, smoothed, inv_freq)
    return inv_freq.astype(np.float32)
