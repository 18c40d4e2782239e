"""LLM(tensor_parallel_size=N) end to end on 8 fake CPU devices: the same greedy tokens for
N = 1, 2 (KV heads split) and 8 (KV heads replicated), with the runner's arrays sharded.
Skipped until the runner builds a ShardingPlan (runner.sharding_plan)."""

from __future__ import annotations

import pytest

from shard_harness import run_script, tiny_model


def test_llm_tensor_parallel_same_tokens(tiny_model_dir):
    r = run_script("llm_tokens.py", tiny_model(tiny_model_dir, "llama-h8-kv4"), 1, 2, 8)
    if r.get("integrated") is False:
        pytest.skip("ModelRunner does not build a ShardingPlan yet (no runner.sharding_plan)")
    for n in ("2", "8"):
        assert r[n]["tokens"] == r["1"]["tokens"], f"tensor_parallel_size {n}"
        assert r[n]["num_devices"] == int(n)
        assert r[n]["linear_backend"] == "xla"  # a mesh never takes the native CPU matmul
        assert r[n]["q_proj_shard"][2] * int(n) == 64  # 8 heads x head_dim 8, split n ways
        assert r[n]["cache_spec"] == r[n]["cache_expected"]


def test_llm_tensor_parallel_with_an_int8_kv_cache(tiny_model_dir):
    r = run_script("llm_tokens.py", tiny_model(tiny_model_dir, "llama-h8-kv4"),
                   "--kv-cache-dtype=int8", 1, 2)
    assert r["2"]["tokens"] == r["1"]["tokens"]
    for n in ("1", "2"):
        assert r[n]["cache_dtype"] == "int8"
        assert r[n]["cache_spec"] == r[n]["cache_expected"]
    assert r["2"]["cache_shard"][2] * 2 == r["1"]["cache_shard"][2] == 4  # KV heads split
