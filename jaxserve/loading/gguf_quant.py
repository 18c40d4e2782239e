"""GGUF's block-quantized tensors kept packed: ggml blocks -> models.quant.HFQuantized.

A ggml block covers 32 consecutive values of a row (the row is the contiguous input axis K of
a linear weight [N, K]), so each block is one quantization group of 32:

    Q8_0  {f16 d; i8 qs[32]}          x = d * q
    Q4_0  {f16 d; u8 qs[16]}          x = d * (q - 8)       q[j] = qs[j] & 15, q[j+16] = qs[j] >> 4
    Q4_1  {f16 d; f16 m; u8 qs[16]}   x = d * q + m         (nibbles as Q4_0)

The scales stay float16 as stored (Q4_0's offset -8 d is exact in float16: a power-of-two
multiple), so the codes and scales in memory are the file's bytes, reordered.
"""

from __future__ import annotations

import numpy as np

from jaxserve.models.quant import HFQuantized

BLOCK = 32
PACKED_TYPES = ("Q8_0", "Q4_0", "Q4_1")


def _blocks(raw: np.ndarray, n_rows: int, type_size: int) -> np.ndarray:
    """raw bytes of a [n_rows, K] tensor -> u8[n_rows, K / 32, type_size]."""
    return np.asarray(raw, np.uint8).reshape(n_rows, -1, type_size)


def _f16(b: np.ndarray) -> np.ndarray:  # u8[..., 2] -> f16[...]
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """u8[n, G, 16] -> codes u8[n, G * 32] in ggml's order: low nibbles first, then high."""
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # [n, G, 32]
    return codes.reshape(qs.shape[0], -1)


def unpack_block_tensor(raw: np.ndarray, kind: str, dims: tuple[int, int]) -> HFQuantized:
    """One 2-D GGUF tensor of type `kind` (dims in numpy order [N, K]) as codes and scales."""
    n, k = dims
    if kind == "Q8_0":
        b = _blocks(raw, n, 2 + BLOCK)
        codes = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(n, k)
        return HFQuantized(codes, _f16(b[..., 0:2]), None, 8, scheme=kind)
    if kind == "Q4_0":
        b = _blocks(raw, n, 2 + BLOCK // 2)
        d = _f16(b[..., 0:2])
        return HFQuantized(_nibbles(b[..., 2:]), d, (-8 * d).astype(np.float16), 4, scheme=kind)
    if kind == "Q4_1":
        b = _blocks(raw, n, 4 + BLOCK // 2)
        return HFQuantized(_nibbles(b[..., 4:]), _f16(b[..., 0:2]), _f16(b[..., 2:4]), 4,
                           scheme=kind)
    raise ValueError(f"not a packed GGUF type: {kind}")


def permute_rows(q: HFQuantized, reorder) -> HFQuantized:
    """The same output-row permutation (llama.cpp's q/k interleave undone) on every field."""
    return HFQuantized(reorder(q.codes), reorder(q.scale),
                       None if q.offset is None else reorder(q.offset), q.bits, q.g_idx,
                       q.scheme)
