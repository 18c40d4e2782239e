"""Errors of the HTTP interface, in vLLM's shape: {"error": {"message", "type", "param", "code"}}.

Every failure a client can cause ends here as a 4xx with the offending parameter named; only
engine faults become 5xx. Handlers raise `APIError`; app.py turns it into a JSON response, or
into an SSE `data: {"error": ...}` event once a stream has started.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus

from starlette.responses import JSONResponse

# vLLM names the error type after the status class; clients match on these strings.
_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestEntityTooLargeError",
    415: "UnsupportedMediaTypeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """A failure to report to the client with `status`, naming `param` where one is at fault."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 err_type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.err_type = err_type or _ERROR_TYPES.get(status) or HTTPStatus(status).phrase
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.err_type)


def error_body(status: int, message: str, param: str | None = None,
               err_type: str | None = None) -> dict:
    return {"error": {"message": message,
                      "type": err_type or _ERROR_TYPES.get(status, "Error"),
                      "param": param,
                      "code": status}}


def safe_dumps(obj) -> str:
    """JSON text that always encodes as UTF-8: text a client sent may hold lone UTF-16
    surrogates (a JSON string may escape one), which UTF-8 cannot encode; those are written as
    JSON escapes instead (the whole text ASCII-escaped), so echoing them can never fail."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, separators=(",", ":"))
    return text


class SafeJSONResponse(JSONResponse):
    """A JSONResponse whose rendering cannot raise on text the client sent (see safe_dumps)."""

    def render(self, content) -> bytes:
        return safe_dumps(content).encode("utf-8")


def error_response(err: APIError) -> JSONResponse:
    return SafeJSONResponse(err.body(), status_code=err.status, headers=err.headers)


def sse_error_event(err: APIError) -> str:
    """The event a stream sends when it fails after the 200 headers went out."""
    return f"data: {safe_dumps(err.body())}\n\n"


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


# Pydantic puts union-branch tags ("str", "list[int]", "function-after[...]") into error
# locations; they mean nothing to a client, so they are dropped from the reported path.
_TAG = re.compile(r"[\[\]\-\s]|^(str|int|float|bool|dict|list|none|tuple)$")


def _clean_loc(loc: tuple) -> list[str]:
    return [str(p) for p in loc if isinstance(p, int) or not _TAG.search(str(p))]


def from_validation_error(exc) -> APIError:
    """pydantic.ValidationError -> 400 "N validation error(s): ..." with param `body.<field>`."""
    seen: dict[str, str] = {}
    for e in exc.errors(include_url=False):
        path = ".".join(["body", *_clean_loc(e.get("loc", ()))])
        msg = e.get("msg", "invalid value")
        if e.get("type") == "extra_forbidden":
            msg = "Extra inputs are not permitted (this parameter is not supported)"
        # Union alternatives report one error each at the same field: keep the first.
        seen.setdefault(path, msg)
    n = len(seen)
    details = "; ".join(f"{path}: {msg}" for path, msg in seen.items())
    first = next(iter(seen), None)
    return APIError(400, f"{n} validation error{'s' if n != 1 else ''}: {details}", first)
