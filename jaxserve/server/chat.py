"""POST /v1/chat/completions: messages -> chat template -> engine -> `chat.completion` object or
`chat.completion.chunk` SSE events (a role chunk per choice first, then content deltas, the
finish reason on each choice's last chunk, and the usage chunk when asked for)."""

from __future__ import annotations

from typing import AsyncIterator

from starlette.requests import Request

from jaxserve.server.errors import SafeJSONResponse, bad_request
from jaxserve.server.logprobs import chat_logprobs
from jaxserve.server.protocol import ChatCompletionRequest, ChatMessage
from jaxserve.server.serving import (SSEStream, ServingContext, created_now, new_id,
                                     read_model, run_to_end, sse_events, start_stream, usage)


def render_chat(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
    """The model's own chat template; template failures (no template, roles out of order, a
    `raise_exception` in the template) are the caller's input problem: 400 on `messages`."""
    try:
        return tokenizer.apply_chat_template([m.as_template_dict() for m in messages],
                                             add_generation_prompt=add_generation_prompt,
                                             tokenize=False)
    except Exception as e:  # noqa: BLE001 - jinja and tokenizer errors have no common base
        raise bad_request(f"Could not apply the chat template: {e}", "messages") from None


async def create_chat_completion(ctx: ServingContext, request: Request):
    req = await read_model(request, ChatCompletionRequest)
    req.check()
    model = ctx.resolve_model(req.model)
    text = render_chat(ctx.engine.tokenizer, req.messages)
    # The template already wrote any BOS; adding special tokens again would double it.
    ids = await ctx.encode(text, add_special_tokens=False)

    ctx.check_prompt(ids)
    mt_name, mt = req.max_tokens_param
    kw = req.sampling_kwargs()
    await ctx.add_structured_output(req, kw)
    kw["max_tokens"] = ctx.max_tokens_for(len(ids), mt, mt_name, user_set=mt is not None)
    if req.logprobs:
        kw["logprobs"] = req.top_logprobs or 0
    params = [ctx.sampling_params(kw, rename={"logprobs": "top_logprobs",
                                              "max_tokens": mt_name})]
    prompts = [(text, ids)]

    rid = new_id("chatcmpl")
    fmt = _Formatter(ctx, req, model, rid, len(ids))
    if req.stream:
        first, merged, admission = await start_stream(ctx, request, rid, prompts, params)
        return SSEStream(sse_events(fmt.chunks(first, merged), merged), admission.release)
    (final,) = await run_to_end(ctx, request, rid, prompts, params)
    return SafeJSONResponse(fmt.response(final))


class _Formatter:
    def __init__(self, ctx: ServingContext, req: ChatCompletionRequest, model: str, rid: str,
                 num_prompt_tokens: int):
        self.ctx, self.req, self.model, self.rid = ctx, req, model, rid
        self.created = created_now()
        self.num_prompt_tokens = num_prompt_tokens

    def _logprobs(self, ids, lps) -> dict | None:
        if not self.req.logprobs:
            return None
        return chat_logprobs(self.ctx.renderer, ids, lps, self.req.top_logprobs or 0)

    def response(self, out) -> dict:
        choices = []
        for c in sorted(out.outputs, key=lambda c: c.index):
            choices.append({
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": self._logprobs(list(c.token_ids), list(c.logprobs or [])),
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
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
        sent: dict[int, list] = {}  # choice -> [chars sent, tokens sent, finished]
        generated: dict[int, int] = {}

        async def items():
            if first is not None:
                yield first
            async for item in merged:
                yield item

        async for _, out in items():
            for c in sorted(out.outputs, key=lambda c: c.index):
                st = sent.setdefault(c.index, [0, 0, False])
                if st[2]:
                    continue
                delta = c.text[st[0]:]
                new_ids = list(c.token_ids[st[1]:])
                if not (delta or new_ids or c.finished):
                    continue
                new_lps = list((c.logprobs or [])[st[1]:])
                st[0], st[1], st[2] = len(c.text), len(c.token_ids), c.finished
                generated[c.index] = len(c.token_ids)
                choice = {"index": c.index, "delta": {"content": delta} if delta else {},
                          "logprobs": self._logprobs(new_ids, new_lps) if new_ids else None,
                          "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                yield self._chunk(choice, sum(generated.values()))
        if self.req.include_usage:
            yield {"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                   "model": self.model, "choices": [],
                   "usage": usage(self.num_prompt_tokens, sum(generated.values()))}
