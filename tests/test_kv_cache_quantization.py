"""A quantized KV cache (--kv-cache-dtype int8 | fp8): codes and per-token scales written by
the step, dequantized by every attention variant where it loads a page, and the engine's
outputs near the float cache's with about twice the pages of a 16-bit cache."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import kv_quant, registry
from pallas_kernels.reference import ragged_paged_attention_reference

CODES = [jnp.int8, jnp.float8_e4m3fn]


@pytest.mark.parametrize("code_dtype", CODES)
def test_quantize_rounds_within_the_codes_step(code_dtype):
    x = np.random.default_rng(0).normal(size=(7, 3, 64)).astype(np.float32)
    x[2, 1] *= 100  # one loud token and head: the others keep their precision
    codes, scale = kv_quant.quantize(jnp.asarray(x), code_dtype)
    assert codes.dtype == code_dtype and scale.shape == (7, 3)
    back = np.asarray(codes.astype(jnp.float32) * scale[..., None])
    amax = np.abs(x).max(-1, keepdims=True)
    bound = amax / 254 if code_dtype == jnp.int8 else np.abs(x) / 16 + amax * 2.0 ** -9 / 448
    assert np.all(np.abs(back - x) <= bound + 1e-6)


def _problem(rng, L=2, P=16, Hkv=2, ps=8, D=32, Hq=4):
    """A mixed step: a 7-token prefill chunk at context 21, two decodes (contexts 30, 9), a
    padding slot; every page of the pool random (stale pages included)."""
    k = rng.normal(size=(L, P, Hkv, ps, D)).astype(np.float32)
    v = rng.normal(size=(L, P, Hkv, ps, D)).astype(np.float32)
    q = rng.normal(size=(12, Hq, D)).astype(np.float32)
    kv_lens = np.array([21, 30, 9, 0], np.int32)
    pages = np.array([[3, 1, 2, 0], [4, 5, 6, 7], [9, 8, 0, 0], [0, 0, 0, 0]], np.int32)
    cu = np.array([0, 7, 8, 9, 9], np.int32)
    return q, k, v, kv_lens, pages, cu, np.array([3], np.int32)


@pytest.mark.parametrize("code_dtype", CODES)
@pytest.mark.parametrize("variant", ["reference", "blocked", "native", "pallas_ragged",
                                     "pallas_splitk_decode"])
def test_every_attention_variant_reads_the_quantized_cache_as_its_dequantized_floats(
        variant, code_dtype):
    q, k, v, kv_lens, pages, cu, ns = _problem(np.random.default_rng(1))
    kc, ks = kv_quant.quantize(jnp.asarray(k), code_dtype)
    vc, vs = kv_quant.quantize(jnp.asarray(v), code_dtype)
    quantized = (kv_quant.QuantizedKV(kc, ks), kv_quant.QuantizedKV(vc, vs))
    floats = (kc.astype(jnp.float32) * ks[..., None], vc.astype(jnp.float32) * vs[..., None])
    args = (jnp.int32(1), jnp.asarray(kv_lens), jnp.asarray(pages), jnp.asarray(cu),
            jnp.asarray(ns))
    want = ragged_paged_attention_reference(jnp.asarray(q), *floats, *args, sm_scale=0.18)
    extra = {"interpret": True} if variant.startswith("pallas") else {}
    got = registry.get_attention_fn(variant)(jnp.asarray(q), *quantized, *args, sm_scale=0.18,
                                             **extra)
    np.testing.assert_allclose(np.asarray(got)[:9], np.asarray(want)[:9], rtol=2e-5, atol=2e-5)
    # and near the float cache it stands for (int8: ~1% of a value; e4m3: ~6%)
    exact = ragged_paged_attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                             *args, sm_scale=0.18)
    tol = 0.03 if code_dtype == jnp.int8 else 0.2
    assert np.abs(np.asarray(got)[:9] - np.asarray(exact)[:9]).max() < tol


def test_a_mixed_quantized_and_float_cache_is_refused():
    q, k, v, kv_lens, pages, cu, ns = _problem(np.random.default_rng(2))
    kc, ks = kv_quant.quantize(jnp.asarray(k), jnp.int8)
    with pytest.raises(ValueError, match="both QuantizedKV"):
        ragged_paged_attention_reference(
            jnp.asarray(q), kv_quant.QuantizedKV(kc, ks), jnp.asarray(v), jnp.int32(0),
            jnp.asarray(kv_lens), jnp.asarray(pages), jnp.asarray(cu), jnp.asarray(ns),
            sm_scale=0.2)


def _engine_outputs(model_dir, kv_cache_dtype, prompts, budget):
    from jaxserve.llm import LLM, SamplingParams
    llm = LLM(model_dir, kv_cache_dtype=kv_cache_dtype, kv_cache_memory_bytes=budget,
              max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64,
              compilation_cache_dir=None)
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0,
                                                prompt_logprobs=0))
    # each prompt token's logprob given the tokens before it: the same tokens in every run
    return llm.engine.runner, [np.array([e[t] for e, t in zip(o.prompt_logprobs[1:], p[1:])])
                               for o, p in zip(outs, prompts)]


@pytest.mark.parametrize("kv_cache_dtype,tol", [("int8", (0.3, 0.06)), ("fp8", (1.0, 0.2))])
def test_engine_with_a_quantized_cache_stays_near_the_float_cache(tiny_model_dir,
                                                                  kv_cache_dtype, tol):
    # bfloat16 weights and cache for the baseline: "twice the pages" is against a 16-bit cache
    folder = tiny_model_dir("llama-gqa", "bfloat16")
    rng = np.random.default_rng(0)
    # 100 tokens: a prefill in two chunks (64-token steps), the second reading the first's
    # quantized K/V from the cache
    prompts = [rng.integers(3, 380, n).tolist() for n in (5, 17, 100)]
    budget = 4 * 2**20
    ref_runner, ref = _engine_outputs(folder, "auto", prompts, budget)
    runner, got = _engine_outputs(folder, kv_cache_dtype, prompts, budget)
    assert kv_quant.is_quantized(runner.kv_cache.k) and kv_quant.is_quantized(runner.kv_cache.v)
    assert runner.kv_cache.k.codes.dtype == kv_quant.KV_CACHE_DTYPES[kv_cache_dtype]
    # head_dim 16: 2 x 16 bytes of bfloat16 per token and head against 16 codes + a 4-byte scale
    assert runner.num_pages / ref_runner.num_pages == pytest.approx(32 / 20, rel=0.02)
    assert f"KV cache {kv_cache_dtype} " in runner.plan.describe()
    # teacher-forced logprobs of the same prompt tokens, in nats; measured on this random
    # bfloat16 model (flat logits, every error shows): int8 max 0.06-0.15, mean 0.03; fp8 max
    # 0.10-0.64, mean 0.05-0.11
    for a, b in zip(got, ref):
        err = np.abs(a - b)
        assert err.max() <= tol[0] and err.mean() <= tol[1], (err.max(), err.mean())
        assert np.abs(a - b).max() > 0  # the codes are really used


def test_the_memory_plan_counts_codes_and_scales():
    from jaxserve.models.config import ModelConfig
    from jaxserve.runner.memory import page_bytes
    cfg = ModelConfig.from_hf_dict({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                    "hidden_size": 576, "intermediate_size": 1536,
                                    "num_hidden_layers": 30, "num_attention_heads": 9,
                                    "num_key_value_heads": 3, "vocab_size": 49152,
                                    "max_position_embeddings": 2048}, source="smollm2")
    bf16 = page_bytes(cfg, 16, jnp.bfloat16)
    int8 = page_bytes(cfg, 16, jnp.bfloat16, "int8")
    assert int8 == 2 * 30 * 3 * 16 * (64 + 4)
    assert bf16 / int8 == pytest.approx(128 / 68)  # 1.88x the tokens of a bfloat16 cache
    assert page_bytes(cfg, 16, jnp.float32) / page_bytes(cfg, 16, jnp.float32, "fp8") > 3.7


def test_bad_kv_cache_dtype_is_a_config_error():
    from jaxserve.config import CacheConfig, ConfigError
    with pytest.raises(ConfigError, match="--kv-cache-dtype must be one of"):
        CacheConfig(kv_cache_dtype="int4")
