"""The OpenAPI 3.1 document of the POST routes (/openapi.json), generated from the pydantic
request models, as vLLM's FastAPI app serves one: clients and API fuzzers (schemathesis,
hypothesis-jsonschema) read the request shapes from it instead of guessing them."""

from __future__ import annotations

import functools

from pydantic.json_schema import models_json_schema

from jaxserve.server.protocol import (ChatCompletionRequest, CompletionRequest,
                                      DetokenizeRequest, TokenizeRequest)

ROUTES = {  # path -> (request model, summary)
    "/v1/completions": (CompletionRequest, "Create a completion (OpenAI)"),
    "/v1/chat/completions": (ChatCompletionRequest, "Create a chat completion (OpenAI)"),
    "/tokenize": (TokenizeRequest, "Tokenize a prompt or chat messages"),
    "/detokenize": (DetokenizeRequest, "Detokenize token ids"),
}

_ERROR = {"description": "An OpenAI-shaped error: {\"error\": {message, type, param, code}}",
          "content": {"application/json": {"schema": {"type": "object",
                                                      "required": ["error"]}}}}


@functools.lru_cache(maxsize=1)
def openapi_document() -> dict:
    refs, schema = models_json_schema([(m, "validation") for m, _ in ROUTES.values()],
                                      ref_template="#/components/schemas/{model}")
    paths = {}
    for path, (model, summary) in ROUTES.items():
        paths[path] = {"post": {
            "summary": summary,
            "operationId": path.strip("/").replace("/", "_").replace(".", "_"),
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": refs[(model, "validation")]}}},
            "responses": {"200": {"description": "OK (JSON, or an SSE stream with stream: true)"},
                          "400": _ERROR, "404": _ERROR, "503": _ERROR},
        }}
    from importlib.metadata import PackageNotFoundError, version
    try:
        ours = version("jaxserve")
    except PackageNotFoundError:  # a checkout run without installing
        ours = "0+unknown"
    return {"openapi": "3.1.0", "info": {"title": "jaxserve", "version": ours},
            "paths": paths, "components": {"schemas": schema.get("$defs", {})}}
