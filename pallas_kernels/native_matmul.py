"""One layer's linear map, x @ W[layer], as native code on XLA:CPU (an XLA FFI custom call).

Why: the model runs its layers as a scan over weights stacked on a leading [L] axis. XLA:CPU
copies each layer's matrices out of the stacks before its dots (dynamic slices): in a SmolLM2
decode step of 32 rows that was 54 ms of copies next to 62 ms of dots. `native/packed_matmul.cc`
reads the layer's matrix in place. It wants the matrix in 64-column panels, `pack(w)`:

    w [..., K, N]  ->  panels [..., ceil(N / 64), K, 64]   (zero-padded to a multiple of 64)

so each panel is one contiguous K x 64 stream, read from memory once per call; rows are tiled
6 x 64 in registers. Probed in a 30-layer scan of SmolLM2's shapes on the 2-core dev machine:
32 rows 101 -> 55 ms, 8 rows 52 -> 29 ms, 512 rows 602 vs 617 ms (XLA's dot on copies vs this).

float32 only (other dtypes keep XLA's dot). The source is built on first use, see native_build.
`quantized_packed_matmul` is the same map over int8, fp8 or 4-bit codes with group scales
(native/quantized_matmul.cc), in the same panels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import native_build

TARGET = "jaxserve_packed_matmul"
PANEL = 64  # columns per panel: 4 AVX-512 vectors of float32


def unavailable_reason() -> str | None:
    """None when the kernel is ready on this machine, else why not (builds on first call)."""
    return native_build.load_target("packed_matmul.cc", "JaxservePackedMatmul", TARGET)


def is_available() -> bool:
    return unavailable_reason() is None


def pack(w):
    """[..., K, N] -> [..., ceil(N / 64), K, 64]: the panels the kernel reads (numpy or jax)."""
    xp = jnp if isinstance(w, jax.Array) else np
    *lead, K, N = w.shape
    panels = -(-N // PANEL)
    pad = [(0, 0)] * (len(lead) + 1) + [(0, panels * PANEL - N)]
    w = xp.pad(w, pad).reshape(*lead, K, panels, PANEL)
    return xp.swapaxes(w, -3, -2)


def unpack(panels, n_out: int):
    """The inverse of pack: [..., NP, K, 64] -> [..., K, n_out]."""
    xp = jnp if isinstance(panels, jax.Array) else np
    *lead, NP, K, _ = panels.shape
    return xp.swapaxes(panels, -3, -2).reshape(*lead, K, NP * PANEL)[..., :n_out]


def packed_matmul(
    x,           # f32[M, K]
    panels,      # f32[L, ceil(N / 64), K, 64]  pack() of a [L, K, N] stack
    layer,       # i32[]  which matrix of the stack
    num_rows=None,  # i32[] rows of x that are real (default all M): the rest are bucket
                    # padding, left uncomputed (their output rows are zero)
    *,
    n_out: int,  # N
):  # -> f32[M, N] = x @ unpack(panels, N)[layer] on rows < num_rows, 0 below them
    if x.dtype != jnp.float32 or panels.dtype != jnp.float32:
        raise ValueError(f"the native matmul takes float32, got {x.dtype} x {panels.dtype}")
    L, NP, K, lanes = panels.shape
    if x.ndim != 2 or x.shape[1] != K or lanes != PANEL or NP != -(-n_out // PANEL):
        raise ValueError(f"packed_matmul: x {x.shape} and panels {panels.shape} (n_out {n_out}) "
                         f"disagree")
    reason = unavailable_reason()
    if reason is not None:
        raise native_build.NativeBuildError(f"native matmul kernel unavailable: {reason}")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n_out), jnp.float32))
    rows = x.shape[0] if num_rows is None else num_rows
    return call(x, panels, jnp.asarray(layer, jnp.int32), jnp.asarray(rows, jnp.int32),
                n_out=np.int64(n_out))


# --- quantized weights (native/quantized_matmul.cc) ---------------------------------------------

# codes dtype -> (FFI target, handler symbol): int8, 4-bit pairs in uint8, float8 e4m3fn
_QUANT_KERNELS = {
    jnp.dtype(jnp.int8): ("jaxserve_quantized_matmul_s8", "JaxserveQuantizedMatmulS8"),
    jnp.dtype(jnp.uint8): ("jaxserve_quantized_matmul_u4", "JaxserveQuantizedMatmulU4"),
    jnp.dtype(jnp.float8_e4m3fn): ("jaxserve_quantized_matmul_f8", "JaxserveQuantizedMatmulF8"),
}
QUANT_CODE_DTYPES = tuple(_QUANT_KERNELS)


def quantized_unavailable_reason() -> str | None:
    for target, symbol in _QUANT_KERNELS.values():
        reason = native_build.load_target("quantized_matmul.cc", symbol, target)
        if reason is not None:
            return reason
    return None


def quantized_packed_matmul(
    x,            # f32[M, K]
    codes,        # s8 | f8e4m3fn [L, NP, K, 64], or u8[L, NP, K / 2, 64] (4-bit): pack()ed
    scale,        # f32 | f16 [L, NP, G, 64]: pack() of the [L, G, N] group scales
    offset,       # f32 | f16 [L, NP, G, 64] or None
    layer,        # i32[]
    num_rows=None,  # i32[] real rows of x, as packed_matmul
    *,
    n_out: int,   # N
    bits: int,    # 8 or 4 (then codes are uint8)
):  # -> f32[M, N] = x @ (scale * codes + offset)[layer] on rows < num_rows, 0 below them
    L, NP, KC, lanes = codes.shape
    K, G = x.shape[1], scale.shape[2]
    kernel = _QUANT_KERNELS.get(jnp.dtype(codes.dtype))
    if (x.dtype != jnp.float32 or kernel is None or (bits == 4) != (codes.dtype == jnp.uint8)
            or bits not in (4, 8) or lanes != PANEL
            or KC * (8 // bits) != K or scale.shape != (L, NP, G, PANEL) or K % G
            or any(a is not None and a.dtype not in (jnp.float32, jnp.float16)
                   for a in (scale, offset))
            or NP != -(-n_out // PANEL)):
        raise ValueError(f"quantized_packed_matmul: x {x.shape} {x.dtype}, codes {codes.shape}, "
                         f"scale {scale.shape}, bits {bits}, n_out {n_out} disagree")
    reason = quantized_unavailable_reason()
    if reason is not None:
        raise native_build.NativeBuildError(f"native quantized matmul unavailable: {reason}")
    call = jax.ffi.ffi_call(kernel[0], jax.ShapeDtypeStruct((x.shape[0], n_out), jnp.float32))
    rows = x.shape[0] if num_rows is None else num_rows
    return call(x, codes, scale, jnp.zeros((1,), jnp.float32) if offset is None else offset,
                jnp.asarray(layer, jnp.int32), jnp.asarray(rows, jnp.int32),
                n_out=np.int64(n_out), group_rows=np.int64(K // G),
                has_offset=np.int64(offset is not None))
