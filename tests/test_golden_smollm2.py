"""Golden test on the real embedded default model, SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from jaxserve.loading import load_model
from model_driver import SingleSequenceDriver
from pallas_kernels import native_matmul

needs_native_matmul = pytest.mark.skipif(not native_matmul.is_available(),
                                         reason="no C++ compiler for the native matmul")

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Here is a short poem about the sea:\n"]


@pytest.fixture(scope="module")
def smollm2(default_model_dir):
    loaded = load_model(default_model_dir, dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return loaded, hf


def test_config_is_smollm2(smollm2):
    cfg = smollm2[0].config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.vocab_size, cfg.tie_word_embeddings) == (30, 576, 9, 3, 64, 49152, True)


@pytest.mark.parametrize("linear", ["xla", pytest.param("native", marks=needs_native_matmul)])
def test_greedy_tokens_match_transformers(smollm2, linear):
    loaded, hf = smollm2
    driver = SingleSequenceDriver(loaded, max_len=64, packed_matrices=linear == "native")
    texts = []
    for prompt in PROMPTS:
        ids = loaded.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
        ours = driver.greedy(ids, 24)
        assert ours == ref[0, len(ids):].tolist(), prompt
        texts.append(loaded.tokenizer.decode(ours))
    assert "Paris" in texts[0]
