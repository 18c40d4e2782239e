"""Functional models by Hugging Face architecture name.

Every supported architecture shares the Llama-family forward (jaxserve.models.llama); the
classes give each a name users recognise and a place for family-specific behaviour.
"""

from __future__ import annotations

import functools

from jaxserve.models import llama
from jaxserve.models.batch import ForwardBatch, KVCache
from jaxserve.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, ModelConfigError


class LlamaForCausalLM:
    """forward(params, kv_cache, batch) -> (kv_cache, logits f32[N, V]); pure, jit-able."""

    def __init__(self, config: ModelConfig, attention_fn: llama.AttentionFn):
        self.config = config
        self.attention_fn = attention_fn
        self.forward = functools.partial(llama.forward, cfg=config, attention_fn=attention_fn)

    def param_shapes(self) -> dict:
        return llama.param_shapes(self.config)


class MistralForCausalLM(LlamaForCausalLM):
    """Llama with an optional sliding attention window (config.sliding_window)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with q/k/v projection biases."""


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Llama with per-head RMSNorm of q and k before rotary embedding."""


MODEL_REGISTRY = {cls.__name__: cls for cls in
                  (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)}
assert set(MODEL_REGISTRY) == set(SUPPORTED_ARCHITECTURES)


def build_model(config: ModelConfig, attention_fn: llama.AttentionFn) -> LlamaForCausalLM:
    return MODEL_REGISTRY[config.architecture](config, attention_fn)


__all__ = ["ForwardBatch", "KVCache", "ModelConfig", "ModelConfigError", "build_model",
           "MODEL_REGISTRY", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
           "Qwen3ForCausalLM"]
