"""Blocked ragged paged attention in pure jnp: the CPU path, whose cost follows the live tokens.

Same contract as `reference.ragged_paged_attention_reference` (see there), different cost. The
reference gathers the whole page table for every query row: a 512-row prefill chunk reads its
context 512 times, and a decode row reads max_model_len positions however short its sequence.
Here every sequence's context is read once per query tile, and only the key blocks up to the
tile's last position (and from its sliding window's first one):

  * decode sequences (q_len == 1, most of a serving step) are processed together, vectorized
    over the S sequence slots, walking key blocks of `block_k` positions with an online softmax
    for as many blocks as the longest decode context of the step needs (a dynamic trip count:
    nothing is sized by the page table's width);
  * every other sequence (prefill chunks, q_len >= 2) is cut into tiles of `block_q` rows; a
    loop over the tiles of the step (dynamic count) walks each tile's causal key range.

Loop bounds are data, not shapes, so one compiled step serves every context length. A key block
is `block_k // page_size` whole pages, gathered from the layer's cache without copying the layer.
Everything the contract says is never read (positions past kv_len, other layers' and unowned
pages, unused slots) is masked out of both the scores and V, so NaN there cannot leak.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import kv_quant
from pallas_kernels.reference import check_operands

# Finite "minus infinity": a fully masked block then leaves the running max and sum unchanged
# instead of producing inf - inf = NaN.
_MASKED = -1e30


@dataclasses.dataclass(frozen=True)
class BlockedConfig:
    block_q: int = 128  # query rows per prefill tile (measured: 128 beats 32 and 64 on CPU)
    block_k: int = 256  # key positions per block (rounded to whole pages)

    def __post_init__(self):
        if self.block_q < 1 or self.block_k < 1:
            raise ValueError(f"block_q and block_k must be positive, got {self}")


def _soft_cap(s, soft_cap):
    return s if soft_cap is None else soft_cap * jnp.tanh(s / soft_cap)


def _online_update(carry, s, mask, weigh_values):
    """One key block of the online softmax. s: f32[..., K] scores, mask: bool[..., K];
    weigh_values(p) -> f32[..., D] sums p over the block's V (zero where masked).
    carry = (m [...], denom [...], acc [..., D])."""
    m, denom, acc = carry
    s = jnp.where(mask, s, _MASKED)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    denom = denom * alpha + p.sum(axis=-1)
    acc = acc * alpha[..., None] + weigh_values(p)
    return m_new, denom, acc


def _finish(denom, acc):
    return acc / jnp.where(denom > 0, denom, 1.0)[..., None]


def blocked_paged_attention(
    q,             # [T, Hq, D]
    k_cache,       # [L, P, Hkv, page_size, D]
    v_cache,       # [L, P, Hkv, page_size, D]
    layer,         # i32[]
    kv_lens,       # i32[S]
    page_indices,  # i32[S, pages_per_seq]
    cu_q_lens,     # i32[S + 1]
    num_seqs,      # i32[1]
    *,
    sm_scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    interpret: bool = False,
    config: BlockedConfig = BlockedConfig(),
    decode_fn=None,
):  # -> [T, Hq, D] in q.dtype
    """decode_fn: None (the jnp loop below) or a function with the contract's signature that
    returns f32[S, Hq, D], each decode slot's output (q_len == 1), e.g. native_decode.paged_decode."""
    del interpret  # plain jnp: the same everywhere
    check_operands(q, k_cache, v_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs,
                   sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window)
    T, Hq, D = q.shape
    _, _, Hkv, page_size, _ = k_cache.shape
    S, pages_per_seq = page_indices.shape
    G = Hq // Hkv
    pages_per_block = max(1, min(config.block_k // page_size, pages_per_seq))
    block_k = pages_per_block * page_size
    num_blocks = -(-pages_per_seq // pages_per_block)
    # a block's pages are a fixed-width slice of the table: pad it to whole blocks (page 0 is
    # read there but masked out, as it is past every kv_len)
    table = jnp.pad(page_indices, ((0, 0), (0, num_blocks * pages_per_block - pages_per_seq)))

    live = jnp.arange(S) < num_seqs[0]                                  # bool[S]
    q_lens = jnp.where(live, cu_q_lens[1:] - cu_q_lens[:-1], 0)         # i32[S]
    kv_lens = jnp.where(live, kv_lens, 0)
    q_starts = cu_q_lens[:-1]                                           # i32[S]
    q32 = q.astype(jnp.float32)

    def gather(k_or_v, pages):  # pages i32[..., ppb] -> f32[..., Hkv, block_k, D]
        x = kv_quant.read_pages(k_or_v, layer, pages)                   # [..., ppb, Hkv, ps, D]
        x = jnp.moveaxis(x, -3, -4)                                     # [..., Hkv, ppb, ps, D]
        return x.reshape(*pages.shape[:-1], Hkv, block_k, D)

    def first_block(first_pos):  # the sliding window's first visible key, as a block index
        if sliding_window is None:
            return jnp.zeros_like(first_pos)
        return jnp.maximum(first_pos - sliding_window + 1, 0) // block_k

    def visible(k_pos, q_pos):  # causal (and windowed) mask, broadcast over leading dims
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        return mask

    # ---- decode sequences: one row each, all S slots at once -------------------------------
    is_decode = q_lens == 1                                             # bool[S]
    dec_len = jnp.where(is_decode, kv_lens, 0)                          # i32[S]
    dec_pos = dec_len - 1                                               # i32[S] query position
    qd = q32[jnp.clip(q_starts, 0, T - 1)].reshape(S, Hkv, G, D) * sm_scale

    def decode_block(j, carry):
        pages = jax.lax.dynamic_slice_in_dim(table, j * pages_per_block, pages_per_block, 1)
        k_pos = j * block_k + jnp.arange(block_k)                       # i32[K]
        mask = visible(k_pos[None, :], dec_pos[:, None]) & is_decode[:, None]  # bool[S, K]
        mask = mask[:, None, None, :]                                   # bool[S, 1, 1, K]
        k = gather(k_cache, pages)                                      # f32[S, Hkv, K, D]
        key_ok = mask[:, 0, :, :, None]                                 # bool[S, 1, K, 1]
        v = jnp.where(key_ok, gather(v_cache, pages), 0.0)              # f32[S, Hkv, K, D]
        # a multiply-reduce, not a batched dot: XLA:CPU runs S * Hkv dots of [G, D] x [D, K]
        # (G ~ 3 rows) at a few GFLOP/s, while this fuses with the gather into one pass
        s = (qd[:, :, :, None, :] * k[:, :, None, :, :]).sum(-1)        # f32[S, Hkv, G, K]
        s = _soft_cap(s, soft_cap)
        return _online_update(carry, s, mask,
                              lambda p: jnp.einsum("sgqk,sgkd->sgqd", p, v))

    if decode_fn is None:
        dec_hi = -(-jnp.max(dec_len) // block_k)
        dec_lo = jnp.min(jnp.where(is_decode, first_block(dec_pos), num_blocks))
        init = (jnp.full((S, Hkv, G), _MASKED), jnp.zeros((S, Hkv, G)),
                jnp.zeros((S, Hkv, G, D)))
        _, denom, acc = jax.lax.fori_loop(jnp.minimum(dec_lo, dec_hi), dec_hi, decode_block,
                                          init)
        dec_out = _finish(denom, acc).reshape(S, Hq, D)
    else:
        dec_out = decode_fn(q, k_cache, v_cache, layer, kv_lens, page_indices, cu_q_lens,
                            num_seqs, sm_scale=sm_scale, soft_cap=soft_cap,
                            sliding_window=sliding_window)              # f32[S, Hq, D]

    # ---- prefill sequences: tiles of block_q rows, one tile at a time ----------------------
    bq = config.block_q
    tiles = jnp.where(q_lens >= 2, -(-q_lens // bq), 0)                 # i32[S]
    tile_end = jnp.cumsum(tiles)                                        # i32[S]
    q_pad = jnp.pad(q32 * sm_scale, ((0, bq), (0, 0), (0, 0)))          # [T + bq, Hq, D]

    def prefill_tile(i, out):
        s_idx = jnp.searchsorted(tile_end, i, side="right")             # the tile's sequence
        t_in_seq = i - (tile_end[s_idx] - tiles[s_idx])
        row0 = q_starts[s_idx] + t_in_seq * bq
        rows_left = q_lens[s_idx] - t_in_seq * bq                       # >= 1
        pos0 = kv_lens[s_idx] - q_lens[s_idx] + t_in_seq * bq
        q_pos = pos0 + jnp.arange(bq)                                   # i32[bq]
        row_ok = jnp.arange(bq) < rows_left                             # bool[bq]
        qt = jax.lax.dynamic_slice_in_dim(q_pad, row0, bq, 0)           # [bq, Hq, D]
        qt = qt.reshape(bq, Hkv, G, D).transpose(1, 2, 0, 3)            # [Hkv, G, bq, D]
        last_pos = pos0 + jnp.minimum(rows_left, bq) - 1
        pages_row = table[s_idx]                                        # i32[num_blocks*ppb]

        def key_block(j, carry):
            pages = jax.lax.dynamic_slice_in_dim(pages_row, j * pages_per_block,
                                                 pages_per_block)
            k_pos = j * block_k + jnp.arange(block_k)
            mask = visible(k_pos[None, :], q_pos[:, None]) & row_ok[:, None]  # bool[bq, K]
            k = gather(k_cache, pages)                                  # f32[Hkv, K, D]
            key_ok = (k_pos <= last_pos)[None, :, None]
            v = jnp.where(key_ok, gather(v_cache, pages), 0.0)
            s = _soft_cap(jnp.einsum("gqtd,gkd->gqtk", qt, k), soft_cap)  # f32[Hkv, G, bq, K]
            return _online_update(carry, s, mask[None, None],
                                  lambda p: jnp.einsum("gqtk,gkd->gqtd", p, v))

        init = (jnp.full((Hkv, G, bq), _MASKED), jnp.zeros((Hkv, G, bq)),
                jnp.zeros((Hkv, G, bq, D)))
        hi = last_pos // block_k + 1
        lo = jnp.minimum(first_block(pos0), hi)
        _, denom, acc = jax.lax.fori_loop(lo, hi, key_block, init)
        o = _finish(denom, acc).transpose(2, 0, 1, 3).reshape(bq, Hq, D)
        kept = jax.lax.dynamic_slice_in_dim(out, row0, bq, 0)
        o = jnp.where(row_ok[:, None, None], o, kept)  # rows past the tile belong to others
        return jax.lax.dynamic_update_slice_in_dim(out, o, row0, 0)

    out = jnp.zeros((T + bq, Hq, D), jnp.float32)
    out = jax.lax.fori_loop(0, tile_end[-1], prefill_tile, out)[:T]
    rows = jnp.where(is_decode, q_starts, T)                            # T: dropped
    out = out.at[rows].set(dec_out, mode="drop")
    return out.astype(q.dtype)
