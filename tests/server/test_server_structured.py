"""Structured output through the HTTP API: serve.py with the real engine and the tiny model,
driven by the official openai client. Every completed output satisfies its constraint (many
seeds, temperature 1, n = 2, streaming and not), constraints arrive under every name vLLM
accepts, and a bad one is a 400 naming the field the client used."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
from test_server_http import assert_error
from test_server_real_engine import ServeProcess

REGEX = r"[a-c]{2,4}-\d{1,3}"
CHOICES = ["red", "green", "blue", "dark green"]
ENUM_SCHEMA = {"enum": ["alpha", "beta", 42, True]}


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    proc = ServeProcess(tiny_model_dir("llama-gqa"))
    yield proc
    proc.stop()


class _Client:
    """The openai client with this server's model name filled in."""

    def __init__(self, url: str):
        self._client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        self._model = self._client.models.list().data[0].id
        self.completions = _Named(self._client.completions, self._model)
        self.chat = type("Chat", (), {"completions": _Named(self._client.chat.completions,
                                                            self._model)})()


class _Named:
    def __init__(self, api, model: str):
        self._api, self._model = api, model

    def create(self, **kw):
        return self._api.create(model=self._model, **kw)


@pytest.fixture(scope="module")
def client(served):
    return _Client(served.url)


def _texts_by_finish(choices, text_of) -> tuple[list[str], int]:
    done = [text_of(c) for c in choices if c.finish_reason == "stop"]
    return done, len(choices)


@pytest.mark.parametrize("stream", [False, True])
def test_completions_regex_under_sampling(client, stream):
    done, total = [], 0
    for seed in range(4):
        kw = dict(prompt=["Once upon a time", "hello"], max_tokens=32,
                  temperature=1.0, n=2, seed=seed, extra_body={"structured_outputs": {"regex": REGEX}})
        if stream:
            texts, finish = {}, {}
            for chunk in client.completions.create(stream=True, **kw):
                for c in chunk.choices:
                    texts[c.index] = texts.get(c.index, "") + c.text
                    if c.finish_reason:
                        finish[c.index] = c.finish_reason
            assert len(texts) == 4
            done += [texts[i] for i in texts if finish[i] == "stop"]
            total += len(texts)
        else:
            resp = client.completions.create(**kw)
            d, n = _texts_by_finish(resp.choices, lambda c: c.text)
            done, total = done + d, total + n
    assert total == 16 and len(done) >= total // 2
    assert all(re.fullmatch(REGEX, t) for t in done), done


@pytest.mark.parametrize("field", ["guided_choice", "structured_outputs"])
def test_chat_choice_under_both_names(client, field):
    body = {"guided_choice": CHOICES} if field == "guided_choice" else {
        "structured_outputs": {"choice": CHOICES}}
    seen = set()
    for seed in range(4):
        resp = client.chat.completions.create(
            messages=[{"role": "user", "content": "Pick a colour"}],
            max_tokens=16, temperature=1.0, n=2, seed=seed, extra_body=body)
        for c in resp.choices:
            assert c.finish_reason == "stop" and c.message.content in CHOICES
            seen.add(c.message.content)
    assert len(seen) > 1


def _chat_pairs(client, stream: bool, **kw) -> list[tuple[str, str]]:
    """(content, finish_reason) per choice, from a whole response or summed stream deltas."""
    if not stream:
        resp = client.chat.completions.create(**kw)
        return [(c.message.content, c.finish_reason) for c in resp.choices]
    texts, finish = {}, {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            finish[c.index] = c.finish_reason or finish.get(c.index)
    return [(texts[i], finish[i]) for i in sorted(texts)]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_response_format_json_schema(client, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "pick", "schema": ENUM_SCHEMA,
                                                  "strict": True}}
    values = []
    for seed in range(4):
        kw = dict(messages=[{"role": "user", "content": "Answer in JSON"}],
                  max_tokens=16, temperature=1.0, n=2, seed=seed, response_format=fmt)
        pairs = _chat_pairs(client, stream, **kw)
        assert len(pairs) == 2
        for text, reason in pairs:
            assert reason == "stop"
            values.append(json.loads(text))
    assert all(v in ENUM_SCHEMA["enum"] for v in values) and len(values) == 8


def test_json_schema_objects_validate(client):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0,
                                                              "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3},
        "pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}},
                "required": ["kind"], "additionalProperties": False}},
        "required": ["name", "age", "pet"], "additionalProperties": False}
    done = 0
    for seed in range(6):
        resp = client.completions.create(
            prompt="{", max_tokens=96, temperature=1.0, n=2, seed=seed,
            extra_body={"structured_outputs": {"json": schema, "disable_any_whitespace": True}})
        for c in resp.choices:
            if c.finish_reason == "stop":
                jsonschema.validate(json.loads(c.text), schema)
                done += 1
    assert done >= 6


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "a(b"}},
     "structured_outputs.regex"),
    ("/v1/completions", {"prompt": "x", "guided_regex": "a(b"}, "guided_regex"),
    ("/v1/completions", {"prompt": "x", "guided_grammar": "start: nothing_here"},
     "guided_grammar"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema", "json_schema": {
                                  "name": "x", "schema": {"type": "no-such-type"}}}},
     "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema"}}, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"},
                              "guided_regex": "a"}, "guided_regex"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["a"]}},
     "structured_outputs"),
])
def test_bad_constraints_are_400_naming_the_field(served, path, body, param):
    assert_error(httpx.post(served.url + path, json=body, timeout=60), 400, param)


def test_metrics_count_constrained_requests(served, client):
    before = served.metrics()
    client.completions.create(prompt="x", max_tokens=4,
                              extra_body={"structured_outputs": {"choice": ["metric-a", "metric-b"]}})
    after = served.metrics()
    key = "jaxserve:structured_output_requests_total"
    assert after[key] == before.get(key, 0) + 1
    assert after["jaxserve:grammar_compiles_total"] >= 1
    assert after["jaxserve:grammar_compile_seconds_total"] > 0
    assert after["jaxserve:num_free_pages"] == after["jaxserve:num_pages"]


GRAMMAR = 'start: sum\nsum: NUM ("+" NUM)*\nNUM: /[1-9][0-9]?/'


def _stream_completions(client, **kw) -> list[tuple[str, str]]:
    texts, finish = {}, {}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            finish[c.index] = c.finish_reason or finish.get(c.index)
    return [(texts[i], finish[i]) for i in sorted(texts)]


@pytest.mark.parametrize("stream", [False, True])
def test_completions_grammar_under_sampling(client, stream):
    done = []
    for seed in range(4):
        kw = dict(prompt="1+1=", max_tokens=24, temperature=1.0, n=2, seed=seed,
                  extra_body={"guided_grammar": GRAMMAR})
        pairs = (_stream_completions(client, **kw) if stream else
                 [(c.text, c.finish_reason) for c in client.completions.create(**kw).choices])
        assert len(pairs) == 2
        for text, reason in pairs:
            assert reason in ("stop", "length")
            if reason == "stop":
                done.append(text)
            else:  # cut short: still a prefix the grammar allows
                assert re.fullmatch(r"([1-9][0-9]?\+)*[1-9]?[0-9]?\+?", text), text
    assert len(done) >= 4 and all(re.fullmatch(r"[1-9][0-9]?(\+[1-9][0-9]?)*", t) for t in done)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_response_format_json_object(client, stream):
    """json_object: the output is a JSON object (completed ones parse as one; a random model
    may write whitespace until max_tokens, but never anything but an object's text)."""
    for seed in range(3):
        kw = dict(messages=[{"role": "user", "content": "JSON please"}], max_tokens=48,
                  temperature=1.0, n=2, seed=seed, response_format={"type": "json_object"})
        pairs = _chat_pairs(client, stream, **kw)
        for text, reason in pairs:
            assert text.lstrip().startswith("{"), text
            if reason == "stop":
                assert isinstance(json.loads(text), dict)
