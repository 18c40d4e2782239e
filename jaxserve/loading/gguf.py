"""Load a GGUF file (llama.cpp's format) as Hugging Face tensors, config and tokenizer.

GGUF is the other way users hold weights besides HF folders. This module turns one file into
exactly what the HF-folder loader produces: an HF config.json dict (-> ModelConfig), a flat dict
of HF-named float32 numpy tensors in PyTorch [out, in] layout, and a transformers tokenizer, so
everything downstream (jaxserve.models.hf_names.params_from_hf) has a single input format.

We parse the header ourselves, not with gguf.GGUFReader, whose constructor dies on a truncated
file or unknown tensor type with a bare numpy/enum error; ours checks every bound and names the
file and field. The `gguf` package dequantizes (numpy); gguf_tokenizer.py builds the tokenizer
from the metadata with the `tokenizers` library (no torch, unlike transformers' GGUF path).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import struct
import sys

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from tqdm import tqdm

from jaxserve.loading import ModelLoadError
from jaxserve.loading.gguf_quant import PACKED_TYPES, permute_rows, unpack_block_tensor
from jaxserve.models.quant import HFQuantized
from jaxserve.models.config import ModelConfig


class GGUFError(ModelLoadError):
    """A GGUF file we cannot read; the message names the file and the field or tensor."""


@dataclasses.dataclass
class GGUFModel:
    config: ModelConfig
    hf_config: dict               # config.json-style dict built from the GGUF metadata
    tensors: dict                 # HF name -> f32 np.ndarray (or HFQuantized), HF [out, in]
    tokenizer: object             # transformers PreTrainedTokenizerFast, or None if not asked for
    metadata: dict                # raw GGUF key/values, minus the big tokenizer arrays


# ggml type ids we read (names as in gguf.GGMLQuantizationType): floats and the block types
# gguf_quant.py decodes (the legacy Q4/Q5/Q8 and the K-quants of llama.cpp's Q2_K..Q6_K
# mixes). The i-quants and ternary types are refused rather than passed to gguf.quants
# untested.
SUPPORTED_TYPES = {int(GGMLQuantizationType[name]): name
                   for name in ("F32", "F16", "BF16", *PACKED_TYPES)}

# GGUF metadata value types: numeric id -> struct format (numpy reads the same codes).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9

# GGUF architecture -> (HF architecture, HF model_type, q/k rows permuted by llama.cpp).
# llama.cpp's converter interleaves q/k rows for its rope layout only for the llama family;
# Qwen2/Qwen3 use the NeoX layout there and are stored unpermuted. Mistral 7B GGUFs say "llama".
_ARCHS = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False),
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
              "output": "lm_head"}
_BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
                "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
                **{f"attn_{x}": f"self_attn.{x}_proj" for x in "qkv"},
                **{f"attn_{x}_norm": f"self_attn.{x}_norm" for x in "qk"}}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


@dataclasses.dataclass
class _TensorInfo:
    name: str
    dims: tuple[int, ...]   # numpy order (ggml's ne reversed): [rows, ..., ne0]
    type_id: int
    offset: int             # absolute byte offset in the file
    nbytes: int


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file."""

    def __init__(self, buf, path: str):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"{self.path}: truncated file: {what} needs {n} bytes at offset "
                            f"{self.pos}, the file has {self.size} bytes")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        out = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return out[0] if len(out) == 1 else out

    def string(self, what: str) -> str:
        n = self.unpack("Q", what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: {what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            itype, count = self.unpack("IQ", what)
            if itype in _SCALARS:  # numeric arrays in one read: vocab-sized score lists
                fmt = _SCALARS[itype]
                nbytes = count * struct.calcsize(fmt)
                self.need(nbytes, what)
                arr = np.frombuffer(self.buf, np.dtype("<" + fmt), count, self.pos).copy()
                self.pos += nbytes
                return arr
            if itype in (_STRING, _ARRAY):
                # each element has at least an 8-byte header: a cheap bound before looping
                self.need(8 * count, what)
                return [self.value(itype, what) for _ in range(count)]
            raise GGUFError(f"{self.path}: {what} is an array of unknown value type {itype}")
        raise GGUFError(f"{self.path}: {what} has unknown value type {vtype}")


def _read_header(path: str, buf) -> tuple[dict, list[_TensorInfo]]:
    cur = _Cursor(buf, path)
    magic = bytes(buf[:4]) if len(buf) >= 4 else b""
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.unpack("I", "header field 'version'")
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2 or 3){hint}")
    n_tensors, n_kv = cur.unpack("QQ", "header fields 'tensor_count'/'kv_count'")

    meta = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        vtype = cur.unpack("I", f"type of metadata key {key!r}")
        meta[key] = cur.value(vtype, f"metadata value {key!r}")

    infos = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}")
        n_dims = cur.unpack("I", f"n_dims of tensor {name!r}")
        if not 1 <= n_dims <= 4:
            raise GGUFError(f"{path}: tensor {name!r} has {n_dims} dimensions (1 to 4 allowed)")
        ne = cur.unpack("Q" * n_dims, f"shape of tensor {name!r}")
        ne = (ne,) if n_dims == 1 else tuple(ne)
        if 0 in ne:
            raise GGUFError(f"{path}: tensor {name!r} has an empty dimension (shape {ne})")
        type_id, offset = cur.unpack("IQ", f"type/offset of tensor {name!r}")
        if type_id not in SUPPORTED_TYPES:
            try:
                tname = GGMLQuantizationType(type_id).name
            except ValueError:
                tname = f"unknown type id {type_id}"
            raise GGUFError(
                f"{path}: tensor {name!r} is stored as {tname}, which jaxserve cannot dequantize; "
                f"supported: {', '.join(SUPPORTED_TYPES.values())} (re-quantize the model, e.g. "
                f"to Q4_K_M or Q8_0, with llama.cpp's llama-quantize)")
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
        if ne[0] % block:
            raise GGUFError(f"{path}: tensor {name!r} has rows of {ne[0]} values, not a multiple "
                            f"of the {SUPPORTED_TYPES[type_id]} block size {block}")
        infos.append(_TensorInfo(name, tuple(reversed(ne)), type_id, offset,
                                 math.prod(ne) // block * type_size))  # exact, no overflow

    align = int(_scalar(path, meta, "general.alignment", 32))
    if align <= 0 or align & (align - 1):
        raise GGUFError(f"{path}: metadata 'general.alignment' = {align} is not a power of two")
    data_start = -(-cur.pos // align) * align
    for t in infos:
        t.offset += data_start
        if t.offset + t.nbytes > len(buf):
            raise GGUFError(f"{path}: truncated file: tensor {t.name!r} ends at byte "
                            f"{t.offset + t.nbytes}, the file has {len(buf)} bytes")
    return meta, infos


def _dequantize(buf, t: _TensorInfo) -> np.ndarray:
    raw = buf[t.offset:t.offset + t.nbytes]
    kind = SUPPORTED_TYPES[t.type_id]
    if kind == "F32":
        return np.array(raw.view(np.float32).reshape(t.dims))   # copy: detach from the map
    if kind == "F16":
        return raw.view(np.float16).astype(np.float32).reshape(t.dims)
    n_rows = math.prod(t.dims[:-1])  # 1 for a 1-D tensor
    out = dequantize(raw.reshape(n_rows, t.nbytes // n_rows), GGMLQuantizationType(t.type_id))
    return np.asarray(out, dtype=np.float32).reshape(t.dims)


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    # Inverse of llama.cpp convert_hf_to_gguf's `permute`: it regroups each head's rows from
    # HF's half-split rotary layout into interleaved pairs; swapping the (2, dim) axes back
    # restores HF's order so the weights match what transformers computes with.
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(path: str, gguf_name: str, n_layers: int) -> str | None:
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _TOP_NAMES and suffix in ("weight", "bias"):
        return f"{_TOP_NAMES[stem]}.{suffix}"
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        layer = int(m.group(1))
        if layer >= n_layers:
            raise GGUFError(f"{path}: tensor {gguf_name!r} is for layer {layer}, but metadata "
                            f"'block_count' says {n_layers} layers")
        return f"model.layers.{layer}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _scalar(path: str, meta: dict, key: str, default=None):
    if key not in meta:
        if default is None:
            raise GGUFError(f"{path}: missing metadata field {key!r}")
        return default
    v = meta[key]
    if isinstance(v, np.ndarray):  # per-layer values (e.g. head_count_kv): must be uniform here
        if v.size == 0 or np.any(v != v.flat[0]):
            raise GGUFError(f"{path}: metadata field {key!r} varies per layer ({v.tolist()}); "
                            "only uniform layers are supported")
        v = v.flat[0]
    if isinstance(v, (str, list)):
        raise GGUFError(f"{path}: metadata field {key!r} should be a number, got {v!r}")
    return v.item() if isinstance(v, np.generic) else v


def _f32(x) -> float:
    # GGUF stores floats as f32: 1e-5 reads back as 9.99999974e-06. The shortest f32 repr
    # gives back the number the original config.json held.
    return float(str(np.float32(x)))


def _build_hf_config(path: str, meta: dict, infos: list[_TensorInfo]) -> tuple[dict, bool]:
    arch = meta.get("general.architecture")
    if arch not in _ARCHS:
        raise GGUFError(f"{path}: metadata 'general.architecture' is {arch!r}; supported: "
                        f"{', '.join(_ARCHS)}")
    hf_arch, model_type, permuted = _ARCHS[arch]
    a = arch + "."
    by_name = {t.name: t for t in infos}
    if "token_embd.weight" not in by_name:
        raise GGUFError(f"{path}: no 'token_embd.weight' tensor")
    hidden = int(_scalar(path, meta, a + "embedding_length"))
    heads = int(_scalar(path, meta, a + "attention.head_count"))
    kv_heads = int(_scalar(path, meta, a + "attention.head_count_kv", heads))
    if min(hidden, heads, kv_heads) <= 0:
        raise GGUFError(f"{path}: metadata {a}embedding_length/attention.head_count(_kv) must "
                        f"be positive, got {hidden}/{heads}/{kv_heads}")
    head_dim = int(_scalar(path, meta, a + "attention.key_length", hidden // heads))
    if int(_scalar(path, meta, a + "attention.value_length", head_dim)) != head_dim:
        raise GGUFError(f"{path}: metadata {a}attention.value_length differs from key_length")
    if int(_scalar(path, meta, a + "rope.dimension_count", head_dim)) != head_dim:
        raise GGUFError(f"{path}: metadata {a}rope.dimension_count != head_dim {head_dim}: "
                        "partial rotary embeddings are not supported")
    vocab = by_name["token_embd.weight"].dims[0]
    hf = {
        "architectures": [hf_arch], "model_type": model_type, "torch_dtype": "float32",
        "vocab_size": int(_scalar(path, meta, a + "vocab_size", vocab)),
        "hidden_size": hidden, "hidden_act": "silu",
        "intermediate_size": int(_scalar(path, meta, a + "feed_forward_length")),
        "num_hidden_layers": int(_scalar(path, meta, a + "block_count")),
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "max_position_embeddings": int(_scalar(path, meta, a + "context_length", 2048)),
        "rms_norm_eps": _f32(_scalar(path, meta, a + "attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(_scalar(path, meta, a + "rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(path, meta, a),
        "tie_word_embeddings": "output.weight" not in by_name,
    }
    if hf["vocab_size"] != vocab:
        raise GGUFError(f"{path}: metadata {a}vocab_size = {hf['vocab_size']} but tensor "
                        f"'token_embd.weight' has {vocab} rows")
    if len(meta.get("tokenizer.ggml.tokens", ())) > vocab:
        raise GGUFError(f"{path}: the tokenizer has more tokens than the {vocab} rows of "
                        "'token_embd.weight'")
    if model_type == "llama":
        hf["attention_bias"] = "blk.0.attn_q.bias" in by_name
        hf["mlp_bias"] = False
    if model_type == "qwen2":
        hf["use_sliding_window"] = False
    for field, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                       ("pad_token_id", "padding_token_id")):
        v = meta.get("tokenizer.ggml." + key)
        if v is not None:
            hf[field] = int(v)
    return hf, permuted


def _rope_scaling(path: str, meta: dict, a: str) -> dict | None:
    kind = meta.get(a + "rope.scaling.type", "none")
    if kind == "linear":
        factor = _f32(_scalar(path, meta, a + "rope.scaling.factor"))
        return {"rope_type": "linear", "factor": factor}
    if kind != "none":
        raise GGUFError(f"{path}: metadata {a}rope.scaling.type = {kind!r} is not supported "
                        "(supported: none, linear, and Llama 3 'rope_freqs.weight')")
    return None


def _fit_llama3_rope(path: str, hf: dict, freqs: np.ndarray) -> dict:
    # Llama 3.x GGUFs carry their rope scaling as a per-frequency divisor tensor instead of
    # metadata. Every Llama 3.x release uses low/high freq factors 1/4 and an 8192 original
    # context; rebuild that curve and accept the file only if it matches the tensor.
    if hf["rope_scaling"] is not None:
        raise GGUFError(f"{path}: has both rope scaling metadata and a 'rope_freqs.weight' "
                        "tensor; this combination is not supported")
    factor, old, lo, hi = _f32(freqs.max()), 8192, 1.0, 4.0
    d = hf["head_dim"]
    wavelen = 2 * np.pi * hf["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float64) / d)
    smooth = (old / wavelen - lo) / (hi - lo)
    medium = 1.0 / ((1 - smooth) / factor + smooth)
    want = np.where(wavelen < old / hi, 1.0, np.where(wavelen > old / lo, factor, medium))
    if freqs.shape != want.shape or not np.allclose(freqs, want, rtol=1e-4):
        raise GGUFError(f"{path}: tensor 'rope_freqs.weight' does not match Llama 3 rope scaling "
                        "(factor, low/high freq factors 1/4, original context 8192); this rope "
                        "scaling is not supported")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": lo,
            "high_freq_factor": hi, "original_max_position_embeddings": old}


def load_gguf(path: str, dtype: str | None = None, *, tokenizer: bool = True,
              keep_packed: bool = False) -> GGUFModel:
    """Read `path`, dequantize every tensor to float32 and return HF-named tensors + config.

    `dtype` sets ModelConfig.dtype (the compute dtype; default float32). `tokenizer=False`
    skips building the tokenizer (weights-only files, tests). `keep_packed`: 2-D block-quantized
    tensors stay codes and scales (models.quant.HFQuantized, see gguf_quant.py).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such file")
    empty = os.path.getsize(path) == 0   # np.memmap refuses an empty file
    buf = np.zeros(0, np.uint8) if empty else np.memmap(path, dtype=np.uint8, mode="r")
    meta, infos = _read_header(path, buf)
    hf, permuted = _build_hf_config(path, meta, infos)
    if tokenizer and ("tokenizer.ggml.tokens" not in meta or "tokenizer.ggml.model" not in meta):
        raise GGUFError(f"{path}: no tokenizer in this file (metadata 'tokenizer.ggml.tokens' "
                        "missing)")

    # Map every tensor's name before the slow part: an unknown tensor means a model we do not
    # understand, which must fail before minutes of dequantization, not be silently dropped.
    names = {}
    for t in infos:
        if t.name == "rope_freqs.weight":
            continue
        hf_name = _hf_name(path, t.name, hf["num_hidden_layers"])
        if hf_name is None:
            raise GGUFError(f"{path}: tensor {t.name!r} has no Hugging Face counterpart in a "
                            f"{hf['model_type']} model")
        names[t.name] = hf_name

    tensors = {}
    heads, kv_heads = hf["num_attention_heads"], hf["num_key_value_heads"]
    with tqdm(total=len(infos), desc=f"dequantizing {os.path.basename(path)}", unit="tensor",
              file=sys.stderr, disable=len(infos) < 64, leave=False) as bar:
        for t in infos:
            kind = SUPPORTED_TYPES[t.type_id]
            if keep_packed and kind in PACKED_TYPES and len(t.dims) == 2:
                w = unpack_block_tensor(buf[t.offset:t.offset + t.nbytes], kind, t.dims)
            else:
                w = _dequantize(buf, t)
            bar.update()
            if t.name == "rope_freqs.weight":
                hf["rope_scaling"] = _fit_llama3_rope(path, hf, w)
                continue
            if permuted and (".attn_q." in t.name or ".attn_k." in t.name):
                n = heads if ".attn_q." in t.name else kv_heads
                if w.shape[0] != n * hf["head_dim"]:
                    raise GGUFError(f"{path}: tensor {t.name!r} has {w.shape[0]} rows, expected "
                                    f"{n} heads x head_dim {hf['head_dim']}")
                w = (permute_rows(w, lambda a: _unpermute_rows(a, n))
                     if isinstance(w, HFQuantized) else _unpermute_rows(w, n))
            tensors[names[t.name]] = w
    config = ModelConfig.from_hf_dict(hf, source=path, dtype=dtype)

    small_meta = {k: v for k, v in meta.items()
                  if not (isinstance(v, (list, np.ndarray)) and len(v) > 64)}
    return GGUFModel(config=config, hf_config=hf, tensors=tensors, metadata=small_meta,
                     tokenizer=_load_tokenizer(path, meta) if tokenizer else None)


def _load_tokenizer(path: str, meta: dict):
    # Built from the metadata by our own code: transformers' GGUF tokenizer path imports torch.
    from jaxserve.loading.gguf_tokenizer import GGUFTokenizerError, build_tokenizer

    try:
        return build_tokenizer(meta)
    except GGUFTokenizerError as e:
        raise GGUFError(f"{path}: could not build the tokenizer: {e}") from None
