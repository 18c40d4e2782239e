"""Frozen engine configuration, built once (serve.py or LLM.__init__) and validated here.

Settings left None take a default that depends on the platform or the model; build_engine
resolves them once (EngineConfig.resolved) and every component reads the resolved config.

No jax import: the server builds these too. Messages name the flag a user would change.
"""

from __future__ import annotations

import dataclasses
import os


class ConfigError(ValueError):
    """An invalid setting; the message names the flag."""


def default_compilation_cache_dir() -> str:
    """Where compiled step variants persist between starts: the user's cache folder
    ($XDG_CACHE_HOME, else ~/.cache) under jaxserve/xla."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "jaxserve", "xla")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    page_size: int = 16
    num_pages: int | None = None             # fixes the pool size; overrides the budgets below
    kv_cache_memory_bytes: int | None = None  # CPU budget; default 512 MiB
    gpu_memory_utilization: float = 0.9       # fraction of device memory jaxserve may use
    enable_prefix_caching: bool = True

    def __post_init__(self):
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


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: str
    dtype: str | None = None              # None: the checkpoint's dtype
    seed: int = 0
    attention_backend: str | None = None  # None: the fastest correct variant for the platform
    # the layers' matmuls: "native" (CPU kernel on panel-packed float32 weights, see
    # jaxserve/models/linear.py) or "xla"; None: native where it applies, else xla
    linear_backend: str | None = None
    tensor_parallel_size: int = 1
    sharding_config: str | None = None
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    # persistent XLA compilation cache (a second start loads every step variant from it);
    # None turns it off
    compilation_cache_dir: str | None = dataclasses.field(
        default_factory=default_compilation_cache_dir)

    def __post_init__(self):
        if self.dtype not in (None, "auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
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
