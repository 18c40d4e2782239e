"""ServerConfig: every `serve.py` flag, frozen and validated once, with errors naming the flag.

Engine-shaped fields (model, parallelism, cache sizes) are carried here unchanged for serve.py
to map onto the engine's own configs; the server itself reads only the HTTP-facing ones
(names, host/port, API key, queue bound, body limit, shutdown and health timeouts).
"""

from __future__ import annotations

import dataclasses
import re

from jaxserve.config import ConfigError  # one ConfigError for every setting

DTYPES = ("auto", "float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"float": "float32", "fp32": "float32", "half": "float16", "fp16": "float16",
                  "bf16": "bfloat16"}
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
TOOL_CALL_PARSERS = ("hermes", "llama3_json")  # server/tools.py

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'16MiB' -> 16777216, '2G' -> 2e9, '4096' -> 4096 (bytes)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a size in bytes: {text!r} (examples: 4096, 512MiB, 2GB)")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    power = "KMGT".index(unit) + 1 if unit else 0
    return int(value * (1024 if binary else 1000) ** power)


def canonical_dtype(name: str) -> str:
    return _DTYPE_ALIASES.get(name.lower(), name.lower())


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model: str | None = None  # None: the embedded default model (serve.py resolves it)
    served_model_name: tuple[str, ...] | None = None  # None: the engine's model_name
    host: str = "127.0.0.1"
    port: int = 8000
    tensor_parallel_size: int = 1
    max_model_len: int | None = None  # None: the model's own limit
    max_num_seqs: int | None = None  # None: the engine's platform default (CPU 16, GPU 256)
    max_num_batched_tokens: int | None = None  # None: the engine's default budget
    api_key: str | None = dataclasses.field(default=None, repr=False)  # never logged
    max_queued_requests: int = 1024
    seed: int = 0
    dtype: str = "auto"
    page_size: int = 16
    num_pages: int | None = None
    kv_cache_memory: int | None = None  # bytes
    gpu_memory_utilization: float = 0.9
    attention_backend: str = "auto"
    linear_backend: str = "auto"
    quantization: str | None = None  # checked by EngineConfig (QUANTIZATION_METHODS)
    quantize_embeddings: bool = False
    kv_cache_dtype: str = "auto"  # checked by CacheConfig (KV_CACHE_DTYPES)
    shutdown_timeout: float = 30.0
    max_request_body_bytes: int = 16 * 1024 * 1024
    sharding_config: str | None = None
    enable_prefix_caching: bool = True
    async_scheduling: bool = True
    coordinator_address: str | None = None  # multi-host: host:port of process 0
    num_processes: int = 1
    process_id: int = 0
    health_heartbeat_timeout: float = 30.0
    compilation_cache_dir: str | None = None  # None: the engine's default folder
    no_compilation_cache: bool = False
    uvicorn_log_level: str = "info"
    # tool calling: tool_choice "auto" parses the model's own calls with this parser
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    speculative_config: str | None = None  # JSON, as vLLM's flag (checked by EngineConfig)

    def __post_init__(self):
        if isinstance(self.served_model_name, (list, str)):
            names = ([self.served_model_name] if isinstance(self.served_model_name, str)
                     else self.served_model_name)
            object.__setattr__(self, "served_model_name", tuple(names))
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        object.__setattr__(self, "uvicorn_log_level", self.uvicorn_log_level.lower())
        self._validate()

    def _validate(self) -> None:
        def bad(flag: str, msg: str):
            raise ConfigError(f"{flag}: {msg}")

        def positive(flag: str, v, allow_none: bool = False):
            if v is None and allow_none:
                return
            if v is None or isinstance(v, bool) or v <= 0:
                bad(flag, f"must be a positive number, got {v!r}")

        if self.served_model_name is not None:
            if not self.served_model_name or any(not n for n in self.served_model_name):
                bad("--served-model-name", "names must be non-empty")
        if not self.host:
            bad("--host", "must not be empty")
        if not 0 <= self.port <= 65535:
            bad("--port", f"must be in [0, 65535], got {self.port}")
        positive("--tensor-parallel-size", self.tensor_parallel_size)
        positive("--num-processes", self.num_processes)
        if not 0 <= self.process_id < self.num_processes:
            bad("--process-id", f"must be in [0, --num-processes={self.num_processes}), "
                f"got {self.process_id}")
        if self.num_processes > 1 and not self.coordinator_address:
            bad("--coordinator-address", "is required when --num-processes > 1")
        positive("--max-model-len", self.max_model_len, allow_none=True)
        positive("--max-num-seqs", self.max_num_seqs, allow_none=True)
        positive("--max-num-batched-tokens", self.max_num_batched_tokens, allow_none=True)
        if self.api_key is not None and not self.api_key.strip():
            bad("--api-key", "must not be empty when given")
        if self.max_queued_requests < 0:
            bad("--max-queued-requests", f"must be >= 0, got {self.max_queued_requests}")
        if not 0 <= self.seed < 2**63:
            bad("--seed", f"must be in [0, 2**63), got {self.seed}")
        if self.dtype not in DTYPES:
            bad("--dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.page_size <= 0 or self.page_size & (self.page_size - 1):
            bad("--page-size", f"must be a positive power of two, got {self.page_size}")
        positive("--num-pages", self.num_pages, allow_none=True)
        positive("--kv-cache-memory", self.kv_cache_memory, allow_none=True)
        if self.num_pages is not None and self.kv_cache_memory is not None:
            bad("--num-pages", "give either --num-pages or --kv-cache-memory, not both")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            bad("--gpu-memory-utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}")
        if not self.attention_backend:
            bad("--attention-backend", "must not be empty")
        if self.shutdown_timeout < 0:
            bad("--shutdown-timeout", f"must be >= 0 seconds, got {self.shutdown_timeout}")
        if self.max_request_body_bytes < 1024:
            bad("--max-request-body-bytes", f"must be at least 1024, got "
                f"{self.max_request_body_bytes}")
        positive("--health-heartbeat-timeout", self.health_heartbeat_timeout)
        if self.compilation_cache_dir is not None and not self.compilation_cache_dir.strip():
            bad("--compilation-cache-dir", "must not be empty")
        if self.compilation_cache_dir is not None and self.no_compilation_cache:
            bad("--no-compilation-cache", "give either --compilation-cache-dir or "
                "--no-compilation-cache, not both")
        if self.uvicorn_log_level not in LOG_LEVELS:
            bad("--uvicorn-log-level", f"must be one of {', '.join(LOG_LEVELS)}")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            bad("--tool-call-parser", f"must be one of {', '.join(TOOL_CALL_PARSERS)}, got "
                f"{self.tool_call_parser!r}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            bad("--enable-auto-tool-choice", "needs --tool-call-parser")
        if self.speculative_config is not None:
            from jaxserve.config import SpeculativeConfig
            SpeculativeConfig.parse(self.speculative_config)  # a bad one fails before loading
