"""How a layer's matrices are applied: XLA's dot on a slice of the stack, or the native CPU
matmul on weights stored in 64-column panels (pallas_kernels.native_matmul).

The layout is data, not a flag: `pack_layer_matrices(params)` replaces each [L, K, N] matrix
stack under params["layers"] with a PackedStack (float32) or a PackedQuantizedStack (int8,
fp8 or 4-bit codes with group scales), and the forward routes every matrix so stored to the native
kernels, which read the layer's panels in place. Those stacks then stay out of the layer
scan's sliced inputs (a sliced input is copied per layer on XLA:CPU: 54 of ~180 ms of a 32-row
SmolLM2 decode step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxserve.models.quant import QuantizedStack

# the layer matrices, [L, K, N] each (see llama.py's parameter pytree)
LAYER_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@struct.dataclass
class PackedStack:
    """A [L, K, N] matrix stack as the native matmul stores it."""
    panels: jax.Array                           # f32[L, ceil(N / 64), K, 64]
    n_out: int = struct.field(pytree_node=False)  # N


@struct.dataclass
class PackedQuantizedStack:
    """A QuantizedStack [L, K, N] as the native quantized matmul stores it."""
    codes: jax.Array                  # s8 | f8e4m3fn [L, NP, K, 64], u8[L, NP, K / 2, 64] (4-bit)
    scale: jax.Array                  # f32 | f16 [L, NP, G, 64]
    offset: jax.Array | None          # f32 | f16 [L, NP, G, 64] or None
    bits: int = struct.field(pytree_node=False)
    n_out: int = struct.field(pytree_node=False)  # N
    scheme: str = struct.field(pytree_node=False, default="")  # as QuantizedStack's

    def matmul(self, x, layer, num_rows=None):  # x f32[T, K] -> f32[T, N]
        from pallas_kernels.native_matmul import quantized_packed_matmul
        return quantized_packed_matmul(x, self.codes, self.scale, self.offset, layer, num_rows,
                                       n_out=self.n_out, bits=self.bits)

    def gather_columns(self, ids, dtype):  # ids i32[T] -> [T, K]: W[0][:, ids].T
        """An embedding lookup in a packed [1, H, V] table: column v lies in panel v // 64 at
        lane v % 64, so each token's codes and group scales are one strided gather."""
        ids = jnp.clip(ids, 0, self.n_out - 1)  # as jnp's gather clamps: never a padding lane
        panel, lane = ids // 64, ids % 64
        codes = self.codes[0, panel, :, lane]                  # [T, K or K / 2]
        if self.bits == 4:  # byte i: input rows 2i (low nibble) and 2i + 1 (high)
            codes = jnp.stack([codes & 0xF, codes >> 4], axis=-1).reshape(ids.shape[0], -1)
        group_rows = codes.shape[1] // self.scale.shape[2]
        w = codes.astype(jnp.float32) * jnp.repeat(self.scale[0, panel, :, lane], group_rows, 1)
        if self.offset is not None:
            w = w + jnp.repeat(self.offset[0, panel, :, lane], group_rows, 1)
        return w.astype(dtype)


def _native_form(w: QuantizedStack) -> bool:
    from pallas_kernels.native_matmul import QUANT_CODE_DTYPES
    return w.g_idx is None and w.codes.dtype in QUANT_CODE_DTYPES


def native_quantized_form_missing(params: dict) -> str | None:
    """Why some quantized layer matrix cannot take the native quantized matmul, or None."""
    for name in LAYER_MATRICES:
        w = params["layers"][name]
        if not isinstance(w, QuantizedStack):
            continue
        if w.g_idx is not None:
            return f"{name} has GPTQ act-order groups (g_idx)"
        if not _native_form(w):
            return f"{name} has {w.codes.dtype} codes"
    return None


def _pack_quantized(w: QuantizedStack) -> PackedQuantizedStack:
    """The same codes, scales and offsets in panels, each in its own dtype (float16 scales stay
    float16: the bytes the memory plan counted are the bytes held)."""
    from pallas_kernels.native_matmul import pack

    def scales(a):  # float16 and float32 as stored; another float (bfloat16) as float32
        return jax.jit(pack)(a if a.dtype in (jnp.float16, jnp.float32)
                             else a.astype(jnp.float32))

    return PackedQuantizedStack(
        codes=jax.jit(pack)(w.codes), scale=scales(w.scale),
        offset=None if w.offset is None else scales(w.offset), bits=w.bits, n_out=w.shape[-1],
        scheme=w.scheme)


def pack_layer_matrices(params: dict) -> dict:
    """params with every layer matrix stack packed for the native matmuls: float32 ones and
    quantized ones (see native_quantized_form_missing for which); a quantized embedding table
    or lm_head [1, H, V] with a native form is packed too (the logits' matmul is then native,
    the lookup gathers from the panels)."""
    from pallas_kernels.native_matmul import pack

    params = dict(params)
    for name in ("embed", "lm_head"):
        w = params.get(name)
        if isinstance(w, QuantizedStack) and _native_form(w):
            params[name] = _pack_quantized(w)
    layers = dict(params["layers"])
    for name in LAYER_MATRICES:
        w = layers[name]  # [L, K, N]
        if isinstance(w, QuantizedStack):
            if _native_form(w):  # else dequantized in XLA's dot (models/quant.py)
                layers[name] = _pack_quantized(w)
            continue
        if w.dtype != jnp.float32:
            raise ValueError(f"the native matmul takes float32 weights, {name} is {w.dtype}")
        layers[name] = PackedStack(panels=jax.jit(pack)(w), n_out=w.shape[-1])
    return {**params, "layers": layers}


class LayerWeights:
    """One layer's weights inside the layer scan: `w[name]` for the sliced vectors (norms,
    biases) and `w.matmul(x, name)` = x @ W_name[layer] by whichever path its stack takes."""

    def __init__(self, sliced: dict, packed: dict, layer, num_rows=None):
        # num_rows (i32[]): the step's real token rows; the native kernel skips the padding
        # below them (XLA's dot computes every row)
        self._sliced, self._packed, self._layer = sliced, packed, layer
        self._num_rows = num_rows

    def __getitem__(self, name):
        return self._sliced[name]

    def matmul(self, x, name):  # x [T, K] -> [T, N]
        stack = self._packed.get(name)
        if stack is None:
            return x @ self._sliced[name]
        if isinstance(stack, QuantizedStack):
            return stack.matmul(x, self._layer)
        if isinstance(stack, PackedQuantizedStack):
            return stack.matmul(x, self._layer, self._num_rows)
        from pallas_kernels.native_matmul import packed_matmul
        return packed_matmul(x, stack.panels, self._layer, self._num_rows, n_out=stack.n_out)


def split_layers(layers: dict) -> tuple[dict, dict]:
    """(stacks the scan slices per layer, packed or quantized stacks it reads in place)."""
    packed = {n: w for n, w in layers.items()
              if isinstance(w, (PackedStack, PackedQuantizedStack, QuantizedStack))}
    return {n: w for n, w in layers.items() if n not in packed}, packed
