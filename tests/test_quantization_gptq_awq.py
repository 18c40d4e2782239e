"""GPTQ and AWQ checkpoints: packed words built here from known integers (by packers written
from each format's definition) unpack to exactly those integers, and a tiny model saved in
each format computes exactly the float model whose weights are its dequantized values."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxserve.loading import ModelLoadError, load_model
from jaxserve.loading.hf import SafetensorsFolder
from jaxserve.loading.hf_quant import unpack_awq, unpack_gptq
from jaxserve.models import quant
from jaxserve.models.linear import PackedQuantizedStack
from model_driver import SingleSequenceDriver

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _words(codes, bits, axis):  # codes [..] -> i32 words packing 32 / bits codes along axis
    per = 32 // bits
    codes = np.moveaxis(codes.astype(np.uint32), axis, 0)
    out = np.zeros((codes.shape[0] // per, *codes.shape[1:]), np.uint32)
    for j in range(per):
        out |= codes[j::per] << np.uint32(bits * j)
    return np.ascontiguousarray(np.moveaxis(out, 0, axis)).view(np.int32)


def pack_gptq(codes, zeros, bits, v2):  # codes [K, N], zeros [G, N]
    stored = zeros if v2 else zeros - 1  # the v1 packer stores zero - 1
    return _words(codes, bits, 0), _words(stored, bits, 1)


def pack_awq(codes, zeros):  # 4-bit, columns interleaved per word
    def interleave(a):
        blocks = a.reshape(a.shape[0], -1, 8)
        return blocks[..., list(AWQ_ORDER)].reshape(a.shape)  # nibble i <- column ORDER[i]
    return _words(interleave(codes), 4, 1), _words(interleave(zeros), 4, 1)


@pytest.mark.parametrize("bits,v2", [(4, False), (4, True), (8, False)])
def test_gptq_words_unpack_to_their_integers(bits, v2):
    rng = np.random.default_rng(bits + v2)
    K, N, G = 64, 16, 2
    codes = rng.integers(0, 2 ** bits, (K, N))
    zeros = rng.integers(1, 2 ** bits, (G, N))  # v1 stores zero - 1: zero 0 has no code
    qweight, qzeros = pack_gptq(codes, zeros, bits, v2)
    assert qweight.shape == (K * bits // 32, N) and qzeros.shape == (G, N * bits // 32)
    got_codes, got_zeros = unpack_gptq(qweight, qzeros, bits, v2)
    np.testing.assert_array_equal(got_codes, codes)
    np.testing.assert_array_equal(got_zeros, zeros)


def test_awq_words_unpack_to_their_integers():
    rng = np.random.default_rng(5)
    codes, zeros = rng.integers(0, 16, (32, 24)), rng.integers(0, 16, (2, 24))
    qweight, qzeros = pack_awq(codes, zeros)
    assert qweight.shape == (32, 3)
    # the interleave is real: column 1 sits in nibble 4 of the first word
    assert (qweight[0, 0].view(np.uint32) >> 16) & 15 == codes[0, 1]
    got_codes, got_zeros = unpack_awq(qweight, qzeros)
    np.testing.assert_array_equal(got_codes, codes)
    np.testing.assert_array_equal(got_zeros, zeros)


def _quantize_minmax(w, group_rows):
    """HF [N, K] float -> (codes [K, N], zeros [G, N], scales f16 [G, N]) for the given group
    of each input row, a plain 4-bit min-max quantizer."""
    G = group_rows.max() + 1
    wt = w.T
    lo = np.stack([wt[group_rows == g].min(0) for g in range(G)])
    hi = np.stack([wt[group_rows == g].max(0) for g in range(G)])
    scales = ((hi - lo) / 15).astype(np.float16)
    s = scales.astype(np.float32)
    zeros = np.clip(np.rint(-lo / s), 1, 15).astype(np.int64)
    codes = np.clip(np.rint(wt / s[group_rows]) + zeros[group_rows], 0, 15).astype(np.int64)
    return codes, zeros, scales


def _write_quantized_folder(src, dst, method, desc_act=False, v2=False, group=32):
    """The tiny model in `method`'s format at dst, and its dequantized float twin at dst_float."""
    rng = np.random.default_rng(0)
    tensors = {k: SafetensorsFolder(src).get(k) for k in _all_names(src)}
    packed, dequant = {}, {}
    for name, w in tensors.items():
        base = name[:-len(".weight")]
        if not any(f"{p}.weight" in name for p in LINEAR):
            packed[name] = dequant[name] = w
            continue
        K = w.shape[1]
        rows = np.arange(K) // group
        if desc_act:
            rows = rng.permutation(rows)
        codes, zeros, scales = _quantize_minmax(w, rows)
        if method == "gptq":
            qweight, qzeros = pack_gptq(codes, zeros, 4, v2)
            packed[base + ".g_idx"] = rows.astype(np.int32)
        else:
            qweight, qzeros = pack_awq(codes, zeros)
        packed.update({base + ".qweight": qweight, base + ".qzeros": qzeros,
                       base + ".scales": scales})
        s = scales.astype(np.float32)
        dequant[name] = (s[rows] * (codes - zeros[rows])).T.astype(np.float32)
    qc = ({"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": desc_act,
           "sym": False, "checkpoint_format": "gptq_v2" if v2 else "gptq"} if method == "gptq"
          else {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                "version": "gemm"})
    for folder, weights, config_extra in ((dst, packed, {"quantization_config": qc}),
                                          (dst + "_float", dequant, {})):
        shutil.copytree(src, folder)
        os.remove(os.path.join(folder, "model.safetensors"))
        # (safetensors writes an array's buffer as is: transposed views must be made whole)
        save_file({k: np.ascontiguousarray(v) for k, v in weights.items()},
                  os.path.join(folder, "model.safetensors"))
        with open(os.path.join(folder, "config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({**cfg, **config_extra}, f)
    return dst, dst + "_float"


def _all_names(folder):
    from safetensors import safe_open
    with safe_open(os.path.join(folder, "model.safetensors"), "np") as f:
        return list(f.keys())


PROMPTS = [[1, 5, 9, 33, 7, 2], [3, 3, 8, 100, 41, 17, 9]]


@pytest.mark.parametrize("method,desc_act,v2", [("gptq", False, False), ("gptq", True, False),
                                                ("gptq", False, True), ("awq", False, False)])
def test_a_packed_checkpoint_computes_its_dequantized_model(tiny_model_dir, tmp_path, method,
                                                           desc_act, v2):
    packed_dir, float_dir = _write_quantized_folder(tiny_model_dir("llama-gqa"),
                                                    str(tmp_path / method), method, desc_act, v2)
    loaded = load_model(packed_dir)
    stacks = [w for w in loaded.params["layers"].values() if isinstance(w, quant.QuantizedStack)]
    assert len(stacks) == 7 and all(s.bits == 4 for s in stacks)
    assert all((s.g_idx is not None) == desc_act for s in stacks)  # act order keeps its gather
    ref = SingleSequenceDriver(load_model(float_dir), max_len=64)
    got = SingleSequenceDriver(loaded, max_len=64)
    # the native CPU matmul takes the packed codes with their float16 scales, except act order
    # (its row gather stays on XLA's dots)
    native = SingleSequenceDriver(loaded, max_len=64, packed_matrices=True)
    on_panels = [w for w in native.params["layers"].values()
                 if isinstance(w, PackedQuantizedStack)]
    assert len(on_panels) == (0 if desc_act else 7)
    assert all(w.scale.dtype == np.float16 for w in on_panels)
    for p in PROMPTS:
        want = ref.prompt_logits(p)
        np.testing.assert_allclose(got.prompt_logits(p), want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(native.prompt_logits(p), want, rtol=1e-4, atol=1e-4)
        assert got.greedy(p, 6) == ref.greedy(p, 6) == native.greedy(p, 6)
    # --quantization none dequantizes at load: the float model itself
    plain = load_model(packed_dir, quantization="none")
    assert isinstance(plain.params["layers"]["q_proj"], np.ndarray)
    np.testing.assert_allclose(plain.params["layers"]["q_proj"],
                               load_model(float_dir).params["layers"]["q_proj"], atol=1e-6)


def test_unsupported_quantization_configs_are_named(tiny_model_dir, tmp_path):
    packed_dir, _ = _write_quantized_folder(tiny_model_dir("llama-gqa"), str(tmp_path / "g"),
                                            "gptq")
    with pytest.raises(ModelLoadError, match="--quantization awq: .* is gptq"):
        load_model(packed_dir, quantization="awq")
    path = os.path.join(packed_dir, "config.json")
    cfg = json.load(open(path))
    for qc, words in (({"quant_method": "bitsandbytes"}, "'bitsandbytes' is not supported"),
                      ({"quant_method": "gptq", "bits": 3}, "bits=3"),
                      ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "'gemv'")):
        json.dump({**cfg, "quantization_config": qc}, open(path, "w"))
        with pytest.raises(ModelLoadError, match=words):
            load_model(packed_dir)
