"""Ragged paged attention for a step that mixes decode tokens and prefill chunks (Pallas, Triton).

Same contract as `reference.ragged_paged_attention_reference`: flat ragged queries q [T, Hq, D],
sequence s owning rows cu_q_lens[s]:cu_q_lens[s+1] (its newest tokens, attending causally), rows
from cu_q_lens[num_seqs] on are padding (zeros out, cache never read), and the all-layers cache
[L, P, Hkv, page_size, D] indexed by `layer` inside the kernel (no per-layer copy).

Grid: (query tiles, kv heads). A tile is `tokens` consecutive rows of one sequence times the
`group` query heads of one KV head, so one dot serves the whole GQA group. The number of tiles
depends on the batch, which Triton cannot size at run time, so the grid is the static upper bound
T // tokens + S + 1 and each program finds its sequence itself: segment s (sequence s, or s ==
num_seqs for the padding rows) owns the tiles from cu_q_lens[s] // tokens + s on. Those starts
grow by at least ceil(q_len / tokens) per segment, so segments never overlap; programs between
two segments' tiles find no live row and return after a few scalar loads. The padding segment
runs with an empty KV range, which writes its zeros without touching the cache, so every output
row is written by exactly one program and no zero-fill pass is needed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import paged_tiles as tiles


@dataclasses.dataclass(frozen=True)
class RaggedConfig:
    """Tuning of the ragged kernel (all powers of 2; the dot needs every dimension >= 16)."""

    block_m: int = 64   # query rows per tile = tokens * group; prefill wants 64-128
    block_kv: int = 64  # cache positions per inner step
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        tiles.check_block("block_m", self.block_m)
        tiles.check_block("block_kv", self.block_kv)
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


DEFAULT_CONFIG = RaggedConfig()


def default_config(dtype, head_dim: int) -> RaggedConfig:
    """Per-shape default, picked from offline sm_90 compiles of the worst case (soft-cap and
    window on) with pallas_kernels.lowering_check (registers, spills, shared memory), not yet
    from GPU timings. 16-bit at D <= 128: 64x64 tiles fit 4 warps without spills; D = 256
    needs half the KV block and 8 warps. f32 (the CPU / test dtype; IEEE dots run on FMA units)
    needs smaller tiles and still spills a few hundred bytes at D = 128."""
    if jnp.dtype(dtype).itemsize == 4:
        return RaggedConfig(block_kv=32) if head_dim <= 64 else RaggedConfig(32, 32, 8)
    if head_dim >= 256:
        return RaggedConfig(block_kv=32, num_warps=8)
    return DEFAULT_CONFIG


def _ragged_kernel(q_ref, k_ref, v_ref, layer_ref, kv_lens_ref, pages_ref, cu_ref, nseq_ref,
                   o_ref, *, tokens: int, block_kv: int, sm_scale: float, soft_cap,
                   sliding_window):
    # q_ref, o_ref [T, Hkv, group, D]; k_ref, v_ref [L, P, Hkv, page_size, D]; layer_ref i32[1]
    # kv_lens_ref i32[S]; pages_ref i32[S, pages_per_seq]; cu_ref i32[S + 1]; nseq_ref i32[1]
    tile, head = pl.program_id(0), pl.program_id(1)
    num_tokens, _, group, head_dim = q_ref.shape
    num_slots = kv_lens_ref.shape[0]
    layer = jnp.clip(layer_ref[0], 0, k_ref.shape[0] - 1)
    num_seqs = jnp.clip(nseq_ref[0], 0, num_slots)

    # Which segment owns this tile: the last s <= num_seqs whose first tile is <= this tile.
    width = tiles.next_pow2(num_slots + 1)
    s_idx = jnp.arange(width, dtype=jnp.int32)  # [W]
    # cu_q_lens clamped into [0, T]: a corrupt batch must not make the GPU write outside `out`.
    cu = plgpu.load(cu_ref.at[pl.ds(0, width)], mask=s_idx <= num_slots, other=0)  # [W]
    cu = jnp.clip(cu, 0, num_tokens)
    owns = ((cu // tokens + s_idx) <= tile) & (s_idx <= num_seqs)  # [W]
    seq = jnp.sum(owns.astype(jnp.int32)) - 1
    is_seq = seq < num_seqs  # False: the padding segment
    seq_c = jnp.minimum(seq, num_slots - 1)
    seq_start = jnp.clip(cu_ref[seq], 0, num_tokens)
    seq_end = jnp.where(is_seq, jnp.clip(cu_ref[jnp.minimum(seq + 1, num_slots)], 0, num_tokens),
                        num_tokens)
    kv_len = jnp.where(is_seq, kv_lens_ref[seq_c], 0)
    row0 = seq_start + (tile - (seq_start // tokens + seq)) * tokens

    row, row_ok, q_pos, lo, hi = tiles.query_tile_bounds(
        row0, seq_start, seq_end, kv_len, tokens=tokens, block_kv=block_kv,
        sliding_window=sliding_window)
    del row
    q = tiles.load_query_tile(q_ref, row0, head, row_ok)  # [M, D]

    def kv_block(start):
        return tiles.load_kv_block(k_ref, v_ref, pages_ref, layer, seq_c, head, start, hi,
                                   block_kv=block_kv)

    acc, _, denom = tiles.attend_kv_range(
        q, tiles.expand_rows(q_pos, group), lo, hi, kv_block, block_kv=block_kv,
        sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window)
    out = acc / jnp.where(denom > 0, denom, 1.0)[:, None]  # rows with no key (padding) stay 0
    out = out.reshape(tokens, group, head_dim).astype(o_ref.dtype)
    mask = jnp.broadcast_to(row_ok[:, None, None], (tokens, group, head_dim))
    plgpu.store(o_ref.at[pl.ds(row0, tokens), head, :, :], out, mask=mask)


def num_query_tiles(num_tokens: int, num_slots: int, tokens: int) -> int:
    """Static grid bound: sum over segments of ceil(len / tokens) <= T // tokens + S + 1."""
    return num_tokens // tokens + num_slots + 1


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "sliding_window", "config",
                                             "interpret"))
def ragged_paged_attention(
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
    config: RaggedConfig | None = None,
    interpret: bool = False,
):  # -> [T, Hq, D] in q.dtype
    """Pallas (Triton) ragged paged attention; see the module docstring and the reference."""
    tiles.check_kernel_operands(q, k_cache, v_cache, layer, kv_lens, page_indices, cu_q_lens,
                                num_seqs, sm_scale=sm_scale, soft_cap=soft_cap,
                                sliding_window=sliding_window)
    num_tokens, num_q_heads, head_dim = q.shape
    config = config or default_config(q.dtype, head_dim)
    num_kv_heads = k_cache.shape[2]
    num_slots = kv_lens.shape[0]
    qg = tiles.group_queries(q, num_kv_heads)  # [T, Hkv, group, D]
    group = qg.shape[2]
    tokens = tiles.tokens_per_tile(group, config.block_m)
    kernel = functools.partial(
        _ragged_kernel, tokens=tokens, block_kv=config.block_kv, sm_scale=float(sm_scale),
        soft_cap=None if soft_cap is None else float(soft_cap),
        sliding_window=None if sliding_window is None else int(sliding_window))
    out = pl.pallas_call(
        kernel,
        grid=(num_query_tiles(num_tokens, num_slots, tokens), num_kv_heads),
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
    )(qg, k_cache, v_cache, tiles.int_scalar(layer), kv_lens.astype(jnp.int32),
      page_indices.astype(jnp.int32), cu_q_lens.astype(jnp.int32),
      num_seqs.astype(jnp.int32).reshape(1))
    return tiles.ungroup_output(out, num_q_heads)  # [T, Hq, D]
