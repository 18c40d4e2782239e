"""ModelConfig: the architecture facts the forward pass needs, read from a HF config.json.

Built once at load time (from a folder's config.json or from GGUF metadata) and frozen; every
model function takes it as a static argument, so it must be hashable.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# HF `architectures` value -> the flags that distinguish the family.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": dict(attention_bias=False, qk_norm=False),
    "MistralForCausalLM": dict(attention_bias=False, qk_norm=False),
    "Qwen2ForCausalLM": dict(attention_bias=True, qk_norm=False),
    "Qwen3ForCausalLM": dict(attention_bias=False, qk_norm=True),
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ModelConfigError(ValueError):
    """A config.json (or GGUF metadata) that describes a model we cannot run."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    dtype: str = "float32"  # "float32" | "bfloat16" | "float16": the compute and weight dtype
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ModelConfigError(f"unsupported dtype {self.dtype!r}; use float32, bfloat16 or float16")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "config.json",
                     dtype: str | None = None) -> "ModelConfig":
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelConfigError(
                f"{source}: unsupported architecture {archs or '(none given)'}; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        family = SUPPORTED_ARCHITECTURES[arch]
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ModelConfigError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
        if hf.get("mlp_bias"):
            raise ModelConfigError(f"{source}: mlp_bias=true is not supported")

        def need(key):
            if key not in hf:
                raise ModelConfigError(f"{source}: missing required field {key!r}")
            return hf[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        head_dim = int(hf.get("head_dim") or hidden // heads)
        rope_theta = float(hf.get("rope_theta") or
                           (hf.get("rope_parameters") or {}).get("rope_theta") or 10000.0)
        rope = _parse_rope_scaling(hf, source)
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        if dtype is None:
            dtype = {"bfloat16": "bfloat16", "float16": "float16"}.get(
                str(hf.get("torch_dtype") or hf.get("dtype") or "float32"), "float32")
        return cls(
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", family["attention_bias"])),
            qk_norm=family["qk_norm"],
            sliding_window=int(window) if window else None,
            dtype=dtype,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_folder(cls, folder: str, dtype: str | None = None) -> "ModelConfig":
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise ModelConfigError(f"{folder}: no config.json in this folder")
        try:
            with open(path) as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(hf, source=path, dtype=dtype)


def _parse_rope_scaling(hf: dict, source: str) -> RopeScaling:
    # transformers 5 moved rope settings into `rope_parameters`; older configs use `rope_scaling`.
    rs = hf.get("rope_scaling") or hf.get("rope_parameters") or None
    if not rs:
        return RopeScaling()
    rope_type = rs.get("rope_type") or rs.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelConfigError(
            f"{source}: unsupported rope_scaling type {rope_type!r}; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    return RopeScaling(
        rope_type=rope_type,
        factor=float(rs.get("factor", 1.0)),
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
    )
