"""Which path the layers' matmuls take, and that both give the same tokens through the engine."""

from __future__ import annotations

import shutil

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.config import ConfigError, EngineConfig
from jaxserve.models.linear import PackedStack
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
