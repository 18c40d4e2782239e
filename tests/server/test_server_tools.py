"""Tool calling through /v1/chat/completions with the openai client: serve.py with the real
engine and the tiny model, started with --enable-auto-tool-choice --tool-call-parser hermes.
`required` and named choices are enforced by a grammar, so the calls always parse and match
their schemas (temperature 1, n = 2, many seeds, streaming and not); `auto` calls are parsed from
the model's text (forced here with a regex, since a random model never writes one itself)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from test_server_http import assert_error
from test_server_real_engine import ServeProcess

jsonschema = pytest.importorskip("jsonschema")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"enum": ["Paris", "Rome", "Oslo"]}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    proc = ServeProcess(tiny_model_dir("llama-gqa"), "--enable-auto-tool-choice",
                        "--tool-call-parser", "hermes")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def chat(served):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="none")
    model = client.models.list().data[0].id

    def create(**kw):
        return client.chat.completions.create(model=model, messages=kw.pop("messages", MESSAGES),
                                              **kw)
    return create


def _check_calls(calls, allowed=SCHEMAS):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), allowed[call.function.name])


def _collect_stream(stream):
    """choice index -> (content, {call index: [id, name, arguments]}, finish_reason)"""
    out = {}
    for chunk in stream:
        for c in chunk.choices:
            content, calls, finish = out.get(c.index, ("", {}, None))
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, [None, None, ""])
                entry[0] = tc.id or entry[0]
                if tc.function is not None:
                    entry[1] = tc.function.name or entry[1]
                    entry[2] += tc.function.arguments or ""
            out[c.index] = (content, calls, c.finish_reason or finish)
    return out


@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_always_parse_and_match(chat, parallel):
    counts, done = set(), 0
    for seed in range(4):
        resp = chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel,
                    temperature=1.0, n=2, seed=seed, max_tokens=120)
        for c in resp.choices:
            if c.finish_reason == "length":  # parallel: a random model may list calls forever
                assert parallel and c.message.tool_calls is None
                continue
            assert c.finish_reason == "tool_calls" and c.message.content is None
            _check_calls(c.message.tool_calls)
            counts.add(len(c.message.tool_calls))
            done += 1
    assert done >= (8 if not parallel else 2)
    if not parallel:
        assert counts == {1}


def test_required_calls_streamed(chat):
    for seed in range(3):
        got = _collect_stream(chat(tools=TOOLS, tool_choice="required", temperature=1.0, n=2,
                                   seed=seed, max_tokens=80, stream=True,
                                   parallel_tool_calls=False))
        assert len(got) == 2
        for content, calls, finish in got.values():
            assert finish == "tool_calls" and content == "" and calls
            for call_id, name, args in calls.values():
                assert call_id.startswith("chatcmpl-tool-") and name in SCHEMAS
                jsonschema.validate(json.loads(args), SCHEMAS[name])


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice(chat, stream):
    choice = {"type": "function", "function": {"name": "add"}}
    for seed in range(3):
        kw = dict(tools=TOOLS, tool_choice=choice, temperature=1.0, n=2, seed=seed,
                  max_tokens=40)
        if stream:
            for content, calls, finish in _collect_stream(chat(stream=True, **kw)).values():
                assert finish == "tool_calls" and content == "" and list(calls) == [0]
                call_id, name, args = calls[0]
                assert name == "add" and call_id.startswith("chatcmpl-tool-")
                jsonschema.validate(json.loads(args), SCHEMAS["add"])
        else:
            for c in chat(**kw).choices:
                assert c.finish_reason == "tool_calls"
                _check_calls(c.message.tool_calls, {"add": SCHEMAS["add"]})
                assert len(c.message.tool_calls) == 1


HERMES_CALL = (r'<tool_call>\{"name": "get_weather", "arguments": '
               r'\{"city": "(Paris|Rome)", "unit": "C"\}\}</tool_call>')


@pytest.mark.parametrize("stream", [False, True])
def test_auto_parses_hermes_calls(chat, stream):
    """tool_choice auto (the default with tools): the model's <tool_call> block becomes a
    tool call and never shows up as content (the text is forced with a regex here)."""
    kw = dict(tools=TOOLS, temperature=1.0, seed=1, max_tokens=200,
              extra_body={"structured_outputs": {"regex": "Checking\\. " + HERMES_CALL}})
    if stream:
        ((content, calls, finish),) = _collect_stream(chat(stream=True, **kw)).values()
        assert content == "Checking. " and finish == "tool_calls"
        (call_id, name, args), = calls.values()
        assert name == "get_weather" and json.loads(args)["city"] in ("Paris", "Rome")
    else:
        (c,) = chat(**kw).choices
        assert c.finish_reason == "tool_calls" and c.message.content == "Checking."
        _check_calls(c.message.tool_calls)
    # auto without a call: plain content, no tool_calls
    (c,) = chat(tools=TOOLS, max_tokens=4, temperature=0.0).choices
    assert c.message.tool_calls is None and c.finish_reason in ("length", "stop")


def test_a_conversation_with_tool_results_is_rendered(chat):
    messages = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    (c,) = chat(messages=messages, tools=TOOLS, tool_choice="none", max_tokens=4).choices
    assert c.message.tool_calls is None and c.finish_reason in ("length", "stop")


@pytest.mark.parametrize("body,param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS},
     "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "no-such-type"}}}], "tool_choice": "required"}, "tools"),
])
def test_bad_tool_requests_are_400(served, body, param):
    r = httpx.post(served.url + "/v1/chat/completions",
                   json={"messages": MESSAGES, "max_tokens": 4, **body}, timeout=60)
    assert_error(r, 400, param)
