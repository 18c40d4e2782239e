"""Quantized linear layers: weights kept as integer (or fp8) codes with scales, dequantized
inside the matmul.

One form covers every format jaxserve reads (int8 and fp8 made at load, GGUF Q8_0/Q4_0/Q4_1,
GPTQ, AWQ): group-wise affine codes along the input axis,

    w[k, n] = scale[g(k), n] * code[k, n] + offset[g(k), n]      g(k) = k // group_size
                                                                 (or g_idx[k]: GPTQ desc_act)

Symmetric formats have no offset (int8: codes -127..127; fp8: e4m3 values). 4-bit formats use
unsigned codes 0..15 with the zero point folded into the offset (Q4_0: -8 d, Q4_1: m, GPTQ and
AWQ: -scale * zero), two codes per byte along K (k = 2i in the low nibble, 2i + 1 in the high):
adjacent input rows share a byte, so a row-parallel shard of K is a shard of the packed rows.

Why not Google's qwix: it quantizes Flax Linen/NNX modules by intercepting their dot_generals
at call time, with its own calibration and parameter format. Our model is a functional forward
over a stacked [L, ...] params pytree (no modules to intercept), the formats that matter are
the checkpoints' own packings (GGUF blocks, GPTQ, AWQ) kept bit for bit, and the codes must be
laid out for the native CPU kernels and the sharding rules; a small explicit form serves all
three.

`HFQuantized` is one checkpoint tensor in HF layout [out N, in K] as the loaders produce it;
`params_from_hf` stacks a layer's worth into a `QuantizedStack` [L, K, N], which the layer scan
reads in place (linear.LayerWeights) and dequantizes one layer at a time: the float weights of
one layer exist only inside that layer's matmul.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import struct

# weight-only schemes made at load from a float checkpoint (--quantization)
LOAD_TIME_SCHEMES = ("int8", "fp8")
_FP8 = ml_dtypes.float8_e4m3fn
_FP8_MAX = float(ml_dtypes.finfo(_FP8).max)  # 448


@dataclasses.dataclass
class HFQuantized:
    """One linear weight of a checkpoint, HF layout [N, K], kept quantized (numpy)."""
    codes: np.ndarray            # int8 | float8_e4m3fn | uint8 (4-bit codes 0..15) [N, K]
    scale: np.ndarray            # [N, G] float16 or float32
    offset: np.ndarray | None    # [N, G] or None (symmetric)
    bits: int                    # 8 or 4
    g_idx: np.ndarray | None = None  # i32[K] group of each input row (default k // (K // G))
    scheme: str = ""             # what it came from, for the start-up log ("Q4_1", "int8", ...)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def groups(self) -> np.ndarray:  # i32[K]
        K, G = self.codes.shape[1], self.scale.shape[1]
        return self.g_idx if self.g_idx is not None else np.arange(K) // (K // G)

    def dequantize(self) -> np.ndarray:  # f32[N, K]
        g = self.groups()
        w = self.codes.astype(np.float32) * self.scale.astype(np.float32)[:, g]
        if self.offset is not None:
            w += self.offset.astype(np.float32)[:, g]
        return w


def quantize_int8(w: np.ndarray) -> HFQuantized:
    """Per-output-channel symmetric int8 of an HF [N, K] float weight: scale = max|w| / 127."""
    w = np.asarray(w, np.float32)
    scale = np.abs(w).max(axis=1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    codes = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return HFQuantized(codes, scale.astype(np.float32), None, 8, scheme="int8")


def quantize_fp8(w: np.ndarray) -> HFQuantized:
    """Per-output-channel fp8 e4m3: scale = max|w| / 448, codes = w / scale rounded to e4m3.
    Per channel, not per tensor: one outlier channel then costs only its own precision."""
    w = np.asarray(w, np.float32)
    scale = np.abs(w).max(axis=1, keepdims=True) / _FP8_MAX
    scale[scale == 0] = 1.0
    return HFQuantized((w / scale).astype(_FP8), scale.astype(np.float32), None, 8,
                       scheme="fp8")


def quantize(w: np.ndarray, scheme: str) -> HFQuantized:
    return {"int8": quantize_int8, "fp8": quantize_fp8}[scheme](w)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 codes 0..15 [..., K, N] -> [..., K/2, N]: row 2i low nibble, 2i + 1 high."""
    return (codes[..., 0::2, :] | (codes[..., 1::2, :] << 4)).astype(np.uint8)


def unpack_nibbles(packed):
    """The inverse of pack_nibbles (numpy or jax): [..., K/2, N] -> [..., K, N] uint8."""
    xp = jnp if isinstance(packed, jax.Array) else np
    lo, hi = packed & 0xF, packed >> 4
    out = xp.stack([lo, hi], axis=-2)  # [..., K/2, 2, N]
    return out.reshape(*packed.shape[:-2], 2 * packed.shape[-2], packed.shape[-1])


@struct.dataclass
class QuantizedStack:
    """A [L, K, N] matrix stack stored quantized (see the module docstring)."""
    codes: jax.Array              # int8 | float8_e4m3fn [L, K, N], or uint8 [L, K/2, N] (4-bit)
    scale: jax.Array              # [L, G, N]
    offset: jax.Array | None      # [L, G, N] or None
    g_idx: jax.Array | None       # i32[L, K] or None (groups of K // G consecutive rows)
    bits: int = struct.field(pytree_node=False)
    n_in: int = struct.field(pytree_node=False)   # K
    scheme: str = struct.field(pytree_node=False, default="")

    @property
    def shape(self) -> tuple[int, int, int]:  # of the float stack it stands for
        return (self.codes.shape[0], self.n_in, self.codes.shape[-1])

    def _dequantize(self, codes, layer, parity=None, columns=None):
        """codes [R, N] of one layer -> f32[R, N]: all K rows (parity None) or the rows
        k = parity mod 2 (R = K / 2; a group of g rows holds g / 2 of them, consecutively);
        `columns`: the codes are those columns only (an embedding lookup)."""
        codes = codes.astype(jnp.float32)
        scale = self.scale[layer].astype(jnp.float32)           # [G, N]
        offset = None if self.offset is None else self.offset[layer].astype(jnp.float32)
        if columns is not None:
            scale = scale[:, columns]
            offset = None if offset is None else offset[:, columns]
        if self.g_idx is not None:  # arbitrary group per input row (GPTQ act-order)
            g = self.g_idx[layer] if parity is None else self.g_idx[layer][parity::2]
            return codes * scale[g] + (0.0 if offset is None else offset[g])
        R, G = codes.shape[0], scale.shape[0]
        w = codes.reshape(G, R // G, -1) * scale[:, None]
        if offset is not None:
            w = w + offset[:, None]
        return w.reshape(R, -1)

    def layer_weight(self, layer, dtype):  # -> [K, N] in dtype (tests, fake quantization)
        codes = self.codes[layer]
        if self.bits == 4:
            codes = unpack_nibbles(codes)
        return self._dequantize(codes, layer).astype(dtype)

    def gather_columns(self, ids, dtype):  # ids i32[T] -> [T, K]: W[0][:, ids].T
        """Columns of layer 0 as rows: the lookup of an embedding table stored as the tied
        lm_head's [1, H, V] stack (column v is token v's embedding)."""
        codes = self.codes[0][:, ids]                                # [K or K/2, T]
        if self.bits == 4:
            codes = unpack_nibbles(codes)
        return self._dequantize(codes, 0, columns=ids).T.astype(dtype)

    def matmul(self, x, layer):  # x [T, K] -> [T, N]
        def dot(a, w):
            return jnp.dot(a, w.astype(a.dtype), preferred_element_type=jnp.float32)

        if self.bits == 4:
            # two dots over the even and odd input rows, one per nibble: no interleaving
            # shuffle of the codes (probed on a 576 x 1536 stack: 10 ms vs 63 ms for 30 layers
            # at 4 rows, float32 14.8)
            packed = self.codes[layer]                           # [K/2, N]
            y = (dot(x[:, 0::2], self._dequantize(packed & 0xF, layer, 0))
                 + dot(x[:, 1::2], self._dequantize(packed >> 4, layer, 1)))
        else:
            y = dot(x, self._dequantize(self.codes[layer], layer))
        return y.astype(x.dtype)


def common_form(per_layer: list[HFQuantized]) -> list[HFQuantized] | None:
    """The layers of one matrix in one storage form, or None when they have none.

    A scan over layers needs one layout per stack, but llama.cpp's mixes (Q4_K_M, Q5_K_M)
    store some layers of attn_v and ffn_down as Q6_K and the rest as Q4_K. Such layers are
    re-expressed without loss in the widest form among them: 4-bit codes widened to int8, the
    coarser groups' scales repeated to the finest group size, a zero offset where a format has
    none, float32 scales. fp8 codes and GPTQ act-order groups have no such common form."""
    if len({(q.bits, q.codes.dtype, q.scale.shape, q.scale.dtype, q.offset is None,
             q.g_idx is None) for q in per_layer}) == 1:
        return per_layer
    K = per_layer[0].codes.shape[1]
    groups = max(q.scale.shape[1] for q in per_layer)
    if any(q.g_idx is not None or q.codes.dtype == _FP8 or groups % q.scale.shape[1]
           or K % groups for q in per_layer):
        return None
    with_offset = any(q.offset is not None for q in per_layer)

    def widen(q: HFQuantized) -> HFQuantized:
        repeat = groups // q.scale.shape[1]
        scale = np.repeat(q.scale.astype(np.float32), repeat, axis=1)
        offset = (np.zeros_like(scale) if q.offset is None
                  else np.repeat(q.offset.astype(np.float32), repeat, axis=1))
        return HFQuantized(q.codes.astype(np.int8), scale, offset if with_offset else None, 8,
                           scheme=q.scheme)

    return [widen(q) for q in per_layer]


def stack_quantized(per_layer: list[HFQuantized]) -> QuantizedStack:
    """L checkpoint tensors [N, K] -> one QuantizedStack [L, K, N] (numpy leaves)."""
    first = per_layer[0]
    if any((q.bits, q.codes.dtype, q.scale.shape, q.g_idx is None, q.offset is None)
           != (first.bits, first.codes.dtype, first.scale.shape, first.g_idx is None,
               first.offset is None) for q in per_layer):
        raise ValueError("the layers of one matrix are quantized differently")
    codes = np.stack([q.codes.T for q in per_layer])            # [L, K, N]
    if first.bits == 4:
        codes = pack_nibbles(codes)
    scale = np.stack([q.scale.T for q in per_layer])            # [L, G, N]
    offset = None if first.offset is None else np.stack([q.offset.T for q in per_layer])
    g_idx = None if first.g_idx is None else np.stack([q.g_idx for q in per_layer]).astype(
        np.int32)
    return QuantizedStack(codes=np.ascontiguousarray(codes), scale=np.ascontiguousarray(scale),
                          offset=None if offset is None else np.ascontiguousarray(offset),
                          g_idx=g_idx, bits=first.bits, n_in=first.codes.shape[1],
                          scheme="+".join(sorted({q.scheme for q in per_layer})))


def field_logical_axes(field: str, axes: tuple) -> tuple:
    """Logical axes of one QuantizedStack field from the float stack's (layers, K axis, N
    axis): the group axis shards like K (whole groups per shard when G divides by the mesh
    axis; otherwise the rules replicate it), g_idx is [L, K]."""
    return axes[:2] if field == "g_idx" else axes


def array_fields(stack: QuantizedStack) -> dict:
    """field name -> array, for the fields present (offset and g_idx may be None)."""
    return {f: getattr(stack, f) for f in ("codes", "scale", "offset", "g_idx")
            if getattr(stack, f) is not None}


def quantized_scheme(params: dict) -> str | None:
    """How the layer matrices of a param pytree are quantized ("int8", "Q4_1", "Q4_1+Q8_0"),
    or None when they are all float. Stacks packed for the native matmul
    (linear.PackedQuantizedStack) carry their scheme too."""
    schemes = sorted({part for w in params["layers"].values()
                      if isinstance(w, QuantizedStack) or hasattr(w, "scheme")
                      for part in (w.scheme or f"{w.bits}-bit").split("+")})
    return "+".join(schemes) or None
