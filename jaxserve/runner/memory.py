"""The memory plan: how many KV pages fit, from a budget, and a line to print at start-up."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxserve.config import CacheConfig
from jaxserve.models.config import ModelConfig

_CPU_DEFAULT_KV_BYTES = 512 * 2**20


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    weight_bytes: int
    page_bytes: int
    num_pages: int
    page_size: int
    budget_source: str
    draft_page_bytes: int = 0  # the draft model's share of page_bytes (speculative decoding)
    kv_cache_dtype: str = "auto"

    @property
    def kv_bytes(self) -> int:
        return self.page_bytes * self.num_pages

    @property
    def tokens(self) -> int:
        return self.num_pages * self.page_size

    def describe(self) -> str:
        gib = 2**30
        draft = (f", {self.draft_page_bytes * self.num_pages / gib:.2f} GiB of it the draft "
                 f"model's" if self.draft_page_bytes else "")
        kv = "" if self.kv_cache_dtype == "auto" else f" {self.kv_cache_dtype}"
        return (f"memory plan: weights {self.weight_bytes / gib:.2f} GiB, KV cache{kv} "
                f"{self.num_pages} pages x {self.page_size} tokens = {self.tokens} tokens "
                f"({self.kv_bytes / gib:.2f} GiB{draft}; {self.budget_source})")


def tree_bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def page_bytes(cfg: ModelConfig, page_size: int, dtype, kv_cache_dtype: str = "auto") -> int:
    """K and V of every layer for one page; a quantized cache (int8/fp8) holds one byte per
    value and a float32 scale per token and KV head."""
    per_token_head = (cfg.head_dim * np.dtype(dtype).itemsize if kv_cache_dtype == "auto"
                      else cfg.head_dim + 4)
    return 2 * cfg.num_layers * cfg.num_kv_heads * page_size * per_token_head


def activation_bytes(cfg: ModelConfig, max_tokens: int, max_seqs: int, dtype) -> int:
    """A generous bound on one step's live activations (largest bucket), kept out of the KV pool."""
    item = np.dtype(dtype).itemsize
    per_token = (4 * cfg.hidden_size + 3 * cfg.intermediate_size
                 + 2 * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim) * item
    logits = max_seqs * cfg.vocab_size * 4 * 3  # logits, log-softmax, sampling temporaries (f32)
    return max_tokens * per_token * 2 + logits


def plan_memory(cfg: ModelConfig, cache: CacheConfig, weight_bytes: int, cache_dtype,
                max_tokens: int, max_seqs: int, device=None, kv_shards: int = 1,
                draft_page_bytes: int = 0) -> MemoryPlan:
    """weight_bytes and the budget are per device; a page split over kv_shards devices (KV
    heads on the model axis) costs each of them 1/kv_shards of its bytes. draft_page_bytes: a
    draft model's cache, which has the target's pages (runner/draft.py), adds to every page."""
    device = device or jax.devices()[0]
    per_page = (page_bytes(cfg, cache.page_size, cache_dtype, cache.kv_cache_dtype) // kv_shards
                + draft_page_bytes)
    if cache.num_pages is not None:
        return MemoryPlan(weight_bytes, per_page, cache.num_pages, cache.page_size, "--num-pages",
                          draft_page_bytes, cache.kv_cache_dtype)
    if cache.kv_cache_memory_bytes is not None:
        budget, source = cache.kv_cache_memory_bytes, "--kv-cache-memory"
    elif device.platform == "cpu":
        budget, source = _CPU_DEFAULT_KV_BYTES, "CPU default budget"
    else:
        stats = device.memory_stats() or {}
        limit = stats.get("bytes_limit", 0)
        in_use = stats.get("bytes_in_use", weight_bytes)  # weights are already on the device
        budget = int(limit * cache.gpu_memory_utilization) - in_use - activation_bytes(
            cfg, max_tokens, max_seqs, cache_dtype)
        source = f"gpu_memory_utilization={cache.gpu_memory_utilization}"
    num_pages = budget // per_page
    if num_pages < 2:
        raise MemoryError(f"no room for the KV cache: budget {budget / 2**20:.1f} MiB ({source}) "
                          f"holds fewer than 2 pages of {per_page / 2**20:.2f} MiB")
    return MemoryPlan(weight_bytes, per_page, int(num_pages), cache.page_size, source,
                      draft_page_bytes, cache.kv_cache_dtype)
