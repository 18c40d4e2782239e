"""serve.py with the real engine and a tiny model, as a real process on 127.0.0.1.

The same tokens as the offline LLM; streaming; load with disconnects leaves the page pool whole;
SIGTERM during load ends streams properly and exits 0.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = ["--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--num-pages", "128",
         "--page-size", "8", "--max-model-len", "256", "--uvicorn-log-level", "warning"]


class ServeProcess:
    def __init__(self, model_path: str, *extra: str):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "serve.py"), "--model", model_path, "--port", "0",
             *FLAGS, *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        self.log = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.log.append(line)
            m = re.search(r"serving \S+ on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                return
        self.proc.kill()
        raise RuntimeError("serve.py did not start:\n" + "".join(self.log))

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self.log.append(out or "")
        return self.proc.returncode


@pytest.fixture(scope="module")
def tiny_path(tiny_model_dir):
    return tiny_model_dir("llama-gqa")


@pytest.fixture(scope="module")
def served(tiny_path):
    server = ServeProcess(tiny_path)
    yield server
    server.stop()


def _wait_pool_whole(server, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        free, total = m["jaxserve:num_free_pages"], m["jaxserve:num_pages"]
        running = sum(v for k, v in m.items() if k == "vllm:num_requests_running")
        if (free == total and running == 0) or time.monotonic() > deadline:
            return free, total


def test_completions_match_offline_engine(served, tiny_path):
    from jaxserve.engine.sampling_params import SamplingParams
    from jaxserve.llm import LLM

    client = openai.OpenAI(base_url=served.url + "/v1", api_key="none")
    name = client.models.list().data[0].id
    prompts = ["The quick brown fox", "Once upon a time"]
    resp = client.completions.create(model=name, prompt=prompts, max_tokens=10, temperature=0)
    assert resp.usage.completion_tokens == 20
    llm = LLM(tiny_path, num_pages=128, page_size=8, max_num_seqs=8, max_num_batched_tokens=64,
              max_model_len=256, warmup=False)
    offline = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0))
    by_index = sorted(resp.choices, key=lambda c: c.index)
    assert [c.text for c in by_index] == [o.outputs[0].text for o in offline]

    stream = client.completions.create(model=name, prompt=prompts[0], max_tokens=10,
                                       temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == by_index[0].text

    chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=5, temperature=0, logprobs=True,
                                          top_logprobs=2)
    assert chat.choices[0].finish_reason in ("length", "stop")
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens


def test_load_with_disconnects_leaves_pool_whole(served):
    async def one(client, i):
        body = {"model": "x", "prompt": f"request {i} says", "max_tokens": 24, "stream": True,
                "temperature": 0.8, "seed": i}
        body["model"] = httpx.get(served.url + "/v1/models").json()["data"][0]["id"]
        chunks = 0
        async with client.stream("POST", served.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if i % 4 == 0 and chunks == 3:
                    return "disconnected"  # leave mid-stream: the server must abort it
                if line == "data: [DONE]":
                    return "done"
                chunks += 1
        return "truncated"

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.wait_for(
                asyncio.gather(*(one(client, i) for i in range(64))), timeout=240)

    results = asyncio.run(run())
    assert results.count("disconnected") == 16
    assert results.count("done") == 48
    free, total = _wait_pool_whole(served)
    assert free == total


def test_sigterm_during_load_exits_zero(tiny_path):
    server = ServeProcess(tiny_path, "--shutdown-timeout", "20")
    body = {"model": httpx.get(server.url + "/v1/models").json()["data"][0]["id"],
            "prompt": "Once upon a time", "max_tokens": 40, "stream": True}

    async def stream_one(client):
        lines = []
        async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if len(lines) == 2 and not hasattr(server, "signalled"):
                        server.signalled = True
                        server.proc.send_signal(signal.SIGTERM)
        return lines

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(stream_one(client) for _ in range(4)))

    for lines in asyncio.run(run()):
        assert lines[-1] == "data: [DONE]"  # every in-flight stream ends properly
    assert server.stop() == 0, "".join(server.log)
