"""jaxserve's OpenAI-compatible server: `python serve.py --model PATH` (no --model: SmolLM2).

Thin on purpose: flags -> frozen configs -> engine -> uvicorn. See `python serve.py --help`.
"""

from __future__ import annotations

import dataclasses
import os
import sys


def engine_config_from(server_config):
    """Map the HTTP server's flags onto the engine's frozen configs."""
    from jaxserve.config import (CacheConfig, EngineConfig, SchedulerConfig,
                                 default_compilation_cache_dir)

    backend = None if server_config.attention_backend in (None, "auto") else server_config.attention_backend
    cache_dir = (None if server_config.no_compilation_cache
                 else server_config.compilation_cache_dir or default_compilation_cache_dir())
    return EngineConfig(
        compilation_cache_dir=cache_dir,
        model=server_config.model, dtype=server_config.dtype, seed=server_config.seed,
        attention_backend=backend, linear_backend=server_config.linear_backend,
        quantization=server_config.quantization,
        quantize_embeddings=server_config.quantize_embeddings,
        speculative=server_config.speculative_config,
        tensor_parallel_size=server_config.tensor_parallel_size,
        sharding_config=server_config.sharding_config,
        cache=CacheConfig(page_size=server_config.page_size, num_pages=server_config.num_pages,
                          kv_cache_memory_bytes=server_config.kv_cache_memory,
                          gpu_memory_utilization=server_config.gpu_memory_utilization,
                          enable_prefix_caching=server_config.enable_prefix_caching,
                          kv_cache_dtype=server_config.kv_cache_dtype),
        # limits left None take the platform's defaults, resolved once by build_engine
        scheduler=SchedulerConfig(max_num_seqs=server_config.max_num_seqs,
                                  max_num_batched_tokens=server_config.max_num_batched_tokens,
                                  max_model_len=server_config.max_model_len,
                                  async_scheduling=server_config.async_scheduling))


def main(argv=None) -> None:
    from jaxserve.server.cli import parse_server_config, run_server

    config = parse_server_config(argv)
    if config.model is None:
        from checkpoints.default_model import ensure_default_model
        config = dataclasses.replace(config, model=ensure_default_model())

    multi_host = config.num_processes > 1
    if multi_host:
        from jaxserve.parallel import initialize_distributed
        initialize_distributed(config.coordinator_address, config.num_processes, config.process_id)

    if multi_host and config.process_id != 0:
        # followers hold their shards and run each step process 0 announces, warm-up included
        from jaxserve.llm import build_engine
        from jaxserve.parallel import follower_loop
        follower_loop(build_engine(engine_config_from(config), warmup=False).runner)
        return

    def engine_factory():
        from jaxserve.engine.async_engine import AsyncEngine
        from jaxserve.llm import build_engine

        engine = build_engine(engine_config_from(config))
        name = os.path.basename(os.path.normpath(config.model))
        return AsyncEngine(engine, model_name=name)

    from jaxserve.config import ConfigError
    try:
        run_server(engine_factory, config)
    except ConfigError as e:  # a setting the model or the devices cannot take: no traceback
        raise SystemExit(f"jaxserve: error: {e}") from None
    finally:
        if multi_host:
            from jaxserve.parallel import stop_followers
            stop_followers()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
