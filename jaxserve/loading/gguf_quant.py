"""GGUF's block-quantized tensors kept packed: ggml blocks -> models.quant.HFQuantized.

A ggml block covers consecutive values of a row (the row is the contiguous input axis K of a
linear weight [N, K]); each block, or each sub-block of a K-quant super-block, is one
quantization group with a scale (and an offset for the "_1" and min-carrying types):

    Q8_0  32 {f16 d; i8 qs[32]}                        x = d * q
    Q4_0  32 {f16 d; u8 qs[16]}                        x = d * (q - 8)     q: 4 bits
    Q4_1  32 {f16 d, m; u8 qs[16]}                     x = d * q + m
    Q5_0  32 {f16 d; u32 qh; u8 qs[16]}                x = d * (q - 16)    q: 4 + 1 bits
    Q5_1  32 {f16 d, m; u32 qh; u8 qs[16]}             x = d * q + m
    Q2_K 256 {u8 sc[16]; u8 qs[64]; f16 d, dmin}       16 groups of 16: x = d sc_lo q - dmin sc_hi
    Q3_K 256 {u8 hmask[32]; u8 qs[64]; u8 sc[12]; f16 d}  16 groups: x = d (sc - 32) (q - 4)
    Q4_K 256 {f16 d, dmin; u8 sc[12]; u8 qs[128]}      8 groups of 32: x = d sc q - dmin m
    Q5_K 256 {f16 d, dmin; u8 sc[12]; u8 qh[32]; u8 qs[128]}   as Q4_K, q: 4 + 1 bits
    Q6_K 256 {u8 ql[128]; u8 qh[64]; i8 sc[16]; f16 d} 16 groups of 16: x = d sc (q - 32)

Codes of at most 4 bits stay 4-bit (two per byte in memory); 5- and 6-bit codes are widened to
int8. The zero points fold into the offset (Q4_0: -8 d; Q3_K: -4 d (sc - 32)). The legacy
types keep their float16 scales as stored; a K-quant's group scale d * sc is a product that
float16 cannot hold exactly, so its scales and offsets are float32: 4 bits + 2 per weight for
Q4_K (the file: 4.5), 8 + 2 for Q6_K (the file: 6.6), still a fifth to a third of float32.
"""

from __future__ import annotations

import numpy as np

from jaxserve.models.quant import HFQuantized

QK_K = 256
# type -> values per block (the group structure is in each decoder)
BLOCK_VALUES = {"Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32,
                "Q2_K": QK_K, "Q3_K": QK_K, "Q4_K": QK_K, "Q5_K": QK_K, "Q6_K": QK_K}
PACKED_TYPES = tuple(BLOCK_VALUES)


def _f16(b: np.ndarray) -> np.ndarray:  # u8[..., 2] -> f16[...]
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def _bits(b: np.ndarray, shifts, mask: int) -> np.ndarray:
    """u8[..., n] -> u8[..., len(shifts) * n]: field (b >> s) & mask for each shift in turn."""
    return np.concatenate([(b >> s) & mask for s in shifts], axis=-1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """u8[..., 16] -> u8[..., 32] in ggml's order: the low nibbles first, then the high."""
    return _bits(qs, (0, 4), 0xF)


def _high_bits_u32(qh: np.ndarray) -> np.ndarray:
    """u8[..., 4] (a little-endian u32) -> u8[..., 32]: bit i is value i's fifth bit."""
    return np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")


def _k4_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins (u8[..., 8] each): bytes
    0-3 hold scales 0-3 (low 6 bits), 4-7 mins 0-3; bytes 8-11 hold the low nibbles of
    scales/mins 4-7, whose top two bits sit in the spare top bits of bytes 0-7."""
    lo, mid, hi = sc[..., 0:4], sc[..., 4:8], sc[..., 8:12]
    scales = np.concatenate([lo & 0x3F, (hi & 0xF) | ((lo >> 6) << 4)], axis=-1)
    mins = np.concatenate([mid & 0x3F, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return scales, mins


def _q3k_scales(sc: np.ndarray) -> np.ndarray:
    """Q3_K's 12 bytes -> 16 six-bit scales (i8, minus their bias 32): low nibbles of bytes
    0-7 are scales 0-7, their high nibbles 8-15; bytes 8-11 give two top bits to each."""
    low = _bits(sc[..., 0:8], (0, 4), 0xF)           # [..., 16]
    top = _bits(sc[..., 8:12], (0, 2, 4, 6), 0x3)    # [..., 16]
    return (low | (top << 4)).astype(np.int8) - 32


def _decode(b: np.ndarray, kind: str):
    """u8[n, B, type_size] blocks -> (codes [n, B, values], scale [n, B, S], offset or None,
    bits) with S groups per block in value order."""
    f32 = np.float32
    if kind == "Q8_0":
        return b[..., 2:].view(np.int8), _f16(b[..., 0:2])[..., None], None, 8
    if kind in ("Q4_0", "Q4_1"):
        d = _f16(b[..., 0:2])[..., None]
        if kind == "Q4_0":
            return _nibbles(b[..., 2:]), d, (-8 * d).astype(np.float16), 4
        return _nibbles(b[..., 4:]), d, _f16(b[..., 2:4])[..., None], 4
    if kind in ("Q5_0", "Q5_1"):
        d = _f16(b[..., 0:2])[..., None]
        at = 2 if kind == "Q5_0" else 4
        q = _nibbles(b[..., at + 4:]) | (_high_bits_u32(b[..., at:at + 4]) << 4)  # 0..31
        if kind == "Q5_0":
            return q.astype(np.int8) - 16, d, None, 8
        return q.astype(np.int8), d, _f16(b[..., 2:4])[..., None], 8
    if kind == "Q2_K":
        sc, qs = b[..., 0:16], b[..., 16:80]
        d, dmin = _f16(b[..., 80:82])[..., None], _f16(b[..., 82:84])[..., None]
        # two halves of 128 values; each takes 2-bit fields at shifts 0, 2, 4, 6 of 32 bytes
        q = np.concatenate([_bits(qs[..., h * 32:(h + 1) * 32], (0, 2, 4, 6), 0x3)
                            for h in (0, 1)], axis=-1)
        return q, d.astype(f32) * (sc & 0xF), -(dmin.astype(f32) * (sc >> 4)), 4
    if kind == "Q3_K":
        hmask, qs, sc, d = b[..., 0:32], b[..., 32:96], b[..., 96:108], b[..., 108:110]
        low = np.concatenate([_bits(qs[..., h * 32:(h + 1) * 32], (0, 2, 4, 6), 0x3)
                              for h in (0, 1)], axis=-1)         # [..., 256]
        high = _bits(hmask, range(8), 0x1)                      # [..., 256]: set = no -4
        scale = _f16(d)[..., None].astype(f32) * _q3k_scales(sc)
        return low | (high << 2), scale, -4 * scale, 4          # codes q + 4 in 0..7
    if kind in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
        sc, m = _k4_scales(b[..., 4:16])
        qs = b[..., 16:144] if kind == "Q4_K" else b[..., 48:176]
        # four chunks of 64 values: 32 low nibbles of 32 bytes, then their 32 high nibbles
        q = np.concatenate([_nibbles(qs[..., c * 32:(c + 1) * 32]) for c in range(4)], axis=-1)
        scale, offset = d.astype(f32) * sc, -(dmin.astype(f32) * m)
        if kind == "Q4_K":
            return q, scale, offset, 4
        q = q | (_bits(b[..., 16:48], range(8), 0x1) << 4)      # chunk j of 32: bit j of qh
        return q.astype(np.int8), scale, offset, 8
    if kind == "Q6_K":
        ql, qh, sc, d = b[..., 0:128], b[..., 128:192], b[..., 192:208], b[..., 208:210]
        # two halves of 128 values: low nibbles from 64 bytes of ql as [lo(0:32), lo(32:64),
        # hi(0:32), hi(32:64)], the top two bits from 32 bytes of qh at shifts 0, 2, 4, 6
        halves = []
        for h in (0, 1):
            lows = ql[..., h * 64:(h + 1) * 64]
            low = np.concatenate([lows & 0xF, lows >> 4], axis=-1)
            top = _bits(qh[..., h * 32:(h + 1) * 32], (0, 2, 4, 6), 0x3)
            halves.append(low | (top << 4))
        q = np.concatenate(halves, axis=-1).astype(np.int8) - 32
        return q, _f16(d)[..., None].astype(f32) * sc.view(np.int8), None, 8
    raise ValueError(f"not a packed GGUF type: {kind}")


def unpack_block_tensor(raw: np.ndarray, kind: str, dims: tuple[int, int]) -> HFQuantized:
    """One 2-D GGUF tensor of type `kind` (dims in numpy order [N, K]) as codes and scales."""
    if kind not in BLOCK_VALUES:
        raise ValueError(f"not a packed GGUF type: {kind}")
    n, k = dims
    blocks = np.asarray(raw, np.uint8).reshape(n, k // BLOCK_VALUES[kind], -1)
    codes, scale, offset, bits = _decode(blocks, kind)
    flat = lambda a: np.ascontiguousarray(a).reshape(n, -1)  # noqa: E731
    return HFQuantized(flat(codes), flat(scale), None if offset is None else flat(offset),
                       bits, scheme=kind)


def permute_rows(q: HFQuantized, reorder) -> HFQuantized:
    """The same output-row permutation (llama.cpp's q/k interleave undone) on every field."""
    return HFQuantized(reorder(q.codes), reorder(q.scale),
                       None if q.offset is None else reorder(q.offset), q.bits, q.g_idx,
                       q.scheme)
