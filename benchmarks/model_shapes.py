"""Built-in model shapes for benchmarks, and random weights at those shapes made on the device.

Benchmarks of an 8B model must not need its checkpoint (no model hub is reachable here, and
speed does not depend on the values of the weights), so throughput.py builds the engine from a
ModelConfig plus random parameters drawn with jax.random directly on the accelerator: no host
copy of 16 GB, no temp folder. Output lengths are fixed with ignore_eos, as vLLM's CI does.

The configs are written as Hugging Face config.json dicts and parsed by ModelConfig.from_hf_dict,
so they go through the same validation as a real checkpoint, and `hf_config_dict` can hand the
same dict to transformers (the --compare-transformers path for small configs).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from jaxserve.models.config import ModelConfig  # noqa: E402
from jaxserve.models.llama import param_shapes  # noqa: E402

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# name -> HF config.json fields (published configs of the real models; weights not needed)
BUILTIN_HF_CONFIGS: dict[str, dict] = {
    "llama3-8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
        torch_dtype="bfloat16"),
    "qwen2.5-7b": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=152064,
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=32768, use_sliding_window=False,
        tie_word_embeddings=False, attention_bias=True, bos_token_id=151643,
        eos_token_id=151645, torch_dtype="bfloat16"),
    "smollm2-135m": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152,
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16"),
    # the smoke-test shape: the tiny test tokenizer's vocabulary, seconds to compile on CPU
    "tiny": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=384,
        hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=2, torch_dtype="float32"),
}


def builtin_names() -> list[str]:
    return sorted(BUILTIN_HF_CONFIGS)


def hf_config_dict(name: str) -> dict:
    if name not in BUILTIN_HF_CONFIGS:
        raise ValueError(f"unknown --model-config {name!r}; built-in: {', '.join(builtin_names())}")
    return dict(BUILTIN_HF_CONFIGS[name])


def builtin_config(name: str, dtype: str | None = None) -> ModelConfig:
    """The ModelConfig of a built-in shape; `dtype` overrides its default (bf16; tiny: f32)."""
    return ModelConfig.from_hf_dict(hf_config_dict(name), source=f"built-in {name}", dtype=dtype)


def resolve_config(model_config: str | None, model_path: str | None,
                   dtype: str | None = None) -> ModelConfig:
    """A built-in name, or the config.json of a HF folder (checkpoint weights are not read)."""
    if model_config:
        return builtin_config(model_config, dtype)
    if model_path and os.path.isdir(model_path):
        return ModelConfig.from_folder(model_path, dtype=dtype)
    raise ValueError("give --model-config NAME or --model PATH (a Hugging Face folder)")


# -- sizes (used by the roofline) ----------------------------------------------------------------

def itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def leaf_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter count per top-level group: embed, lm_head (0 when tied), layers, final_norm."""
    shapes = param_shapes(cfg)
    return {
        "embed": math.prod(shapes["embed"]),
        "lm_head": math.prod(shapes["lm_head"]) if "lm_head" in shapes else 0,
        "final_norm": math.prod(shapes["final_norm"]),
        "layers": sum(math.prod(s) for s in shapes["layers"].values()),
    }


def num_params(cfg: ModelConfig) -> int:
    return sum(leaf_counts(cfg).values())


def kv_bytes_per_token(cfg: ModelConfig, dtype: str | None = None) -> int:
    """K and V of every layer for one token (the cache has the weights' dtype)."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize(dtype or cfg.dtype)


# -- random weights on the device ----------------------------------------------------------------

@dataclasses.dataclass
class RandomModel:
    """Quacks like jaxserve.loading.LoadedModel, so ModelRunner takes it unchanged."""
    config: ModelConfig
    params: dict      # jax arrays, already on the default device
    tokenizer: object
    source: str


@functools.lru_cache(maxsize=None)
def _sampler(shape: tuple[int, ...], dtype: str, kind: str):
    import jax
    import jax.numpy as jnp

    def make(key):
        if kind == "ones":  # norms: a real model's norm weights sit near 1
            return jnp.ones(shape, dtype)
        # std 0.02 (HF's initializer_range); drawn directly in the target dtype, so a bf16
        # [32, 4096, 14336] leaf never needs an f32 copy next to it
        return jax.random.normal(key, shape, dtype) * jnp.asarray(0.02, dtype)
    return jax.jit(make)


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """A param pytree of cfg's shapes, every leaf drawn on the default device."""
    import jax

    shapes = param_shapes(cfg)
    key = jax.random.PRNGKey(seed)

    def draw(name, shape):
        nonlocal key
        key, sub = jax.random.split(key)
        kind = "ones" if name.endswith("norm") else "normal"
        return _sampler(tuple(shape), cfg.dtype, kind)(sub)

    params = {k: draw(k, v) for k, v in shapes.items() if k != "layers"}
    params["layers"] = {k: draw(k, v) for k, v in shapes["layers"].items()}
    jax.block_until_ready(params)
    return params


def random_model(cfg: ModelConfig, seed: int = 0) -> RandomModel:
    """Random weights plus the tiny test tokenizer: prompts are token ids, and ids it does not
    know decode to nothing, so detokenization still runs (and costs what it costs)."""
    from checkpoints.make_tiny_model import train_tokenizer

    return RandomModel(cfg, random_params(cfg, seed), train_tokenizer(), f"random:{seed}")


def torch_model_from_config(cfg: ModelConfig, seed: int = 0):
    """A transformers model with random weights at cfg's shapes (CPU, small configs only) and our
    param pytree holding the same weights, converted with the loader's own name mapping."""
    import torch
    import transformers

    from jaxserve.models.hf_names import params_from_hf

    hf = {"architectures": [cfg.architecture], "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
          "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
          "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
          "max_position_embeddings": cfg.max_position_embeddings,
          "tie_word_embeddings": cfg.tie_word_embeddings, "initializer_range": 0.02,
          "eos_token_id": list(cfg.eos_token_ids) or None, "bos_token_id": cfg.bos_token_id}
    if cfg.rope_scaling.rope_type != "default":
        hf["rope_scaling"] = dataclasses.asdict(cfg.rope_scaling)
    if cfg.architecture == "Qwen2ForCausalLM":
        hf["use_sliding_window"] = False
    config_cls = getattr(transformers, cfg.architecture.replace("ForCausalLM", "Config"))
    hf_cfg = config_cls(**{k: v for k, v in hf.items() if k != "architectures"},
                        architectures=hf["architectures"])
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, cfg.dtype)
    model = getattr(transformers, cfg.architecture)(hf_cfg).to(torch_dtype).eval()
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    params = params_from_hf(cfg, lambda name: state.get(name), "transformers random init")
    return model, params
