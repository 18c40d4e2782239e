"""Every size a request controls is bounded (server/limits.py, engine/sampling_params.py):
just over a limit is a 400 naming the field, at the limit the request is served; text that is
not valid Unicode is a 400 naming where it is, and no error path can fail to encode; admission
counts sequences (n x prompts), not requests."""

from __future__ import annotations

import httpx
import pytest
from fake_engine import FakeEngine
from test_server_http import assert_error

from jaxserve.engine import sampling_params as sp
from jaxserve.server import limits

C, CC = "/v1/completions", "/v1/chat/completions"
CHAT = [{"role": "user", "content": "hi"}]


def _completion(**kw):
    return {"prompt": "x", "max_tokens": 1, **kw}


def _chat(**kw):
    return {"messages": CHAT, "max_tokens": 1, **kw}


# (route, field named in the error, body at the limit, body just over it)
LIMITS = [
    (C, "n", _completion(n=sp.MAX_N), _completion(n=sp.MAX_N + 1)),
    (CC, "n", _chat(n=sp.MAX_N), _chat(n=sp.MAX_N + 1)),
    (C, "best_of", _completion(n=sp.MAX_N, best_of=sp.MAX_N),
     _completion(n=sp.MAX_N, best_of=sp.MAX_N + 1)),
    (C, "prompt", _completion(prompt=["x"] * limits.MAX_PROMPTS),
     _completion(prompt=["x"] * (limits.MAX_PROMPTS + 1))),
    (C, "stop", _completion(stop=[f"s{i}" for i in range(sp.MAX_STOP_STRINGS)]),
     _completion(stop=[f"s{i}" for i in range(sp.MAX_STOP_STRINGS + 1)])),
    (C, "stop", _completion(stop="y" * sp.MAX_STOP_STRING_CHARS),
     _completion(stop="y" * (sp.MAX_STOP_STRING_CHARS + 1))),
    (CC, "stop", _chat(stop=["y" * sp.MAX_STOP_STRING_CHARS]),
     _chat(stop=["y" * (sp.MAX_STOP_STRING_CHARS + 1)])),
    (C, "logit_bias", _completion(logit_bias={str(i): 0.5 for i in range(sp.MAX_LOGIT_BIAS_ENTRIES)}),
     _completion(logit_bias={str(i): 0.5 for i in range(sp.MAX_LOGIT_BIAS_ENTRIES + 1)})),
    (C, "stop_token_ids", _completion(stop_token_ids=list(range(sp.MAX_STOP_TOKEN_IDS))),
     _completion(stop_token_ids=list(range(sp.MAX_STOP_TOKEN_IDS + 1)))),
    (C, "logprobs", _completion(logprobs=20), _completion(logprobs=21)),
    (CC, "top_logprobs", _chat(logprobs=True, top_logprobs=20),
     _chat(logprobs=True, top_logprobs=21)),
]


@pytest.mark.parametrize("path,param,at_limit,over", LIMITS,
                         ids=[f"{p}-{param}-{i}" for i, (p, param, *_) in enumerate(LIMITS)])
def test_each_limit_is_served_at_and_refused_just_over(server, path, param, at_limit, over):
    assert_error(httpx.post(server.url + path, json=over, timeout=30), 400, param)
    r = httpx.post(server.url + path, json=at_limit, timeout=60)
    assert r.status_code == 200, r.text
    n = at_limit.get("n", 1) * len(at_limit["prompt"] if isinstance(at_limit.get("prompt"), list)
                                   else [0])
    assert len(r.json()["choices"]) == n


def test_message_count_is_served_at_and_refused_just_over(fresh_server):
    s = fresh_server(FakeEngine(max_model_len=1_000_000))  # room for every message's tokens
    system = [{"role": "system", "content": ""}]
    over = _chat(messages=system * limits.MAX_MESSAGES + CHAT)
    assert_error(httpx.post(s.url + CC, json=over, timeout=30), 400, "messages")
    r = httpx.post(s.url + CC, json=_chat(messages=system * (limits.MAX_MESSAGES - 1) + CHAT),
                   timeout=60)
    assert r.status_code == 200, r.text


def test_message_content_size_is_bounded(fresh_server):
    # a body limit large enough that the content limit is the one that answers
    s = fresh_server(max_request_body_bytes=2 * limits.MAX_MESSAGE_CHARS)
    big = [{"role": "user", "content": "x" * (limits.MAX_MESSAGE_CHARS + 1)}]
    assert_error(httpx.post(s.url + CC, json=_chat(messages=big), timeout=60), 400, "messages")


@pytest.mark.parametrize("n", [2**63, 9223372036854775808, 10**30])
def test_a_huge_n_is_refused_before_any_engine_request(fresh_server, n):
    engine = FakeEngine()
    s = fresh_server(engine)
    for path, body in ((C, _completion(n=n)), (CC, _chat(n=n)), (C, _completion(n=n, stream=True))):
        assert_error(httpx.post(s.url + path, json=body, timeout=10), 400, "n")
    assert engine.requests == {} and s.app.state.ctx.in_flight == 0
    assert httpx.get(s.url + "/health", timeout=10).status_code == 200


def test_admission_counts_sequences_not_requests(fresh_server):
    s = fresh_server(FakeEngine(), max_num_seqs=2, max_queued_requests=2)  # capacity 4
    r = httpx.post(s.url + C, json=_completion(n=5), timeout=10)
    assert_error(r, 503)
    assert r.headers["retry-after"] == "1"
    r = httpx.post(s.url + C, json=_completion(prompt=["a", "b", "c"], n=2), timeout=10)
    assert_error(r, 503)
    r = httpx.post(s.url + C, json=_completion(prompt=["a", "b"], n=2), timeout=10)
    assert r.status_code == 200 and len(r.json()["choices"]) == 4


@pytest.mark.parametrize("path,body,param", [
    (C, _completion(model="\ud800"), "body.model"),
    (CC, _chat(model="bad\udfff name", stream=True), "body.model"),
    (C, _completion(prompt="a\ud800b", echo=True), "body.prompt"),
    (C, _completion(prompt=["ok", "a\udc00"], stream=True), "body.prompt.1"),
    (C, _completion(stop=["\ud800"]), "body.stop.0"),
    (C, _completion(temperature="\ud800"), "body.temperature"),
    (CC, _chat(messages=[{"role": "user", "content": "\udc00x"}]), "body.messages.0.content"),
    (CC, _chat(messages=[{"role": "\ud800", "content": "x"}]), "body.messages.0.role"),
    ("/tokenize", {"prompt": "\ud800"}, "body.prompt"),
])
def test_lone_surrogates_are_a_clean_400_naming_the_field(server, path, body, param):
    import json
    raw = json.dumps(body)  # ASCII JSON with \\ud800 escapes: valid JSON, not valid Unicode
    r = httpx.post(server.url + path, content=raw.encode(), timeout=10,
                   headers={"content-type": "application/json"})
    assert_error(r, 400, param)
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_a_surrogate_pair_is_ordinary_text(server):
    r = httpx.post(server.url + C, content=b'{"prompt": "hi \\ud83d\\ude00", "max_tokens": 1}',
                   headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 200, r.text


def test_the_error_path_encodes_any_text():
    from jaxserve.server.errors import APIError, error_response, sse_error_event
    err = APIError(404, "The model `\ud800` does not exist.", "model")
    assert b"\\ud800" in error_response(err).body
    assert "\\ud800" in sse_error_event(err)


def test_capacity_is_the_engines_batch_bound_plus_the_queue(fresh_server):
    # no --max-num-seqs given to the server: the bound comes from the engine, not a guess
    s = fresh_server(FakeEngine(max_num_seqs=3), max_queued_requests=1)
    assert s.app.state.ctx.capacity == 4
    assert_error(httpx.post(s.url + C, json=_completion(n=5), timeout=10), 503)
    r = httpx.post(s.url + C, json=_completion(n=4), timeout=10)
    assert r.status_code == 200 and len(r.json()["choices"]) == 4


# -- one owner for the context and vocabulary rules ------------------------------------------

def _engine_verdict(call) -> tuple[str, str]:
    """(param, message) of the engine's own rule (engine/input_limits.py), called directly."""
    from jaxserve.engine.input_limits import RequestRejectedError
    with pytest.raises(RequestRejectedError) as err:
        call()
    return err.value.param, str(err.value)


@pytest.mark.parametrize("path,body,verdict", [
    (C, {"prompt": [5] * 128, "max_tokens": 1},
     lambda lim: lim.check_prompt([5] * 128)),
    (C, {"prompt": [5, 3, 100_000], "max_tokens": 1},
     lambda lim: lim.check_prompt([5, 3, 100_000])),
    (C, {"prompt": [5] * 100, "max_tokens": 29},
     lambda lim: lim.max_tokens(100, 29, explicit=True)),
    (CC, {"messages": CHAT, "max_completion_tokens": 500},
     None),  # the chat prompt's length depends on the template: checked by param below
])
def test_server_reports_the_engines_own_verdict(server, path, body, verdict):
    """The server holds no copy of these rules: its 400 is the engine's error, word for word."""
    r = httpx.post(server.url + path, json=body, timeout=30)
    if verdict is None:
        assert_error(r, 400, "max_completion_tokens")
        assert "'max_completion_tokens' is too large: 500" in r.json()["error"]["message"]
        return
    param, message = _engine_verdict(lambda: verdict(server.engine.input_limits))
    assert_error(r, 400, param)
    assert r.json()["error"]["message"] == message


def test_default_max_tokens_is_clamped_to_the_context(server):
    """A completion's default max_tokens (16) shrinks to what fits; an explicit one is an
    error (above); the prompt still needs room for one token."""
    r = httpx.post(server.url + C, json={"prompt": [5] * 120}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 128 - 120
