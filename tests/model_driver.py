"""A minimal single-sequence driver of the model forward, for golden tests of the model alone.

It lays one sequence into consecutive pages and runs prefill then one-token decode steps,
so model bugs show without the scheduler or runner in between.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.models import ForwardBatch, KVCache, build_model
from jaxserve.models.linear import pack_layer_matrices
from pallas_kernels.reference import ragged_paged_attention_reference

PAGE_SIZE = 8


class SingleSequenceDriver:
    def __init__(self, loaded, max_len: int = 128, attention_fn=ragged_paged_attention_reference,
                 packed_matrices: bool = False):
        """packed_matrices: the layer matrices in the native CPU matmul's panels (float32)."""
        cfg = loaded.config
        self.cfg = cfg
        self.params = jax.tree.map(jnp.asarray, loaded.params)
        if packed_matrices:
            self.params = pack_layer_matrices(self.params)
        self.model = build_model(cfg, attention_fn)
        self.num_pages = -(-max_len // PAGE_SIZE)
        self.dtype = self.params["final_norm"].dtype
        self.forward = jax.jit(self.model.forward, donate_argnums=(1,))

    def new_cache(self):
        c = self.cfg
        return KVCache.zeros(c.num_layers, self.num_pages, c.num_kv_heads, PAGE_SIZE, c.head_dim,
                             self.dtype)

    def batch(self, token_ids, start: int, all_logits: bool, pad_to: int = 1):
        n = len(token_ids)
        padded = -(-n // pad_to) * pad_to  # fewer distinct shapes, fewer compiles
        pos = np.arange(start, start + padded, dtype=np.int32)
        pages = np.where(np.arange(padded) < n, pos // PAGE_SIZE, self.num_pages)  # pad: dropped
        ids = np.zeros(padded, np.int32)
        ids[:n] = token_ids
        return ForwardBatch(
            token_ids=jnp.asarray(ids),
            positions=jnp.asarray(pos),
            slot_pages=jnp.asarray(pages.astype(np.int32)),
            slot_offsets=jnp.asarray(pos % PAGE_SIZE),
            kv_lens=jnp.asarray([start + n], jnp.int32),
            page_indices=jnp.arange(self.num_pages, dtype=jnp.int32)[None, :],
            cu_q_lens=jnp.asarray([0, n], jnp.int32),
            num_seqs=jnp.asarray([1], jnp.int32),
            logits_indices=jnp.asarray(np.arange(n) if all_logits else [n - 1], jnp.int32),
        )

    def prompt_logits(self, token_ids) -> np.ndarray:  # f32[n, V]
        _, logits = self.forward(self.params, self.new_cache(), self.batch(token_ids, 0, True))
        return np.asarray(logits)

    def greedy(self, token_ids, max_new: int) -> list[int]:
        cache, logits = self.forward(self.params, self.new_cache(),
                                     self.batch(token_ids, 0, False, pad_to=32))
        out = [int(np.argmax(logits[0]))]
        pos = len(token_ids)
        while len(out) < max_new:
            cache, logits = self.forward(self.params, cache, self.batch([out[-1]], pos, False))
            out.append(int(np.argmax(logits[0])))
            pos += 1
        return out
