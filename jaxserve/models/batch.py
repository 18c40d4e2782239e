"""ForwardBatch: the flat ragged batch one model step consumes, and the paged KV cache pytree.

The runner packs scheduled sequences into these padded arrays; the model never sees requests.
Padding tokens write to page `num_pages` (out of range, dropped) and are masked from attention
because they lie at or beyond cu_q_lens[num_seqs].
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    # [L, num_pages, Hkv, page_size, D], or a pallas_kernels.kv_quant.QuantizedKV of that
    # shape (int8/fp8 codes and per-token scales: --kv-cache-dtype)
    k: jnp.ndarray
    v: jnp.ndarray

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    @classmethod
    def zeros(cls, num_layers, num_pages, num_kv_heads, page_size, head_dim, dtype):
        shape = (num_layers, num_pages, num_kv_heads, page_size, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


@struct.dataclass
class ForwardBatch:
    token_ids: jnp.ndarray      # i32[T]
    positions: jnp.ndarray      # i32[T]  position of each token within its sequence
    slot_pages: jnp.ndarray     # i32[T]  page receiving the token's K/V (num_pages for padding)
    slot_offsets: jnp.ndarray   # i32[T]  row inside that page
    kv_lens: jnp.ndarray        # i32[S]  context length per sequence, this step's tokens included
    page_indices: jnp.ndarray   # i32[S, pages_per_seq]
    cu_q_lens: jnp.ndarray      # i32[S + 1]  rows of sequence s: cu_q_lens[s]:cu_q_lens[s+1]
    num_seqs: jnp.ndarray       # i32[1]  real sequences; the rest of the S slots are padding
    logits_indices: jnp.ndarray  # i32[N]  token rows whose logits the caller needs
