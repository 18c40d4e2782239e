"""A generative fuzz of the HTTP API against serve.py with the real engine and a tiny model:
request bodies generated from the server's own /openapi.json (hypothesis-jsonschema), valid ones
and ones with a field replaced by a hostile value. No request may get a 5xx; every error is
OpenAI-shaped; afterwards /health is 200 and the page pool is whole.

Bounded in count (derandomized hypothesis, fixed example counts: the same requests every run)
and in cost: generated requests are capped at a few tokens and sequences (the limits themselves
are tested one by one in test_server_limits.py); hostile values replace each field of a small
valid request in turn."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis_jsonschema import from_schema
from test_server_real_engine import ServeProcess, _wait_pool_whole

GENERATED = 80  # hypothesis examples per route
HOSTILE = [None, -1, 0, 2**63, -(2**63) - 1, 10**30, 1e308, -1e308, True, "", "\ud800",
           "x" * 5000, [], [[]], [None], {}, {"a": {"b": [1, {"c": None}]}}, [2**40] * 3]
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")
# a valid request per route: every field of its schema is replaced in turn by each HOSTILE value
BASE = {"/v1/completions": {"prompt": "The quick brown fox", "max_tokens": 4},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": 4},
        "/tokenize": {"prompt": "hello"}, "/detokenize": {"tokens": [1, 2, 3]}}


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    server = ServeProcess(tiny_model_dir("llama-gqa"))
    yield server
    server.stop()


def _bounded(path: str, body: dict) -> dict:
    """Keep a generated request cheap to serve: at most 4 tokens and 2 sequences per prompt."""
    if path in GENERATION_ROUTES:
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if (key == "max_tokens" and value is None) or (
                    isinstance(value, int) and not isinstance(value, bool) and value > 4):
                body[key] = 4
        if isinstance(body.get("n"), int) and body["n"] > 2:
            body["n"] = 2
        if isinstance(body.get("best_of"), int) and body["best_of"] > 2:
            body["best_of"] = 2
        if isinstance(body.get("prompt"), list) and len(body["prompt"]) > 4:
            body["prompt"] = body["prompt"][:4]
    return body


def _check(client: httpx.Client, path: str, body: dict) -> None:
    raw = json.dumps(body)  # lone surrogates travel as \\u escapes, as a client would send them
    r = client.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    assert r.status_code < 500, (path, raw[:500], r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, r.text
        assert err["code"] == r.status_code and isinstance(err["message"], str)
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [e for e in r.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]", r.text[-300:]
        assert '"InternalServerError"' not in r.text, (path, raw[:500], r.text[-500:])


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize",
                                  "/detokenize"])
def test_generated_and_mutated_requests_never_get_a_5xx(served, path):
    doc = httpx.get(served.url + "/openapi.json", timeout=10).json()
    schema = dict(doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]
                  ["schema"], components=doc["components"])
    bodies = from_schema(schema).filter(lambda b: isinstance(b, dict))
    common = dict(deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
    with httpx.Client(base_url=served.url, timeout=60) as client:

        @settings(max_examples=GENERATED, **common)
        @given(bodies)
        def valid(body):
            _check(client, path, _bounded(path, body))

        valid()
        fields = sorted(doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
                        ["properties"])
        for key in fields:  # every field x every hostile value, one at a time (~300 requests)
            for value in HOSTILE:
                body = {**BASE[path], key: value}
                if key not in ("max_tokens", "max_completion_tokens", "n", "best_of"):
                    body = _bounded(path, body)
                _check(client, path, body)
        # hostile values one level down: inside a chat message
        if path == "/v1/chat/completions":
            for key in ("role", "content", "name"):
                for value in HOSTILE:
                    message = {"role": "user", "content": "hi", key: value}
                    _check(client, path, {**BASE[path], "messages": [message]})
    assert httpx.get(served.url + "/health", timeout=10).status_code == 200
    free, total = _wait_pool_whole(served)
    assert free == total, (free, total)
