"""POST /v1/chat/completions: messages -> chat template -> engine -> `chat.completion` object or
`chat.completion.chunk` SSE events (a role chunk per choice first, then content deltas, the
finish reason on each choice's last chunk, and the usage chunk when asked for).

With tools (server/tools.py) a choice's text may become `tool_calls` (finish_reason
"tool_calls"): a named tool's arguments stream as they are generated, calls found by the
`auto` parser or in a `required` answer go out when the choice finishes.
"""

from __future__ import annotations

from typing import AsyncIterator

from starlette.requests import Request

from jaxserve.engine.sampling_params import SamplingParamsError
from jaxserve.server.errors import SafeJSONResponse, bad_request
from jaxserve.server.logprobs import chat_logprobs
from jaxserve.server.protocol import ChatCompletionRequest, ChatMessage, ChatTool
from jaxserve.server.serving import (ServingContext, created_now, new_id, read_model,
                                     run_to_end, start_stream, usage)
from jaxserve.server.sse import SSEStream, sse_events
from jaxserve.server.tools import StreamingToolText, ToolMode, new_call_id


def render_chat(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True,
                tools: list[dict] | None = None) -> str:
    """The model's own chat template; template failures (no template, roles out of order, a
    `raise_exception` in the template) are the caller's input problem: 400 on `messages`."""
    extra = {"tools": tools} if tools else {}
    try:
        return tokenizer.apply_chat_template([m.as_template_dict() for m in messages],
                                             add_generation_prompt=add_generation_prompt,
                                             tokenize=False, **extra)
    except Exception as e:  # noqa: BLE001 - jinja and tokenizer errors have no common base
        raise bad_request(f"Could not apply the chat template: {e}", "messages") from None


def tool_mode(ctx: ServingContext, req: ChatCompletionRequest) -> ToolMode | None:
    if not req.tools:
        return None
    choice = req.effective_tool_choice
    if choice == "auto" and not ctx.config.enable_auto_tool_choice:
        raise bad_request(
            '"auto" tool choice (the default when tools are given) needs the server started '
            "with --enable-auto-tool-choice and --tool-call-parser; \"required\", \"none\" and "
            "a named function work without them.",
            "tool_choice" if req.tool_choice is not None else "tools")
    tools = [ChatTool.model_validate(t).model_dump(exclude_none=True) for t in req.tools]
    return ToolMode(tools, choice, parallel=req.parallel_tool_calls is not False,
                    parser_name=ctx.config.tool_call_parser)


async def create_chat_completion(ctx: ServingContext, request: Request):
    req = await read_model(request, ChatCompletionRequest)
    req.check()
    model = ctx.resolve_model(req.model)
    mode = tool_mode(ctx, req)
    text = render_chat(ctx.engine.tokenizer, req.messages, tools=mode.tools if mode else None)
    # The template already wrote any BOS; adding special tokens again would double it.
    ids = await ctx.encode(text, add_special_tokens=False)

    ctx.check_prompt(ids)
    mt_name, mt = req.max_tokens_param
    kw = req.sampling_kwargs()
    await ctx.add_structured_output(req, kw)
    if mode is not None and mode.forced:
        if "structured_outputs" in kw:
            raise bad_request("A required or named tool_choice constrains the output already; "
                              "it cannot be combined with another structured-output "
                              "constraint.", "tool_choice")
        try:
            spec = mode.constraint()
        except SamplingParamsError as e:
            raise bad_request(f"The tools' schemas do not make a valid constraint: {e}",
                              "tools") from None
        await ctx.compile_constraint(spec, "tools")
        kw["structured_outputs"] = spec
    kw["max_tokens"] = ctx.max_tokens_for(len(ids), mt, mt_name, user_set=mt is not None)
    if req.logprobs:
        kw["logprobs"] = req.top_logprobs or 0
    params = [ctx.sampling_params(kw, rename={"logprobs": "top_logprobs",
                                              "max_tokens": mt_name})]
    prompts = [(text, ids)]

    rid = new_id("chatcmpl")
    fmt = _Formatter(ctx, req, model, rid, len(ids), mode)
    if req.stream:
        first, merged, admission = await start_stream(ctx, request, rid, prompts, params)
        return SSEStream(sse_events(fmt.chunks(first, merged), merged), admission.release)
    (final,) = await run_to_end(ctx, request, rid, prompts, params)
    return SafeJSONResponse(fmt.response(final))


def _finish_reason(reason: str | None, calls: list) -> str | None:
    return "tool_calls" if calls and reason == "stop" else reason


class _ChoiceStream:
    """What one streamed choice has sent, and how its text turns into deltas."""

    def __init__(self, mode: ToolMode | None):
        self.chars = self.tokens = 0
        self.finished = False
        self.mode = mode if mode is not None and mode.choice != "none" else None
        self.auto = (StreamingToolText(mode.parser) if self.mode is not None
                     and mode.parser is not None else None)
        self.named_id = None  # the named tool's call id, once its header went out

    def delta(self, text: str, finished: bool, finish_reason: str | None) -> tuple[dict, str | None]:
        """(delta for the text so far, the finish reason to report)."""
        new = text[self.chars:]
        self.chars = len(text)
        mode = self.mode
        if mode is None:
            return ({"content": new} if new else {}), finish_reason
        if mode.named is not None:  # the whole output is the call's arguments
            reason = "tool_calls" if finish_reason == "stop" else finish_reason
            call: dict = {"index": 0, "function": {"arguments": new}}
            if self.named_id is None:
                self.named_id = new_call_id()
                call.update(id=self.named_id, type="function")
                call["function"]["name"] = mode.named
            elif not new:
                return {}, reason
            return {"tool_calls": [call]}, reason
        if self.auto is not None and not finished:
            content = self.auto.content_delta(text)
            return ({"content": content} if content else {}), finish_reason
        if not finished:
            return {}, finish_reason  # required: the calls go out whole at the end
        if self.auto is not None:
            rest, calls = self.auto.finish(text)
        else:
            content, calls = mode.calls(text)
            rest = "" if calls else text
        delta: dict = {}
        if rest:
            delta["content"] = rest
        if calls:
            delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
        return delta, _finish_reason(finish_reason, calls)


class _Formatter:
    def __init__(self, ctx: ServingContext, req: ChatCompletionRequest, model: str, rid: str,
                 num_prompt_tokens: int, mode: ToolMode | None = None):
        self.ctx, self.req, self.model, self.rid = ctx, req, model, rid
        self.created = created_now()
        self.num_prompt_tokens = num_prompt_tokens
        self.mode = mode

    def _logprobs(self, ids, lps) -> dict | None:
        if not self.req.logprobs:
            return None
        return chat_logprobs(self.ctx.renderer, ids, lps, self.req.top_logprobs or 0)

    def _message(self, c) -> tuple[dict, str | None]:
        message = {"role": "assistant", "content": c.text}
        if self.mode is None or self.mode.choice == "none":
            return message, c.finish_reason
        content, calls = self.mode.calls(c.text)
        if not calls:
            return message, c.finish_reason
        return ({"role": "assistant", "content": content, "tool_calls": calls},
                _finish_reason(c.finish_reason, calls))

    def response(self, out) -> dict:
        choices = []
        for c in sorted(out.outputs, key=lambda c: c.index):
            message, finish = self._message(c)
            choices.append({
                "index": c.index, "message": message,
                "logprobs": self._logprobs(list(c.token_ids), list(c.logprobs or [])),
                "finish_reason": finish, "stop_reason": c.stop_reason})
        generated = sum(len(c.token_ids) for c in out.outputs)
        return {"id": self.rid, "object": "chat.completion", "created": self.created,
                "model": self.model, "choices": choices, "system_fingerprint": None,
                "usage": usage(self.num_prompt_tokens, generated)}

    def _chunk(self, choice: dict, generated: int) -> dict:
        chunk = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.model, "system_fingerprint": None, "choices": [choice]}
        opts = self.req.stream_options
        if opts is not None and opts.continuous_usage_stats:
            chunk["usage"] = usage(self.num_prompt_tokens, generated)
        elif self.req.include_usage:
            chunk["usage"] = None
        return chunk

    async def chunks(self, first, merged: AsyncIterator) -> AsyncIterator[dict]:
        # The role goes out before any token, as OpenAI's first chunk does.
        for i in range(self.req.n):
            yield self._chunk({"index": i, "delta": {"role": "assistant", "content": ""},
                               "logprobs": None, "finish_reason": None}, 0)
        streams: dict[int, _ChoiceStream] = {}
        generated: dict[int, int] = {}

        async def items():
            if first is not None:
                yield first
            async for item in merged:
                yield item

        async for _, out in items():
            for c in sorted(out.outputs, key=lambda c: c.index):
                st = streams.setdefault(c.index, _ChoiceStream(self.mode))
                if st.finished:
                    continue
                new_ids = list(c.token_ids[st.tokens:])
                if not (c.text[st.chars:] or new_ids or c.finished):
                    continue
                new_lps = list((c.logprobs or [])[st.tokens:])
                delta, finish = st.delta(c.text, c.finished, c.finish_reason)
                st.tokens, st.finished = len(c.token_ids), c.finished
                generated[c.index] = len(c.token_ids)
                if not (delta or new_ids or c.finished):
                    continue
                choice = {"index": c.index, "delta": delta,
                          "logprobs": self._logprobs(new_ids, new_lps) if new_ids else None,
                          "finish_reason": finish if c.finished else None,
                          "stop_reason": c.stop_reason}
                yield self._chunk(choice, sum(generated.values()))
        if self.req.include_usage:
            yield {"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                   "model": self.model, "choices": [],
                   "usage": usage(self.num_prompt_tokens, sum(generated.values()))}
