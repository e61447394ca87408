"""The aiohttp application: one factory, create_app(settings), used by `edge serve`, the Lambda
adapter and the tests.

Middlewares, outermost first: metrics (requests by route and status, latency), errors (every
failure becomes an OpenAI-style JSON error; aiohttp's own 404/405/413 too), auth (a Bearer key on
every route but /health when one is configured, compared in constant time).  Models load in the
background after start-up, so /health answers 503 until they are ready.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

from aiohttp import web

from edge import handlers
from edge.engine import Engine
from edge.errors import HTTPError, error_body, retry_after
from edge.keys import ENGINE, METRICS, MODELS, SETTINGS, ModelState
from edge.metrics import Metrics
from edge.settings import Settings

log = logging.getLogger("edge")

AIOHTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


@web.middleware
async def metrics_middleware(request: web.Request, handler):
    start = time.perf_counter()
    route = request.match_info.route.resource
    label = route.canonical if route is not None else "unmatched"
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except asyncio.CancelledError:
        status = 499                     # the client went away
        raise
    finally:
        m = request.app[METRICS]
        m.requests.labels(label, str(status)).inc()
        m.latency.labels(label).observe(time.perf_counter() - start)


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        exc = HTTPError(e.status, AIOHTTP_CODES.get(e.status, "http_error"),
                        "request body too large" if e.status == 413 else e.reason)
        status, body = error_body(exc)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as e:  # noqa: BLE001 - the boundary: nothing escapes as a traceback
        status, body = error_body(e)
        retry = retry_after(e)
        if retry is not None:
            return handlers.json_response(body, status=status, headers={"Retry-After": str(retry)})
    return handlers.json_response(body, status=status)


@web.middleware
async def auth_middleware(request: web.Request, handler):
    key = request.app[SETTINGS].api_key
    if key and request.path != "/health":
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise HTTPError(401, "invalid_api_key", "a valid API key is required (Authorization: Bearer KEY)")
    return await handler(request)


def load_models(settings: Settings, state: ModelState, metrics: Metrics) -> None:
    """Load every configured model into state (blocking; the HTTP app runs it on a worker thread
    at start-up, the RPC server and the Lambda adapter reuse it)."""
    from core.threads import serving_spin, set_num_threads

    serving_spin()              # before anything loads the kernels' libgomp, which reads it once
    from core import kernel_builds
    from core.kernels._omp import simd_name
    from edge.registry import DEFAULT_MODELS, canonical_name, resolve
    from models.api import load_model

    set_num_threads(settings.threads)
    for spec in settings.models:
        start = time.perf_counter()
        canon = canonical_name(spec)
        name = canon or spec.rsplit("/", 1)[-1].removesuffix(".edge")
        model = load_model(resolve(spec), threads=settings.threads, kv_tokens=settings.kv_tokens,
                           kv_dtype=settings.kv_dtype)
        if settings.draft_tokens is not None and hasattr(model, "draft_tokens"):
            model.draft_tokens = settings.draft_tokens
        state.models[name] = model
        state.aliases[name.lower()] = name
        for alias in DEFAULT_MODELS.get(canon, {}).get("aliases", ()):
            state.aliases[alias] = name
        metrics.model_load.labels(name).set(time.perf_counter() - start)
        log.info("loaded %s in %.3f s (kernels: %s%s)", name, time.perf_counter() - start, simd_name(),
                 "" if kernel_builds.chosen == "baseline" else f", build {kernel_builds.chosen}")
    state.ready = True


async def engine_ctx(app: web.Application):
    engine = app[ENGINE]
    engine.start()
    state = app[MODELS]

    async def load():
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, load_models, app[SETTINGS], state, app[METRICS])
        except Exception as e:  # noqa: BLE001 - reported by /health, logged in full
            log.exception("loading models failed")
            state.failed = str(e)
    task = asyncio.create_task(load())
    yield
    task.cancel()
    engine.stop()


def create_app(settings: Settings | None = None) -> web.Application:
    settings = settings or Settings.from_env()
    app = web.Application(client_max_size=settings.max_body_bytes,
                          middlewares=[metrics_middleware, error_middleware, auth_middleware])
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[ENGINE] = Engine(prefill_rows=settings.prefill_chunk)
    app[MODELS] = ModelState()
    app.cleanup_ctx.append(engine_ctx)
    app.router.add_get("/health", handlers.health)
    app.router.add_get("/metrics", handlers.metrics)
    app.router.add_get("/openapi.json", handlers.openapi)
    app.router.add_get("/v1/models", handlers.list_models)
    app.router.add_post("/v1/completions", handlers.completions)
    app.router.add_post("/v1/chat/completions", handlers.chat_completions)
    app.router.add_post("/v1/embeddings", handlers.embeddings)
    app.router.add_post("/tokenize", handlers.tokenize)
    app.router.add_post("/detokenize", handlers.detokenize)
    return app


async def wait_ready(app: web.Application, timeout: float = 600) -> None:
    """Wait until the app's models are loaded (for the Lambda adapter and tests)."""
    deadline = time.monotonic() + timeout
    state = app[MODELS]
    while not state.ready:
        if state.failed:
            raise RuntimeError(f"loading models failed: {state.failed}")
        if time.monotonic() > deadline:
            raise TimeoutError("models did not load in time")
        await asyncio.sleep(0.01)
