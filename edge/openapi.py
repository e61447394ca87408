"""The OpenAPI 3.1 description of every route, served at /openapi.json."""

from __future__ import annotations

_ERROR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_SAMPLING = {
    "max_tokens": {"type": "integer", "minimum": 1},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 1},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1},
    "top_k": {"type": "integer", "minimum": 0, "default": 0, "description": "extension: 0 disables"},
    "repetition_penalty": {"type": "number", "exclusiveMinimum": 0, "default": 1, "description": "extension"},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2, "default": 0},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2, "default": 0},
    "seed": {"type": "integer"},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 16}]},
    "n": {"type": "integer", "enum": [1]},
    "stream": {"type": "boolean", "default": False},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "ignore_eos": {"type": "boolean", "default": False, "description": "extension"},
    "priority": {"type": "integer", "default": 0, "description": "extension: batching order, higher first"},
}


def _json(schema_ref: str | None = None, schema: dict | None = None) -> dict:
    return {"content": {"application/json": {"schema": schema or {"$ref": f"#/components/schemas/{schema_ref}"}}}}


def _post(summary: str, request: dict, response: str, stream: bool = False) -> dict:
    ok = _json(response)
    if stream:
        ok["content"]["text/event-stream"] = {"schema": {"type": "string"}}
    return {"post": {"summary": summary, "requestBody": {"required": True, **_json(schema=request)},
                     "responses": {"200": {"description": "ok", **ok}, "400": _ERROR, "401": _ERROR, "404": _ERROR,
                                   "413": _ERROR,
                                   "429": {**_ERROR, "description": "the queue is full; retry after Retry-After seconds"},
                                   "500": _ERROR,
                                   "503": {**_ERROR, "description": "models loading, or out of memory for now; "
                                                                   "retry (after Retry-After seconds if given)"}}}}


def spec() -> dict:
    completion_req = {"type": "object", "required": ["model", "prompt"], "properties": {
        "model": {"type": "string"},
        "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "integer"}}]},
        **_SAMPLING}}
    chat_req = {"type": "object", "required": ["model", "messages"], "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role"], "properties": {
            "role": {"type": "string"}, "content": {"type": "string"}}}},
        **_SAMPLING}}
    embed_req = {"type": "object", "required": ["model", "input"], "properties": {
        "model": {"type": "string"},
        "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "encoding_format": {"type": "string", "enum": ["float", "base64"]}, "dimensions": {"type": "integer"}}}
    any_obj = {"type": "object"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "edge", "version": "0.1.0",
                 "description": "OpenAI-compatible inference for small models on a CPU"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["message", "type", "code"], "properties": {
                        "message": {"type": "string"}, "type": {"type": "string"}, "code": {"type": "string"},
                        "param": {"type": "string"}}}}},
                "Completion": any_obj, "ChatCompletion": any_obj, "Embeddings": any_obj, "Models": any_obj,
                "Tokens": any_obj, "Content": any_obj, "Health": any_obj,
            }},
        "security": [{"bearer": []}],
        "paths": {
            "/health": {"get": {"summary": "503 while models load, 200 when ready", "security": [],
                                "responses": {"200": {"description": "ready", **_json("Health")},
                                              "503": {"description": "loading", **_json("Health")}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
                "description": "text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "this document", "responses": {"200": {"description": "ok"}}}},
            "/v1/models": {"get": {"summary": "loaded models", "responses": {"200": {"description": "ok",
                                                                                     **_json("Models")}}}},
            "/v1/completions": _post("complete a prompt", completion_req, "Completion", stream=True),
            "/v1/chat/completions": _post("answer chat messages", chat_req, "ChatCompletion", stream=True),
            "/v1/embeddings": _post("sentence embeddings", embed_req, "Embeddings"),
            "/tokenize": _post("text to token ids", {"type": "object", "required": ["content"], "properties": {
                "model": {"type": "string"}, "content": {"type": "string"},
                "add_special_tokens": {"type": "boolean"}}}, "Tokens"),
            "/detokenize": _post("token ids to text", {"type": "object", "required": ["tokens"], "properties": {
                "model": {"type": "string"}, "tokens": {"type": "array", "items": {"type": "integer"}}}}, "Content"),
        },
    }
