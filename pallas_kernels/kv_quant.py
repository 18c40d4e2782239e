"""A quantized paged KV cache: int8 or fp8 (e4m3) codes with one float32 scale per token and
KV head, written by the model step and dequantized where attention loads a page.

    codes  [L, P, Hkv, page_size, D]   int8 | float8_e4m3fn
    scale  [L, P, Hkv, page_size]      f32: x = codes * scale

Why per token and head, not per tensor: the scale is computed when a token's K/V are written
(amax over its D values / the code range), so nothing needs calibrating and an outlier token or
head costs only its own precision; a static per-tensor scale (vLLM's fp8 default of 1.0) would
leave int8 unusable without calibration. The cost is 4 bytes per token and head next to D
bytes of codes: at D = 64, 136 bytes per token and head for K and V against 256 in bfloat16
and 512 in float32.

Attention receives a QuantizedKV where it received the cache array; `read_pages` is the one
place the jnp paths load pages, and pallas_kernels.paged_tiles.load_kv_block the Pallas one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# --kv-cache-dtype names (vLLM's) -> code dtype; "auto" keeps the model's dtype
KV_CACHE_DTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn, "fp8_e4m3": jnp.float8_e4m3fn}
_CODE_MAX = {jnp.dtype(jnp.int8): 127.0, jnp.dtype(jnp.float8_e4m3fn): 448.0}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)  # hashable when its leaves are (shardings: jit cache keys)
class QuantizedKV:
    codes: jax.Array  # [L, P, Hkv, page_size, D]
    scale: jax.Array  # f32[L, P, Hkv, page_size]

    @property
    def shape(self):
        return self.codes.shape

    @property
    def ndim(self):
        return self.codes.ndim

    @property
    def dtype(self):
        return self.codes.dtype

    @classmethod
    def zeros(cls, shape, dtype):
        return cls(codes=jnp.zeros(shape, dtype), scale=jnp.zeros(shape[:-1], jnp.float32))


def is_quantized(cache) -> bool:
    return isinstance(cache, QuantizedKV)


def quantize(x, code_dtype):
    """x [..., D] float -> (codes [..., D] in code_dtype, scale f32[...])."""
    code_dtype = jnp.dtype(code_dtype)
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1)
    scale = jnp.where(amax > 0, amax / _CODE_MAX[code_dtype], 1.0)
    y = x32 / scale[..., None]
    if code_dtype == jnp.int8:
        y = jnp.clip(jnp.round(y), -127, 127)
    return y.astype(code_dtype), scale


def write(cache, layer, pages, offsets, x):
    """cache with x [T, Hkv, D] written at (layer, pages[t], :, offsets[t]); out-of-range
    pages (padding rows: page == num_pages) are dropped."""
    if not is_quantized(cache):
        return cache.at[layer, pages, :, offsets].set(x.astype(cache.dtype), mode="drop")
    codes, scale = quantize(x, cache.codes.dtype)
    return QuantizedKV(
        codes=cache.codes.at[layer, pages, :, offsets].set(codes, mode="drop"),
        scale=cache.scale.at[layer, pages, :, offsets].set(scale, mode="drop"))


def read_pages(cache, layer, pages):
    """f32[..., Hkv, page_size, D]: the pages (i32[...]) of one layer, dequantized."""
    if not is_quantized(cache):
        return cache[layer, pages].astype(jnp.float32)
    return cache.codes[layer, pages].astype(jnp.float32) * cache.scale[layer, pages][..., None]
