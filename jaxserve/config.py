"""Frozen engine configuration, built once (serve.py or LLM.__init__) and validated here.

Settings left None take a default that depends on the platform or the model; build_engine
resolves them once (EngineConfig.resolved) and every component reads the resolved config.

No jax import: the server builds these too. Messages name the flag a user would change.
"""

from __future__ import annotations

import dataclasses
import json
import os


class ConfigError(ValueError):
    """An invalid setting; the message names the flag."""


def default_compilation_cache_dir() -> str:
    """Where compiled step variants persist between starts: the user's cache folder
    ($XDG_CACHE_HOME, else ~/.cache) under jaxserve/xla."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "jaxserve", "xla")


KV_CACHE_DTYPES = ("auto", "int8", "fp8", "fp8_e4m3")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    page_size: int = 16
    num_pages: int | None = None             # fixes the pool size; overrides the budgets below
    kv_cache_memory_bytes: int | None = None  # CPU budget; default 512 MiB
    gpu_memory_utilization: float = 0.9       # fraction of device memory jaxserve may use
    enable_prefix_caching: bool = True
    # "auto" (the model's dtype), or int8 / fp8 (= fp8_e4m3): codes with a float32 scale per
    # token and KV head (pallas_kernels/kv_quant.py)
    kv_cache_dtype: str = "auto"

    def __post_init__(self):
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                              f"got {self.kv_cache_dtype!r}")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ConfigError(f"--page-size must be a power of two, got {self.page_size}")
        if self.num_pages is not None and self.num_pages < 2:
            raise ConfigError(f"--num-pages must be at least 2, got {self.num_pages}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("--gpu-memory-utilization must be in (0, 1], got "
                              f"{self.gpu_memory_utilization}")


# Batch limits when the user sets none, by platform: CPU serves small models to few clients;
# GPU follows vLLM's defaults.
PLATFORM_BATCH_DEFAULTS = {"cpu": (16, 256)}  # (max_num_seqs, max_num_batched_tokens)
ACCELERATOR_BATCH_DEFAULTS = (256, 8192)
# The context when neither the user nor the model limits it lower: long contexts cost a wider
# page table in every step, so we do not default to a model's 128k.
DEFAULT_MAX_MODEL_LEN = 2048


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int | None = None            # None: the platform's default (resolved)
    max_num_batched_tokens: int | None = None  # None: the platform's default (resolved)
    max_model_len: int | None = None  # None: the model's max_position_embeddings (capped)
    # schedule and dispatch step N+1 while step N runs on the device (engine.py)
    async_scheduling: bool = True

    def __post_init__(self):
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ConfigError(f"--max-num-seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ConfigError("--max-num-batched-tokens must be at least 1, got "
                              f"{self.max_num_batched_tokens}")
        if (self.max_num_seqs is not None and self.max_num_batched_tokens is not None
                and self.max_num_batched_tokens < self.max_num_seqs):
            raise ConfigError(f"--max-num-batched-tokens ({self.max_num_batched_tokens}) must be at "
                              f"least --max-num-seqs ({self.max_num_seqs})")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"--max-model-len must be at least 2, got {self.max_model_len}")

    @property
    def is_resolved(self) -> bool:
        return None not in (self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len)

    def resolved(self, platform: str, max_position_embeddings: int) -> "SchedulerConfig":
        """Every default filled in, once, for this platform and model."""
        seqs, tokens = PLATFORM_BATCH_DEFAULTS.get(platform, ACCELERATOR_BATCH_DEFAULTS)
        max_num_seqs = self.max_num_seqs or min(seqs, self.max_num_batched_tokens or seqs)
        return dataclasses.replace(
            self, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens or max(tokens, max_num_seqs),
            max_model_len=self.max_model_len or min(max_position_embeddings,
                                                    DEFAULT_MAX_MODEL_LEN))


# speculative decoding (engine/speculative.py): implemented methods, and vLLM's others
SPECULATIVE_METHODS = ("ngram", "draft_model")
SPECULATIVE_NOT_YET = ("eagle", "eagle3", "medusa", "mlp_speculator", "suffix")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    # no drafts in a step while this many requests run (vLLM's name): where the step is
    # compute-bound (CPUs, large batches) verifying drafts costs more than it saves
    disable_by_batch_size: int | None = None
    # draft_model: the smaller model's folder or GGUF file (same tokenizer and vocabulary)
    model: str | None = None

    def __post_init__(self):
        def bad(msg):
            raise ConfigError(f"--speculative-config: {msg}")
        if self.method in SPECULATIVE_NOT_YET:
            bad(f"method {self.method!r} is not implemented yet; implemented: "
                f"{', '.join(SPECULATIVE_METHODS)}")
        if self.method not in SPECULATIVE_METHODS:
            bad(f"unknown method {self.method!r}; implemented: {', '.join(SPECULATIVE_METHODS)}")
        if self.method == "ngram" and self.model is not None:
            bad("method ngram takes no model")
        if self.method == "draft_model" and (not isinstance(self.model, str)
                                             or not self.model.strip()):
            bad("method draft_model needs a model (the draft model's path)")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(f"{name} must be a positive integer, got {value!r}")
        if self.num_speculative_tokens > 16:
            bad(f"num_speculative_tokens can be at most 16, got {self.num_speculative_tokens}")
        if self.disable_by_batch_size is not None and (
                not isinstance(self.disable_by_batch_size, int)
                or isinstance(self.disable_by_batch_size, bool) or self.disable_by_batch_size < 1):
            bad(f"disable_by_batch_size must be a positive integer, got "
                f"{self.disable_by_batch_size!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            bad(f"prompt_lookup_min ({self.prompt_lookup_min}) must not exceed "
                f"prompt_lookup_max ({self.prompt_lookup_max})")

    @classmethod
    def parse(cls, value) -> "SpeculativeConfig | None":
        """From the flag's JSON text, a dict, or None."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ConfigError(f"--speculative-config must be a JSON object: {e}") from None
        if not isinstance(value, dict):
            raise ConfigError("--speculative-config must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(value) - known)
        if extra:
            raise ConfigError(f"--speculative-config: unknown keys {extra}")
        if "method" not in value:
            raise ConfigError("--speculative-config needs a method (implemented: "
                              f"{', '.join(SPECULATIVE_METHODS)})")
        return cls(**value)


# --quantization: int8 / fp8 quantize a float checkpoint's layer matrices at load (weight-only,
# per output channel, models/quant.py); gguf, gptq, awq name the checkpoint's own packed format
# (the default: a .gguf file's blocks and an HF folder's quantization_config are kept packed);
# none loads every weight as float
QUANTIZATION_METHODS = ("int8", "fp8", "gguf", "gptq", "awq", "none")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: str
    dtype: str | None = None              # None: the checkpoint's dtype
    seed: int = 0
    attention_backend: str | None = None  # None: the fastest correct variant for the platform
    # the layers' matmuls: "native" (CPU kernel on panel-packed float32 weights, see
    # jaxserve/models/linear.py) or "xla"; None: native where it applies, else xla
    linear_backend: str | None = None
    # weight quantization (--quantization): None keeps the checkpoint's own (a GGUF file's
    # blocks stay packed, float stays float); see QUANTIZATION_METHODS
    quantization: str | None = None
    # int8/fp8 also quantize the embedding table and lm_head (--quantize-embeddings)
    quantize_embeddings: bool = False
    tensor_parallel_size: int = 1
    sharding_config: str | None = None
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    # persistent XLA compilation cache (a second start loads every step variant from it);
    # None turns it off
    compilation_cache_dir: str | None = dataclasses.field(
        default_factory=default_compilation_cache_dir)
    speculative: SpeculativeConfig | None = None  # None: no speculative decoding

    def __post_init__(self):
        # a dict or the flag's JSON text becomes a SpeculativeConfig (validated there)
        object.__setattr__(self, "speculative", SpeculativeConfig.parse(self.speculative))
        if self.dtype not in (None, "auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quantization not in (None, *QUANTIZATION_METHODS):
            raise ConfigError(f"--quantization must be one of {', '.join(QUANTIZATION_METHODS)}"
                              f", got {self.quantization!r}")
        if self.quantize_embeddings and self.quantization not in ("int8", "fp8"):
            raise ConfigError("--quantize-embeddings needs --quantization int8 or fp8 (a packed "
                              "checkpoint keeps its own embedding format), got "
                              f"{self.quantization or 'none given'}")
        if self.linear_backend not in (None, "auto", "native", "xla"):
            raise ConfigError(f"--linear-backend must be auto, native or xla, got "
                              f"{self.linear_backend!r}")
        if self.compilation_cache_dir is not None and not self.compilation_cache_dir.strip():
            raise ConfigError("--compilation-cache-dir must not be empty (use "
                              "--no-compilation-cache to turn the cache off)")
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"--tensor-parallel-size must be at least 1, got {self.tensor_parallel_size}")

    def resolved(self, platform: str, max_position_embeddings: int) -> "EngineConfig":
        """This config with every platform and model default filled in (see SchedulerConfig)."""
        return dataclasses.replace(
            self, scheduler=self.scheduler.resolved(platform, max_position_embeddings))
