"""Request schemas of the OpenAI-compatible routes (pydantic), with vLLM's extra sampling fields.

Everything not listed is rejected (`extra="forbid"`): a parameter we do not implement must fail
with a 400 that names it, never be silently dropped. A few OpenAI parameters that clients send
with harmless default values (`suffix: null`, `tools: []`, `best_of == n`) are declared so that
those defaults pass while anything else is refused.

Cross-field rules that need a precise `param` (pydantic would report them at the model root)
live in `check()` methods that raise `APIError`; the handlers call them right after parsing.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jaxserve.engine.sampling_params import SamplingParamsError, StructuredOutputsParams
from jaxserve.server import limits
from jaxserve.server.errors import bad_request


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


class JsonSchemaFormat(_Strict):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's response_format: free text, any JSON object, or JSON matching a schema."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` extra field: exactly one constraint."""
    json_: dict[str, Any] | bool | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False


class _SamplingRequest(_Strict):
    """Fields shared by completions and chat: model, streaming, and sampling knobs."""

    model: str | None = None  # None: the first served name, as vLLM does
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    # JSON object keys are strings; SamplingParams converts them to token ids and checks them.
    logit_bias: dict[str, float] | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    user: str | None = None  # metadata for the caller's own accounting; unused here
    # structured output: OpenAI's response_format, vLLM's structured_outputs, and the older
    # guided_* fields as aliases of the latter (at most one of all these per request)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def structured_spec(self) -> tuple[StructuredOutputsParams | None, str | None]:
        """(the request's constraint, the field errors about it name), or (None, None)."""
        sources = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            sources.append(("response_format", {"json_object": True}))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise bad_request("response_format of type json_schema needs "
                                  "json_schema.schema.", "response_format")
            sources.append(("response_format", {"json": rf.json_schema.schema_}))
        if self.structured_outputs is not None:
            fields = self.structured_outputs.model_dump(exclude_none=True, by_alias=True)
            sources.append(("structured_outputs", fields))
        for name in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{name}")
            if value is not None:
                sources.append((f"guided_{name}", {name: value}))
        if not sources:
            return None, None
        if len(sources) > 1:
            raise bad_request("Only one structured-output constraint per request: got "
                              f"{', '.join(name for name, _ in sources)}.", sources[1][0])
        param, fields = sources[0]
        try:
            spec = StructuredOutputsParams(**fields)
        except SamplingParamsError as e:
            raise bad_request(str(e), e.param if param == "structured_outputs" else param) \
                from None
        return spec, spec.param if param == "structured_outputs" else param

    def check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise bad_request("Stream options can only be defined when `stream=True`.",
                              "stream_options")

    def sampling_kwargs(self) -> dict[str, Any]:
        """The SamplingParams fields that both routes map the same way (None: keep default)."""
        kw: dict[str, Any] = dict(
            n=self.n, stop=self.stop, seed=self.seed, temperature=self.temperature,
            top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=self.logit_bias,
            min_tokens=self.min_tokens, ignore_eos=self.ignore_eos,
            stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens)
        return {k: v for k, v in kw.items() if v is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and (self.stream_options.include_usage
                                             or self.stream_options.continuous_usage_stats))


def _is_token_ids(x) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. After validation `prompt` is a non-empty list whose items are each
    a string or a list of token ids (one engine request per item)."""

    prompt: list[str | list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True  # vLLM's extension: BOS etc. when tokenizing a text prompt

    @field_validator("prompt", mode="before")
    @classmethod
    def _normalize_prompt(cls, v):
        if isinstance(v, str):
            return [v]
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be an empty list")
            if _is_token_ids(v):
                return [v]
            if all(isinstance(x, str) for x in v) or all(_is_token_ids(x) for x in v):
                return v
        raise ValueError("prompt must be a string, a list of strings, a list of token ids, "
                         "or a list of lists of token ids")

    def check(self) -> None:
        limits.at_most("prompt", len(self.prompt), limits.MAX_PROMPTS, "prompts")
        self.check_common()
        if self.suffix:
            raise bad_request("suffix is not supported.", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request(f"best_of must equal n ({self.n}) when set: ranking several "
                              f"candidates is not supported, got {self.best_of}.", "best_of")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None


class ChatTool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoiceFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedToolChoiceFunction


class ToolCallFunction(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None           # a tool message: the call it answers

    @field_validator("tool_calls")
    @classmethod
    def _calls_from_assistant(cls, v, info):
        if v is not None and info.data.get("role") != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return v

    @field_validator("tool_call_id")
    @classmethod
    def _id_on_tool_messages(cls, v, info):
        if v is not None and info.data.get("role") != "tool":
            raise ValueError("only tool messages carry a tool_call_id")
        return v

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, v):
        # The OpenAI list-of-parts form; text parts are joined as vLLM does, anything else
        # (images, audio, files) is a modality we do not serve.
        if isinstance(v, list):
            texts = []
            for i, part in enumerate(v):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"content part {i} has type {kind!r}; only 'text' parts "
                                     "are supported")
                texts.append(TextPart.model_validate(part).text)
            return "\n".join(texts)
        return v

    def as_template_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"role": self.role, "content": self.content or ""}
        if self.name is not None:
            d["name"] = self.name
        if self.tool_calls:
            # chat templates expect the arguments as an object, as vLLM hands them over
            d["tool_calls"] = [{"id": c.id, "type": c.type, "function": {
                "name": c.function.name, "arguments": _json_or_text(c.function.arguments)}}
                for c in self.tool_calls]
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        return d


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    # checked in check() (each tool in full there, so that errors name `tools`)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def check(self) -> None:
        limits.check_messages(self.messages)
        self.check_common()
        self.check_tools()
        if self.top_logprobs is not None and not self.logprobs and self.top_logprobs > 0:
            raise bad_request("when using `top_logprobs`, `logprobs` must be set to true.",
                              "top_logprobs")

    def check_tools(self) -> None:
        if not self.tools:
            if self.tool_choice not in (None, "none"):
                raise bad_request("tool_choice needs tools.", "tool_choice")
            return
        limits.at_most("tools", len(self.tools), limits.MAX_TOOLS, "tools")
        names = []
        for i, tool in enumerate(self.tools):
            try:
                names.append(ChatTool.model_validate(tool).function.name)
            except ValidationError as e:
                first = e.errors(include_url=False)[0]
                where = ".".join(str(x) for x in first.get("loc", ()))
                raise bad_request(f"tools[{i}] is invalid: {where}: {first.get('msg')}",
                                  "tools") from None
        if len(set(names)) != len(names):
            raise bad_request("tool function names must be unique.", "tools")
        if isinstance(self.tool_choice, NamedToolChoice) and \
                self.tool_choice.function.name not in names:
            raise bad_request(f"tool_choice names {self.tool_choice.function.name!r}, which is "
                              "not among the tools.", "tool_choice")

    @property
    def effective_tool_choice(self):
        """OpenAI's default: "auto" when tools are given, else "none"; a named choice as a
        dict."""
        choice = self.tool_choice
        if choice is None:
            return "auto" if self.tools else "none"
        return choice.model_dump() if isinstance(choice, NamedToolChoice) else choice

    @property
    def max_tokens_param(self) -> tuple[str, int | None]:
        """(name the user gave, value): errors must name the field the client actually sent."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens


class TokenizeRequest(_Strict):
    """POST /tokenize: either a `prompt` or chat `messages` (rendered with the template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise bad_request("Exactly one of `prompt` and `messages` must be given.", "prompt")
        if self.messages is not None:
            limits.check_messages(self.messages)


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]

