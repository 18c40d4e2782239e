"""The Pallas kernels lower for CUDA on this CPU host, obeying the Triton rules; GPU runs.

Interpret mode ignores Triton's rules, so every kernel is also lowered for CUDA here (an abstract
H100 stands in for the GPU on jax >= 0.11) and its Triton IR checked: power-of-2 tensor sizes,
dot dimensions >= 16, f32 dots in IEEE precision. Where the optional `triton` package is installed
the IR is also compiled for sm_90 (shared memory, spills). The `gpu` tests run the kernels for real
and are skipped where no GPU is visible.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import lowering_check, registry
from pallas_kernels.kv_quant import QuantizedKV
from pallas_kernels.problems import make_problem

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

PALLAS_VARIANTS = list(registry.pallas_variants())
H100_MAX_SHARED = 227 * 1024

# (tokens, slots, q_heads, kv_heads, head_dim, page_size, dtype, soft_cap, sliding_window);
# T <= S makes pallas_splitk_decode take its split-K path, T > S its ragged fallback.
SHAPES = {
    "mixed_bf16_d128_g4_cap_window": (64, 8, 32, 8, 128, 16, jnp.bfloat16, 30.0, 128),
    "decode_bf16_d128_g8": (8, 8, 64, 8, 128, 16, jnp.bfloat16, None, None),
    "decode_bf16_d64_g3": (4, 4, 9, 3, 64, 32, jnp.bfloat16, None, None),
    "mixed_f32_d64_g1": (40, 4, 4, 4, 64, 8, jnp.float32, None, None),
    "decode_f32_d128_g4_cap": (2, 2, 8, 2, 128, 16, jnp.float32, 50.0, None),
}


def _abstract_args(tokens, slots, hq, hkv, d, ps, dtype, pages_per_seq=64, layers=4, pages=512,
                   code_dtype=None):
    """code_dtype: int8 / float8_e4m3fn for a quantized cache (kv_quant.QuantizedKV)."""
    def spec(shape, dt=jnp.int32):
        return jax.ShapeDtypeStruct(shape, dt)
    cache = spec((layers, pages, hkv, ps, d), dtype)
    if code_dtype is not None:
        cache = QuantizedKV(codes=spec(cache.shape, code_dtype),
                            scale=spec(cache.shape[:-1], jnp.float32))
    return (spec((tokens, hq, d), dtype), cache, cache, spec(()), spec((slots,)),
            spec((slots, pages_per_seq)), spec((slots + 1,)), spec((1,)))


def _lower(variant, shape, code_dtype=None):
    tokens, slots, hq, hkv, d, ps, dtype, soft_cap, window = SHAPES[shape]
    fn = registry.get_attention_fn(variant)

    def attend(*args):
        return fn(*args, sm_scale=d ** -0.5, soft_cap=soft_cap, sliding_window=window)

    return lowering_check.lower_for_cuda(attend, *_abstract_args(tokens, slots, hq, hkv, d, ps,
                                                                 dtype, code_dtype=code_dtype))


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("variant", PALLAS_VARIANTS)
def test_lowers_for_cuda_within_triton_rules(variant, shape):
    text, kernels = _lower(variant, shape)
    assert kernels, "no Pallas-Triton kernel in the lowered module"
    assert "__gpu$xla.gpu.triton" in text
    for kernel in kernels:
        assert lowering_check.ttir_problems(kernel.ttir) == [], kernel.name
        assert kernel.num_warps in (1, 2, 4, 8, 16) and kernel.num_stages >= 1


@pytest.mark.parametrize("code_dtype", [jnp.int8, jnp.float8_e4m3fn], ids=["int8", "fp8"])
@pytest.mark.parametrize("shape", ["mixed_bf16_d128_g4_cap_window", "decode_bf16_d128_g8",
                                   "decode_bf16_d64_g3"])
@pytest.mark.parametrize("variant", PALLAS_VARIANTS)
def test_quantized_caches_lower_for_cuda_within_triton_rules(variant, shape, code_dtype):
    # codes and scales are two refs of the kernel, dequantized where a page is loaded
    text, kernels = _lower(variant, shape, code_dtype)
    assert kernels and "__gpu$xla.gpu.triton" in text
    for kernel in kernels:
        assert lowering_check.ttir_problems(kernel.ttir) == [], kernel.name
        assert ("i8" if code_dtype == jnp.int8 else "f8E4M3FN") in kernel.ttir, kernel.name


def test_splitk_variant_picks_kernel_by_shape():
    _, decode = _lower("pallas_splitk_decode", "decode_bf16_d128_g8")
    _, mixed = _lower("pallas_splitk_decode", "mixed_bf16_d128_g4_cap_window")
    assert [k.name for k in decode] == ["splitk_decode_attention"]
    assert decode[0].grid[2] > 1, "few sequences should be split along the context"
    assert [k.name for k in mixed] == ["ragged_paged_attention"]


@pytest.mark.parametrize("shape", ["mixed_bf16_d128_g4_cap_window", "decode_bf16_d128_g8",
                                   "decode_bf16_d64_g3"])
@pytest.mark.parametrize("variant", PALLAS_VARIANTS)
def test_compiles_for_sm90(variant, shape):
    pytest.importorskip("triton", reason="optional: AOT-compiles the Triton IR for sm_90")
    _, kernels = _lower(variant, shape)
    for kernel in kernels:
        report = lowering_check.compile_ttir(kernel, arch=90)
        assert report["shared"] <= H100_MAX_SHARED, report
        assert report["spill_bytes"] == 0, report


# --- on a real GPU -------------------------------------------------------------------------------

GPU_CASES = [
    ([1] * 8, [1, 15, 17, 513, 2000, 4096, 100, 33], 32, 8, 128, 16, jnp.bfloat16, {}),
    ([1, 100, 1, 513], [700, 100, 9, 513], 32, 8, 128, 16, jnp.bfloat16,
     dict(num_tokens=640, num_slots=6)),
    ([7, 1, 1], [7, 300, 31], 12, 4, 64, 32, jnp.float32, dict(num_tokens=16, num_slots=4)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
@pytest.mark.parametrize("variant", PALLAS_VARIANTS)
def test_matches_reference_on_gpu(variant, case):
    q_lens, kv_lens, hq, hkv, d, ps, dtype, extra = GPU_CASES[case]
    problem = make_problem(q_lens, kv_lens, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                           page_size=ps, dtype=dtype, **extra)
    kwargs = dict(sm_scale=d ** -0.5, soft_cap=30.0, sliding_window=None)
    ref = np.asarray(registry.get_attention_fn("reference")(*problem.args, **kwargs), np.float32)
    out = np.asarray(registry.get_attention_fn(variant)(*problem.args, **kwargs), np.float32)
    assert np.all(np.isfinite(out)) and np.all(out[problem.num_rows:] == 0)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("code_dtype", [jnp.int8, jnp.float8_e4m3fn], ids=["int8", "fp8"])
@pytest.mark.parametrize("variant", PALLAS_VARIANTS)
def test_quantized_cache_matches_reference_on_gpu(variant, code_dtype):
    from pallas_kernels import kv_quant
    q_lens, kv_lens, hq, hkv, d, ps, dtype, extra = GPU_CASES[1]
    problem = make_problem(q_lens, kv_lens, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                           page_size=ps, dtype=dtype, **extra)
    q, k, v, *meta = problem.args
    k, v = (kv_quant.QuantizedKV(*kv_quant.quantize(c, code_dtype)) for c in (k, v))
    kwargs = dict(sm_scale=d ** -0.5, soft_cap=30.0, sliding_window=None)
    ref = np.asarray(registry.get_attention_fn("reference")(q, k, v, *meta, **kwargs), np.float32)
    out = np.asarray(registry.get_attention_fn(variant)(q, k, v, *meta, **kwargs), np.float32)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, rtol=2e-2, atol=2e-2)
