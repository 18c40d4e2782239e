"""POST /v1/completions: prompts (text or token ids, one or many) -> engine -> OpenAI's
`text_completion` object, or its SSE chunks.

Choice indexes follow OpenAI/vLLM: prompt p, sample i -> index p * n + i. `echo` prepends the
prompt (and, with `logprobs`, the prompt's logprobs, computed by the engine as prompt_logprobs).
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from starlette.requests import Request

from jaxserve.server.errors import SafeJSONResponse
from jaxserve.server.logprobs import completion_logprobs
from jaxserve.server.protocol import CompletionRequest
from jaxserve.server.serving import (ServingContext, created_now, new_id, read_model,
                                     run_to_end, start_stream, usage)
from jaxserve.server.sse import SSEStream, sse_events


async def create_completion(ctx: ServingContext, request: Request):
    req = await read_model(request, CompletionRequest)
    req.check()
    model = ctx.resolve_model(req.model)

    prompts = []
    for p in req.prompt:
        ids = await ctx.encode(p, req.add_special_tokens) if isinstance(p, str) else list(p)
        ctx.check_prompt(ids)
        prompts.append((p if isinstance(p, str) else None, ids))

    user_set = "max_tokens" in req.model_fields_set and req.max_tokens is not None
    constraint: dict = {}
    await ctx.add_structured_output(req, constraint)
    params = []
    for _, ids in prompts:
        kw = {**req.sampling_kwargs(), **constraint}
        kw["max_tokens"] = ctx.max_tokens_for(len(ids), req.max_tokens, "max_tokens", user_set)
        if req.logprobs is not None:
            kw["logprobs"] = req.logprobs
            if req.echo:
                kw["prompt_logprobs"] = req.logprobs
        params.append(ctx.sampling_params(kw))

    rid = new_id("cmpl")
    fmt = _Formatter(ctx, req, model, rid, prompts)
    if req.stream:
        first, merged, admission = await start_stream(ctx, request, rid, prompts, params)
        return SSEStream(sse_events(fmt.chunks(first, merged), merged), admission.release)
    finals = await run_to_end(ctx, request, rid, prompts, params)
    return SafeJSONResponse(fmt.response(finals))


class _Formatter:
    """Turns RequestOutputs into response objects; keeps per-choice progress for streams."""

    def __init__(self, ctx: ServingContext, req: CompletionRequest, model: str, rid: str,
                 prompts: list[tuple[str | None, list[int]]]):
        self.ctx, self.req, self.model, self.rid = ctx, req, model, rid
        self.prompts = prompts
        self.created = created_now()
        self.num_prompt_tokens = sum(len(ids) for _, ids in prompts)
        # (prompt, choice) -> [chars sent, tokens sent, text offset, finished]
        self._sent: dict[tuple[int, int], list[Any]] = {}

    def _prompt_text(self, p: int) -> str:
        text, ids = self.prompts[p]
        return text if text is not None else self.ctx.engine.tokenizer.decode(ids)

    def _echo_part(self, p: int, out) -> tuple[str, list[int], list]:
        """What echo puts before the generated part: prompt text, ids, logprobs."""
        _, ids = self.prompts[p]
        lps = out.prompt_logprobs if out.prompt_logprobs is not None else [None] * len(ids)
        return self._prompt_text(p), ids, list(lps)

    def _logprobs(self, ids, lps, offset) -> dict | None:
        if self.req.logprobs is None:
            return None
        return completion_logprobs(self.ctx.renderer, ids, lps, self.req.logprobs, offset)

    def _choice(self, index: int, text: str, logprobs, c) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

    def response(self, finals: list) -> dict:
        choices, generated = [], 0
        for p, out in enumerate(finals):
            for c in sorted(out.outputs, key=lambda c: c.index):
                text, ids, lps = c.text, list(c.token_ids), list(c.logprobs or [])
                if self.req.echo:
                    e_text, e_ids, e_lps = self._echo_part(p, out)
                    text, ids, lps = e_text + text, e_ids + ids, e_lps + lps
                generated += len(c.token_ids)
                choices.append(self._choice(p * self.req.n + c.index, text,
                                            self._logprobs(ids, lps, 0), c))
        return {"id": self.rid, "object": "text_completion", "created": self.created,
                "model": self.model, "choices": choices, "system_fingerprint": None,
                "usage": usage(self.num_prompt_tokens, generated)}

    def _chunk(self, choices: list[dict], generated: int) -> dict:
        chunk = {"id": self.rid, "object": "text_completion", "created": self.created,
                 "model": self.model, "choices": choices}
        opts = self.req.stream_options
        if opts is not None and opts.continuous_usage_stats:
            chunk["usage"] = usage(self.num_prompt_tokens, generated)
        elif self.req.include_usage:
            chunk["usage"] = None  # OpenAI: null on every chunk but the last
        return chunk

    async def chunks(self, first, merged: AsyncIterator) -> AsyncIterator[dict]:
        generated: dict[tuple[int, int], int] = {}
        pending = [first] if first is not None else []

        async def items():
            for item in pending:
                yield item
            async for item in merged:
                yield item

        async for p, out in items():
            for c in sorted(out.outputs, key=lambda c: c.index):
                key = (p, c.index)
                st = self._sent.get(key)
                prefix, pre_ids, pre_lps = "", [], []
                if st is None:
                    st = self._sent[key] = [0, 0, 0, False]
                    if self.req.echo:
                        prefix, pre_ids, pre_lps = self._echo_part(p, out)
                if st[3]:
                    continue
                delta = c.text[st[0]:]
                new_ids = list(c.token_ids[st[1]:])
                new_lps = list((c.logprobs or [])[st[1]:])
                if not (prefix or delta or new_ids or c.finished):
                    continue
                ids, lps = pre_ids + new_ids, pre_lps + new_lps
                logprobs = self._logprobs(ids, lps, st[2])
                if logprobs is not None:
                    st[2] = (logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
                             if ids else st[2])
                st[0], st[1], st[3] = len(c.text), len(c.token_ids), c.finished
                generated[key] = len(c.token_ids)
                choice = self._choice(p * self.req.n + c.index, prefix + delta, logprobs, c)
                yield self._chunk([choice], sum(generated.values()))
        if self.req.include_usage:
            yield {"id": self.rid, "object": "text_completion", "created": self.created,
                   "model": self.model, "choices": [],
                   "usage": usage(self.num_prompt_tokens, sum(generated.values()))}
