"""GPTQ and AWQ checkpoints (HF folders with `quantization_config`) kept packed.

Both store a linear layer of K inputs and N outputs as int32 words of 32 / bits codes, with one
scale and one zero point per group of `group_size` input rows:

  GPTQ  qweight i32[K * bits / 32, N]   codes packed along K: word i holds rows 8i .. 8i + 7
                                        (4-bit; row 8i + j at bits 4j .. 4j + 3)
        qzeros  i32[G, N * bits / 32]   zero points packed along N, the same way
        scales  f16[G, N];  g_idx i32[K] (the group of each input row: act-order when
                                        desc_act, else k // group_size)
        w = scale * (q - z) with z = stored + 1 (the v1 format, "gptq": its packer stores z - 1)
        or z = stored (checkpoint_format "gptq_v2")
  AWQ   qweight i32[K, N / 8], qzeros i32[G, N / 8]: codes packed along N in the interleaved
        order of AutoAWQ's GEMM kernel (nibble i holds column 8c + (0, 2, 4, 6, 1, 3, 5, 7)[i])
        scales f16[G, N];  w = scale * (q - z)

Unpacked, each becomes a models.quant.HFQuantized [N, K] with unsigned codes and the zero point
folded into the offset (-scale * z), like every other 4-bit format here.
"""

from __future__ import annotations

import numpy as np

from jaxserve.models.quant import HFQuantized

_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # column (within a word) of nibble i
METHODS = ("gptq", "awq")


class QuantConfigError(ValueError):
    """A quantization_config we cannot load; the message names the field."""


def _unpack_words(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """i32 words -> their codes, word w's code j at index w * (32 / bits) + j along `axis`."""
    per_word = 32 // bits
    u = words.astype(np.uint32)
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)
    codes = (np.expand_dims(u, -1) >> shifts) & ((1 << bits) - 1)   # [..., per_word]
    codes = np.moveaxis(codes, -1, axis + 1) if axis != u.ndim - 1 else codes
    shape = list(u.shape)
    shape[axis] *= per_word
    return codes.reshape(shape).astype(np.uint8)


def unpack_gptq(qweight, qzeros, bits: int, v2: bool) -> tuple[np.ndarray, np.ndarray]:
    """(codes u8[K, N], zero points [G, N] as the dequantization uses them)."""
    codes = _unpack_words(qweight, bits, axis=0)
    zeros = _unpack_words(qzeros, bits, axis=1).astype(np.int32)
    return codes, zeros if v2 else zeros + 1


def unpack_awq(qweight, qzeros, bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(codes u8[K, N], zero points i32[G, N]) with AutoAWQ's column interleave undone."""
    def columns(words):
        raw = _unpack_words(words, bits, axis=1)                 # nibble order per word
        blocks = raw.reshape(raw.shape[0], -1, 32 // bits)
        out = np.empty_like(blocks)
        out[..., list(_AWQ_ORDER)] = blocks                       # nibble i -> its column
        return out.reshape(raw.shape)
    return columns(qweight), columns(qzeros).astype(np.int32)


def to_hf_quantized(codes, zeros, scales, g_idx, bits: int, scheme: str) -> HFQuantized:
    """codes [K, N], zeros and scales [G, N], g_idx [K] or None -> HFQuantized [N, K]."""
    scales32 = scales.astype(np.float32)
    offset = -scales32 * zeros.astype(np.float32)
    K, G = codes.shape[0], scales.shape[0]
    if g_idx is not None and np.array_equal(g_idx, np.arange(K) // -(-K // G)):
        g_idx = None  # the regular layout: consecutive groups, no gather needed
    return HFQuantized(np.ascontiguousarray(codes.T), np.ascontiguousarray(scales.T),
                       np.ascontiguousarray(offset.T), bits,
                       None if g_idx is None else g_idx.astype(np.int32), scheme)


def parse_quant_config(qc: dict, source: str) -> dict:
    """Validated settings of a config.json quantization_config (method, bits, v2)."""
    method = str(qc.get("quant_method", "")).lower()
    if method not in METHODS:
        raise QuantConfigError(f"{source}: quantization_config.quant_method {method!r} is not "
                               f"supported (supported: {', '.join(METHODS)}; or load a float "
                               f"checkpoint and pass --quantization int8/fp8)")
    bits = qc.get("bits", qc.get("w_bit"))
    if bits not in ((4, 8) if method == "gptq" else (4,)):
        raise QuantConfigError(f"{source}: {method} with bits={bits!r} is not supported "
                               f"({'4 or 8' if method == 'gptq' else '4'})")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise QuantConfigError(f"{source}: AWQ version {version!r} is not supported (gemm)")
        if qc.get("zero_point", True) is not True:
            raise QuantConfigError(f"{source}: AWQ without zero points is not supported")
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if method == "gptq" and fmt not in ("gptq", "gptq_v2"):
        raise QuantConfigError(f"{source}: GPTQ checkpoint_format {fmt!r} is not supported "
                               f"(gptq, gptq_v2)")
    return {"method": method, "bits": int(bits), "v2": fmt == "gptq_v2"}


def quantized_getter(get, settings: dict, source: str):
    """Wrap a folder's get(name): a linear weight `X.weight` stored as X.qweight/qzeros/scales
    (and g_idx) comes back as HFQuantized; everything else as stored."""
    method, bits = settings["method"], settings["bits"]
    scheme = f"{method.upper()} {bits}-bit"

    def read(name):
        if not name.endswith(".weight"):
            return get(name)
        base = name[:-len(".weight")]
        qweight = get(base + ".qweight")
        if qweight is None:
            return get(name)
        qzeros, scales = get(base + ".qzeros"), get(base + ".scales")
        if qzeros is None or scales is None:
            raise QuantConfigError(f"{source}: {base}.qweight without its qzeros/scales")
        if method == "gptq":
            codes, zeros = unpack_gptq(qweight, qzeros, bits, settings["v2"])
            g_idx = get(base + ".g_idx")
        else:
            codes, zeros = unpack_awq(qweight, qzeros, bits)
            g_idx = None
        if codes.shape[1] != scales.shape[1] or zeros.shape != scales.shape:
            raise QuantConfigError(f"{source}: {base}: qweight {qweight.shape}, qzeros "
                                   f"{qzeros.shape} and scales {scales.shape} disagree")
        return to_hf_quantized(codes, zeros, scales, g_idx, bits, scheme)

    return read
