"""Building blocks shared by the Pallas (Triton lowering) paged-attention kernels.

Both kernels (`ragged_paged_attention.py`, `splitk_decode_attention.py`) work on the same tile: the
query heads of one KV group for a few consecutive tokens of one sequence, flattened into
`rows = tokens * group` rows so that one `pl.dot` serves the whole GQA group (the KV block is read
once per group, not once per query head). This module holds what they share:

* operand validation (the contract's `check_operands` plus what the Triton lowering needs),
* the q layout change [T, Hq, D] -> [T, Hkv, group, D] (group = q_per_kv padded to a power of 2),
* the gather of one block of K/V positions straight out of the all-layers cache,
* one step of the online softmax.

Triton rules that shape the code: every in-kernel array has a power-of-2 size, dot operands have
every dimension >= 16, and there is no scalar prefetch, so page tables and lengths are read inside
the kernel. `interpret=True` does not enforce these rules; the CUDA lowering tests do.
"""

from __future__ import annotations

import jax
import jax.experimental.pallas.tpu  # noqa: F401  (see below)
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import kv_quant
from pallas_kernels.reference import check_operands

# jax.experimental.pallas.tpu is imported for a side effect: on jax 0.11/0.12 the first
# interpret-mode pallas_call otherwise makes every function jitted before it retrace once, which
# the engine's no-recompile guard would report. Importing pallas_kernels before the first jit is
# enough (checked on 0.11.2; the import takes ~0.1 s).

# A large finite negative instead of -inf: a row whose every key is masked in one block must not
# produce inf - inf = NaN in the running-max update.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_block(name: str, value: int, minimum: int = 16) -> None:
    """Tuning configs call this from __post_init__: Triton needs power-of-2 tiles >= 16."""
    if not is_pow2(value) or value < minimum:
        raise ValueError(f"{name} must be a power of 2 >= {minimum}, got {value}")


def check_kernel_operands(q, k_cache, v_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs,
                          *, sm_scale, soft_cap, sliding_window) -> None:
    """The contract's operand checks plus the limits of the Triton kernels, as clear ValueErrors."""
    check_operands(q, k_cache, v_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs,
                   sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window)
    head_dim = q.shape[2]
    if not is_pow2(head_dim) or head_dim < 16:
        raise ValueError(f"the Pallas kernels need head_dim to be a power of 2 >= 16, got "
                         f"{head_dim}; use the 'reference' variant for this model")


def group_queries(q, num_kv_heads: int):
    """[T, Hq, D] -> [T, Hkv, group, D] with group = q_per_kv rounded up to a power of 2.

    The reshape is free; padding (only for q_per_kv like 3 or 6) copies q, which is small next to
    the KV cache the kernel reads.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    q_per_kv = num_q_heads // num_kv_heads
    group = next_pow2(q_per_kv)
    qg = q.reshape(num_tokens, num_kv_heads, q_per_kv, head_dim)
    if group != q_per_kv:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, group - q_per_kv), (0, 0)))
    return qg  # [T, Hkv, group, D]


def ungroup_output(out, num_q_heads: int):
    """Inverse of group_queries: [T, Hkv, group, D] -> [T, Hq, D]."""
    num_tokens, num_kv_heads, _, head_dim = out.shape
    q_per_kv = num_q_heads // num_kv_heads
    return out[:, :, :q_per_kv].reshape(num_tokens, num_q_heads, head_dim)


def tokens_per_tile(group: int, block_m: int) -> int:
    """Tokens of one sequence per tile so that tokens * group == max(block_m, group) rows."""
    return max(1, block_m // group)


def int_scalar(x):
    """An int array of shape [] or [1] as the i32[1] a Triton kernel reads through a pointer."""
    return jnp.asarray(x, jnp.int32).reshape(1)


def load_kv_block(k_ref, v_ref, pages_ref, layer, seq, head, start, stop, *, block_kv: int):
    """Gather K/V for cache positions [start, start + block_kv) of one sequence and KV head.

    Positions >= stop are never read (masked loads, value 0), so pages beyond a sequence's length
    may hold anything, NaN included. Page numbers are clamped into the cache like jnp indexing does,
    so a corrupt page table cannot make the GPU read outside the cache.
    Returns k [BK, D], v [BK, D], positions i32[BK] and live bool[BK].
    """
    _, num_pages, _, page_size, head_dim = k_ref.shape  # [L, P, Hkv, page_size, D]
    # a quantized cache arrives as kv_quant.QuantizedKV of refs: codes and per-token scales
    pages_per_seq = pages_ref.shape[1]  # pages_ref: [S, pages_per_seq]
    pos = start + jnp.arange(block_kv, dtype=jnp.int32)  # [BK]
    live = pos < stop  # [BK]
    slot = jnp.minimum(pos // page_size, pages_per_seq - 1)  # [BK]
    page = plgpu.load(pages_ref.at[seq, slot], mask=live, other=0)  # [BK]
    page = jnp.clip(page, 0, num_pages - 1)
    within = pos % page_size  # [BK]
    dims = jnp.arange(head_dim, dtype=jnp.int32)  # [D]
    # Integer-array indexers (no slices) so the same gather also runs in interpret mode.
    idx = (layer, page[:, None], head, within[:, None], dims[None, :])  # broadcasts to [BK, D]
    mask = jnp.broadcast_to(live[:, None], (block_kv, head_dim))  # [BK, D]
    if kv_quant.is_quantized(k_ref):  # dequantize on load: codes * the token's scale
        sidx = (layer, page, head, within)  # [BK]
        # the fill value in the codes' own kind: Triton casts a float constant to fp8 but not
        # an integer one ("cannot cast i32 to f8E4M3FN" at lowering)
        zero = 0 if jnp.issubdtype(k_ref.codes.dtype, jnp.integer) else 0.0
        k = (plgpu.load(k_ref.codes.at[idx], mask=mask, other=zero).astype(jnp.float32)
             * plgpu.load(k_ref.scale.at[sidx], mask=live, other=0.0)[:, None])
        v = (plgpu.load(v_ref.codes.at[idx], mask=mask, other=zero).astype(jnp.float32)
             * plgpu.load(v_ref.scale.at[sidx], mask=live, other=0.0)[:, None])
        return k, v, pos, live
    k = plgpu.load(k_ref.at[idx], mask=mask, other=0)  # [BK, D]
    v = plgpu.load(v_ref.at[idx], mask=mask, other=0)  # [BK, D]
    return k, v, pos, live


def attention_mask(q_pos, k_pos, k_live, sliding_window):
    """bool[M, BK]: causal (key position <= query position), inside the window, key in range."""
    mask = k_live[None, :] & (k_pos[None, :] <= q_pos[:, None])
    if sliding_window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
    return mask


def online_softmax_step(carry, q, k, v, mask, *, sm_scale: float, soft_cap):
    """Fold one KV block into the running (acc [M, D], max [M], sum [M]), all float32."""
    acc, m_prev, l_prev = carry
    k, v = k.astype(q.dtype), v.astype(q.dtype)  # a dequantized cache block is float32
    # Triton's default for f32 operands is TF32 (~1e-3 error); the f32 path promises ~1e-5.
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    s = plgpu.dot(q, k, trans_b=True, precision=precision) * sm_scale  # [M, BK] f32
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    s = jnp.where(mask, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))  # [M]
    alpha = jnp.exp(m_prev - m_next)  # [M]
    # Zeroing masked probabilities keeps rows with no live key at l == 0 (output 0, not a mean).
    p = jnp.where(mask, jnp.exp(s - m_next[:, None]), 0.0)  # [M, BK]
    l_next = l_prev * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)  # [M, D]
    return acc, m_next, l_next


def attend_kv_range(q, q_pos, lo, hi, kv_block_fn, *, block_kv: int, sm_scale: float, soft_cap,
                    sliding_window):
    """Online softmax of q [M, D] over cache positions [lo, hi). Returns acc [M, D], m, l [M].

    `kv_block_fn(start)` returns (k, v, positions, live) for [start, start + block_kv); an empty
    range (hi <= lo) runs no iteration and reads nothing.
    """
    rows, head_dim = q.shape
    init = (jnp.zeros((rows, head_dim), jnp.float32),
            jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))

    def body(i, carry):
        k, v, k_pos, k_live = kv_block_fn(lo + i * block_kv)
        mask = attention_mask(q_pos, k_pos, k_live, sliding_window)
        return online_softmax_step(carry, q, k, v, mask, sm_scale=sm_scale, soft_cap=soft_cap)

    num_blocks = jnp.maximum(hi - lo + block_kv - 1, 0) // block_kv
    return jax.lax.fori_loop(0, num_blocks, body, init)


def query_tile_bounds(row0, seq_start, seq_end, kv_len, *, tokens: int, block_kv: int,
                      sliding_window):
    """Rows, positions and the cache range one tile of `tokens` query rows needs.

    Query row r of a sequence (rows [seq_start, seq_end)) sits at cache position
    kv_len - q_len + (r - seq_start). Returns row i32[BQ], row_ok bool[BQ], q_pos i32[BQ] and the
    cache range [lo, hi): hi is one past the last live row's position (0 when the tile has no live
    row, so it reads nothing); lo is 0, or the window start rounded down to a block.
    """
    row = row0 + jnp.arange(tokens, dtype=jnp.int32)  # [BQ]
    row_ok = row < seq_end  # [BQ]
    q_pos = kv_len - seq_end + row  # [BQ]
    num_live = jnp.clip(seq_end - row0, 0, tokens)
    hi = jnp.where(num_live > 0, jnp.clip(kv_len - seq_end + row0 + num_live, 0, kv_len), 0)
    lo = jnp.int32(0)
    if sliding_window is not None:
        first = jnp.maximum(kv_len - seq_end + row0 - sliding_window + 1, 0)
        lo = jnp.minimum(first // block_kv * block_kv, hi)
    return row, row_ok, q_pos, lo, hi


def load_query_tile(q_ref, row0, head, row_ok):
    """q_ref [T, Hkv, group, D] -> the tile's query rows as [tokens * group, D] (dead rows 0)."""
    _, _, group, head_dim = q_ref.shape
    tokens = row_ok.shape[0]
    mask = jnp.broadcast_to(row_ok[:, None, None], (tokens, group, head_dim))
    q = plgpu.load(q_ref.at[pl.ds(row0, tokens), head, :, :], mask=mask, other=0)  # [BQ, G, D]
    return q.reshape(tokens * group, head_dim)


def expand_rows(x, group: int):
    """Per-token values [BQ] -> per-row values [BQ * group] (row = token * group + head)."""
    tokens = x.shape[0]
    return jnp.broadcast_to(x[:, None], (tokens, group)).reshape(tokens * group)
