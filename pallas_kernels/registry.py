"""Registry of paged-attention variants: how the model picks its attention function by name.

Every registered function has the reference's signature plus `interpret: bool = False`:

    fn(q [T, Hq, D], k_cache [L, P, Hkv, page_size, D], v_cache, layer i32[], kv_lens i32[S],
       page_indices i32[S, pages_per_seq], cu_q_lens i32[S + 1], num_seqs i32[1], *,
       sm_scale, soft_cap=None, sliding_window=None, interpret=False) -> [T, Hq, D]

Variants:
  "reference"             pure jnp (any platform; `interpret` is accepted and ignored); the
                          oracle: every row gathers the whole page table.
  "blocked"               pure jnp, cost bounded by the live context (each sequence's pages read
                          once per query tile, key loops with data-dependent trip counts); the
                          CPU default when "native" cannot be built.
  "native"                "blocked" with its decode rows computed by native code (an XLA FFI
                          custom call built on first use, see native_decode.py): the CPU
                          default where a C++ compiler is present. CPU only.
  "pallas_ragged"         one Pallas-Triton kernel for mixed decode + prefill steps.
  "pallas_splitk_decode"  flash-decoding split-K kernel when the bucket has T <= S (decode-shaped),
                          statically falling back to "pallas_ragged" when T > S. The split-K
                          kernel itself is correct for any batch, so the choice only affects speed.

On CPU the Pallas variants need interpret=True (tests); the engine uses "native" there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax.numpy as jnp

from pallas_kernels import kv_quant, native_decode
from pallas_kernels.blocked_attention import BlockedConfig, blocked_paged_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.reference import ragged_paged_attention_reference
from pallas_kernels.splitk_decode_attention import ragged_paged_attention_splitk


def _reference(q, k_cache, v_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs, *,
               sm_scale, soft_cap=None, sliding_window=None, interpret: bool = False):
    del interpret  # plain jnp runs the same everywhere
    return ragged_paged_attention_reference(
        q, k_cache, v_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs,
        sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window)


def _native(q, k_cache, v_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs, *,
            sm_scale, soft_cap=None, sliding_window=None, interpret: bool = False,
            config: BlockedConfig = BlockedConfig()):
    # the native kernel reads float32 and bfloat16 caches in q's dtype and int8 / fp8
    # quantized ones; others (float16) keep the jnp decode loop
    native = q.dtype in (jnp.float32, jnp.bfloat16) and (
        jnp.dtype(k_cache.codes.dtype) in native_decode.CODE_DTYPES
        if kv_quant.is_quantized(k_cache) else k_cache.dtype == q.dtype)
    return blocked_paged_attention(
        q, k_cache, v_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs,
        sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window, interpret=interpret,
        config=config, decode_fn=native_decode.paged_decode if native else None)


_VARIANTS: dict[str, Callable] = {
    "reference": _reference,
    "blocked": blocked_paged_attention,
    "native": _native,
    "pallas_ragged": ragged_paged_attention,
    "pallas_splitk_decode": ragged_paged_attention_splitk,
}

# Chosen by construction, not yet by measurement on a GPU: split-K is the ragged kernel on every
# bucket with T > S and adds parallelism over the context on decode buckets, where the ragged
# kernel has only S * Hkv programs. benchmarks/kernels.py measures both; revisit with its numbers.
_DEFAULT = {"gpu": "pallas_splitk_decode", "cuda": "pallas_splitk_decode", "cpu": "native"}


# Not Pallas kernels: they run compiled (the native one on CPU only) and follow no Triton rules.
_JNP_VARIANTS = ("reference", "blocked", "native")


def available_variants() -> tuple[str, ...]:
    return tuple(_VARIANTS)


def pallas_variants() -> tuple[str, ...]:
    """The variants that are Pallas kernels (interpret mode only on CPU; Triton's rules)."""
    return tuple(v for v in _VARIANTS if v not in _JNP_VARIANTS)


def get_attention_fn(name: str, **config) -> Callable:
    """The attention function registered as `name`; `config=` binds a tuning config."""
    try:
        fn = _VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown attention variant {name!r}; available: "
                         f"{', '.join(available_variants())}") from None
    if config:
        if name == "reference" or set(config) != {"config"}:
            raise ValueError(f"variant {name!r} accepts only config=<its tuning config>, got "
                             f"{sorted(config)}")
        fn = functools.partial(fn, **config)
    return fn


def default_variant(platform: str) -> str:
    """Variant to use on `platform` ("gpu"/"cuda" or "cpu"); unknown platforms get "reference".
    On CPU, "native" needs a C++ compiler (built on the first call): without one, "blocked"."""
    name = _DEFAULT.get(platform.lower(), "reference")
    if name == "native" and not native_decode.is_available():
        return "blocked"
    return name
