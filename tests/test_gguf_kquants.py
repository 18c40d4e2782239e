"""GGUF's K-quants and 5-bit types kept packed (issue 16): every block type decodes to exactly
what the `gguf` package's own dequantizer (an independent implementation) computes, K-quant
blocks built here from known integers unpack to those integers, a matrix whose layers mix
types (llama.cpp's Q4_K_M: Q6_K layers among Q4_K ones) stays packed in one common form, and
a tiny model stored that way computes what the same file dequantized at load computes.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize

from jaxserve.loading.gguf_quant import PACKED_TYPES, unpack_block_tensor
from jaxserve.models import quant

# byte offsets of each type's float16 fields (d, and m or dmin), which random bytes must not
# turn into inf or NaN
_F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
               "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
# (bits as stored, code range) per type: 5- and 6-bit codes widen to int8
_CODES = {"Q8_0": (8, -128, 127), "Q4_0": (4, 0, 15), "Q4_1": (4, 0, 15), "Q5_0": (8, -16, 15),
          "Q5_1": (8, 0, 31), "Q2_K": (4, 0, 3), "Q3_K": (4, 0, 7), "Q4_K": (4, 0, 15),
          "Q5_K": (8, 0, 31), "Q6_K": (8, -32, 31)}


def random_blocks(kind, n, k, rng, d_range=(-0.1, 0.1)):
    """u8[n, k / block * type_size]: random bytes with finite float16 scales."""
    block, size = GGML_QUANT_SIZES[Q[kind]]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    for at in _F16_FIELDS[kind]:
        d = rng.uniform(*d_range, (n, k // block)).astype(np.float16)
        raw[..., at:at + 2] = d.view(np.uint8).reshape(n, k // block, 2)
    return raw.reshape(n, -1)


def test_the_table_covers_every_packed_type():
    assert set(_F16_FIELDS) == set(_CODES) == set(PACKED_TYPES)


@pytest.mark.parametrize("kind", PACKED_TYPES)
def test_every_block_type_decodes_as_gguf_dequantizes(kind):
    n, k = 5, 512
    raw = random_blocks(kind, n, k, np.random.default_rng(1))
    q = unpack_block_tensor(raw, kind, (n, k))
    bits, lo, hi = _CODES[kind]
    assert q.bits == bits and q.codes.shape == (n, k) and q.scheme == kind
    assert q.codes.dtype == (np.uint8 if bits == 4 else np.int8)
    # random bytes reach both ends of the code range: every bit of every field is read
    assert q.codes.min() == lo and q.codes.max() == hi
    np.testing.assert_array_equal(q.dequantize(), gguf_dequantize(raw, Q[kind]).reshape(n, k))


def _pack_k4_scales(sc, m):
    """8 six-bit scales and mins -> Q4_K's 12 bytes (the format's layout, written out here)."""
    out = np.zeros(12, np.uint8)
    out[0:4] = (sc[0:4] & 63) | ((sc[4:8] >> 4) << 6)
    out[4:8] = (m[0:4] & 63) | ((m[4:8] >> 4) << 6)
    out[8:12] = (sc[4:8] & 15) | ((m[4:8] & 15) << 4)
    return out


def test_q4_k_and_q6_k_blocks_built_from_known_integers_unpack_to_them():
    rng = np.random.default_rng(2)
    # Q4_K: one block of 256 codes in 8 groups of 32, six-bit scales and mins
    codes = rng.integers(0, 16, 256).astype(np.uint8)
    sc, m = rng.integers(0, 64, 8).astype(np.uint8), rng.integers(0, 64, 8).astype(np.uint8)
    d, dmin = np.float16(0.03125), np.float16(0.0078125)
    chunks = codes.reshape(4, 2, 32)                       # 64 values: 32 low, 32 high nibbles
    qs = (chunks[:, 0] | (chunks[:, 1] << 4)).reshape(-1)
    raw = np.concatenate([np.array([d, dmin], np.float16).view(np.uint8),
                          _pack_k4_scales(sc, m), qs]).astype(np.uint8)
    q = unpack_block_tensor(raw, "Q4_K", (1, 256))
    np.testing.assert_array_equal(q.codes[0], codes)
    np.testing.assert_array_equal(q.scale[0], np.float32(d) * sc)
    np.testing.assert_array_equal(q.offset[0], -np.float32(dmin) * m)

    # Q6_K: 256 six-bit codes (minus 32) in 16 groups of 16 with signed eight-bit scales
    six = rng.integers(0, 64, 256).astype(np.uint8)
    scales = rng.integers(-128, 128, 16).astype(np.int8)
    ql, qh = np.zeros(128, np.uint8), np.zeros(64, np.uint8)
    for h in range(2):                   # each half: 4 runs of 32 values, see gguf_quant.py
        v = six[h * 128:(h + 1) * 128].reshape(4, 32)
        ql[h * 64:h * 64 + 32] = (v[0] & 15) | ((v[2] & 15) << 4)
        ql[h * 64 + 32:h * 64 + 64] = (v[1] & 15) | ((v[3] & 15) << 4)
        qh[h * 32:(h + 1) * 32] = sum(((v[i] >> 4) & 3) << (2 * i) for i in range(4))
    raw = np.concatenate([ql, qh, scales.view(np.uint8),
                          np.array([0.5], np.float16).view(np.uint8)])
    q = unpack_block_tensor(raw, "Q6_K", (1, 256))
    np.testing.assert_array_equal(q.codes[0], six.astype(np.int8) - 32)
    np.testing.assert_array_equal(q.scale[0], 0.5 * scales.astype(np.float32))
    assert q.offset is None


def test_layers_of_mixed_types_share_one_lossless_form():
    rng = np.random.default_rng(3)
    kinds = ["Q4_K", "Q6_K", "Q4_K", "Q8_0"]
    per_layer = [unpack_block_tensor(random_blocks(k, 8, 512, rng), k, (8, 512)) for k in kinds]
    common = quant.common_form(per_layer)
    assert {(c.bits, c.codes.dtype, c.scale.shape, c.offset is None) for c in common} == {
        (8, np.dtype(np.int8), (8, 32), False)}            # Q6_K's 16-value groups, Q4_K's mins
    stack = quant.stack_quantized(common)
    assert stack.scheme == "Q4_K+Q6_K+Q8_0"
    assert quant.quantized_scheme({"layers": {"down_proj": stack}}) == "Q4_K+Q6_K+Q8_0"
    for i, q in enumerate(per_layer):
        np.testing.assert_array_equal(np.asarray(stack.layer_weight(i, np.float32)),
                                      q.dequantize().T)
    same = [per_layer[0], per_layer[2]]
    assert quant.common_form(same) is same                 # nothing to do
    fp8 = quant.quantize_fp8(rng.normal(size=(8, 512)).astype(np.float32))
    assert quant.common_form([per_layer[0], fp8]) is None  # no common form: loaded as float


# a tiny llama whose sizes are multiples of the K-quants' 256-value super-blocks
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, LAYERS = 256, 4, 2, 64, 512, 64, 2
# llama.cpp's Q4_K_M recipe in miniature: Q6_K for some layers of attn_v and ffn_down and for
# the output, Q4_K elsewhere, and the other types on the remaining matrices
_TYPES = {"token_embd": "Q5_0", "output": "Q6_K", "attn_q": "Q4_K", "attn_k": "Q5_K",
          "attn_output": "Q3_K", "ffn_gate": "Q2_K", "ffn_up": "Q5_1"}
_MIXED = {"attn_v": ("Q6_K", "Q4_K"), "ffn_down": ("Q4_K", "Q6_K")}


def _write_kquant_gguf(path, rng):
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)

    def matrix(name, kind, rows, cols):
        # small scales keep the activations of random codes in range
        raw = random_blocks(kind, rows, cols, rng, d_range=(0.0005, 0.002))
        w.add_tensor(name, raw, raw_dtype=Q[kind])  # u8[rows, bytes]: shape from the type

    matrix("token_embd.weight", _TYPES["token_embd"], VOCAB, HIDDEN)
    matrix("output.weight", _TYPES["output"], VOCAB, HIDDEN)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    shapes = {"attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
              "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HEADS * HEAD_DIM),
              "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}
    for i in range(LAYERS):
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", np.ones(HIDDEN, np.float32))
        for name, (rows, cols) in shapes.items():
            kind = _MIXED[name][i] if name in _MIXED else _TYPES[name]
            matrix(f"blk.{i}.{name}.weight", kind, rows, cols)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_a_k_quant_mix_kept_packed_computes_the_dequantized_model(tmp_path):
    from test_quantization import PROMPTS, _greedy_and_logits, load_model_weights
    path = _write_kquant_gguf(tmp_path / "kq.gguf", np.random.default_rng(4))
    packed = load_model_weights(path, "gguf")
    float_ = load_model_weights(path, "none")
    layers = packed.params["layers"]
    for name, kind in (("q_proj", "Q4_K"), ("k_proj", "Q5_K"), ("o_proj", "Q3_K"),
                       ("gate_proj", "Q2_K"), ("up_proj", "Q5_1"), ("v_proj", "Q4_K+Q6_K"),
                       ("down_proj", "Q4_K+Q6_K")):
        assert isinstance(layers[name], quant.QuantizedStack) and layers[name].scheme == kind
    assert packed.params["embed"].scheme == "Q5_0" and packed.params["lm_head"].scheme == "Q6_K"
    assert all(isinstance(x, np.ndarray) for x in float_.params["layers"].values())
    matrices = [k for k, v in layers.items() if isinstance(v, quant.QuantizedStack)]
    stored = sum(a.nbytes for k in matrices for a in quant.array_fields(layers[k]).values())
    floats = sum(float_.params["layers"][k].nbytes for k in matrices)
    assert stored < 0.4 * floats        # measured: 0.28 (4-6 bits + f32 scales per weight)
    t_packed, l_packed = _greedy_and_logits(packed, PROMPTS[:2], max_new=6)
    t_float, l_float = _greedy_and_logits(float_, PROMPTS[:2], max_new=6)
    assert t_packed == t_float
    for a, b in zip(l_packed, l_float):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
