"""How a layer's matrices are applied: XLA's dot on a slice of the stack, or the native CPU
matmul on weights stored in 64-column panels (pallas_kernels.native_matmul).

The layout is data, not a flag: `pack_layer_matrices(params)` replaces each [L, K, N] matrix
stack under params["layers"] with a PackedStack (float32) or a PackedQuantizedStack (int8 or
4-bit codes with group scales), and the forward routes every matrix so stored to the native
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
    codes: jax.Array                  # s8[L, NP, K, 64] or u8[L, NP, K / 2, 64] (4-bit)
    scale: jax.Array                  # f32[L, NP, G, 64]
    offset: jax.Array | None          # f32[L, NP, G, 64] or None
    bits: int = struct.field(pytree_node=False)
    n_out: int = struct.field(pytree_node=False)  # N


def native_quantized_form_missing(params: dict) -> str | None:
    """Why some quantized layer matrix cannot take the native quantized matmul, or None."""
    for name in LAYER_MATRICES:
        w = params["layers"][name]
        if not isinstance(w, QuantizedStack):
            continue
        if w.g_idx is not None:
            return f"{name} has GPTQ act-order groups (g_idx)"
        if w.codes.dtype not in (jnp.int8, jnp.uint8):
            return f"{name} has {w.codes.dtype} codes"
    return None


def _pack_quantized(w: QuantizedStack) -> PackedQuantizedStack:
    from pallas_kernels.native_matmul import pack

    as_f32 = jax.jit(lambda a: pack(a.astype(jnp.float32)))
    return PackedQuantizedStack(
        codes=jax.jit(pack)(w.codes), scale=as_f32(w.scale),
        offset=None if w.offset is None else as_f32(w.offset), bits=w.bits,
        n_out=w.shape[-1])


def pack_layer_matrices(params: dict) -> dict:
    """params with every layer matrix stack packed for the native matmuls: float32 ones and
    quantized ones (see native_quantized_form_missing for which)."""
    from pallas_kernels.native_matmul import pack

    layers = dict(params["layers"])
    for name in LAYER_MATRICES:
        w = layers[name]  # [L, K, N]
        if isinstance(w, QuantizedStack):
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
        from pallas_kernels import native_matmul
        if isinstance(stack, PackedQuantizedStack):
            return native_matmul.quantized_packed_matmul(
                x, stack.codes, stack.scale, stack.offset, self._layer, self._num_rows,
                n_out=stack.n_out, bits=stack.bits)
        return native_matmul.packed_matmul(x, stack.panels, self._layer, self._num_rows,
                                           n_out=stack.n_out)


def split_layers(layers: dict) -> tuple[dict, dict]:
    """(stacks the scan slices per layer, packed or quantized stacks it reads in place)."""
    packed = {n: w for n, w in layers.items()
              if isinstance(w, (PackedStack, PackedQuantizedStack, QuantizedStack))}
    return {n: w for n, w in layers.items() if n not in packed}, packed
