"""Decode rows of paged attention as native code on XLA:CPU (an XLA FFI custom call).

Why: XLA:CPU turns a decode step's attention into several passes over the live K/V (page gather,
transpose, mask, small batched dots with G ~ 3 query rows) at ~2 GB/s; in a SmolLM2 decode step
that was ~250 of ~400 ms. `native/paged_decode.cc` reads each (sequence, kv head)'s live pages
once, in place, on XLA's intra-op thread pool (~9 GB/s on the same machine). It computes only
decode rows (q_len == 1); the "native" variant of the registry pairs it with the blocked jnp
path for prefill tiles, whose dots are large enough for XLA to run well.

The source is built on first use (see native_build.py); no compiler, or a failed build:
`unavailable_reason()` says why and the registry's CPU default falls back to "blocked".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import kv_quant, native_build
from pallas_kernels.native_build import NativeBuildError  # noqa: F401  (re-exported)
from pallas_kernels.reference import check_operands

TARGET = "jaxserve_paged_decode"
QUANTIZED_TARGET = "jaxserve_paged_decode_quantized"  # a kv_quant.QuantizedKV cache
CODE_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


def _load() -> str | None:
    """Build, load and register the FFI targets; None on success, else the reason it failed."""
    return (native_build.load_target("paged_decode.cc", "JaxservePagedDecode", TARGET)
            or native_build.load_target("paged_decode.cc", "JaxservePagedDecodeQuantized",
                                        QUANTIZED_TARGET))


def unavailable_reason() -> str | None:
    """None when the native kernel is ready on this machine, else why not (builds on first call)."""
    return _load()


def is_available() -> bool:
    return _load() is None


def paged_decode(
    q,             # [T, Hq, D]  f32 or bf16
    k_cache,       # [L, P, Hkv, page_size, D] in q's dtype, or a kv_quant.QuantizedKV of
    v_cache,       # int8 / float8_e4m3fn codes with their per-token scales
    layer,         # i32[]
    kv_lens,       # i32[S]
    page_indices,  # i32[S, pages_per_seq]
    cu_q_lens,     # i32[S + 1]
    num_seqs,      # i32[1]
    *,
    sm_scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
):  # -> f32[S, Hq, D]: the decode row's output per sequence slot, zero for other slots
    check_operands(q, k_cache, v_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs,
                   sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window)
    if q.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"the native decode kernel takes float32 or bfloat16, got {q.dtype}")
    reason = _load()
    if reason is not None:
        raise NativeBuildError(f"native decode kernel unavailable: {reason}")
    S = page_indices.shape[0]
    out = jax.ShapeDtypeStruct((S, *q.shape[1:]), jnp.float32)
    i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
    meta = (i32(layer), i32(kv_lens), i32(page_indices), i32(cu_q_lens), i32(num_seqs))
    attrs = dict(sm_scale=np.float32(sm_scale), soft_cap=np.float32(soft_cap or 0.0),
                 sliding_window=np.int32(sliding_window or 0))
    if kv_quant.is_quantized(k_cache):
        if jnp.dtype(k_cache.codes.dtype) not in CODE_DTYPES:
            raise ValueError(f"the native decode kernel reads int8 or float8_e4m3fn codes, got "
                             f"{k_cache.codes.dtype}")
        return jax.ffi.ffi_call(QUANTIZED_TARGET, out)(
            q, k_cache.codes, k_cache.scale, v_cache.codes, v_cache.scale, *meta, **attrs)
    return jax.ffi.ffi_call(TARGET, out)(q, k_cache, v_cache, *meta, **attrs)
