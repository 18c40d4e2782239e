"""The native CPU matmul on panel-packed weights (pallas_kernels/native/packed_matmul.cc)."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import native_matmul

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")


@pytest.mark.parametrize("shape", [(2, 3, 5), (3, 64, 64), (1, 576, 1536), (2, 17, 130)])
def test_pack_is_a_lossless_panel_layout(shape):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    panels = native_matmul.pack(w)
    L, K, N = shape
    assert panels.shape == (L, -(-N // 64), K, 64)
    # column n of layer l is panel n // 64, lane n % 64; the padding is zero
    n = N - 1
    np.testing.assert_array_equal(panels[L - 1, n // 64, :, n % 64], w[L - 1, :, n])
    assert not panels[..., -1, :, N % 64 or 64:].any()
    np.testing.assert_array_equal(native_matmul.unpack(panels, N), w)
    np.testing.assert_array_equal(np.asarray(native_matmul.pack(jnp.asarray(w))), panels)


# rows cover every register-tile remainder (6-row tiles); widths a partial last panel
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 32, 70])
@pytest.mark.parametrize("k,n", [(7, 5), (64, 64), (96, 200)])
def test_matches_numpy_for_every_layer(rows, k, n):
    rng = np.random.default_rng(rows * 1000 + n)
    w = rng.standard_normal((3, k, n)).astype(np.float32)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    panels = jnp.asarray(native_matmul.pack(w))
    fn = jax.jit(lambda x, p, layer: native_matmul.packed_matmul(x, p, layer, n_out=n))
    for layer in range(3):
        out = np.asarray(fn(x, panels, layer))
        assert out.shape == (rows, n)
        np.testing.assert_allclose(out, x.astype(np.float64) @ w[layer], rtol=1e-5, atol=1e-5)


def test_only_the_real_rows_are_computed_and_the_padding_is_zero():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((2, 40, 70)).astype(np.float32)
    x = rng.standard_normal((13, 40)).astype(np.float32)
    panels = jnp.asarray(native_matmul.pack(w))
    fn = jax.jit(lambda x, p, layer, rows: native_matmul.packed_matmul(x, p, layer, rows,
                                                                       n_out=70))
    for num_rows in (0, 1, 7, 12, 13):
        out = np.asarray(fn(x, panels, 1, jnp.int32(num_rows)))
        np.testing.assert_allclose(out[:num_rows], x[:num_rows].astype(np.float64) @ w[1],
                                   rtol=1e-5, atol=1e-5)
        assert not out[num_rows:].any()
    # the row count is a runtime operand: one compiled program served every count
    assert fn._cache_size() == 1


def test_in_a_layer_scan_it_reads_each_layers_matrix():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 32, 32)).astype(np.float32) / 6
    x = rng.standard_normal((3, 32)).astype(np.float32)
    panels = jnp.asarray(native_matmul.pack(w))

    @jax.jit
    def native(h):
        return jax.lax.scan(lambda h, layer: (jnp.tanh(native_matmul.packed_matmul(
            h, panels, layer, n_out=32)), None), h, jnp.arange(4))[0]
    ref = x
    for layer in range(4):
        ref = np.tanh(ref @ w[layer])
    np.testing.assert_allclose(np.asarray(native(x)), ref, rtol=1e-5, atol=1e-5)


def test_bad_operands_are_clear_errors():
    panels = jnp.asarray(native_matmul.pack(np.zeros((1, 8, 8), np.float32)))
    with pytest.raises(ValueError, match="float32"):
        native_matmul.packed_matmul(jnp.zeros((2, 8), jnp.bfloat16), panels, 0, n_out=8)
    with pytest.raises(ValueError, match="disagree"):
        native_matmul.packed_matmul(jnp.zeros((2, 9)), panels, 0, n_out=8)
    with pytest.raises(ValueError, match="disagree"):
        native_matmul.packed_matmul(jnp.zeros((2, 8)), panels, 0, n_out=100)


def test_loading_the_native_kernels_keeps_the_process_ieee():
    # -ffast-math would link crtfastmath.o: flush-to-zero for every float op of the process
    from pallas_kernels import native_decode
    assert native_matmul.is_available() and native_decode.is_available()
    tiny = 1e-310  # a subnormal double
    assert tiny * 1.0 == tiny and np.float32(1e-40) * np.float32(1.0) > 0
