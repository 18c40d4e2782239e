"""The Starlette application: routes, the guard middleware, error mapping, engine lifespan.

Order of checks for a request: API key (401) and body size (413) in `_Guard`, before any byte
is parsed; then the route parses and validates (400/404), admits (503 when over capacity) and
hands the request to the engine. Every exception becomes vLLM's error JSON; bad input never
reaches the 500 handler.

    app = build_app(engine, server_config)   # engine: jaxserve.engine.async_engine.AsyncEngine
    uvicorn.run(app, ...)                    # or cli.run_server, which also drains on SIGTERM
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jaxserve.server.chat import create_chat_completion, render_chat
from jaxserve.server.completions import create_completion
from jaxserve.server.config import ServerConfig
from jaxserve.server.openapi import openapi_document
from jaxserve.server.errors import APIError, SafeJSONResponse, error_body, error_response
from jaxserve.server.metrics import ServerMetrics
from jaxserve.server.protocol import DetokenizeRequest, TokenizeRequest
from jaxserve.server.serving import ServingContext, read_model
from jaxserve.server.sse import ClientDisconnected

log = logging.getLogger(__name__)

# Routes that use the model; /health and /metrics stay open for probes and scrapers.
_PROTECTED_PREFIXES = ("/v1", "/tokenize", "/detokenize")


class _Guard:
    """Pure ASGI middleware (BaseHTTPMiddleware would break streaming and disconnect
    detection): API key, then body size, both before the route parses anything. The body is
    read here once, bounded, and replayed to the app."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.limit = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if (self.key is not None and scope["method"] != "OPTIONS"
                and scope["path"].startswith(_PROTECTED_PREFIXES)):
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                err = APIError(401, "Invalid or missing API key: send `Authorization: Bearer "
                               "<key>`.", headers={"WWW-Authenticate": "Bearer"})
                return await error_response(err)(scope, receive, send)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            declared = headers.get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.limit:
                return await self._too_large(scope, receive, send)
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # gone before sending its body: nothing to answer
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.limit:
                    return await self._too_large(scope, receive, send)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            receive = _replay(b"".join(chunks), receive)
        await self.app(scope, receive, send)

    async def _too_large(self, scope, receive, send):
        err = APIError(413, f"Request body exceeds the limit of {self.limit} bytes "
                       "(--max-request-body-bytes).")
        await error_response(err)(scope, receive, send)


def _replay(body: bytes, receive):
    """A receive() that yields the buffered body once, then defers to the server's (so that
    http.disconnect still arrives for the disconnect watchers)."""
    pending = [body]

    async def replay():
        if pending:
            return {"type": "http.request", "body": pending.pop(), "more_body": False}
        return await receive()

    return replay


def build_app(engine, server_config: ServerConfig, *, start_engine: bool = True) -> Starlette:
    """The ASGI app serving `engine`. Its lifespan calls `await engine.start()` (unless
    start_engine=False) and `await engine.shutdown(server_config.shutdown_timeout)`."""
    names = list(server_config.served_model_name or [engine.model_name])
    metrics = ServerMetrics(engine, names[0])
    ctx = ServingContext(engine, server_config, metrics)
    created = int(time.time())

    def handler(fn):
        async def endpoint(request: Request):
            try:
                return await fn(ctx, request)
            except ClientDisconnected:
                return Response(status_code=499)  # nginx's "client closed request"; unseen
        return endpoint

    async def openapi_json(request: Request):
        return SafeJSONResponse(openapi_document())

    async def list_models(request: Request):
        data = [{"id": n, "object": "model", "created": created, "owned_by": "jaxserve",
                 "root": server_config.model or engine.model_name, "parent": None,
                 "max_model_len": engine.max_model_len, "permission": []} for n in names]
        return SafeJSONResponse({"object": "list", "data": data})

    async def tokenize(ctx: ServingContext, request: Request):
        req = await read_model(request, TokenizeRequest)
        req.check()
        ctx.resolve_model(req.model)
        if req.messages is not None:
            text = render_chat(engine.tokenizer, req.messages, req.add_generation_prompt)
            special = bool(req.add_special_tokens)  # the template wrote them already
        else:
            text = req.prompt
            special = req.add_special_tokens is not False
        ids = await ctx.encode(text, special)
        strs = [ctx.renderer.text(t) for t in ids] if req.return_token_strs else None
        return SafeJSONResponse({"count": len(ids), "max_model_len": engine.max_model_len,
                             "tokens": ids, "token_strs": strs})

    async def detokenize(ctx: ServingContext, request: Request):
        req = await read_model(request, DetokenizeRequest)
        ctx.resolve_model(req.model)
        ctx.check_token_ids(req.tokens, "tokens")
        return SafeJSONResponse({"prompt": engine.tokenizer.decode(req.tokens)})

    async def health(request: Request):
        try:
            if ctx.draining:
                raise APIError(503, "The server is shutting down.")
            if not engine.is_running():
                raise APIError(503, "The engine step loop is not running.")
            age = engine.heartbeat_age()
            if age > server_config.health_heartbeat_timeout:
                raise APIError(503, f"The engine step loop has made no progress for {age:.1f} s "
                               f"(limit {server_config.health_heartbeat_timeout} s).")
        except APIError as e:
            return error_response(e)
        except Exception as e:  # noqa: BLE001 - a probe that cannot ask is unhealthy
            return error_response(APIError(503, f"Engine health check failed: {e}"))
        return Response(status_code=200)

    async def prometheus(request: Request):
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def on_api_error(request: Request, exc: APIError):
        return error_response(exc)

    async def on_http_error(request: Request, exc: HTTPException):
        return SafeJSONResponse(error_body(exc.status_code, str(exc.detail)),
                            status_code=exc.status_code, headers=exc.headers)

    async def on_crash(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path, exc_info=exc)
        return SafeJSONResponse(error_body(500, f"Internal server error: {type(exc).__name__}"),
                            status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if start_engine:
            await engine.start()
        try:
            yield
        finally:
            ctx.draining = True
            await engine.shutdown(server_config.shutdown_timeout)

    routes = [
        Route("/v1/completions", handler(create_completion), methods=["POST"]),
        Route("/v1/chat/completions", handler(create_chat_completion), methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/tokenize", handler(tokenize), methods=["POST"]),
        Route("/detokenize", handler(detokenize), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/ping", health, methods=["GET", "POST"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan,
        middleware=[Middleware(_Guard, api_key=server_config.api_key,
                               max_body_bytes=server_config.max_request_body_bytes)],
        exception_handlers={APIError: on_api_error, HTTPException: on_http_error,
                            Exception: on_crash})
    app.state.ctx = ctx
    app.state.metrics = metrics
    return app
