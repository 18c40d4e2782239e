"""Tool-call parsing (server/tools.py): hermes and llama3_json text, the streaming split that
holds back a possible tool-call start, and the schemas that force required / named calls."""

from __future__ import annotations

import json

import pytest

from jaxserve.server.tools import (HermesParser, Llama3JsonParser, StreamingToolText, ToolMode,
                                   required_schema)

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"]}}}


def _named(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_hermes_blocks_become_calls_and_the_rest_content():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '\n</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>')
    content, calls = HermesParser().extract(text)
    assert content == "Let me check."
    assert _named(calls) == [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    assert all(c["type"] == "function" and c["id"].startswith("chatcmpl-tool-") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    assert HermesParser().extract("no call here") == ("no call here", [])
    broken = '<tool_call>{"name": "add", "arguments": </tool_call>'
    assert HermesParser().extract(broken) == (broken, [])  # malformed: left as text


def test_llama3_json_calls():
    content, calls = Llama3JsonParser().extract(
        '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
        '{"name": "get_weather", "parameters": {"city": "Rome"}}')
    assert content is None
    assert _named(calls) == [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Rome"})]
    assert Llama3JsonParser().extract("The answer is 3.") == ("The answer is 3.", [])
    assert Llama3JsonParser().extract('{"no": "name"}') == ('{"no": "name"}', [])


@pytest.mark.parametrize("pieces,streamed,final", [
    (["Sure", ", <tool", "_call>", '{"name": "add", "arguments": {"a": 1, "b": 2}}',
      "</tool_call>"], "Sure, ", ""),
    (["Plain ", "text <tool", " no call"], "Plain text <tool no call", ""),
])
def test_streaming_holds_back_a_possible_call(pieces, streamed, final):
    split = StreamingToolText(HermesParser())
    text, sent = "", ""
    for piece in pieces:
        text += piece
        sent += split.content_delta(text)
        assert "<tool_call>" not in sent
    rest, calls = split.finish(text)
    assert sent == streamed and rest == final
    assert bool(calls) == ("</tool_call>" in text)


def test_forced_modes_parse_their_constrained_output():
    required = ToolMode([WEATHER, ADD], "required", parallel=True, parser_name=None)
    schema = required_schema([WEATHER, ADD], parallel=False)
    assert schema["maxItems"] == 1 and schema["minItems"] == 1
    content, calls = required.calls('[{"name": "add", "parameters": {"a": 4, "b": 5}}]')
    assert content is None and _named(calls) == [("add", {"a": 4, "b": 5})]
    assert required.calls('[{"name": "add", "param') == ('[{"name": "add", "param', [])
    named = ToolMode([WEATHER, ADD], {"type": "function", "function": {"name": "get_weather"}},
                     parallel=True, parser_name="hermes")
    assert named.parser is None and named.named == "get_weather"
    assert _named(named.calls('{"city": "Oslo"}')[1]) == [("get_weather", {"city": "Oslo"})]
    assert named.constraint().json == WEATHER["function"]["parameters"]
