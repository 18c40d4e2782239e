"""The native decode kernel (pallas_kernels/native/paged_decode.cc, an XLA FFI custom call).

test_paged_attention.py already runs the "native" variant on every contract case (poisoned pages,
GQA, sliding window, soft cap, bf16). Here: the kernel on its own at serving sizes (many slots, so
the work is split over XLA's thread pool), inside a layer scan with a traced layer index as the
model calls it, its build cache, and the fallback when no compiler is present.
"""

from __future__ import annotations

import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import native_build, native_decode, registry
from pallas_kernels.problems import make_problem

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")


def _decode_problem(dtype=jnp.float32, num_layers=3, layer=1):
    rng = np.random.default_rng(7)
    kv_lens = list(rng.integers(1, 300, size=29)) + [16, 17, 1]
    return make_problem([1] * len(kv_lens), kv_lens, num_q_heads=9, num_kv_heads=3, head_dim=64,
                        page_size=16, dtype=dtype, num_tokens=40, num_slots=36,
                        pages_per_seq=24, num_layers=num_layers, layer=layer, seed=3)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_many_decode_slots_match_reference(dtype, tol):
    problem = _decode_problem(dtype)
    kwargs = dict(sm_scale=0.125)
    ref = registry.get_attention_fn("reference")(*problem.args, **kwargs)
    out = jax.jit(functools.partial(native_decode.paged_decode, **kwargs))(*problem.args)
    assert out.shape == (36, 9, 64) and out.dtype == jnp.float32
    rows = np.asarray(problem.args[6])[:32]  # each live slot's one query row
    np.testing.assert_allclose(np.asarray(out[:32]), np.asarray(ref[rows], np.float32),
                               rtol=tol, atol=tol)
    assert np.all(np.asarray(out[32:]) == 0), "unused slots must be zero"


@pytest.mark.parametrize("q_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("code_dtype", [jnp.int8, jnp.float8_e4m3fn], ids=["int8", "fp8"])
def test_a_quantized_cache_is_read_as_its_dequantized_floats(code_dtype, q_dtype):
    from pallas_kernels import kv_quant
    problem = _decode_problem(jnp.float32)
    q, k, v, *meta = problem.args
    k, v = (jnp.nan_to_num(c) for c in (k, v))  # the problem poisons unused pages with NaN
    quantized = [kv_quant.QuantizedKV(*kv_quant.quantize(c, code_dtype)) for c in (k, v)]
    floats = [c.codes.astype(jnp.float32) * c.scale[..., None] for c in quantized]
    kwargs = dict(sm_scale=0.125, soft_cap=20.0, sliding_window=100)
    q = q.astype(q_dtype)
    out = jax.jit(functools.partial(native_decode.paged_decode, **kwargs))(q, *quantized, *meta)
    ref = registry.get_attention_fn("reference")(q.astype(jnp.float32), *floats, *meta,
                                                 **kwargs)
    rows = np.asarray(meta[3])[:32]
    np.testing.assert_allclose(np.asarray(out[:32]), np.asarray(ref[rows]), rtol=1e-5,
                               atol=1e-5)
    assert np.all(np.asarray(out[32:]) == 0)


def test_prefill_slots_are_left_to_the_caller():
    problem = make_problem([3, 1, 5], [10, 20, 5], num_q_heads=4, num_kv_heads=2, head_dim=64,
                           page_size=8, seed=1)
    out = np.asarray(native_decode.paged_decode(*problem.args, sm_scale=0.125))
    ref = np.asarray(registry.get_attention_fn("reference")(*problem.args, sm_scale=0.125))
    assert np.all(out[[0, 2]] == 0)
    np.testing.assert_allclose(out[1], ref[3], rtol=1e-5, atol=1e-5)


def test_inside_a_layer_scan_with_a_traced_layer():
    problem = _decode_problem(num_layers=3, layer=2)
    q, k, v, _, *rest = problem.args

    @jax.jit
    def all_layers(q, k, v, *rest):
        def body(carry, layer):
            return carry, native_decode.paged_decode(q, k, v, layer, *rest, sm_scale=0.125)
        return jax.lax.scan(body, 0, jnp.arange(3, dtype=jnp.int32))[1]  # [3, S, Hq, D]

    out = all_layers(q, k, v, *rest)
    ref = registry.get_attention_fn("reference")(q, k, v, jnp.int32(2), *rest, sm_scale=0.125)
    rows = np.asarray(rest[2])[:32]
    np.testing.assert_allclose(np.asarray(out[2, :32]), np.asarray(ref[rows]), rtol=1e-5,
                               atol=1e-5)
    # layers the problem never wrote are NaN-poisoned: reading them shows up as NaN
    assert np.isnan(np.asarray(out[0, :32])).any()


def test_rejects_dtypes_it_does_not_read():
    args = make_problem([1], [5], num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=8,
                        dtype=jnp.float16, poison=False).args
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        native_decode.paged_decode(*args, sm_scale=0.1)
    # the registry's variant keeps the jnp decode loop for float16 instead of failing
    out = registry.get_attention_fn("native")(*args, sm_scale=0.1)
    ref = registry.get_attention_fn("reference")(*args, sm_scale=0.1)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               rtol=2e-3, atol=2e-3)


def test_build_is_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    source = native_build.NATIVE_DIR / "paged_decode.cc"
    first = native_build.build(source)
    assert first.parent == tmp_path / "jaxserve" / "native" and first.exists()
    stamp = first.stat().st_mtime_ns
    assert native_build.build(source) == first and first.stat().st_mtime_ns == stamp


def test_no_compiler_is_a_clear_error_and_the_default_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(native_build.NativeBuildError, match="no-such-compiler"):
        native_build.build(native_build.NATIVE_DIR / "paged_decode.cc")
    monkeypatch.setattr(native_decode, "is_available", lambda: False)
    assert registry.default_variant("cpu") == "blocked"
    assert registry.default_variant("gpu") == "pallas_splitk_decode"
