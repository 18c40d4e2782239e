"""Paged-attention kernels vs the pure-jnp reference, in Pallas interpret mode on CPU.

The case grid covers every value the kernels must handle without the full cartesian product
(interpret mode is slow): page sizes 8/16/32, head_dim 64/128, GQA ratios 1/3/4/8 (3 pads the
group to 4), sequence lengths 1, page_size-1, page_size+1 and 513, decode-only, prefill-only and
mixed batches, f32 and bf16, soft-cap and sliding window. Every problem is poisoned (see
pallas_kernels.problems): NaN in other layers, in unowned pages, past kv_len and in padding q rows,
garbage in unused slots; outputs must be finite and padding rows exactly zero.
"""

from __future__ import annotations

import inspect
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import registry
from pallas_kernels.problems import make_problem
from pallas_kernels.splitk_decode_attention import SplitKConfig, splitk_decode_attention

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

TOLERANCE = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}
# every variant but the oracle itself: the Pallas kernels (interpret mode) and plain-jnp ones
VARIANTS = [v for v in registry.available_variants() if v != "reference"]
PALLAS_VARIANTS = list(registry.pallas_variants())

# name: (q_lens, kv_lens, q_heads, kv_heads, head_dim, page_size, dtype, extra)
# extra: num_tokens / num_slots (padding), soft_cap, sliding_window.
CASES = {
    "decode_ps8_d64_g1_f32": (
        [1, 1, 1, 1], [1, 7, 9, 513], 2, 2, 64, 8, jnp.float32, dict(num_tokens=6, num_slots=6)),
    "decode_ps16_d128_g8_bf16": (
        [1, 1, 1], [15, 17, 513], 16, 2, 128, 16, jnp.bfloat16, dict(num_tokens=4, num_slots=4)),
    "decode_ps32_d64_g3_window_cap_f32": (
        [1, 1], [31, 513], 6, 2, 64, 32, jnp.float32,
        dict(soft_cap=5.0, sliding_window=40, num_tokens=3, num_slots=3)),
    "prefill_ps32_d128_g4_f32": (
        [31, 33, 1], [31, 33, 1], 8, 2, 128, 32, jnp.float32, dict(num_tokens=72)),
    "prefill_513_ps16_d64_g1_bf16": ([513], [513], 2, 2, 64, 16, jnp.bfloat16, {}),
    "mixed_ps16_d64_g4_f32": (  # includes a live sequence with no new token this step
        [1, 15, 0, 9, 1, 17], [17, 15, 30, 513, 1, 40], 8, 2, 64, 16, jnp.float32,
        dict(num_tokens=48, num_slots=7)),
    "mixed_ps8_d128_g8_window_cap_bf16": (
        [1, 7, 9], [513, 7, 20], 8, 1, 128, 8, jnp.bfloat16,
        dict(soft_cap=30.0, sliding_window=16, num_tokens=20, num_slots=4)),
}
# The split-K kernel is correct for any batch, though the registry uses it on decode buckets only.
FORCED_SPLITK = ["prefill_ps32_d128_g4_f32", "mixed_ps8_d128_g8_window_cap_bf16"]


def _case(name):
    q_lens, kv_lens, hq, hkv, d, ps, dtype, extra = CASES[name]
    extra = dict(extra)
    kwargs = dict(sm_scale=d ** -0.5, soft_cap=extra.pop("soft_cap", None),
                  sliding_window=extra.pop("sliding_window", None))
    problem = make_problem(q_lens, kv_lens, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                           page_size=ps, dtype=dtype, seed=len(name), **extra)
    return problem, kwargs, dtype


_REFERENCE_CACHE = {}


def _reference(name):
    if name not in _REFERENCE_CACHE:
        problem, kwargs, dtype = _case(name)
        ref = registry.get_attention_fn("reference")(*problem.args, **kwargs)
        _REFERENCE_CACHE[name] = (problem, kwargs, dtype, np.asarray(ref, np.float32))
    return _REFERENCE_CACHE[name]


def _check(out, problem, ref, dtype):
    out = np.asarray(out, np.float32)
    assert out.shape == ref.shape
    assert np.all(np.isfinite(out)), "a kernel read a poisoned (NaN) value it must never read"
    assert np.all(out[problem.num_rows:] == 0), "padding rows must be exactly zero"
    np.testing.assert_allclose(out, ref, **TOLERANCE[dtype])


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_matches_reference(variant, name):
    problem, kwargs, dtype, ref = _reference(name)
    assert np.all(np.isfinite(ref)) and np.all(ref[problem.num_rows:] == 0)
    out = registry.get_attention_fn(variant)(*problem.args, interpret=True, **kwargs)
    assert out.dtype == dtype
    _check(out, problem, ref, dtype)


@pytest.mark.parametrize("name", FORCED_SPLITK)
def test_splitk_kernel_handles_any_batch(name):
    problem, kwargs, dtype, ref = _reference(name)
    config = SplitKConfig(num_splits=3, block_kv=16)
    fn = jax.jit(lambda *a: splitk_decode_attention(*a, config=config, interpret=True, **kwargs))
    _check(fn(*problem.args), problem, ref, dtype)


def test_no_live_sequence_gives_zeros():
    problem, kwargs, _ = _case("decode_ps8_d64_g1_f32")
    args = list(problem.args)
    args[7] = jnp.zeros((1,), jnp.int32)  # num_seqs = 0: every row is padding
    for variant in VARIANTS:
        out = registry.get_attention_fn(variant)(*args, interpret=True, **kwargs)
        assert np.all(np.asarray(out) == 0)


def test_splitk_uses_several_splits_for_few_sequences():
    assert SplitKConfig().splits_for(num_slots=4, num_kv_heads=2, context=4096) == 16
    assert SplitKConfig().splits_for(num_slots=256, num_kv_heads=8, context=4096) == 1
    assert SplitKConfig().splits_for(num_slots=1, num_kv_heads=1, context=64) == 1


# --- errors, configs, registry -------------------------------------------------------------------

def _small_args(head_dim=64, dtype=jnp.float32):
    return make_problem([1], [5], num_q_heads=4, num_kv_heads=2, head_dim=head_dim, page_size=8,
                        dtype=dtype, poison=False).args


@pytest.mark.parametrize("variant", VARIANTS)
def test_bad_operands_raise_clear_errors(variant):
    fn = registry.get_attention_fn(variant)
    q, k, v, layer, lens, table, cu, nseq = _small_args()
    with pytest.raises(ValueError, match="q must be"):
        fn(q[0], k, v, layer, lens, table, cu, nseq, sm_scale=0.1, interpret=True)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        fn(q[:, :3], k, v, layer, lens, table, cu, nseq, sm_scale=0.1, interpret=True)
    with pytest.raises(ValueError, match="cu_q_lens"):
        fn(q, k, v, layer, lens, table, cu[:1], nseq, sm_scale=0.1, interpret=True)
    with pytest.raises(ValueError, match="one dtype"):
        fn(q.astype(jnp.bfloat16), k, v, layer, lens, table, cu, nseq, sm_scale=0.1,
           interpret=True)
    with pytest.raises(ValueError, match="sliding_window"):
        fn(q, k, v, layer, lens, table, cu, nseq, sm_scale=0.1, sliding_window=0, interpret=True)
    if variant in PALLAS_VARIANTS:  # a Triton rule; plain jnp takes any head_dim
        q80, k80, v80, *rest = _small_args(head_dim=80)
        with pytest.raises(ValueError, match="power of 2"):
            fn(q80, k80, v80, *rest, sm_scale=0.1, interpret=True)


def test_configs_reject_triton_incompatible_tiles():
    from pallas_kernels.ragged_paged_attention import RaggedConfig
    with pytest.raises(ValueError, match="block_m"):
        RaggedConfig(block_m=8)
    with pytest.raises(ValueError, match="block_kv"):
        RaggedConfig(block_kv=48)
    with pytest.raises(ValueError, match="num_splits"):
        SplitKConfig(num_splits=0)


def test_registry():
    names = registry.available_variants()
    assert {"reference", "blocked", "pallas_ragged", "pallas_splitk_decode"} <= set(names)
    # "native" needs a C++ compiler (test_native_decode.py checks the fallback without one)
    assert registry.default_variant("cpu") == ("native" if shutil.which("c++") else "blocked")
    assert set(registry.pallas_variants()) == set(names) - {"reference", "blocked", "native"}
    assert registry.default_variant("gpu") in names
    with pytest.raises(ValueError, match="unknown attention variant"):
        registry.get_attention_fn("flash")
    ref_params = inspect.signature(registry.get_attention_fn("reference")).parameters
    for name in names:
        params = inspect.signature(registry.get_attention_fn(name)).parameters
        assert list(params)[:8] == list(ref_params)[:8]
        for keyword in ("sm_scale", "soft_cap", "sliding_window", "interpret"):
            assert params[keyword].kind is inspect.Parameter.KEYWORD_ONLY


def test_benchmark_smoke_runs():
    """benchmarks/kernels.py --smoke: the CI run of the benchmark (interpret mode, seconds)."""
    import importlib.util
    import os
    import sys

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "kernels.py")
    spec = importlib.util.spec_from_file_location("kernels_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    assert module.main(["--smoke"]) == 0
