"""The server over raw HTTP: SSE framing, bad inputs, auth, body limit, overload, disconnects,
/health, /metrics, /tokenize. Every wait is bounded; everything stays on 127.0.0.1."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from fake_engine import FakeEngine
from server_harness import wait_until
from prometheus_client.parser import text_string_to_metric_families

CHAT = [{"role": "user", "content": "hi"}]


def sse_events(resp: httpx.Response) -> list[str]:
    """The `data:` payloads of a finished SSE response, checking the framing on the way."""
    body = resp.text
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: "):] for e in events]


def assert_error(resp: httpx.Response, status: int, param=...):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert isinstance(err["message"], str) and err["message"]
    if param is not ...:
        assert err["param"] == param, err
    return err


def test_sse_framing_completion(server):
    r = httpx.post(server.url + "/v1/completions", timeout=10, json={
        "prompt": "x", "max_tokens": 3, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_sse_framing_chat_without_usage(server):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=10, json={
        "messages": CHAT, "max_tokens": 2, "stream": True})
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("usage" not in c for c in chunks)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


C, CC = "/v1/completions", "/v1/chat/completions"
BAD_INPUTS = [
    # (path, json body, status, param)
    (C, {}, 400, "body.prompt"),
    (C, {"prompt": []}, 400, "body.prompt"),
    (C, {"prompt": [1, "a"]}, 400, "body.prompt"),
    (C, {"prompt": {"text": "x"}}, 400, "body.prompt"),
    (C, {"prompt": [[]]}, 400, "prompt"),
    (C, {"prompt": ""}, 400, "prompt"),
    (C, {"prompt": [999999]}, 400, "prompt"),
    (C, {"prompt": [-1]}, 400, "prompt"),
    (C, {"prompt": "x", "temperature": 5}, 400, "temperature"),
    (C, {"prompt": "x", "temperature": "hot"}, 400, "body.temperature"),
    (C, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    (C, {"prompt": "x", "top_k": -5}, 400, "top_k"),
    (C, {"prompt": "x", "min_p": 2}, 400, "min_p"),
    (C, {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    (C, {"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty"),
    (C, {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    (C, {"prompt": "x", "seed": 2**64}, 400, "seed"),
    (C, {"prompt": "x", "seed": "abc"}, 400, "body.seed"),
    (C, {"prompt": "x", "n": 0}, 400, "n"),
    (C, {"prompt": "x", "n": 1.5}, 400, "body.n"),
    (C, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
    (C, {"prompt": "one two " * 100}, 400, "input_tokens"),
    (C, {"prompt": "x", "min_tokens": 10, "max_tokens": 5}, 400, "min_tokens"),
    (C, {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    (C, {"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    (C, {"prompt": "x", "logit_bias": {"5": 500}}, 400, "logit_bias"),
    (C, {"prompt": "x", "logit_bias": {"5": "big"}}, 400, "body.logit_bias.5"),
    (C, {"prompt": "x", "stop_token_ids": [999999]}, 400, "stop_token_ids"),
    (C, {"prompt": "x", "stop": [""]}, 400, "stop"),
    (C, {"prompt": "x", "logit_bias": {"999999": 1}}, 400, "logit_bias"),
    (C, {"prompt": "x", "stop": 5}, 400, "body.stop"),
    (C, {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    (C, {"prompt": "x", "best_of": 3}, 400, "best_of"),
    (C, {"prompt": "x", "tools": []}, 400, "body.tools"),
    (C, {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (C, {"prompt": "x", "stream": True, "stream_options": {"x": 1}}, 400,
     "body.stream_options.x"),
    (C, {"prompt": "x", "model": "other"}, 404, "model"),
    (C, {"prompt": "engine-reject"}, 400, None),
    (C, {"prompt": "engine-reject", "stream": True}, 400, None),
    (CC, {"messages": []}, 400, "body.messages"),
    (CC, {}, 400, "body.messages"),
    (CC, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "body.messages.0.role"),
    (CC, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://x"}}]}]}, 400, "body.messages.0.content"),
    (CC, {"messages": [{"role": "user", "content": "x", "tool_call_id": "1"}]}, 400,
     "body.messages.0.tool_call_id"),
    (CC, {"messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    (CC, {"messages": CHAT, "tool_choice": "required"}, 400, "tool_choice"),
    # json_object is served (issue 14); a json_schema format without its schema is not
    (CC, {"messages": CHAT, "response_format": {"type": "json_schema"}}, 400, "response_format"),
    (CC, {"messages": CHAT, "functions": [{"name": "f"}]}, 400, "body.functions"),
    (CC, {"messages": CHAT, "echo": True}, 400, "body.echo"),
    (CC, {"messages": CHAT, "top_logprobs": 3}, 400, "top_logprobs"),
    (CC, {"messages": CHAT, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    (CC, {"messages": CHAT, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    (CC, {"messages": CHAT, "max_tokens": 10_000}, 400, "max_tokens"),
    (CC, {"messages": [{"role": "user", "content": "one two " * 100}]}, 400, "input_tokens"),
    (CC, {"messages": CHAT, "model": "other", "stream": True}, 404, "model"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": CHAT}, 400, "prompt"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "body.tokens"),
]


@pytest.mark.parametrize("path,body,status,param", BAD_INPUTS,
                         ids=[f"{p}-{i}" for i, (p, *_) in enumerate(BAD_INPUTS)])
def test_bad_inputs(server, path, body, status, param):
    r = httpx.post(server.url + path, json=body, timeout=10)
    assert_error(r, status, param)


@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b"null", b"\xff\xfe", b""])
def test_malformed_bodies(server, raw):
    r = httpx.post(server.url + "/v1/completions", content=raw, timeout=10,
                   headers={"content-type": "application/json"})
    assert_error(r, 400, None)


def test_unknown_route_and_method(server):
    assert_error(httpx.get(server.url + "/v1/nope", timeout=10), 404)
    assert_error(httpx.get(server.url + "/v1/completions", timeout=10), 405)


def test_server_keeps_serving_after_bad_inputs(server):
    for path, body, *_ in BAD_INPUTS[:10]:
        httpx.post(server.url + path, json=body, timeout=10)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                   timeout=10)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_engine_fault_midstream_and_whole(server):
    r = httpx.post(server.url + "/v1/completions", timeout=10, json={
        "prompt": "engine-crash", "max_tokens": 10, "stream": True})
    assert r.status_code == 200
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == 500 and "fake engine fault" in err["message"]
    r = httpx.post(server.url + "/v1/completions", timeout=10, json={
        "prompt": "engine-crash", "max_tokens": 10})
    assert_error(r, 500)


def test_tokenize_detokenize(server):
    tok = server.engine.tokenizer
    r = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world",
                                                   "return_token_strs": True}, timeout=10)
    body = r.json()
    assert body["tokens"] == tok.encode("Hello world") and body["count"] == len(body["tokens"])
    assert "".join(body["token_strs"]) == "Hello world" and body["max_model_len"] == 128
    r = httpx.post(server.url + "/tokenize", json={"messages": CHAT}, timeout=10)
    assert tok.decode(r.json()["tokens"]).endswith("<|im_start|>assistant\n")
    r = httpx.post(server.url + "/detokenize", json={"tokens": body["tokens"]}, timeout=10)
    assert r.json() == {"prompt": "Hello world"}


def test_api_key(fresh_server):
    s = fresh_server(api_key="sekret")
    url = s.url + "/v1/completions"
    body = {"prompt": "x", "max_tokens": 1}
    assert_error(httpx.post(url, json=body, timeout=10), 401, None)
    assert_error(httpx.post(url, json=body, headers={"Authorization": "Bearer nope"},
                            timeout=10), 401)
    assert_error(httpx.get(s.url + "/v1/models", timeout=10), 401)
    assert_error(httpx.post(s.url + "/tokenize", json={"prompt": "x"}, timeout=10), 401)
    ok = httpx.post(url, json=body, headers={"Authorization": "Bearer sekret"}, timeout=10)
    assert ok.status_code == 200
    # probes and scrapers need no key
    assert httpx.get(s.url + "/health", timeout=10).status_code == 200
    assert httpx.get(s.url + "/metrics", timeout=10).status_code == 200
    # auth is checked before the body is even parsed
    assert_error(httpx.post(url, content=b"{not json", timeout=10), 401)


def test_body_limit(fresh_server):
    s = fresh_server(max_request_body_bytes=2048)
    url = s.url + "/v1/completions"
    assert_error(httpx.post(url, json={"prompt": "x" * 4096}, timeout=10), 413)

    def chunked():  # no Content-Length: counted while reading
        for _ in range(8):
            yield b" " * 512

    assert_error(httpx.post(url, content=chunked(), timeout=10), 413)
    ok = httpx.post(url, json={"prompt": "x", "max_tokens": 1}, timeout=10)
    assert ok.status_code == 200


def test_overload_503(fresh_server):
    engine = FakeEngine(token_delay=0.05)
    s = fresh_server(engine, max_num_seqs=1, max_queued_requests=1)
    body = {"prompt": "x", "max_tokens": 100, "stream": True}
    with httpx.Client(timeout=10) as c1, httpx.Client(timeout=10) as c2:
        with c1.stream("POST", s.url + "/v1/completions", json=body) as r1, \
             c2.stream("POST", s.url + "/v1/completions", json=body) as r2:
            # keep the line iterators referenced: a collected one closes its response
            lines = [r1.iter_lines(), r2.iter_lines()]
            [next(it) for it in lines]
            assert s.app.state.ctx.in_flight == 2
            r3 = httpx.post(s.url + "/v1/completions", json={"prompt": "x"}, timeout=10)
            assert_error(r3, 503)
            assert r3.headers["retry-after"] == "1"
    # the two streams were dropped: their slots come back and the server serves again
    assert wait_until(lambda: s.app.state.ctx.in_flight == 0, timeout=5)
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=10)
    assert r.status_code == 200
    metrics = httpx.get(s.url + "/metrics", timeout=10).text
    assert 'jaxserve:requests_rejected_total{model_name="fake-model",reason="overload"} 1.0' \
        in metrics


def test_disconnect_mid_stream_aborts(fresh_server):
    engine = FakeEngine(token_delay=0.05)
    s = fresh_server(engine)
    with httpx.Client(timeout=10) as c:
        with c.stream("POST", s.url + "/v1/chat/completions",
                      json={"messages": CHAT, "max_tokens": 100, "stream": True}) as r:
            lines = r.iter_lines()
            rid = json.loads(next(lines)[len("data: "):])["id"]
            next(lines), next(lines)
    # the disconnect ended the request early: it stopped well before its 100 tokens
    assert wait_until(lambda: rid in engine.generated_at_abort, timeout=3)
    assert engine.generated_at_abort[rid] < 50
    assert wait_until(lambda: not engine.active, timeout=3)
    assert wait_until(lambda: s.app.state.ctx.in_flight == 0, timeout=3)


def test_disconnect_before_first_token_and_non_streaming(fresh_server):
    engine = FakeEngine(token_delay=2.0)  # nothing comes out before the client gives up
    s = fresh_server(engine)
    for stream in (True, False):
        before = len(engine.aborted)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/completions", timeout=httpx.Timeout(10, read=0.3),
                       json={"prompt": "x", "max_tokens": 5, "stream": stream})
        assert wait_until(lambda: len(engine.aborted) == before + 1, timeout=3), stream
    assert wait_until(lambda: not engine.active, timeout=3)


def test_concurrent_requests(server):
    results = []

    def one(i):
        r = httpx.post(server.url + "/v1/completions", timeout=20,
                       json={"prompt": f"p{i}", "max_tokens": 4, "stream": i % 2 == 0})
        results.append(r.status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert results == [200] * 16


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics(server):
    m = ("model_name", "fake-model")
    before = _samples(httpx.get(server.url + "/metrics", timeout=10).text)
    for name in ["vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total"]:
        assert (name, (m,)) in before, name
    prompt_ids = server.engine.tokenizer.encode("Hello world")
    r = httpx.post(server.url + "/v1/completions", timeout=10,
                   json={"prompt": "Hello world", "max_tokens": 3})
    assert r.status_code == 200
    after = _samples(httpx.get(server.url + "/metrics", timeout=10).text)

    def delta(name, labels=(m,)):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert delta("vllm:prompt_tokens_total") == len(prompt_ids)
    assert delta("vllm:generation_tokens_total") == 3
    assert delta("vllm:request_success_total", (("finished_reason", "length"), m)) == 1
    assert delta("vllm:prefix_cache_queries_total") == len(prompt_ids)
    for h in ["vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
              "vllm:request_decode_time_seconds"]:
        assert delta(h + "_count") == 1, h
    assert delta("vllm:inter_token_latency_seconds_count") == 2
    assert ("vllm:request_queue_time_seconds_count", (m,)) in after


def test_health(fresh_server):
    s = fresh_server()
    assert httpx.get(s.url + "/health", timeout=10).status_code == 200
    s.engine.stale = True
    err = assert_error(httpx.get(s.url + "/health", timeout=10), 503)
    assert "no progress" in err["message"]
    s.engine.stale = False
    assert httpx.get(s.url + "/health", timeout=10).status_code == 200
    s.engine.stopped = True
    assert_error(httpx.get(s.url + "/health", timeout=10), 503)
    # a dead engine also refuses work with 503 rather than hanging
    assert_error(httpx.post(s.url + "/v1/completions", json={"prompt": "x"}, timeout=10), 503)
    s.engine.stopped = False


def test_openapi_document_describes_the_request_models(server):
    doc = httpx.get(server.url + "/openapi.json", timeout=10).json()
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {"/v1/completions", "/v1/chat/completions", "/tokenize",
                                 "/detokenize"}
    completion = doc["components"]["schemas"]["CompletionRequest"]
    assert "prompt" in completion["required"] and completion["additionalProperties"] is False
    ref = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/ChatCompletionRequest"
