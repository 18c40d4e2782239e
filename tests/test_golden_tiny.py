"""Golden tests: our functional models vs Hugging Face transformers on identical tiny weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from checkpoints.make_tiny_model import VARIANTS
from jaxserve.loading import load_model
from model_driver import SingleSequenceDriver
from pallas_kernels import native_matmul

needs_native_matmul = pytest.mark.skipif(not native_matmul.is_available(),
                                         reason="no C++ compiler for the native matmul")

PROMPTS = ["The", "The quick brown fox jumps over", "Once upon a time there was a small model",
           "def main():\n    print(\"hello world\")\n    return 42\nThe capital of France is"]


def _hf_model(path, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # compare fixed lengths, as our driver does
    model.generation_config.pad_token_id = 0
    return model


@pytest.mark.parametrize("linear", ["xla", pytest.param("native", marks=needs_native_matmul)])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prefill_logits_and_greedy_tokens_match_transformers(tiny_model_dir, variant, linear):
    path = tiny_model_dir(variant)
    loaded = load_model(path)
    assert loaded.config.architecture == VARIANTS[variant][0]
    driver = SingleSequenceDriver(loaded, packed_matrices=linear == "native")
    hf = _hf_model(path)
    for prompt in PROMPTS:
        ids = loaded.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(driver.prompt_logits(ids), ref, atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            hf_tokens = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
        assert driver.greedy(ids, 32) == hf_tokens[0, len(ids):].tolist(), prompt


def test_bfloat16_model_tracks_transformers(tiny_model_dir):
    path = tiny_model_dir("llama-gqa", "bfloat16")
    loaded = load_model(path)
    assert loaded.config.dtype == "bfloat16"
    assert loaded.params["embed"].dtype.name == "bfloat16"
    ids = loaded.tokenizer.encode(PROMPTS[2])
    ours = SingleSequenceDriver(loaded).prompt_logits(ids)
    with torch.no_grad():
        ref = _hf_model(path, torch.bfloat16)(torch.tensor([ids])).logits[0].float().numpy()
    # bf16 keeps 8 mantissa bits: both sides round differently along the way, so compare at
    # bf16 resolution of the logit scale, and require the same argmax where it is clear.
    scale = np.abs(ref).max()
    np.testing.assert_allclose(ours, ref, atol=0.05 * scale)
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.1 * scale
    assert (ours.argmax(-1)[clear] == ref.argmax(-1)[clear]).all()
