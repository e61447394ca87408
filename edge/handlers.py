"""Route handlers of the OpenAI-compatible API.  Each parses and checks its body (edge.schemas),
hands the work to the engine thread, and serialises the result: JSON, or Server-Sent Events when
`stream` is true (each event `data: {json}`, the last `data: [DONE]`)."""

from __future__ import annotations

import base64
import json
import time
import uuid
from contextlib import aclosing

import numpy as np
from aiohttp import web

from core.errors import ModelNotFoundError, UnsupportedTaskError
from edge import schemas
from edge.errors import HTTPError, error_body
from edge.keys import ENGINE, METRICS, MODELS, SETTINGS


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def json_response(obj, status: int = 200) -> web.Response:
    return web.Response(text=dumps(obj), status=status, content_type="application/json")


async def read_body(request: web.Request) -> dict:
    return schemas.load_json(await request.read())


def get_model(request: web.Request, body: dict, task: str | None = None, required: bool = True):
    """(name, model) for the body's 'model'.  Where it is optional, the first loaded model able to
    do the task is used."""
    state = request.app[MODELS]
    if not state.ready:
        raise HTTPError(503, "model_loading", "models are still loading; retry shortly")
    name = schemas.field(body, "model", str, required=required)
    if name is None:
        name = next((n for n, m in state.models.items() if task is None or m.task == task
                     or (task == "embed" and m.task == "classify")), None)
        if name is None:
            raise ModelNotFoundError(f"no loaded model can do '{task}'")
    canon = state.aliases.get(name.lower(), name)
    model = state.models.get(canon)
    if model is None:
        raise ModelNotFoundError(f"the model '{name}' does not exist; see GET /v1/models")
    if task == "generate" and model.task != "generate":
        raise UnsupportedTaskError(f"'{name}' is an encoder: it makes embeddings, not text")
    if task == "embed" and model.task == "generate":
        raise UnsupportedTaskError(f"'{name}' is a decoder: use an embedding model")
    return canon, model


def generation_job(request, model, prompt=None, messages=None, kw=None):
    """A generator for the engine thread: first the prompt's token count (so that errors in the
    request surface before any response starts), then StreamChunks."""
    from models.api import SamplingParams
    settings = request.app[SETTINGS]

    def job():
        ids = model.chat_prompt(messages) if messages is not None else model.prompt_ids(prompt)
        args = dict(kw)
        if args["max_tokens"] is None:
            args["max_tokens"] = max(1, min(settings.max_new_tokens, model.context - len(ids)))
        params = SamplingParams(**args)
        model.check_fits(ids, params.max_tokens)
        yield len(ids)
        yield from model.generate_stream(ids, params=params)
    return job


async def run_generation(request, name, model, job, render, stream: bool, include_usage: bool):
    """Drive a generation job; render(kind, text, finish_reason) builds one response object."""
    metrics = request.app[METRICS]
    async with aclosing(request.app[ENGINE].stream(job)) as items:
        n_prompt = await anext(items)
        metrics.prompt_tokens.labels(name).inc(n_prompt)
        usage = {"prompt_tokens": n_prompt, "completion_tokens": 0, "total_tokens": n_prompt}

        def count(chunk):
            n = len([t for t in chunk.token_ids if t not in model.tokenizer.end_ids or chunk.finish_reason is None])
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
    name, model = get_model(request, body, "generate")
    prompt = schemas.prompt(body)
    kw = schemas.sampling(body, default_max_tokens=16)
    stream, include_usage = schemas.stream_flags(body)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def render(kind, text, reason):
        if kind == "first":
            return None
        return {"id": rid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}
    job = generation_job(request, model, prompt=prompt, kw=kw)
    return await run_generation(request, name, model, job, render, stream, include_usage)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await read_body(request)
    name, model = get_model(request, body, "generate")
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
    job = generation_job(request, model, messages=messages, kw=kw)
    return await run_generation(request, name, model, job, render, stream, include_usage)


async def embeddings(request: web.Request) -> web.Response:
    body = await read_body(request)
    name, model = get_model(request, body, "embed")
    inputs = schemas.embedding_input(body)
    fmt = schemas.field(body, "encoding_format", str, "float")
    if fmt not in ("float", "base64"):
        raise schemas.invalid("encoding_format", "encoding_format must be 'float' or 'base64'")
    dims = schemas.field(body, "dimensions", int)
    if dims is not None and dims != model.config.dim:
        raise schemas.invalid("dimensions", f"this model's embeddings have {model.config.dim} dimensions")

    def work():
        ids = [model.tokenize(t) if isinstance(t, str) else t for t in inputs]
        return model.embed_ids(ids), sum(min(len(i), model.config.max_tokens) for i in ids)
    vectors, n_tokens = await request.app[ENGINE].call(work)
    request.app[METRICS].prompt_tokens.labels(name).inc(n_tokens)
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()}
            for i, v in enumerate(np.asarray(vectors))]
    return json_response({"object": "list", "data": data, "model": name,
                          "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})


async def list_models(request: web.Request) -> web.Response:
    state = request.app[MODELS]
    data = [{"id": n, "object": "model", "created": m.created, "owned_by": "edge", "task": m.task}
            for n, m in state.models.items()]
    return json_response({"object": "list", "data": data})


async def tokenize(request: web.Request) -> web.Response:
    body = await read_body(request)
    name, model = get_model(request, body, required=False)
    text = schemas.field(body, "content", str, schemas.field(body, "prompt", str))
    if text is None:
        raise HTTPError(400, "missing_parameter", "'content' is required", param="content")
    special = schemas.field(body, "add_special_tokens", bool, True)
    tokens = await request.app[ENGINE].call(lambda: model.tokenize(text, special))
    return json_response({"model": name, "tokens": tokens})


async def detokenize(request: web.Request) -> web.Response:
    body = await read_body(request)
    name, model = get_model(request, body, required=False)
    tokens = schemas.field(body, "tokens", list, required=True)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise schemas.invalid("tokens", "tokens must be a list of integers")
    return json_response({"model": name, "content": await request.app[ENGINE].call(lambda: model.detokenize(tokens))})


async def health(request: web.Request) -> web.Response:
    state = request.app[MODELS]
    if state.failed:
        return json_response({"status": "error", "error": state.failed}, status=503)
    if not state.ready:
        return json_response({"status": "loading"}, status=503)
    return json_response({"status": "ok", "models": list(state.models)})


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    m.queue_depth.set(request.app[ENGINE].depth)
    return web.Response(body=m.render(), headers={"Content-Type": m.content_type})


async def openapi(request: web.Request) -> web.Response:
    from edge.openapi import spec
    return json_response(spec())
