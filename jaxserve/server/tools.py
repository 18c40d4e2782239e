"""Tool calling for /v1/chat/completions: the tool_choice modes, the grammars that enforce
`required` and named choices, and the parsers that find tool calls in free text (`auto`).

- "none": the tools are rendered by the chat template, nothing is parsed.
- "auto": the model decides; `--tool-call-parser` extracts its calls from the text (`hermes`:
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, as Qwen2.5/Qwen3 and Hermes
  models write them; `llama3_json`: `{"name": ..., "parameters": {...}}`, optionally after
  `<|python_tag|>`, several separated by `;`). Needs `--enable-auto-tool-choice`.
- "required": the output is constrained (engine/grammar.py) to a JSON array of one or more
  {"name": <a tool's name>, "parameters": <that tool's schema>} objects (one, without
  parallel_tool_calls), so the calls always parse and match their schemas.
- {"type": "function", "function": {"name": N}}: the output is constrained to N's parameters
  schema and is the call's arguments.

Host side, no jax. Messages and schemas follow OpenAI's shapes.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from jaxserve.engine.sampling_params import StructuredOutputsParams

ANY_OBJECT = {"type": "object"}


def new_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex[:24]}"


def tool_call(name: str, arguments: str) -> dict:
    return {"id": new_call_id(), "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or ANY_OBJECT


def required_schema(tools: list[dict], parallel: bool) -> dict:
    """JSON schema of a `required` answer: a list of calls, each naming one tool and matching
    its parameters."""
    one_of = [{"type": "object",
               "properties": {"name": {"enum": [t["function"]["name"]]},
                              "parameters": _parameters(t)},
               "required": ["name", "parameters"], "additionalProperties": False}
              for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": one_of}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def forced_constraint(tools: list[dict], tool_choice, parallel: bool
                      ) -> StructuredOutputsParams | None:
    """The grammar that makes the model call a tool, for `required` or a named choice."""
    # compact JSON: a call's arguments need no layout, and unbounded whitespace would let a
    # weak model ramble until max_tokens inside a call that then does not parse
    if tool_choice == "required":
        return StructuredOutputsParams(json=required_schema(tools, parallel),
                                       disable_any_whitespace=True)
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        tool = next(t for t in tools if t["function"]["name"] == name)
        return StructuredOutputsParams(json=_parameters(tool), disable_any_whitespace=True)
    return None


def forced_calls(tools: list[dict], tool_choice, text: str) -> list[dict] | None:
    """The calls in a constrained (`required` / named) output; None if it is incomplete (cut
    by max_tokens) and does not parse."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(tool_choice, dict):
        return [tool_call(tool_choice["function"]["name"], json.dumps(value))]
    return [tool_call(c["name"], json.dumps(c["parameters"])) for c in value]


class ToolMode:
    """A chat request's tools and what to do with them: which grammar constrains the output,
    and how the output becomes tool calls."""

    def __init__(self, tools: list[dict], choice, parallel: bool, parser_name: str | None):
        self.tools, self.choice, self.parallel = tools, choice, parallel
        self.parser = PARSERS[parser_name]() if parser_name and choice == "auto" else None

    @property
    def forced(self) -> bool:
        return self.choice == "required" or isinstance(self.choice, dict)

    @property
    def named(self) -> str | None:
        return self.choice["function"]["name"] if isinstance(self.choice, dict) else None

    def constraint(self) -> StructuredOutputsParams | None:
        return forced_constraint(self.tools, self.choice, self.parallel)

    def calls(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, tool calls) of a finished output."""
        if self.forced:
            calls = forced_calls(self.tools, self.choice, text)
            return (text, []) if calls is None else (None, calls)
        if self.parser is not None:
            return self.parser.extract(text)
        return text, []


# -- auto: parsers of free text --------------------------------------------------------------

class HermesParser:
    """`<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks; text outside them is
    the message's content."""
    start = "<tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def extract(self, text: str) -> tuple[str | None, list[dict]]:
        calls = []
        for body in self._block.findall(text):
            call = _call_from_json(body, ("arguments", "parameters"))
            if call is None:
                return text, []  # a malformed block: leave the text as it is
            calls.append(call)
        if not calls:
            return text, []
        content = self._block.sub("", text).strip()
        return content or None, calls


class Llama3JsonParser:
    """Llama 3.x JSON tool calls: the whole message is one or more `{"name": ...,
    "parameters": ...}` objects separated by ';', optionally after <|python_tag|>."""
    start = "{"
    _tag = "<|python_tag|>"

    def extract(self, text: str) -> tuple[str | None, list[dict]]:
        body = text.strip()
        if body.startswith(self._tag):
            body = body[len(self._tag):].strip()
        if not body.startswith("{"):
            return text, []
        calls = []
        decoder = json.JSONDecoder()
        pos = 0
        while pos < len(body):
            try:
                value, end = decoder.raw_decode(body, pos)
            except ValueError:
                return text, []
            call = _call_from_value(value, ("parameters", "arguments"))
            if call is None:
                return text, []
            calls.append(call)
            pos = end
            while pos < len(body) and body[pos] in " \t\r\n;":
                pos += 1
        return None, calls


def _call_from_json(body: str, keys) -> dict | None:
    try:
        return _call_from_value(json.loads(body), keys)
    except ValueError:
        return None


def _call_from_value(value, keys) -> dict | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = next((value[k] for k in keys if k in value), {})
    return tool_call(value["name"], args if isinstance(args, str) else json.dumps(args))


PARSERS = {"hermes": HermesParser, "llama3_json": Llama3JsonParser}


class StreamingToolText:
    """Splits a growing output into content the client may see now and a tail held back
    because it may begin a tool call (the parser's start marker, or a prefix of it); at the
    end, `finish` parses the whole text."""

    def __init__(self, parser):
        self.parser = parser
        self.sent = 0  # characters of content already sent
        self.in_call = False

    def content_delta(self, text: str) -> str:
        if self.in_call:
            return ""
        start = self.parser.start
        at = text.find(start, self.sent)
        if at >= 0 and (start != "{" or not text[:at].strip()):
            self.in_call = True
            delta, self.sent = text[self.sent:at], at
            return delta
        hold = 0  # a suffix that could still grow into the marker
        for k in range(min(len(start) - 1, len(text) - self.sent), 0, -1):
            if text.endswith(start[:k]):
                hold = k
                break
        if start == "{" and not text.strip():
            hold = len(text) - self.sent  # llama3_json: leading whitespace may precede a call
        end = len(text) - hold
        delta, self.sent = text[self.sent:end], max(self.sent, end)
        return delta

    def finish(self, text: str) -> tuple[str, list[dict]]:
        """(content not sent yet, the calls)."""
        rest, calls = self.parser.extract(text[self.sent:])  # sent content holds no call
        if not calls:
            return text[self.sent:], []
        return rest or "", calls
