"""Which path the layers' matmuls take, and that both give the same tokens through the engine."""

from __future__ import annotations

import shutil

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.config import ConfigError, EngineConfig
from jaxserve.models.linear import PackedQuantizedStack, PackedStack
from jaxserve.runner.linear_backend import resolve_linear_backend

has_compiler = shutil.which("c++") is not None


@pytest.mark.skipif(not has_compiler, reason="no C++ compiler")
def test_native_is_the_cpu_default_for_float32_on_one_device():
    assert resolve_linear_backend(None, "cpu", "float32", 1)[0] == "native"
    assert resolve_linear_backend("native", "cpu", "float32", 1)[0] == "native"


@pytest.mark.parametrize("platform,dtype,devices,why", [
    ("gpu", "float32", 1, "CPU only"), ("cpu", "bfloat16", 1, "float32"),
    ("cpu", "float32", 2, "one device")])
def test_where_native_cannot_apply_the_default_is_xla_and_asking_is_an_error(
        platform, dtype, devices, why):
    backend, note = resolve_linear_backend(None, platform, dtype, devices)
    assert backend == "xla"
    assert (note is None) == (platform != "cpu") and (note is None or why in note)
    with pytest.raises(ConfigError, match=why):
        resolve_linear_backend("native", platform, dtype, devices)
    assert resolve_linear_backend("xla", "cpu", "float32", 1) == ("xla", None)


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="--linear-backend"):
        EngineConfig(model="x", linear_backend="fast")


@pytest.mark.skipif(not has_compiler, reason="no C++ compiler")
def test_native_and_xla_engines_give_the_same_greedy_tokens(tiny_model_dir):
    prompts = ["The quick brown fox", "Once upon a time there was", "1 2 3 4 5 6 7 8 9"]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    outputs = {}
    for backend in ("native", "xla"):
        llm = LLM(tiny_model_dir("llama-gqa"), num_pages=64, page_size=8, max_num_seqs=4,
                  max_num_batched_tokens=32, linear_backend=backend)
        runner = llm.engine.runner
        assert runner.linear_backend == backend
        packed = [w for w in runner.params["layers"].values() if isinstance(w, PackedStack)]
        assert len(packed) == (7 if backend == "native" else 0)
        outputs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert runner.compiles_since_warmup() == 0
    assert outputs["native"] == outputs["xla"]
    assert all(len(t) == 16 for t in outputs["xla"])


@pytest.mark.skipif(not has_compiler, reason="no C++ compiler")
def test_quantized_weights_take_the_native_matmul_where_they_have_a_native_form():
    backend, note = resolve_linear_backend(None, "cpu", "float32", 1, "int8")
    assert backend == "native" and "int8 codes" in note
    assert resolve_linear_backend("native", "cpu", "float32", 1, "Q4_K+Q6_K")[0] == "native"
    missing = "q_proj has float8_e4m3fn codes"
    backend, note = resolve_linear_backend(None, "cpu", "float32", 1, "fp8", missing)
    assert backend == "xla" and missing in note
    with pytest.raises(ConfigError, match="no native form"):
        resolve_linear_backend("native", "cpu", "float32", 1, "fp8", missing)
    for platform, devices in (("gpu", 1), ("cpu", 2)):
        assert resolve_linear_backend(None, platform, "float32", devices, "int8")[0] == "xla"
    backend, note = resolve_linear_backend("xla", "cpu", "float32", 1, "int8")
    assert backend == "xla" and "XLA's dots" in note


def _quantized_models(tiny_model_dir, tmp_path):
    """name -> LoadedModel: int8 and fp8 made at load, and GGUF files kept packed (Q8_0, Q4_1,
    and a Q4_K_M-like mix of K-quants and 5-bit types)."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from jaxserve.loading import load_model
    from test_gguf import _hf_tensors, write_gguf
    from test_gguf_kquants import _write_kquant_gguf
    from test_quantization import load_model_weights
    models = {"int8": load_model(tiny_model_dir("llama-gqa"), quantization="int8"),
              "fp8": load_model(tiny_model_dir("llama-gqa"), quantization="fp8"),
              "int8-emb": load_model(tiny_model_dir("qwen2"), quantization="int8",
                                     quantize_embeddings=True)}  # tied: embed only
    for qtype in (Q.Q8_0, Q.Q4_1):
        path = write_gguf(tmp_path / f"{qtype.name}.gguf", _hf_tensors(), qtype=qtype)
        models[qtype.name] = load_model_weights(path, "gguf")
    path = _write_kquant_gguf(tmp_path / "kq.gguf", np.random.default_rng(4))
    models["k-quants"] = load_model_weights(path, "gguf")
    return models


@pytest.mark.skipif(not has_compiler, reason="no C++ compiler")
def test_native_quantized_matmul_computes_what_xla_computes(tiny_model_dir, tmp_path):
    import numpy as np
    from model_driver import SingleSequenceDriver
    from test_quantization import PROMPTS
    for name, loaded in _quantized_models(tiny_model_dir, tmp_path).items():
        xla = SingleSequenceDriver(loaded, max_len=64)
        native = SingleSequenceDriver(loaded, max_len=64, packed_matrices=True)
        stacks = [w for w in native.params["layers"].values()
                  if isinstance(w, PackedQuantizedStack)]
        assert len(stacks) == 7, name
        # a packed GGUF's embedding table (and lm_head) take the panels too
        top = [k for k in ("embed", "lm_head") if isinstance(native.params.get(k),
                                                              PackedQuantizedStack)]
        assert top == {"int8": [], "fp8": [], "int8-emb": ["embed"]}.get(
            name, ["embed", "lm_head"]), name
        for p in PROMPTS[:2]:
            p = [t % 64 for t in p]  # inside every vocabulary here (the K-quant model's: 64)
            assert native.greedy(p, 6) == xla.greedy(p, 6), name
            want = xla.prompt_logits(p)
            np.testing.assert_allclose(native.prompt_logits(p), want, rtol=1e-4,
                                       atol=1e-4 * np.abs(want).max(), err_msg=name)


@pytest.mark.skipif(not has_compiler, reason="no C++ compiler")
def test_an_int8_engine_takes_the_native_matmul_with_xlas_tokens(tiny_model_dir):
    prompts = ["The quick brown fox", "1 2 3 4 5 6 7 8 9"]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outputs = {}
    for backend in (None, "xla"):
        llm = LLM(tiny_model_dir("llama-gqa"), quantization="int8", num_pages=64, page_size=8,
                  max_num_seqs=4, max_num_batched_tokens=32, linear_backend=backend)
        runner = llm.engine.runner
        assert runner.linear_backend == ("native" if backend is None else "xla")
        packed = [w for w in runner.params["layers"].values()
                  if isinstance(w, PackedQuantizedStack)]
        assert len(packed) == (7 if backend is None else 0)
        outputs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert runner.compiles_since_warmup() == 0
    assert outputs[None] == outputs["xla"]
