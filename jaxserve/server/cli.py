"""Command line of the server (vLLM's flag names) and the uvicorn launcher.

serve.py does: `config = parse_server_config()`, then
`run_server(lambda: <load model, build AsyncEngine>, config)`. Engine construction stays in
serve.py; this module never imports jax.

Shutdown: on SIGTERM (or Ctrl-C) the server stops accepting connections, /health and new
requests answer 503, in-flight requests get up to --shutdown-timeout seconds to finish, the rest
are cancelled (which aborts them in the engine), the engine is shut down, and the process
exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import threading
from typing import Any, Callable, Sequence

import uvicorn

from jaxserve.config import KV_CACHE_DTYPES, QUANTIZATION_METHODS
from jaxserve.server.config import (DTYPES, LOG_LEVELS, TOOL_CALL_PARSERS, ConfigError,
                                    ServerConfig, parse_size)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="serve.py", description="jaxserve: OpenAI-compatible LLM server in JAX.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = ServerConfig()
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, help="HF folder, .gguf file or orbax checkpoint; "
                   "omitted: the embedded default model (SmolLM2-135M-Instruct).")
    m.add_argument("--served-model-name", nargs="+", default=None, help="Name(s) clients use "
                   "in `model`; the first is reported in responses. Default: the model's name.")
    m.add_argument("--dtype", default=d.dtype, help=f"Weights/activations dtype: "
                   f"{', '.join(DTYPES)} (aliases half, float, bf16, fp16, fp32).")
    m.add_argument("--quantization", "-q", choices=QUANTIZATION_METHODS, default=None,
                   help="Weight quantization: int8 / fp8 (weight-only, per output channel, "
                   "made at load from float weights), gguf (a GGUF file's blocks, Q4_0..Q8_0 "
                   "and the K-quants, kept packed: the default for .gguf), gptq / awq (an "
                   "HF folder's quantization_config), none (dequantize at load). "
                   "Default: the checkpoint's own.")
    m.add_argument("--quantize-embeddings", action="store_true",
                   help="With --quantization int8 or fp8: also quantize the embedding table "
                   "and lm_head (one scale per vocabulary entry); by default they stay float.")
    m.add_argument("--max-model-len", type=int, default=None,
                   help="Context length (prompt + output). Default: the model's limit.")
    m.add_argument("--seed", type=int, default=d.seed, help="Seed of the sampling RNG.")
    e = p.add_argument_group("engine")
    e.add_argument("--tensor-parallel-size", "-tp", type=int, default=d.tensor_parallel_size,
                   help="Devices to shard the model over (tensor parallelism).")
    e.add_argument("--sharding-config", default=None,
                   help="Logical-axis -> mesh-axis rule table (file or preset name).")
    e.add_argument("--max-num-seqs", type=int, default=None,
                   help="Most sequences in one running batch (default: 16 on CPU, 256 on GPU).")
    e.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="Token budget of one engine step (prefill chunks + decodes).")
    e.add_argument("--page-size", "--block-size", type=int, default=d.page_size,
                   help="Tokens per KV-cache page (power of two).")
    kv = e.add_mutually_exclusive_group()
    kv.add_argument("--num-pages", type=int, default=None, help="KV-cache pages to allocate.")
    kv.add_argument("--kv-cache-memory", "--kv-cache-memory-bytes", type=parse_size,
                    default=None, help="KV-cache size in bytes (e.g. 8GiB); instead of "
                    "--num-pages.")
    e.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=d.kv_cache_dtype,
                   help="KV cache storage: auto (the model's dtype), int8 or fp8 (e4m3; "
                   "fp8_e4m3 is the same): one byte per value and a float32 scale per token "
                   "and KV head, about twice the tokens of a bfloat16 cache in the same memory.")
    e.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                   help="Fraction of device memory for weights + KV cache, when neither "
                   "--num-pages nor --kv-cache-memory is given.")
    e.add_argument("--attention-backend", default=d.attention_backend,
                   help="Paged-attention kernel variant ('auto' picks per device).")
    e.add_argument("--linear-backend", choices=("auto", "native", "xla"),
                   default=d.linear_backend, help="The layers' matmuls: 'native' (a CPU kernel "
                   "reading float32 weights in place, single device) or 'xla'; 'auto' picks "
                   "native where it applies.")
    e.add_argument("--speculative-config", default=None,
                   help="Speculative decoding, as JSON: {\"method\": \"ngram\", "
                   "\"num_speculative_tokens\": 3, \"prompt_lookup_min\": 1, "
                   "\"prompt_lookup_max\": 4}. Steps run synchronously with it.")
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=d.enable_prefix_caching, help="Reuse KV pages of shared prefixes.")
    e.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                   default=d.async_scheduling, help="Prepare and dispatch the next step while "
                   "the device runs the current one.")
    cc = e.add_mutually_exclusive_group()
    cc.add_argument("--compilation-cache-dir", default=None,
                    help="Folder of the persistent XLA compilation cache: a second start "
                    "loads the compiled step variants instead of compiling them. Default: "
                    "$XDG_CACHE_HOME/jaxserve/xla (~/.cache/jaxserve/xla).")
    cc.add_argument("--no-compilation-cache", action="store_true",
                    help="Compile every step variant at start-up, keeping nothing on disk.")
    h = p.add_argument_group("multi-host (jax.distributed)")
    h.add_argument("--coordinator-address", default=None,
                   help="host:port of process 0; every process of the job passes the same one.")
    h.add_argument("--num-processes", type=int, default=d.num_processes,
                   help="Processes in the job (one per host).")
    h.add_argument("--process-id", type=int, default=d.process_id,
                   help="This process's index; 0 serves HTTP, the others follow its steps.")
    s = p.add_argument_group("server")
    s.add_argument("--host", default=d.host, help="Address to bind (0.0.0.0: all interfaces).")
    s.add_argument("--port", type=int, default=d.port, help="Port to bind (0: any free port).")
    s.add_argument("--api-key", default=None, help="Require `Authorization: Bearer <key>` on "
                   "/v1/*, /tokenize and /detokenize (/health and /metrics stay open).")
    s.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                   help="Requests allowed to wait beyond --max-num-seqs; more get 503 with "
                   "Retry-After.")
    s.add_argument("--max-request-body-bytes", type=parse_size, default=d.max_request_body_bytes,
                   help="Largest request body accepted (413 beyond), e.g. 16MiB.")
    s.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                   help="Seconds in-flight requests may run after SIGTERM before being aborted.")
    s.add_argument("--health-heartbeat-timeout", type=float,
                   default=d.health_heartbeat_timeout, help="/health answers 503 when the "
                   "engine loop has made no progress for this many seconds.")
    s.add_argument("--uvicorn-log-level", default=d.uvicorn_log_level, choices=LOG_LEVELS,
                   help="Log level of uvicorn (access log at info).")
    t = p.add_argument_group("tool calling")
    t.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="Serve tool_choice \"auto\" (the default when a request has tools): "
                   "the model's own tool calls are parsed by --tool-call-parser. \"required\" "
                   "and a named tool are enforced by a grammar and need neither flag.")
    t.add_argument("--tool-call-parser", default=None, choices=TOOL_CALL_PARSERS,
                   help="How the model writes tool calls: hermes (<tool_call>{json}</tool_call>, "
                   "Qwen2.5/Qwen3, Hermes) or llama3_json (Llama 3.x JSON calls).")
    return p


def config_from_args(ns: argparse.Namespace) -> ServerConfig:
    fields = {f for f in ServerConfig.__dataclass_fields__}
    return ServerConfig(**{k: v for k, v in vars(ns).items() if k in fields})


def parse_server_config(argv: Sequence[str] | None = None) -> ServerConfig:
    """argv -> ServerConfig; a bad value exits with status 2 and the flag named, as argparse
    does for malformed ones."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return config_from_args(ns)
    except ConfigError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def run_server(engine_factory: Callable[[], Any], config: ServerConfig, *,
               on_ready: Callable[[str], None] | None = None) -> None:
    """Build the engine (`engine_factory()`, synchronously: loading can take minutes), serve it
    until SIGTERM/SIGINT, then drain and return normally (exit status 0).

    Prints `jaxserve: serving <model> on http://host:port` once the socket is bound and the
    engine started (with --port 0 the printed port is the real one); `on_ready(url)` is called
    at the same moment."""
    from jaxserve.server.app import build_app

    engine = engine_factory()
    app = build_app(engine, config)
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, lifespan="on",
                               log_level=config.uvicorn_log_level,
                               timeout_graceful_shutdown=config.shutdown_timeout)
    server = _DrainingServer(uv_config, app)
    in_main = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main:
        # uvicorn re-raises the captured signal once it has shut down, which would kill us
        # with 143 after a clean drain; this handler underneath turns that into exit 0 (and
        # a signal arriving before uvicorn installs its own still stops the server).
        def request_exit(*_):
            server.should_exit = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, request_exit)
    try:
        asyncio.run(_serve(server, app, on_ready))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise SystemExit("jaxserve: the server did not start")
    print("jaxserve: shut down", flush=True)


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server that also tells the app a shutdown began, so that /health and new
    requests on kept-alive connections answer 503 while in-flight streams finish."""

    def __init__(self, config: uvicorn.Config, app):
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig, frame):
        self._app.state.ctx.draining = True
        super().handle_exit(sig, frame)


async def _serve(server, app, on_ready) -> None:
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        print(f"jaxserve: serving {app.state.ctx.served_names[0]} on {url}", flush=True)
        if on_ready is not None:
            on_ready(url)
    await task
