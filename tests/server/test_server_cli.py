"""Flags, ServerConfig validation, run_server's SIGTERM drain (in a subprocess), the no-jax
rule of jaxserve/server, and the token rendering behind logprobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fake_engine import build_tokenizer
from server_harness import wait_until

from jaxserve.server.cli import build_parser, parse_server_config
from jaxserve.server.config import ConfigError, ServerConfig, parse_size
from jaxserve.server.logprobs import TokenRenderer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def test_defaults_and_all_flags():
    assert parse_server_config([]) == ServerConfig()
    c = parse_server_config([
        "--model", "m.gguf", "--served-model-name", "a", "b", "--host", "0.0.0.0", "--port", "9",
        "--tensor-parallel-size", "2", "--max-model-len", "4096", "--max-num-seqs", "8",
        "--max-num-batched-tokens", "512", "--api-key", "sekret-key", "--max-queued-requests", "3",
        "--seed", "7", "--dtype", "half", "--page-size", "32", "--kv-cache-memory", "1GiB",
        "--gpu-memory-utilization", "0.5", "--attention-backend", "pallas",
        "--shutdown-timeout", "2.5", "--max-request-body-bytes", "1MiB",
        "--sharding-config", "tp.yaml", "--no-enable-prefix-caching",
        "--health-heartbeat-timeout", "9", "--uvicorn-log-level", "warning"])
    assert c.served_model_name == ("a", "b") and c.dtype == "float16"
    assert c.kv_cache_memory == 2**30 and c.max_request_body_bytes == 2**20
    assert not c.enable_prefix_caching and c.tensor_parallel_size == 2
    assert "sekret-key" not in repr(c) and c.api_key == "sekret-key"  # never in a log line
    assert parse_server_config(["--block-size", "8", "--num-pages", "10"]).num_pages == 10


@pytest.mark.parametrize("argv,flag", [
    (["--port", "70000"], "--port"),
    (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--max-model-len", "-1"], "--max-model-len"),
    (["--dtype", "int4"], "--dtype"),
    (["--page-size", "12"], "--page-size"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
    (["--max-queued-requests", "-1"], "--max-queued-requests"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout"),
    (["--served-model-name", ""], "--served-model-name"),
    (["--api-key", " "], "--api-key"),
    (["--max-request-body-bytes", "10"], "--max-request-body-bytes"),
    (["--num-pages", "4", "--kv-cache-memory", "1G"], "--kv-cache-memory"),
    (["--kv-cache-memory", "lots"], "--kv-cache-memory"),
])
def test_bad_flags_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse_server_config(argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_config_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--tensor-parallel-size"):
        ServerConfig(tensor_parallel_size=0)
    assert parse_size("16MiB") == 16 * 2**20 and parse_size("2GB") == 2 * 10**9
    assert parse_size("4096") == 4096


def test_every_flag_has_help():
    for action in build_parser()._actions:
        assert action.help, action.dest


def test_server_package_does_not_import_jax():
    code = ("import sys; import jaxserve.server.app, jaxserve.server.cli; "
            "bad = [m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'jaxlib'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_token_renderer_exact_bytes():
    tok = build_tokenizer()
    r = TokenRenderer(tok)
    text = "Bonjour, ça va? 日本語 🙂"
    ids = tok.encode(text)
    assert b"".join(r.render(t)[1] for t in ids) == text.encode()
    assert r.text(tok.convert_tokens_to_ids("<|im_end|>")) == "<|im_end|>"


# -- run_server in a subprocess: SIGTERM drains, then exits 0 --------------------------------

def _start(*flags: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "serve_fake.py"), "--port", "0",
         "--uvicorn-log-level", "warning", *flags],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if " on http://" in line:
            return proc, line.rsplit(" on ", 1)[1].strip()
    proc.kill()
    raise AssertionError("serve_fake.py did not print its address")


def _stream_in_thread(url: str, max_tokens: int, out: dict) -> threading.Thread:
    def run():
        try:
            with httpx.stream("POST", url + "/v1/completions", timeout=30, json={
                    "prompt": "x", "max_tokens": max_tokens, "stream": True}) as r:
                out["lines"] = []
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line:
                        out["lines"].append(line)
        except httpx.HTTPError as e:
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _wait_for_lines(out: dict, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while len(out.get("lines", [])) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert out.get("lines"), out


def test_sigterm_finishes_in_flight_then_exits_0():
    proc, url = _start("--shutdown-timeout", "20")
    try:
        out: dict = {}
        t = _stream_in_thread(url, 30, out)  # ~1.5 s of generation
        _wait_for_lines(out)
        proc.send_signal(signal.SIGTERM)

        def refused() -> bool:  # no longer accepting connections
            try:
                httpx.get(url + "/health", timeout=2)
            except httpx.ConnectError:
                return True
            return False
        assert wait_until(refused, timeout=10)
        t.join(timeout=20)
        assert out["lines"][-1] == "data: [DONE]"  # the in-flight stream ran to its end
        last = json.loads(out["lines"][-2][len("data: "):])
        assert last["choices"][0]["finish_reason"] == "length"
        rest, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, rest
        assert "aborted: 0 stopped: True" in rest
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_aborts_after_shutdown_timeout():
    proc, url = _start("--shutdown-timeout", "0.5")
    try:
        out: dict = {}
        t = _stream_in_thread(url, 120, out)  # ~6 s: far longer than the timeout
        _wait_for_lines(out)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=20)
        assert time.monotonic() - sent < 10
        assert proc.returncode == 0, rest
        assert "aborted: 1 stopped: True" in rest
        t.join(timeout=10)
        lines = out.get("lines", [])
        assert not any('"finish_reason":"length"' in line for line in lines)
        if "data: [DONE]" in lines:  # the engine's shutdown ended it first: said in-band
            assert '"code":503' in lines[-2].replace(" ", "")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_setting_the_engine_refuses_is_one_line_not_a_traceback(tiny_model_dir):
    # --linear-backend native takes float32 weights: asking for it with bfloat16 is refused
    # by the runner, after loading; serve.py reports the ConfigError and exits non-zero
    r = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), "--model",
                        tiny_model_dir("llama-gqa"), "--dtype", "bfloat16", "--linear-backend",
                        "native", "--port", "0"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 1, r.stderr[-2000:]
    assert "jaxserve: error: --linear-backend native: it takes float32 weights" in r.stderr
    assert "Traceback" not in r.stderr


def test_quantization_flags_reach_the_engine_config():
    import serve
    from jaxserve.config import ConfigError as EngineConfigError
    c = parse_server_config(["--quantization", "int8", "--quantize-embeddings",
                             "--kv-cache-dtype", "fp8"])
    e = serve.engine_config_from(c)
    assert e.quantization == "int8" and e.quantize_embeddings
    assert e.cache.kv_cache_dtype == "fp8"
    with pytest.raises(EngineConfigError, match="--quantize-embeddings needs"):
        serve.engine_config_from(parse_server_config(["--quantize-embeddings"]))
