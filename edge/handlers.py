"""Route handlers of the OpenAI-compatible API.  Each parses and checks its body (edge.schemas),
hands the work to the engine thread, and serialises the result: JSON, or Server-Sent Events when
`stream` is true (each event `data: {json}`, the last `data: [DONE]`)."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from contextlib import aclosing

from aiohttp import web

from edge import schemas
from edge.errors import error_body
from edge.keys import ENGINE, METRICS, MODELS, SETTINGS
from edge.service import (check_capacity, check_dimensions, detokenize_fields, embedding_job, generated_ids, generation_job,
                          get_model, tokenize_fields)


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def json_response(obj, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(text=dumps(obj), status=status, content_type="application/json", headers=headers)


async def read_body(request: web.Request) -> dict:
    return schemas.load_json(await request.read())


async def run_generation(request, name, model, job, render, stream: bool, include_usage: bool):
    """Drive a generation job; render(kind, text, finish_reason) builds one response object."""
    metrics = request.app[METRICS]
    check_capacity(request.app[SETTINGS], request.app[ENGINE])
    async with aclosing(request.app[ENGINE].stream(job)) as items:
        n_prompt = await anext(items)
        metrics.prompt_tokens.labels(name).inc(n_prompt)
        usage = {"prompt_tokens": n_prompt, "completion_tokens": 0, "total_tokens": n_prompt}

        def count(chunk):
            n = len(generated_ids(model, chunk))
            usage["completion_tokens"] += n
            usage["total_tokens"] += n
            metrics.generated_tokens.labels(name).inc(n)

        if not stream:
            parts, reason = [], None
            async for chunk in items:
                count(chunk)
                parts.append(chunk.text)
                reason = chunk.finish_reason
            return json_response(dict(render("whole", "".join(parts), reason), usage=usage))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        first = render("first", "", None)
        if first is not None:
            await resp.write(f"data: {dumps(first)}\n\n".encode())
        try:
            async for chunk in items:
                count(chunk)
                if chunk.text or chunk.finish_reason:
                    event = render("delta", chunk.text, chunk.finish_reason)
                    if include_usage:
                        event["usage"] = None
                    await resp.write(f"data: {dumps(event)}\n\n".encode())
        except ConnectionError:        # the client went away: leaving aclosing cancels the job
            return resp
        except Exception as e:         # noqa: BLE001 - the status line is sent; report in-band
            await resp.write(f"data: {dumps(error_body(e)[1])}\n\n".encode())
        if include_usage:
            final = render("delta", "", None)
            final["choices"], final["usage"] = [], usage
            await resp.write(f"data: {dumps(final)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def completions(request: web.Request) -> web.StreamResponse:
    body = await read_body(request)
    name, model = get_model(request.app[MODELS], body, "generate")
    prompt = schemas.prompt(body)
    kw = schemas.sampling(body, default_max_tokens=16)
    stream, include_usage = schemas.stream_flags(body)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def render(kind, text, reason):
        if kind == "first":
            return None
        return {"id": rid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}
    job = generation_job(request.app[SETTINGS], model, prompt=prompt, kw=kw)
    return await run_generation(request, name, model, job, render, stream, include_usage)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await read_body(request)
    name, model = get_model(request.app[MODELS], body, "generate")
    messages = schemas.messages(body)
    kw = schemas.sampling(body, default_max_tokens=None)
    stream, include_usage = schemas.stream_flags(body)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def render(kind, text, reason):
        base = {"id": rid, "created": created, "model": name}
        if kind == "whole":
            return dict(base, object="chat.completion", choices=[
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}])
        delta = {"role": "assistant", "content": ""} if kind == "first" else ({"content": text} if text else {})
        return dict(base, object="chat.completion.chunk",
                    choices=[{"index": 0, "delta": delta, "finish_reason": reason}])
    job = generation_job(request.app[SETTINGS], model, messages=messages, kw=kw)
    return await run_generation(request, name, model, job, render, stream, include_usage)


async def embeddings(request: web.Request) -> web.Response:
    body = await read_body(request)
    name, model = get_model(request.app[MODELS], body, "embed")
    inputs = schemas.embedding_input(body)
    fmt = schemas.field(body, "encoding_format", str, "float")
    if fmt not in ("float", "base64"):
        raise schemas.invalid("encoding_format", "encoding_format must be 'float' or 'base64'")
    check_dimensions(body, model)
    vectors, n_tokens = await request.app[ENGINE].call(embedding_job(model, inputs))
    request.app[METRICS].prompt_tokens.labels(name).inc(n_tokens)
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()}
            for i, v in enumerate(vectors)]     # rows of embed_ids' (n, dim) float32 array
    return json_response({"object": "list", "data": data, "model": name,
                          "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})


async def list_models(request: web.Request) -> web.Response:
    state = request.app[MODELS]
    data = [{"id": n, "object": "model", "created": m.created, "owned_by": "edge", "task": m.task}
            for n, m in state.models.items()]
    return json_response({"object": "list", "data": data})


async def tokenize(request: web.Request) -> web.Response:
    body = await read_body(request)
    name, model = get_model(request.app[MODELS], body, required=False)
    text, special = tokenize_fields(body)
    tokens = await request.app[ENGINE].call(lambda: model.tokenize(text, special))
    return json_response({"model": name, "tokens": tokens})


async def detokenize(request: web.Request) -> web.Response:
    body = await read_body(request)
    name, model = get_model(request.app[MODELS], body, required=False)
    tokens = detokenize_fields(body)
    return json_response({"model": name, "content": await request.app[ENGINE].call(lambda: model.detokenize(tokens))})


async def health(request: web.Request) -> web.Response:
    state = request.app[MODELS]
    if state.failed:
        return json_response({"status": "error", "error": state.failed}, status=503)
    if not state.ready:
        return json_response({"status": "loading"}, status=503)
    return json_response({"status": "ok", "models": list(state.models), "pid": os.getpid()})


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    engine = request.app[ENGINE]
    m.queue_depth.set(engine.depth)
    m.running.set(engine.running)
    m.rounds.set(engine.rounds)
    m.batched.set(engine.batched_rows)
    for name, model in request.app[MODELS].models.items():
        cache = getattr(model, "cache", None)
        if cache is not None:
            m.kv_blocks.labels(name, "free").set(cache.n_free)
            m.kv_blocks.labels(name, "used").set(cache.n_blocks - cache.n_free)
            m.prefix.labels(name, "queried").set(cache.prefix_queried)
            m.prefix.labels(name, "hit").set(cache.prefix_hits)
        if hasattr(model, "drafted_tokens"):
            m.drafts.labels(name, "drafted").set(model.drafted_tokens)
            m.drafts.labels(name, "accepted").set(model.accepted_tokens)
    return web.Response(body=m.render(), headers={"Content-Type": m.content_type})


async def openapi(request: web.Request) -> web.Response:
    from edge.openapi import spec
    return json_response(spec())
