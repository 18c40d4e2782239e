"""What the generation routes share: model names, admission, length checks, the engine call with
its abort guarantee (the SSE response that notices a client leaving is in sse.py).

The abort guarantee is the point of this module: every path out of `ServingContext.generate`
that is not a finished request (client disconnect, cancelled task, server shutdown, error)
calls `engine.abort(request_id)` so that the request's KV pages are freed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import logging
import time
import uuid
from typing import Any, AsyncIterator, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from jaxserve.engine.input_limits import RequestRejectedError
from jaxserve.engine.sampling_params import SamplingParams, SamplingParamsError
from jaxserve.server.errors import APIError, bad_request, from_validation_error
from jaxserve.server.logprobs import TokenRenderer
from jaxserve.server.metrics import RequestTracker, ServerMetrics
from jaxserve.server.sse import merge, until_disconnect

log = logging.getLogger(__name__)
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

# Tokenizing this many characters takes long enough (~ms) to stall other streams: off-loop.
_ENCODE_IN_THREAD_CHARS = 20_000


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _lone_surrogate_path(value, path: list[str]) -> str | None:
    """The dotted path of the first string (or key) in a parsed body holding a lone surrogate."""
    if isinstance(value, str):
        return ".".join(path) if any(0xD800 <= ord(c) <= 0xDFFF for c in value) else None
    items = (value.items() if isinstance(value, dict) else
             enumerate(value) if isinstance(value, list) else ())
    for key, item in items:
        found = _lone_surrogate_path(str(key), path) or _lone_surrogate_path(item, path + [str(key)])
        if found is not None:
            return found
    return None


async def read_model(request: Request, model: type[M]) -> M:
    """Body -> validated request model; every failure is a 400 (content type is not enforced:
    `curl -d` sends form encoding for what is JSON)."""
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"Invalid JSON body: {e}") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    # Valid UTF-8 bytes cannot hold a lone UTF-16 surrogate, but a JSON \u escape can; no
    # tokenizer or encoder takes one, so such text is refused here, naming where it is.
    if _SURROGATE_ESCAPE.search(raw):
        where = _lone_surrogate_path(body, ["body"])
        if where is not None:
            raise bad_request("The request holds text that is not valid Unicode (a lone UTF-16 "
                              "surrogate escape).", where)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise from_validation_error(e) from None


class Admission:
    """A slot in the server's bounded set of in-flight engine requests; release() is idempotent
    so that both the normal end of a stream and its cancellation may call it."""

    def __init__(self, ctx: "ServingContext", n: int):
        self._ctx, self._n = ctx, n
        ctx.in_flight += n

    def release(self) -> None:
        if self._n:
            self._ctx.in_flight -= self._n
            self._n = 0


class ServingContext:
    def __init__(self, engine, config, metrics: ServerMetrics):
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.served_names: list[str] = list(config.served_model_name or [engine.model_name])
        self.renderer = TokenRenderer(engine.tokenizer)
        self.in_flight = 0
        self.draining = False  # set on SIGTERM: new work gets 503 while streams finish
        # Running batch plus the queue allowed behind it; beyond that a request would only wait
        # (and hold a connection) for longer than it is worth: 503 tells it to retry elsewhere.
        self.capacity = engine.max_num_seqs + config.max_queued_requests

    # -- request checks -------------------------------------------------------------------

    def resolve_model(self, name: str | None) -> str:
        if name is None:
            return self.served_names[0]
        if name not in self.served_names:
            raise APIError(404, f"The model `{name}` does not exist.", "model")
        return name

    def admit(self, n: int) -> Admission:
        """A slot for n sequences (a request's n x prompts), or 503 when they do not fit."""
        if self.draining:
            raise APIError(503, "The server is shutting down.", headers={"Retry-After": "5"})
        if not self.engine.is_running():
            raise APIError(503, "The engine is not running.")
        if self.in_flight + n > self.capacity:
            self.metrics.rejected("overload")
            raise APIError(503, f"The server is overloaded: {self.in_flight} sequences in flight "
                           f"and this request adds {n} (limit {self.capacity} = --max-num-seqs + "
                           "--max-queued-requests). Retry later.", headers={"Retry-After": "1"})
        return Admission(self, n)

    def check_prompt(self, ids: list[int]) -> None:
        """The engine's own prompt rules (engine/input_limits.py), asked before anything
        starts, so a request with several prompts fails whole, before any of them runs."""
        try:
            self.engine.input_limits.check_prompt(ids)
        except RequestRejectedError as e:
            raise bad_request(str(e), e.param) from None

    def max_tokens_for(self, num_prompt: int, max_tokens: int | None, param: str,
                       user_set: bool) -> int:
        """The engine's context-length rule: an explicit max_tokens that does not fit is an
        error (on `param`, the name the client used), a default one is clamped to what fits."""
        try:
            return self.engine.input_limits.max_tokens(num_prompt, max_tokens, explicit=user_set,
                                                       param=param)
        except RequestRejectedError as e:
            raise bad_request(str(e), e.param) from None

    def sampling_params(self, kwargs: dict[str, Any], rename: dict[str, str] | None = None
                        ) -> SamplingParams:
        """SamplingParams validate themselves (ranges, token ids against the vocabulary); their
        error names the field, renamed where the client used another name for it."""
        try:
            params = SamplingParams(**kwargs)
            params.verify_token_ids(self.engine.input_limits.vocab_size)
            return params
        except SamplingParamsError as e:
            raise bad_request(str(e), (rename or {}).get(e.param, e.param)) from None

    async def add_structured_output(self, req, kw: dict[str, Any]) -> None:
        """The request's constraint into the sampling kwargs, compiled (or found cached) off
        the event loop now, so that a bad one is a 400 naming the field the client used."""
        spec, param = req.structured_spec()
        if spec is None:
            return
        await self.compile_constraint(spec, param)
        kw["structured_outputs"] = spec

    async def compile_constraint(self, spec, param: str) -> None:
        """Compile a constraint now (cached for the engine); a bad one is a 400 on `param`."""
        try:
            await self.engine.compile_grammar(spec, param)
        except RequestRejectedError as e:
            raise bad_request(str(e), e.param) from None

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        tok = self.engine.tokenizer
        if len(text) > _ENCODE_IN_THREAD_CHARS:
            return await asyncio.to_thread(tok.encode, text, add_special_tokens=add_special_tokens)
        return tok.encode(text, add_special_tokens=add_special_tokens)

    def check_token_ids(self, ids: list[int], param: str) -> None:
        try:
            self.engine.input_limits.check_token_ids(ids, param)
        except RequestRejectedError as e:
            raise bad_request(str(e), e.param) from None

    # -- the engine call ------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       prompt: str | None, tracker: RequestTracker) -> AsyncIterator[Any]:
        """engine.generate with metrics; aborts the engine request on any unfinished exit."""
        finished = rejected = False
        stream = None
        try:
            stream = self.engine.generate(request_id, prompt_ids, params, prompt=prompt)
            async for out in stream:
                tracker.on_output(out)
                finished = out.finished
                yield out
                if finished:
                    break
            if not finished:  # the engine dropped it (shutdown, engine-side abort)
                raise APIError(503, "The engine ended the request before it finished "
                               "(the server may be shutting down).")
        except ValueError as e:  # the engine's verdict on an invalid request
            rejected = True
            raise bad_request(str(e), getattr(e, "param", None)) from None
        except Exception as e:
            if not self.engine.is_running():  # a dead or stopping engine: not the client's fault,
                # and not a bug of this request either; another replica can serve it
                raise APIError(503, f"The engine is not running: {e}") from e
            raise
        finally:
            if not finished:
                if not rejected:
                    tracker.on_abort(params.n)
                await self.abort(request_id)
            aclose = getattr(stream, "aclose", None) if stream is not None else None
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def abort(self, request_id: str) -> None:
        try:
            await self.engine.abort(request_id)
        except Exception:  # noqa: BLE001 - an abort must never turn into a client-visible error
            log.exception("engine.abort(%s) failed", request_id)


def created_now() -> int:
    return int(time.time())


# -- driving a request: whole (non-streaming) or as a stream ---------------------------------

Prompt = tuple  # (text or None, token ids)


def _streams(ctx: ServingContext, rid: str, prompts: list[Prompt],
             params: list[SamplingParams]) -> list[AsyncIterator[Any]]:
    # One engine request per prompt; a single prompt keeps the response id, so logs correlate.
    return [ctx.generate(rid if len(prompts) == 1 else f"{rid}-{i}", ids, p, text,
                         ctx.metrics.tracker())
            for i, ((text, ids), p) in enumerate(zip(prompts, params))]


async def run_to_end(ctx: ServingContext, request: Request, rid: str, prompts: list[Prompt],
                     params: list[SamplingParams]) -> list[Any]:
    """The final RequestOutput of each prompt; aborts everything if the client leaves."""
    admission = ctx.admit(sum(p.n for p in params))  # sequences, not requests
    finals: list[Any] = [None] * len(prompts)

    async def collect() -> None:
        async with contextlib.aclosing(merge(_streams(ctx, rid, prompts, params))) as merged:
            async for i, out in merged:
                finals[i] = out

    try:
        await until_disconnect(collect(), request.receive)
    finally:
        admission.release()
    if any(f is None for f in finals):
        raise APIError(500, "The engine ended a request without output.")
    return finals


async def _first(it: AsyncIterator[T]) -> T | None:
    async for item in it:
        return item
    return None


async def start_stream(ctx: ServingContext, request: Request, rid: str, prompts: list[Prompt],
                       params: list[SamplingParams]):
    """Start the engine requests and wait for the first output before any header is sent, so
    that a request the engine rejects still gets a plain 400 rather than an SSE error event.

    Returns (first (index, output) or None, the rest of the merged stream, admission); the
    caller hands the admission to the SSEStream, which releases it when the stream ends."""
    admission = ctx.admit(sum(p.n for p in params))  # sequences, not requests
    merged = merge(_streams(ctx, rid, prompts, params))
    try:
        first = await until_disconnect(_first(merged), request.receive)
    except BaseException:
        admission.release()
        with contextlib.suppress(Exception):
            await merged.aclose()
        raise
    return first, merged, admission


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
