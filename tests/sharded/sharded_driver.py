"""A small multi-sequence greedy driver of the bare model forward, sharded by a ShardingPlan.

Run inside the subprocess scripts of tests/sharded (which see 8 fake CPU devices). Sequence i
owns pages [i * pages_per_seq, (i + 1) * pages_per_seq); all prompts prefill in one ragged
batch, then every step decodes one token per sequence, so the same code exercises mixed ragged
prefill and batched decode. With plan=None it is the unsharded baseline (default device).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxserve.models import ForwardBatch, KVCache, build_model  # noqa: E402
from pallas_kernels.reference import ragged_paged_attention_reference  # noqa: E402

PAGE_SIZE = 8
PAD_TO = 32  # prefill and decode share one token bucket: one compile per sharding


def load_host_model(model_dir: str):
    """(ModelConfig, host numpy params) of an HF folder, without the tokenizer (importing
    transformers' tokenizer stack costs seconds per subprocess, and tests feed token ids)."""
    from jaxserve.loading.hf import SafetensorsFolder
    from jaxserve.models.config import ModelConfig
    from jaxserve.models.hf_names import params_from_hf

    cfg = ModelConfig.from_folder(model_dir)
    return cfg, params_from_hf(cfg, SafetensorsFolder(model_dir).get, model_dir)


def prompts(n: int = 2, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 384, size=int(rng.integers(9, 30))).tolist() for _ in range(n)]


class ShardedDriver:
    def __init__(self, cfg, host_params, plan=None, max_len: int = 64,
                 attention_fn=ragged_paged_attention_reference, params=None,
                 kv_code_dtype=None):
        """params: already-placed params (e.g. restored from orbax); else host_params are
        placed with the plan (or device_put without one). kv_code_dtype: int8 / float8_e4m3fn
        for a quantized KV cache (pallas_kernels.kv_quant), None for a float one."""
        self.cfg, self.plan, self.kv_code_dtype = cfg, plan, kv_code_dtype
        quantized = kv_code_dtype is not None
        self.pages_per_seq = -(-max_len // PAGE_SIZE)
        if plan is None:
            self.params = params if params is not None else jax.device_put(host_params)
            model = build_model(cfg, attention_fn)
            self.forward = jax.jit(model.forward, donate_argnums=(1,))
        else:
            self.params = params if params is not None else plan.place_params(host_params)
            model = build_model(cfg, plan.wrap_attention(attention_fn))
            self.forward = jax.jit(model.forward, donate_argnums=(1,),
                                   out_shardings=(plan.kv_cache_sharding(quantized),
                                                  plan.replicated()))
        self.dtype = self.params["final_norm"].dtype

    def new_cache(self, num_seqs: int):
        c, pages = self.cfg, num_seqs * self.pages_per_seq
        if self.plan is None:
            shape = (c.num_layers, pages, c.num_kv_heads, PAGE_SIZE, c.head_dim)
            if self.kv_code_dtype is not None:
                from pallas_kernels.kv_quant import QuantizedKV
                return KVCache(k=QuantizedKV.zeros(shape, self.kv_code_dtype),
                               v=QuantizedKV.zeros(shape, self.kv_code_dtype))
            return KVCache.zeros(*shape, self.dtype)
        return self.plan.zeros_kv_cache(pages, PAGE_SIZE, self.dtype, self.kv_code_dtype)

    def batch(self, chunks: list[list[int]], starts: list[int], pad_to: int) -> ForwardBatch:
        """numpy ForwardBatch: chunks[i] at positions starts[i].. of sequence i."""
        S, num_pages = len(chunks), len(chunks) * self.pages_per_seq
        n = sum(len(c) for c in chunks)
        T = -(-n // pad_to) * pad_to
        ids = np.zeros(T, np.int32)
        pos = np.zeros(T, np.int32)
        pages = np.full(T, num_pages, np.int32)  # padding rows: out-of-range page, dropped
        cu = np.zeros(S + 1, np.int32)
        row = 0
        for i, (chunk, start) in enumerate(zip(chunks, starts)):
            p = np.arange(start, start + len(chunk), dtype=np.int32)
            ids[row:row + len(chunk)] = chunk
            pos[row:row + len(chunk)] = p
            pages[row:row + len(chunk)] = i * self.pages_per_seq + p // PAGE_SIZE
            row += len(chunk)
            cu[i + 1] = row
        table = (np.arange(S, dtype=np.int32)[:, None] * self.pages_per_seq
                 + np.arange(self.pages_per_seq, dtype=np.int32)[None, :])
        return ForwardBatch(
            token_ids=ids, positions=pos, slot_pages=pages, slot_offsets=pos % PAGE_SIZE,
            kv_lens=np.asarray([s + len(c) for c, s in zip(chunks, starts)], np.int32),
            page_indices=table, cu_q_lens=cu, num_seqs=np.asarray([S], np.int32),
            logits_indices=(cu[1:] - 1).astype(np.int32))

    def step(self, cache, batch: ForwardBatch):
        """One forward; returns (cache, greedy next token per sequence as a list)."""
        placed = (jax.tree.map(jnp.asarray, batch) if self.plan is None
                  else self.plan.put_batch(batch))
        cache, logits = self.forward(self.params, cache, placed)
        return cache, np.asarray(logits).argmax(-1).tolist()

    def greedy(self, prompt_list: list[list[int]], max_new: int) -> list[list[int]]:
        cache = self.new_cache(len(prompt_list))
        cache, nxt = self.step(cache, self.batch(prompt_list, [0] * len(prompt_list), PAD_TO))
        out = [[t] for t in nxt]
        starts = [len(p) for p in prompt_list]
        while len(out[0]) < max_new:
            cache, nxt = self.step(cache, self.batch([[o[-1]] for o in out], starts, PAD_TO))
            for o, t in zip(out, nxt):
                o.append(t)
            starts = [s + 1 for s in starts]
        self.last_cache = cache
        return out
