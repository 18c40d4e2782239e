"""GGUF loading: synthetic files written with the `gguf` package, and the real SmolLM2 file.

Synthetic files check dequantization against the originals within each format's error bound,
llama.cpp's q/k row permutation being undone, the config built from metadata, and that bad
files (unsupported or unknown types, truncation, odd metadata) fail with a GGUFError naming the
file and the field. The real file is compared with transformers' own GGUF loader, tensor by
tensor. The tokenizers built from GGUF metadata are checked in test_gguf_tokenizer.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import quantize

from jaxserve.loading import ModelLoadError
from jaxserve.loading.gguf import GGUFError, load_gguf

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB, LAYERS = 64, 4, 2, 128, 96, 2


def _permute(w, n_head):
    # what llama.cpp's convert_hf_to_gguf does to llama q/k rows (written here independently)
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, dim, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_tensors(arch="llama", head_dim=16, tied=False, seed=0):
    rng = np.random.default_rng(seed)
    t = {"model.embed_tokens.weight": rng.normal(size=(VOCAB, HIDDEN)),
         "model.norm.weight": 1 + 0.1 * rng.normal(size=HIDDEN)}
    if not tied:
        t["lm_head.weight"] = rng.normal(size=(VOCAB, HIDDEN))
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=HIDDEN)
        t[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=HIDDEN)
        for name, rows in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
            t[p + f"self_attn.{name}_proj.weight"] = rng.normal(size=(rows * head_dim, HIDDEN))
            if arch == "qwen2":
                t[p + f"self_attn.{name}_proj.bias"] = rng.normal(size=rows * head_dim)
        if arch == "qwen3":
            t[p + "self_attn.q_norm.weight"] = 1 + 0.1 * rng.normal(size=head_dim)
            t[p + "self_attn.k_norm.weight"] = 1 + 0.1 * rng.normal(size=head_dim)
        t[p + "self_attn.o_proj.weight"] = rng.normal(size=(HIDDEN, HEADS * head_dim))
        t[p + "mlp.gate_proj.weight"] = rng.normal(size=(FFN, HIDDEN))
        t[p + "mlp.up_proj.weight"] = rng.normal(size=(FFN, HIDDEN))
        t[p + "mlp.down_proj.weight"] = rng.normal(size=(HIDDEN, FFN))
    return {k: v.astype(np.float32) for k, v in t.items()}


_TO_GGUF = [("model.embed_tokens", "token_embd"), ("model.norm", "output_norm"),
            ("lm_head", "output"), ("model.layers.", "blk."), ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "ffn_norm"), ("self_attn.o_proj", "attn_output"),
            ("self_attn.q_norm", "attn_q_norm"), ("self_attn.k_norm", "attn_k_norm"),
            ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"), ("mlp.gate_proj", "ffn_gate"),
            ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")]


def write_gguf(path, tensors, arch="llama", qtype=Q.F32, head_dim=16, meta=None, extra=None):
    """Write HF-named tensors as a GGUF file the way llama.cpp's converter lays them out."""
    w = GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    for key, value in (meta or {}).items():
        (w.add_string if isinstance(value, str) else w.add_float32)(key, value)
    for name, t in tensors.items():
        g = name
        for a, b in _TO_GGUF:
            g = g.replace(a, b)
        if arch == "llama" and (".attn_q." in g or ".attn_k." in g):
            t = _permute(t, HEADS if ".attn_q." in g else KV_HEADS)
        if t.ndim == 1 or qtype == Q.F32:   # llama.cpp keeps norms and biases in F32
            w.add_tensor(g, t)
        elif qtype == Q.F16:
            w.add_tensor(g, t.astype(np.float16))
        else:
            w.add_tensor(g, quantize(t, qtype), raw_dtype=qtype)
    for g, t in (extra or {}).items():
        w.add_tensor(g, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _error_bound(x, qtype):
    """Per-element bound on |dequant(quant(x)) - x|, from each format's block scheme."""
    if qtype == Q.F32:
        return np.zeros_like(x)
    if qtype in (Q.F16, Q.BF16):
        return np.abs(x) * (2.0 ** -11 if qtype == Q.F16 else 2.0 ** -8) + 1e-7
    blocks = x.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    if qtype == Q.Q8_0:       # scale amax/127, half a step of rounding, f16 scale
        b = amax / 127 * 0.5 + amax * 2.0 ** -10
    elif qtype == Q.Q4_0:     # scale amax/8; the far end is clipped by one whole step
        b = amax / 8 + amax * 2.0 ** -9
    else:                     # Q4_1: scale (max-min)/15, half a step, f16 scale and min
        span = blocks.max(axis=1, keepdims=True) - blocks.min(axis=1, keepdims=True)
        b = span / 15 * 0.5 + amax * 2.0 ** -9
    return np.broadcast_to(b, blocks.shape).reshape(x.shape)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1],
                         ids=lambda q: q.name)
def test_dequantize_within_error_bound(tmp_path, qtype):
    hf = _hf_tensors()
    g = load_gguf(write_gguf(tmp_path / "m.gguf", hf, qtype=qtype), tokenizer=False)
    assert set(g.tensors) == set(hf)
    for name, want in hf.items():
        got = g.tensors[name]
        assert got.dtype == np.float32 and got.shape == want.shape, name
        bound = _error_bound(want, qtype if want.ndim == 2 else Q.F32)
        assert np.all(np.abs(got - want) <= bound), (name, np.abs(got - want).max())
        if qtype in (Q.Q4_0, Q.Q4_1) and want.ndim == 2:
            assert not np.array_equal(got, want)   # it really was quantized


@pytest.mark.parametrize("arch,head_dim,tied", [("llama", 16, False), ("llama", 32, True),
                                                ("qwen2", 16, True), ("qwen3", 32, False)])
def test_config_and_unpermuted_tensors(tmp_path, arch, head_dim, tied):
    hf = _hf_tensors(arch, head_dim, tied)
    g = load_gguf(write_gguf(tmp_path / "m.gguf", hf, arch, head_dim=head_dim), tokenizer=False)
    for name, want in hf.items():   # exact: F32, and q/k rows back in HF order
        np.testing.assert_array_equal(g.tensors[name], want, err_msg=name)
    c = g.config
    assert c.architecture == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                              "qwen3": "Qwen3ForCausalLM"}[arch]
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
            c.intermediate_size, c.vocab_size) == (LAYERS, HIDDEN, HEADS, KV_HEADS, head_dim,
                                                   FFN, VOCAB)
    assert c.tie_word_embeddings == tied and c.rms_norm_eps == 1e-5 and c.rope_theta == 5e5
    assert c.attention_bias == (arch == "qwen2") and c.qk_norm == (arch == "qwen3")


def test_tensors_match_transformers_gguf_loader(tmp_path):
    """transformers' own GGUF code maps names and undoes the permutation the same way."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    for arch in ("llama", "qwen2"):
        hf = _hf_tensors(arch, tied=arch == "qwen2")
        path = write_gguf(tmp_path / f"{arch}.gguf", hf, arch, qtype=Q.Q8_0)
        ours = load_gguf(path, tokenizer=False)
        cfg = AutoConfig.from_pretrained(str(tmp_path), gguf_file=f"{arch}.gguf")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        ref = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
        assert set(ref) == set(ours.tensors)
        for name, t in ref.items():
            np.testing.assert_array_equal(ours.tensors[name], t.numpy(), err_msg=name)


def test_rope_scaling_from_metadata_and_llama3_rope_freqs(tmp_path):
    hf = _hf_tensors()
    linear = load_gguf(write_gguf(tmp_path / "lin.gguf", hf, meta={
        "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}), tokenizer=False)
    assert linear.hf_config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert linear.config.rope_scaling.rope_type == "linear"

    # rope_freqs as llama.cpp's converter writes it for Llama 3.1 (factor 8, 1/4, ctx 8192)
    inv = 1.0 / 500000.0 ** (np.arange(0, 16, 2) / 16)
    factors = []
    for wavelen in 2 * np.pi / inv:
        if wavelen < 8192 / 4:
            factors.append(1.0)
        elif wavelen > 8192 / 1:
            factors.append(8.0)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            factors.append(1 / ((1 - smooth) / 8 + smooth))
    freqs = np.array(factors, np.float32)
    assert 1.0 in factors and 8.0 in factors and len(set(factors)) > 2   # all three regimes
    g = load_gguf(write_gguf(tmp_path / "l3.gguf", hf, extra={"rope_freqs.weight": freqs}),
                  tokenizer=False)
    assert g.hf_config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in g.tensors and g.config.rope_scaling.rope_type == "llama3"
    with pytest.raises(GGUFError, match="rope_freqs.weight"):
        load_gguf(write_gguf(tmp_path / "bad.gguf", hf, extra={"rope_freqs.weight": freqs[::-1]}),
                  tokenizer=False)


def _patch_type_id(path, tensor_name, type_id):
    """Overwrite the ggml type id in one tensor's info record (after name, n_dims, dims)."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    at = data.index(tensor_name.encode()) + len(tensor_name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    at += 4 + 8 * n_dims
    data[at:at + 4] = type_id.to_bytes(4, "little")
    with open(path, "wb") as f:
        f.write(bytes(data))


def test_unsupported_and_unknown_types_are_named(tmp_path):
    # a real IQ4_NL tensor (an i-quant, not read by jaxserve; written as raw blocks)
    w_path = tmp_path / "k.gguf"
    w = GGUFWriter(str(w_path), "llama")
    w.add_tensor("blk.0.ffn_down.weight", np.zeros((4, 18), np.uint8), raw_dtype=Q.IQ4_NL)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(GGUFError, match=r"blk\.0\.ffn_down\.weight.*IQ4_NL.*Q4_K"):
        load_gguf(w_path, tokenizer=False)
    path = write_gguf(tmp_path / "m.gguf", _hf_tensors())
    _patch_type_id(path, "blk.1.attn_v.weight", 99)
    with pytest.raises(GGUFError, match=r"blk\.1\.attn_v\.weight.*unknown type id 99"):
        load_gguf(path, tokenizer=False)


def test_truncated_and_corrupt_files(tmp_path):
    src = write_gguf(tmp_path / "full.gguf", _hf_tensors(), qtype=Q.Q4_0)
    with open(src, "rb") as f:
        data = f.read()
    cut_points = {"tensor data": len(data) - 100, "metadata": 60,
                  "tensor infos": data.index(b"blk.1.ffn_up.weight") + 4}
    for where, cut in cut_points.items():
        path = tmp_path / f"cut-{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(GGUFError, match="truncated file") as e:
            load_gguf(path, tokenizer=False)
        assert str(path) in str(e.value), where
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04 not a gguf at all")
    (tmp_path / "empty.gguf").write_bytes(b"")
    for name in ("junk.gguf", "empty.gguf"):
        with pytest.raises(GGUFError, match="not a GGUF file"):
            load_gguf(tmp_path / name, tokenizer=False)
    with pytest.raises(GGUFError, match="no such file"):
        load_gguf(tmp_path / "missing.gguf")


def test_bad_metadata_and_names_are_clear(tmp_path):
    hf = _hf_tensors()
    with pytest.raises(GGUFError, match="'general.architecture' is 'gpt2'"):
        load_gguf(write_gguf(tmp_path / "a.gguf", hf, arch="gpt2"), tokenizer=False)
    with pytest.raises(GGUFError, match="'mystery.weight' has no Hugging Face counterpart"):
        extra = {"mystery.weight": np.ones(4, np.float32)}
        load_gguf(write_gguf(tmp_path / "b.gguf", hf, extra=extra), tokenizer=False)
    with pytest.raises(GGUFError, match="rope.scaling.type = 'yarn'"):
        load_gguf(write_gguf(tmp_path / "c.gguf", hf, meta={"llama.rope.scaling.type": "yarn"}),
                  tokenizer=False)
    with pytest.raises(GGUFError, match="no tokenizer in this file"):
        load_gguf(write_gguf(tmp_path / "d.gguf", hf))
    w = GGUFWriter(str(tmp_path / "e.gguf"), "llama")   # no hyperparameters at all
    w.add_tensor("token_embd.weight", hf["model.embed_tokens.weight"])
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(GGUFError, match="missing metadata field 'llama.embedding_length'"):
        load_gguf(tmp_path / "e.gguf", tokenizer=False)
    # the engine's entry point turns every loading problem into one ValueError subclass
    from jaxserve.loading import load_model
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        load_model(str(tmp_path / "d.gguf"))
    assert issubclass(GGUFError, ValueError)


# ---- the real default model: SmolLM2-135M-Instruct, Q4_1 with a Q8_0 embedding ----------------

@pytest.fixture(scope="module")
def smollm2_gguf(default_model_dir):
    path = os.path.join(default_model_dir, "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path, load_gguf(path)


@pytest.mark.slow
def test_smollm2_tensors_equal_transformers_gguf_state_dict(smollm2_gguf):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path, ours = smollm2_gguf
    # `from_pretrained(gguf_file=)` needs accelerate; the converter itself does not: it only
    # wants a module tree for its name map, built here on the meta device (no memory, no init).
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**ours.hf_config))
    parsed = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)
    ref, cfg = parsed["tensors"], parsed["config"]
    assert set(ref) == set(ours.tensors) and len(ref) == 272
    for hf_name in ref:   # all 272; q_proj/k_proj included (llama.cpp permutation undone)
        np.testing.assert_allclose(ours.tensors[hf_name], ref[hf_name].numpy(), rtol=0,
                                   atol=1e-6, err_msg=hf_name)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
                "head_dim", "rope_theta"):
        assert ours.hf_config[key] == cfg[key], key
    assert ours.hf_config["rms_norm_eps"] == pytest.approx(cfg["rms_norm_eps"]) == 1e-5


@pytest.mark.slow
def test_default_model_folder_is_a_working_hf_checkpoint(default_model_dir, smollm2_gguf):
    import json

    from safetensors.numpy import load_file

    from checkpoints.default_model import ensure_default_model, verify_with_transformers

    assert ensure_default_model() == default_model_dir   # idempotent: found, not rebuilt
    _, ours = smollm2_gguf
    with open(os.path.join(default_model_dir, "config.json")) as f:
        assert json.load(f) == ours.hf_config
    with open(os.path.join(default_model_dir, "tokenizer_config.json")) as f:
        assert "<|im_start|>" in json.load(f)["chat_template"]
    saved = load_file(os.path.join(default_model_dir, "model.safetensors"))
    assert set(saved) == set(ours.tensors)
    for name in ("model.embed_tokens.weight", "model.layers.7.self_attn.q_proj.weight",
                 "model.layers.7.self_attn.k_proj.weight", "model.norm.weight"):
        np.testing.assert_array_equal(saved[name], ours.tensors[name])
    # the chat reply is generated by `python checkpoints/default_model.py --verify`; here only
    # the completion, to keep this file fast (a forward of this model takes ~0.3 s on CI CPUs)
    completion, _ = verify_with_transformers(default_model_dir, max_new_tokens=3, chat=False)
    assert "Paris" in completion
