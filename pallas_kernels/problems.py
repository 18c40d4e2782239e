"""Synthetic ragged paged-attention problems for the kernel tests and benchmarks/kernels.py.

A problem is the contract's eight operands for one step: sequences with given (q_len, kv_len),
pages handed out in shuffled order from an all-layers cache, padding rows and unused sequence
slots after the live ones. With `poison=True` everything the contract says must never be read is
NaN or garbage, so a kernel that reads it produces NaN instead of passing by luck: other layers,
pages no sequence owns (which the page-table tails point to), cache positions at or past kv_len
inside owned pages, the q rows of padding, and the page tables / kv_lens of unused slots.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Problem:
    args: tuple  # (q, k_cache, v_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs)
    q_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]
    num_rows: int  # live query rows; rows past this are padding

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V a kernel must read at least (each live token's K and V, one layer)."""
        _, _, hkv, _, d = self.args[1].shape
        return 2 * sum(self.kv_lens) * hkv * d * self.args[1].dtype.itemsize

    @property
    def flops(self) -> int:
        """Causal attention FLOPs (no sliding window): 4 * D per (query head, visible key) pair.

        Query i of a sequence (0-based, of q_len) sees kv_len - q_len + i + 1 keys.
        """
        _, hq, d = self.args[0].shape
        pairs = sum(q * (kv - q) + q * (q + 1) // 2 for q, kv in zip(self.q_lens, self.kv_lens))
        return 4 * d * hq * pairs


def make_problem(q_lens, kv_lens, *, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 page_size: int, dtype=jnp.float32, num_tokens: int | None = None,
                 num_slots: int | None = None, pages_per_seq: int | None = None,
                 num_layers: int = 2, layer: int = 1, spare_pages: int = 3, poison: bool = True,
                 seed: int = 0) -> Problem:
    """Build one step. q_lens[i] <= kv_lens[i]; T and S default to the live sizes (no padding)."""
    q_lens, kv_lens = tuple(int(x) for x in q_lens), tuple(int(x) for x in kv_lens)
    if len(q_lens) != len(kv_lens) or any(q > kv for q, kv in zip(q_lens, kv_lens)):
        raise ValueError("need one q_len <= kv_len per sequence")
    rng = np.random.default_rng(seed)
    num_seqs = len(q_lens)
    num_rows = sum(q_lens)
    num_tokens = num_rows if num_tokens is None else num_tokens
    num_slots = num_seqs if num_slots is None else num_slots
    need = [-(-kv // page_size) for kv in kv_lens]
    pages_per_seq = pages_per_seq or max(need + [1])
    if num_tokens < num_rows or num_slots < num_seqs or pages_per_seq < max(need + [1]):
        raise ValueError("num_tokens, num_slots or pages_per_seq too small for these sequences")
    num_pages = sum(need) + spare_pages

    # Owned pages in shuffled order; table tails (and unused slots) point at spare pages.
    order = rng.permutation(num_pages).astype(np.int32)
    owned, spare = order[:sum(need)], order[sum(need):]
    table = rng.choice(spare, size=(num_slots, pages_per_seq)).astype(np.int32)
    valid = np.zeros((num_pages, page_size), bool)  # cache positions some sequence may read
    start = 0
    for s, (n, kv) in enumerate(zip(need, kv_lens)):
        table[s, :n] = owned[start:start + n]
        for j, page in enumerate(table[s, :n]):
            valid[page, :min(page_size, kv - j * page_size)] = True
        start += n
    lens = np.zeros(num_slots, np.int32)
    lens[:num_seqs] = kv_lens
    cu = np.full(num_slots + 1, num_rows, np.int32)
    cu[:num_seqs + 1] = np.concatenate([[0], np.cumsum(q_lens)])
    if poison:  # garbage the kernels must ignore in unused slots
        lens[num_seqs:] = 10 ** 6
        table[num_seqs:] = rng.integers(-(2 ** 20), 2 ** 20, size=table[num_seqs:].shape)

    cache_shape = (num_layers, num_pages, num_kv_heads, page_size, head_dim)
    poison_q = np.arange(num_tokens)[:, None, None] >= num_rows  # padding rows
    keep = np.zeros((num_layers, num_pages, 1, page_size, 1), bool)  # what may be read
    keep[layer] = valid[:, None, :, None]
    q = _normal(rng, (num_tokens, num_q_heads, head_dim), dtype, poison and poison_q)
    k = _normal(rng, cache_shape, dtype, poison and ~keep)
    v = _normal(rng, cache_shape, dtype, poison and ~keep)
    args = (q, k, v, jnp.int32(layer),
            jnp.asarray(lens), jnp.asarray(table), jnp.asarray(cu),
            jnp.asarray([num_seqs], jnp.int32))
    return Problem(args=args, q_lens=q_lens, kv_lens=kv_lens, num_rows=num_rows)


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _device_normal(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _normal(rng, shape, dtype, nan_where):
    """Standard normal values, NaN where `nan_where` (a broadcastable bool array, or False).

    Small arrays come from numpy (no compile per shape, which dominates test time); big
    benchmark caches are drawn on the device.
    """
    if np.prod(shape) > 2 ** 22:
        x = _device_normal(jax.random.key(int(rng.integers(2 ** 31))), tuple(shape),
                           jnp.dtype(dtype))
        return x if nan_where is False else jnp.where(nan_where, jnp.nan, x).astype(dtype)
    x = rng.standard_normal(shape, np.float32)
    if nan_where is not False:
        x = np.where(nan_where, np.float32(np.nan), x)
    return jnp.asarray(x).astype(dtype)
