"""Mapping between Hugging Face tensor names/layouts and our stacked parameter pytree."""

from __future__ import annotations

import numpy as np

from jaxserve.models.config import ModelConfig
from jaxserve.models import quant
from jaxserve.models.linear import LAYER_MATRICES
from jaxserve.models.llama import param_shapes
from jaxserve.models.quant import HFQuantized

# our per-layer leaf -> (HF name inside "model.layers.{i}.", transpose from HF [out, in])
_LAYER_NAMES = {
    "input_norm": ("input_layernorm.weight", False),
    "post_norm": ("post_attention_layernorm.weight", False),
    "q_proj": ("self_attn.q_proj.weight", True),
    "k_proj": ("self_attn.k_proj.weight", True),
    "v_proj": ("self_attn.v_proj.weight", True),
    "o_proj": ("self_attn.o_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False),
    "k_bias": ("self_attn.k_proj.bias", False),
    "v_bias": ("self_attn.v_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
    "gate_proj": ("mlp.gate_proj.weight", True),
    "up_proj": ("mlp.up_proj.weight", True),
    "down_proj": ("mlp.down_proj.weight", True),
}
# top-level tensors a packed checkpoint may keep packed (an [N = V, K = H] matrix each)
_PACKED_TOP = ("model.embed_tokens.weight", "lm_head.weight")
_TOP_NAMES = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}


class WeightError(ValueError):
    """A checkpoint whose tensors do not match the model its config describes."""


def required_hf_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> the shape (HF layout) the config implies."""
    shapes = param_shapes(cfg)
    out = {}
    for key, (name, transpose) in _TOP_NAMES.items():
        if key in shapes:
            out[name] = tuple(reversed(shapes[key])) if transpose else tuple(shapes[key])
    for key, shape in shapes["layers"].items():
        name, transpose = _LAYER_NAMES[key]
        per_layer = tuple(reversed(shape[1:])) if transpose else tuple(shape[1:])
        for i in range(cfg.num_layers):
            out[f"model.layers.{i}.{name}"] = per_layer
    return out


def params_from_hf(cfg: ModelConfig, get_tensor, source: str, on_tensor=None,
                   quantize: str | None = None, quantize_embeddings: bool = False) -> dict:
    """Build the numpy param pytree, reading tensors by HF name through `get_tensor(name)`.

    `get_tensor` returns a numpy array, a quant.HFQuantized (a checkpoint kept packed), or
    None when absent; `on_tensor` is called per tensor read (progress bars). Missing tensors
    and wrong shapes raise WeightError naming both. The layer matrices of a packed checkpoint
    become QuantizedStacks; so do float ones with `quantize` ("int8"/"fp8", made here; a
    packed one is first dequantized); quantize="none" dequantizes packed ones. A packed
    embedding table and lm_head stay packed too (QuantizedStack [1, H, V]) unless `quantize`
    is given; int8/fp8 leave them float unless `quantize_embeddings` (then one scale per
    vocabulary entry: per output channel of the lm_head, per row of the table).
    """
    np_dtype = {"float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}[cfg.dtype]
    if np_dtype == "bfloat16":
        import ml_dtypes
        np_dtype = ml_dtypes.bfloat16
    expected = required_hf_tensors(cfg)

    def read(name, transpose, matrix=False):  # matrix: one of a layer's LAYER_MATRICES
        arr = get_tensor(name)
        if arr is None:
            raise WeightError(f"{source}: missing tensor {name!r} (expected shape {expected[name]})")
        if tuple(arr.shape) != expected[name]:
            raise WeightError(f"{source}: tensor {name!r} has shape {tuple(arr.shape)}, "
                              f"expected {expected[name]}")
        if on_tensor is not None:
            on_tensor(name)
        if isinstance(arr, HFQuantized):
            if matrix and quantize is None:
                return arr  # a layer matrix kept packed, [N, K]
            if quantize is None and name in _PACKED_TOP:
                # the embedding table / lm_head [V, H] kept packed, as one [1, H, V] stack
                return quant.stack_quantized([arr])
            arr = arr.dequantize()
        if quantize in quant.LOAD_TIME_SCHEMES and (
                matrix or (quantize_embeddings and name in _PACKED_TOP)):
            q = quant.quantize(arr, quantize)
            return q if matrix else quant.stack_quantized([q])
        arr = arr.T if transpose else arr
        return np.ascontiguousarray(arr.astype(np_dtype))

    shapes = param_shapes(cfg)
    params = {key: read(*_TOP_NAMES[key]) for key in ("embed", "final_norm", "lm_head") if key in shapes}
    params["layers"] = {}
    for key in shapes["layers"]:
        name, transpose = _LAYER_NAMES[key]
        per_layer = [read(f"model.layers.{i}.{name}", transpose, key in LAYER_MATRICES)
                     for i in range(cfg.num_layers)]
        if all(isinstance(a, HFQuantized) for a in per_layer):
            common = quant.common_form(per_layer)  # e.g. Q4_K and Q6_K layers: all 8-bit
            if common is not None:
                params["layers"][key] = quant.stack_quantized(common)
                continue
        # one stack needs one layout: a matrix with float layers, or packed layers without a
        # common form, is loaded as float
        params["layers"][key] = np.stack([
            (a.dequantize().T.astype(np_dtype) if isinstance(a, HFQuantized) else a)
            for a in per_layer])
    return params
