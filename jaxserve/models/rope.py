"""Rotary position embeddings with HF's rope_scaling types default, linear and llama3.

Frequencies are computed once per config in numpy (f64, then f32) so they match transformers'
own computation bit for bit; the rotation uses the rotate-half (non-interleaved) layout of HF
Llama checkpoints.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxserve.models.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:  # f32[D // 2]
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        inv_freq = inv_freq / rs.factor
    elif rs.rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, rs)
    return inv_freq.astype(np.float32)


def _llama3_scale(inv_freq: np.ndarray, rs) -> np.ndarray:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    low_freq_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_freq_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions, inv_freq, dtype):
    """positions i32[T] -> cos, sin [T, 1, D] in `dtype` (broadcast over heads)."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [T, D]
    return jnp.cos(emb)[:, None, :].astype(dtype), jnp.sin(emb)[:, None, :].astype(dtype)


def apply_rope(x, cos, sin):
    """x [T, H, D] rotated by position (rotate-half layout)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
