"""The native CPU matmul on quantized panels (pallas_kernels/native/quantized_matmul.cc): int8,
float8 e4m3fn and 4-bit codes with group scales and offsets, against the same QuantizedStack's
XLA path and numpy."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxserve.models import quant
from jaxserve.models.linear import PackedQuantizedStack, _pack_quantized
from pallas_kernels import native_matmul

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")


FP8 = ml_dtypes.float8_e4m3fn


def _fp8_codes(rng, shape):
    """Random finite e4m3fn codes: every byte but the two NaNs, subnormals included."""
    b = rng.integers(0, 256, shape).astype(np.uint8)
    b[(b & 0x7F) == 0x7F] = 0x7E
    return b.view(FP8)


def _stack(rng, bits, L, K, N, groups, with_offset):
    """A QuantizedStack [L, K, N] from random codes and scales (via HFQuantized); bits "fp8"
    for float8 codes."""
    per_layer = []
    for _ in range(L):
        codes = (rng.integers(-128, 128, (N, K)).astype(np.int8) if bits == 8
                 else _fp8_codes(rng, (N, K)) if bits == "fp8"
                 else rng.integers(0, 16, (N, K)).astype(np.uint8))
        scale = rng.uniform(0.01, 0.1, (N, groups)).astype(np.float16)
        offset = rng.normal(size=(N, groups)).astype(np.float16) if with_offset else None
        per_layer.append(quant.HFQuantized(codes, scale, offset, 8 if bits == "fp8" else bits))
    return quant.stack_quantized(per_layer), per_layer


# rows cover every 6-row register-tile remainder; N a partial last panel; group sizes from one
# group per column (int8 per channel) to GGUF's 32 and K-quants' 16
@pytest.mark.parametrize("rows", [1, 5, 7, 13, 40])
@pytest.mark.parametrize("bits,K,N,groups,with_offset", [
    (8, 96, 200, 1, False), (8, 96, 64, 3, True), (4, 96, 130, 3, True), (4, 64, 64, 4, False),
    ("fp8", 96, 130, 1, False), ("fp8", 64, 64, 2, True)])
def test_matches_numpy_and_the_xla_path_for_every_layer(rows, bits, K, N, groups, with_offset):
    rng = np.random.default_rng(rows * 100 + N + K)
    stack, per_layer = _stack(rng, bits, 3, K, N, groups, with_offset)
    packed = _pack_quantized(jax.tree.map(jnp.asarray, stack))
    assert isinstance(packed, PackedQuantizedStack) and packed.codes.shape == (
        3, -(-N // 64), K // 2 if bits == 4 else K, 64)
    x = jnp.asarray(rng.standard_normal((rows, K)).astype(np.float32))
    real = max(rows - 2, 1)  # the last rows are bucket padding: zero out, never computed

    @jax.jit
    def native(x, codes, scale, offset, layer):
        return native_matmul.quantized_packed_matmul(x, codes, scale, offset, layer, real,
                                                     n_out=N, bits=packed.bits)

    for layer in range(3):
        got = np.asarray(native(x, packed.codes, packed.scale, packed.offset, layer))
        want = np.asarray(x) @ per_layer[layer].dequantize().T
        xla = np.asarray(stack.matmul(x, layer))
        np.testing.assert_allclose(got[:real], want[:real], rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(got[:real], xla[:real], rtol=1e-4, atol=1e-3)
        assert not got[real:].any()


def test_bad_shapes_are_refused_before_the_call():
    x = jnp.zeros((4, 64), jnp.float32)
    codes = jnp.zeros((1, 1, 64, 64), jnp.int8)
    scale = jnp.zeros((1, 1, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="disagree"):  # 4-bit codes hold K / 2 rows
        native_matmul.quantized_packed_matmul(x, codes, scale, None, 0, n_out=64, bits=4)
    with pytest.raises(ValueError, match="disagree"):  # 3 groups do not divide K = 64
        native_matmul.quantized_packed_matmul(x, codes, jnp.zeros((1, 1, 3, 64)), None, 0,
                                              n_out=64, bits=8)


@pytest.mark.parametrize("bits,groups,with_offset", [(8, 1, False), (8, 2, False), (4, 2, True)])
def test_an_embedding_lookup_in_the_panels_equals_the_stacks(bits, groups, with_offset):
    # a [1, H, V] table with V = 100: a partial last panel, whose padding lanes a token id at
    # or past V must never read (jnp's gather clamps it to V - 1)
    stack, _ = _stack(np.random.default_rng(bits), bits, 1, 64, 100, groups, with_offset)
    stack = jax.tree.map(jnp.asarray, stack)
    packed = _pack_quantized(stack)
    ids = jnp.asarray([0, 63, 64, 99, 100, 130], jnp.int32)
    np.testing.assert_array_equal(np.asarray(packed.gather_columns(ids, jnp.float32)),
                                  np.asarray(stack.gather_columns(ids, jnp.float32)))


def test_every_finite_fp8_code_converts_exactly():
    # one-hot rows of x pick out single dequantized weights: all 254 finite e4m3fn codes, their
    # subnormals and +-448 included, must come back as the exact floats ml_dtypes gives
    codes = np.arange(256, dtype=np.uint8)
    codes = codes[(codes & 0x7F) != 0x7F].view(FP8)                  # [254]
    K = 256
    w = np.zeros((1, K, 64), FP8)
    w[0, :254, 0] = codes
    stack = quant.QuantizedStack(codes=jnp.asarray(w), scale=jnp.ones((1, 1, 64), jnp.float32),
                                 offset=None, g_idx=None, bits=8, n_in=K, scheme="fp8")
    packed = _pack_quantized(stack)
    got = native_matmul.quantized_packed_matmul(jnp.eye(K, dtype=jnp.float32), packed.codes,
                                                packed.scale, None, 0, n_out=64, bits=8)
    np.testing.assert_array_equal(np.asarray(got)[:254, 0], codes.astype(np.float32))


def test_float16_scales_stay_float16_in_the_panels():
    # GGUF's legacy blocks, GPTQ and AWQ store float16 scales: the panels hold them as they are
    # (the memory plan counted their bytes) and the kernel converts per group
    stack, per_layer = _stack(np.random.default_rng(5), 4, 2, 64, 70, 2, True)
    stack = jax.tree.map(jnp.asarray, stack)
    packed = _pack_quantized(stack)
    assert packed.scale.dtype == packed.offset.dtype == jnp.float16
    assert stack.scale.dtype == jnp.float16
    x = jnp.asarray(np.random.default_rng(6).standard_normal((3, 64)).astype(np.float32))
    for layer in range(2):
        got = native_matmul.quantized_packed_matmul(x, packed.codes, packed.scale,
                                                    packed.offset, layer, n_out=70, bits=4)
        np.testing.assert_allclose(np.asarray(got), np.asarray(x) @ per_layer[layer].dequantize().T,
                                   rtol=1e-4, atol=1e-3)
