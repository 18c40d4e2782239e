"""Pure-jnp ragged paged attention: the oracle for every kernel variant and the CPU path.

One call serves a step that mixes decode tokens and prefill chunks. Queries are a flat ragged
batch: sequence s owns rows cu_q_lens[s]:cu_q_lens[s+1] of `q`; those are its newest tokens, whose
K/V are already written into the cache, so query row i of s sits at position
kv_lens[s] - q_len[s] + i and attends causally to cache positions [0, that position].
Rows at or beyond cu_q_lens[num_seqs] are padding: never read from the cache, output zeros.

The cache holds every layer ([L, P, Hkv, page_size, D]) and `layer` picks one, so the model can
scan over layers without slicing (copying) a layer's cache out for each call. It may be a
kv_quant.QuantizedKV (int8/fp8 codes + per-token scales), dequantized as pages are read.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels import kv_quant

# Token rows processed together; bounds the gathered K/V to [chunk, Hkv, context, D].
_TOKEN_CHUNK = 32


def check_shapes(q, k_cache, v_cache, kv_lens, page_indices, cu_q_lens, num_seqs):
    """Raise a clear ValueError when the operands do not form one paged-attention problem."""
    if q.ndim != 3:
        raise ValueError(f"q must be [tokens, q_heads, head_dim], got shape {q.shape}")
    if kv_quant.is_quantized(k_cache) != kv_quant.is_quantized(v_cache):
        raise ValueError("a quantized cache needs K and V both QuantizedKV, got one of each")
    if k_cache.ndim != 5 or k_cache.shape != v_cache.shape:
        raise ValueError("k_cache and v_cache must both be [layers, pages, kv_heads, page_size, "
                         f"head_dim], got {k_cache.shape} and {v_cache.shape}")
    if q.shape[2] != k_cache.shape[4]:
        raise ValueError(f"head_dim of q ({q.shape[2]}) != head_dim of the cache ({k_cache.shape[4]})")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"q_heads ({q.shape[1]}) must be a multiple of kv_heads ({k_cache.shape[2]})")
    num_seq_slots = kv_lens.shape[0]
    if page_indices.ndim != 2 or page_indices.shape[0] != num_seq_slots:
        raise ValueError(f"page_indices must be [{num_seq_slots}, pages_per_seq], got {page_indices.shape}")
    if cu_q_lens.shape != (num_seq_slots + 1,):
        raise ValueError(f"cu_q_lens must be [{num_seq_slots + 1}], got {cu_q_lens.shape}")
    if num_seqs.shape != (1,):
        raise ValueError(f"num_seqs must be i32[1], got shape {num_seqs.shape}")


def check_operands(q, k_cache, v_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                   sm_scale, soft_cap, sliding_window) -> None:
    """check_shapes plus the dtypes and static settings every compiled variant relies on."""
    check_shapes(q, k_cache, v_cache, kv_lens, page_indices, cu_q_lens, num_seqs)
    if kv_quant.is_quantized(k_cache) or kv_quant.is_quantized(v_cache):
        if not (kv_quant.is_quantized(k_cache) and kv_quant.is_quantized(v_cache)
                and k_cache.dtype == v_cache.dtype
                and any(k_cache.dtype == d for d in kv_quant.KV_CACHE_DTYPES.values())):
            raise ValueError(f"a quantized cache needs K and V both QuantizedKV of int8 or "
                             f"float8_e4m3fn codes, got {k_cache.dtype} and {v_cache.dtype}")
    elif not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"q, k_cache and v_cache must share one dtype, got {q.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}")
    if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"unsupported dtype {q.dtype}: use float32, bfloat16 or float16")
    if jnp.ndim(layer) != 0:
        raise ValueError(f"layer must be a scalar i32[], got shape {jnp.shape(layer)}")
    for name, arr in (("kv_lens", kv_lens), ("page_indices", page_indices),
                      ("cu_q_lens", cu_q_lens), ("num_seqs", num_seqs)):
        if not jnp.issubdtype(arr.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer array, got {arr.dtype}")
    if q.shape[0] == 0:
        raise ValueError("q has no rows; pad the batch to at least one token")
    if not isinstance(sm_scale, (int, float)) or not math.isfinite(sm_scale):
        raise ValueError(f"sm_scale must be a finite Python float, got {sm_scale!r}")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap must be > 0 or None, got {soft_cap!r}")
    if sliding_window is not None and (int(sliding_window) != sliding_window
                                       or sliding_window < 1):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")


def ragged_paged_attention_reference(
    q,             # [T, Hq, D]
    k_cache,       # [L, P, Hkv, page_size, D]
    v_cache,       # [L, P, Hkv, page_size, D]
    layer,         # i32[]
    kv_lens,       # i32[S]   context length of each sequence, this step's tokens included
    page_indices,  # i32[S, pages_per_seq]
    cu_q_lens,     # i32[S + 1]
    num_seqs,      # i32[1]
    *,
    sm_scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
):  # -> [T, Hq, D] in q.dtype
    check_shapes(q, k_cache, v_cache, kv_lens, page_indices, cu_q_lens, num_seqs)
    num_tokens, num_q_heads, head_dim = q.shape
    _, _, num_kv_heads, page_size, _ = k_cache.shape
    q_per_kv = num_q_heads // num_kv_heads
    context = page_indices.shape[1] * page_size

    rows = jnp.arange(num_tokens, dtype=jnp.int32)
    seq_of_row = jnp.searchsorted(cu_q_lens, rows, side="right").astype(jnp.int32) - 1  # [T]
    seq_of_row = jnp.clip(seq_of_row, 0, kv_lens.shape[0] - 1)
    row_valid = rows < cu_q_lens[num_seqs[0]]
    q_len = cu_q_lens[seq_of_row + 1] - cu_q_lens[seq_of_row]
    q_pos = kv_lens[seq_of_row] - q_len + (rows - cu_q_lens[seq_of_row])  # [T]

    def attend(args):  # one query row; lax.map vmaps this over chunks of rows
        q_t, seq, pos, valid = args  # [Hq, D], [], [], []
        pages = jnp.where(valid, page_indices[seq], 0)  # padding rows read page 0 only
        k = kv_quant.read_pages(k_cache, layer, pages)  # f32[pages, Hkv, page_size, D]
        v = kv_quant.read_pages(v_cache, layer, pages)
        k = k.transpose(1, 0, 2, 3).reshape(num_kv_heads, context, head_dim)
        v = v.transpose(1, 0, 2, 3).reshape(num_kv_heads, context, head_dim)
        qg = q_t.reshape(num_kv_heads, q_per_kv, head_dim).astype(jnp.float32)
        s = jnp.einsum("gqd,gkd->gqk", qg, k.astype(jnp.float32)) * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        k_pos = jnp.arange(context, dtype=jnp.int32)
        mask = k_pos <= pos  # [context]
        if sliding_window is not None:
            mask &= k_pos > pos - sliding_window
        p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
        # Zero V outside the mask too: p == 0 there, but 0 * NaN from a stale page is NaN.
        v = jnp.where(mask[None, :, None], v.astype(jnp.float32), 0.0)
        o = jnp.einsum("gqk,gkd->gqd", p, v)
        o = jnp.where(valid, o, 0.0)
        return o.reshape(num_q_heads, head_dim).astype(q.dtype)

    return jax.lax.map(attend, (q, seq_of_row, q_pos, row_valid),
                       batch_size=min(_TOKEN_CHUNK, num_tokens))
