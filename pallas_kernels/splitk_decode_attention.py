"""Split-K (flash-decoding) paged attention for decode steps of few sequences at long context.

A decode step of a handful of sequences gives the ragged kernel only S * Hkv programs (8 for one
Llama-3-8B sequence), far fewer than the GPU's 132 SMs, so most of the memory bandwidth idles. Here
the grid is (S, Hkv, splits): each program reads one contiguous share of one sequence's cache and
writes the attention over that share with its log-sum-exp; a small jnp epilogue merges the
splits (out = sum_i exp(lse_i - max) * o_i / sum_i exp(lse_i - max)) and zeroes padding rows.

The kernel is correct for any ragged batch: a program loops over all query tiles of its sequence
(one tile in decode). It is only fast for decode, and its partial buffers grow with T * splits, so
`ragged_paged_attention_splitk` decides statically from shapes: when T <= S (a bucket no larger
than its sequence slots, which is how decode buckets look) it runs split-K, otherwise it falls back
to the ragged kernel. Whether every q_len is 1 is only known on device; a lax.cond on it would make
XLA sync the stream on the predicate for every layer, so we do not branch on it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import paged_tiles as tiles
from pallas_kernels.ragged_paged_attention import RaggedConfig, ragged_paged_attention


@dataclasses.dataclass(frozen=True)
class SplitKConfig:
    """Tuning of the split-K decode kernel (block sizes powers of 2, dot dims >= 16)."""

    block_m: int = 16          # query rows per tile; decode has `group` live rows of these
    block_kv: int = 64         # cache positions per inner step
    num_splits: int | None = None  # None: enough programs to fill the GPU (see splits_for)
    target_programs: int = 264     # ~2 programs per SM of an H100/H200 (132 SMs)
    max_splits: int = 16
    num_warps: int = 4
    num_stages: int = 2
    fallback: RaggedConfig | None = None  # ragged kernel's config for T > S (None: its default)

    def __post_init__(self):
        tiles.check_block("block_m", self.block_m)
        tiles.check_block("block_kv", self.block_kv)
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits must be >= 1 or None, got {self.num_splits}")
        if self.max_splits < 1 or self.target_programs < 1:
            raise ValueError("max_splits and target_programs must be >= 1")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")

    def splits_for(self, num_slots: int, num_kv_heads: int, context: int) -> int:
        """Static split count: fill the GPU, but never split finer than one KV block."""
        if self.num_splits is not None:
            return self.num_splits
        want = -(-self.target_programs // (num_slots * num_kv_heads))
        return max(1, min(want, self.max_splits, -(-context // self.block_kv)))


DEFAULT_CONFIG = SplitKConfig()


def default_config(dtype, head_dim: int) -> SplitKConfig:
    """Per-shape default from offline sm_90 compiles (see ragged_paged_attention.default_config):
    16 x 64 tiles; 8 warps where 4 would need more than ~200 registers (f32, or D = 256)."""
    if jnp.dtype(dtype).itemsize == 4 or head_dim >= 256:
        return SplitKConfig(num_warps=8)
    return DEFAULT_CONFIG


def _splitk_kernel(q_ref, k_ref, v_ref, layer_ref, kv_lens_ref, pages_ref, cu_ref, nseq_ref,
                   o_ref, lse_ref, *, tokens: int, block_kv: int, num_splits: int,
                   sm_scale: float, soft_cap, sliding_window):
    # q_ref [T, Hkv, group, D]; k_ref, v_ref [L, P, Hkv, page_size, D]; layer_ref i32[1]
    # kv_lens_ref i32[S]; pages_ref i32[S, pages_per_seq]; cu_ref i32[S + 1]; nseq_ref i32[1]
    # o_ref [splits, T, Hkv, group, D] f32, normalised over the split's keys
    # lse_ref [splits, T, Hkv, group] f32, log-sum-exp of the split's scores
    seq, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_tokens, _, group, head_dim = q_ref.shape
    layer = jnp.clip(layer_ref[0], 0, k_ref.shape[0] - 1)
    live_seq = seq < jnp.clip(nseq_ref[0], 0, kv_lens_ref.shape[0])
    # Rows clamped into [0, T]: a corrupt cu_q_lens must not make the GPU write outside `out`.
    seq_start = jnp.clip(cu_ref[seq], 0, num_tokens)
    seq_end = jnp.where(live_seq, jnp.clip(cu_ref[seq + 1], seq_start, num_tokens),
                        seq_start)  # slots >= num_seqs own no rows
    kv_len = jnp.where(live_seq, kv_lens_ref[seq], 0)
    # This split's share of the cache, a whole number of KV blocks.
    chunk = (kv_len + num_splits * block_kv - 1) // (num_splits * block_kv) * block_kv
    split_lo = split * chunk
    split_hi = jnp.minimum(split_lo + chunk, kv_len)

    def q_tile(t, carry):
        row0 = seq_start + t * tokens
        _, row_ok, q_pos, lo, hi = tiles.query_tile_bounds(
            row0, seq_start, seq_end, kv_len, tokens=tokens, block_kv=block_kv,
            sliding_window=sliding_window)
        lo = jnp.maximum(lo, split_lo)  # both block-aligned, so blocks stay page-friendly
        hi = jnp.minimum(hi, split_hi)
        q = tiles.load_query_tile(q_ref, row0, head, row_ok)  # [M, D]

        def kv_block(start):
            return tiles.load_kv_block(k_ref, v_ref, pages_ref, layer, seq, head, start, hi,
                                       block_kv=block_kv)

        acc, m, denom = tiles.attend_kv_range(
            q, tiles.expand_rows(q_pos, group), lo, hi, kv_block, block_kv=block_kv,
            sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window)
        has_key = denom > 0
        out = acc / jnp.where(has_key, denom, 1.0)[:, None]  # [M, D]
        # A split that saw no key for a row gets weight exp(MASK_VALUE - max) == 0 in the merge.
        lse = jnp.where(has_key, m + jnp.log(jnp.where(has_key, denom, 1.0)), tiles.MASK_VALUE)
        mask3 = jnp.broadcast_to(row_ok[:, None, None], (tokens, group, head_dim))
        plgpu.store(o_ref.at[split, pl.ds(row0, tokens), head, :, :],
                    out.reshape(tokens, group, head_dim), mask=mask3)
        mask2 = jnp.broadcast_to(row_ok[:, None], (tokens, group))
        plgpu.store(lse_ref.at[split, pl.ds(row0, tokens), head, :],
                    lse.reshape(tokens, group), mask=mask2)
        return carry

    jax.lax.fori_loop(0, (seq_end - seq_start + tokens - 1) // tokens, q_tile, 0)


def merge_splits(o_parts, lse_parts, row_valid, dtype):
    """[splits, T, Hkv, G, D] partials + [splits, T, Hkv, G] lse -> [T, Hkv, G, D] in dtype.

    Rows no program wrote (padding) hold garbage, possibly NaN; the final where drops them.
    """
    lse_max = jnp.max(lse_parts, axis=0)  # [T, Hkv, G]
    w = jnp.exp(lse_parts - lse_max[None])  # [splits, T, Hkv, G]
    out = jnp.sum(w[..., None] * o_parts, axis=0) / jnp.sum(w, axis=0)[..., None]
    return jnp.where(row_valid[:, None, None, None], out, 0.0).astype(dtype)


def splitk_decode_attention(q, k_cache, v_cache, layer, kv_lens, page_indices, cu_q_lens,
                            num_seqs, *, sm_scale, soft_cap, sliding_window, config, interpret):
    """The split-K kernel plus merge, for any batch (no fallback); operands already checked."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, page_size = k_cache.shape[2], k_cache.shape[3]
    num_slots = kv_lens.shape[0]
    qg = tiles.group_queries(q, num_kv_heads)  # [T, Hkv, group, D]
    group = qg.shape[2]
    tokens = tiles.tokens_per_tile(group, config.block_m)
    splits = config.splits_for(num_slots, num_kv_heads, page_indices.shape[1] * page_size)
    kernel = functools.partial(
        _splitk_kernel, tokens=tokens, block_kv=config.block_kv, num_splits=splits,
        sm_scale=float(sm_scale), soft_cap=None if soft_cap is None else float(soft_cap),
        sliding_window=None if sliding_window is None else int(sliding_window))
    cu_q_lens = cu_q_lens.astype(jnp.int32)
    num_seqs = num_seqs.astype(jnp.int32).reshape(1)
    o_parts, lse_parts = pl.pallas_call(
        kernel,
        grid=(num_slots, num_kv_heads, splits),
        out_shape=(jax.ShapeDtypeStruct((splits, *qg.shape), jnp.float32),
                   jax.ShapeDtypeStruct((splits, *qg.shape[:3]), jnp.float32)),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        interpret=interpret,
        name="splitk_decode_attention",
    )(qg, k_cache, v_cache, tiles.int_scalar(layer), kv_lens.astype(jnp.int32),
      page_indices.astype(jnp.int32), cu_q_lens, num_seqs)
    num_live_rows = cu_q_lens[jnp.clip(num_seqs[0], 0, num_slots)]
    row_valid = jnp.arange(num_tokens) < num_live_rows  # [T]
    out = merge_splits(o_parts, lse_parts, row_valid, q.dtype)  # [T, Hkv, group, D]
    del head_dim
    return tiles.ungroup_output(out, num_q_heads)


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "sliding_window", "config",
                                             "interpret"))
def ragged_paged_attention_splitk(
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
    config: SplitKConfig | None = None,
    interpret: bool = False,
):  # -> [T, Hq, D] in q.dtype
    """Split-K when T <= S (decode-shaped bucket), else the ragged kernel; same contract."""
    tiles.check_kernel_operands(q, k_cache, v_cache, layer, kv_lens, page_indices, cu_q_lens,
                                num_seqs, sm_scale=sm_scale, soft_cap=soft_cap,
                                sliding_window=sliding_window)
    config = config or default_config(q.dtype, q.shape[2])
    kwargs = dict(sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
                  interpret=interpret)
    args = (q, k_cache, v_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs)
    if q.shape[0] > kv_lens.shape[0]:
        return ragged_paged_attention(*args, config=config.fallback, **kwargs)
    return splitk_decode_attention(*args, config=config, **kwargs)
