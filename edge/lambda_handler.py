"""AWS Lambda adapter: API Gateway HTTP API (payload format 2.0) and Lambda Function URL events,
answered by the same aiohttp app as `edge serve`.

At init, once per container, the module builds the app with create_app(Settings.from_env()),
runs it on a background thread's event loop behind a unix socket in the temp dir and waits until
the models are loaded (a failure there is an init error: Lambda reports it and starts afresh).
Each invocation then becomes an HTTP request to that server, and its response the result:

    {"version": "2.0", "rawPath", "rawQueryString", "headers", "cookies", "body",
     "isBase64Encoded", "requestContext": {"http": {"method"}}}
        -> {"statusCode", "headers", "cookies" (when the app sets any), "body", "isBase64Encoded"}

Bodies come back as text when they are UTF-8 text (JSON, SSE, the metrics), base64 otherwise.
A streamed request (`stream: true`) gets its whole SSE body at once: a Python Lambda cannot stream
its response.  A malformed event is a 400 with an OpenAI-style error body (edge.errors) and
nothing raises out of the handler.  A request that would outlive the invocation is cut off just
before it and answered 504.  Configuration is the worker's environment (edge.settings): EDGE_MODELS,
EDGE_THREADS, EDGE_API_KEY..., and EDGE_HOME for the converted models.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import tempfile
import threading

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from edge.app import create_app, wait_ready
from edge.errors import HTTPError, error_body
from edge.handlers import dumps
from edge.settings import Settings

# Headers about one connection, or lengths the next hop computes itself: never passed on.
HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                         "transfer-encoding", "upgrade", "expect", "content-length"})
RESPONSE_MARGIN_S = 1.0     # of the invocation's time, kept to send a 504 before Lambda's deadline


class LocalServer:
    """The app served on a background event loop, and a client session to it."""

    def __init__(self, settings: Settings):
        self.socket_path = os.path.join(tempfile.gettempdir(), f"edge-{os.getpid()}.sock")
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="edge-lambda-loop", daemon=True).start()
        self._run(self._start(settings))

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _start(self, settings: Settings) -> None:
        app = create_app(settings)
        # handler_cancellation: a request given up on (504) stops its generation, so the next
        # invocation does not queue behind it on the engine thread.
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        await web.UnixSite(runner, self.socket_path).start()
        self.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self.socket_path),
                                             auto_decompress=False)
        await wait_ready(app)

    def forward(self, method: str, url: URL, headers: CIMultiDict, body: bytes, timeout: float | None):
        """(status, headers, body) of the app's response, read to the end."""
        async def send():
            async with self.session.request(method, url, headers=headers, data=body, allow_redirects=False,
                                            timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                return resp.status, resp.headers, await resp.read()
        return self._run(send())


def invalid_event(message: str) -> HTTPError:
    return HTTPError(400, "invalid_event", f"not an API Gateway HTTP API / Function URL event "
                                           f"(payload format 2.0): {message}")


def parse_event(event) -> tuple[str, URL, CIMultiDict, bytes]:
    """(method, url, headers, body) of the request an event carries."""
    if not isinstance(event, dict):
        raise invalid_event("the event is not a JSON object")
    if event.get("version") != "2.0":
        raise invalid_event("'version' is not \"2.0\"")
    http = event.get("requestContext")
    http = http.get("http") if isinstance(http, dict) else None
    method = http.get("method") if isinstance(http, dict) else None
    if not isinstance(method, str) or not method.isalpha():
        raise invalid_event("'requestContext.http.method' is missing")
    path = event.get("rawPath")
    if not isinstance(path, str) or not path.startswith("/"):
        raise invalid_event("'rawPath' is missing or does not start with '/'")
    query = event.get("rawQueryString") or ""
    raw_headers = event.get("headers") or {}
    cookies = event.get("cookies") or []
    body = event.get("body") or ""
    if not isinstance(query, str):
        raise invalid_event("'rawQueryString' is not a string")
    if not isinstance(raw_headers, dict) or not all(isinstance(v, str) for v in raw_headers.values()):
        raise invalid_event("'headers' is not an object of strings")
    if not isinstance(cookies, list) or not all(isinstance(c, str) for c in cookies):
        raise invalid_event("'cookies' is not a list of strings")
    if not isinstance(body, str):
        raise invalid_event("'body' is not a string")

    headers = CIMultiDict((k, v) for k, v in raw_headers.items() if k.lower() not in HOP_HEADERS)
    if cookies:
        headers["Cookie"] = "; ".join(cookies)
    if event.get("isBase64Encoded"):
        try:
            data = base64.b64decode(body, validate=True)
        except binascii.Error:
            raise invalid_event("'isBase64Encoded' is true but 'body' is not base64") from None
    else:
        data = body.encode()
    url = URL(f"http://edge{path}" + (f"?{query}" if query else ""), encoded=True)
    return method.upper(), url, headers, data


def as_text(headers, body: bytes) -> str | None:
    """The body as text when it is UTF-8 text (JSON, SSE, the metrics...), else None."""
    mime = headers.get("Content-Type", "").split(";")[0].strip().lower()
    textual = mime.startswith("text/") or mime == "application/json" or mime.endswith("+json")
    if not textual or "Content-Encoding" in headers:
        return None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def to_result(status: int, headers, body: bytes) -> dict:
    """The Lambda result for a response: repeated headers joined with ',', Set-Cookie as 'cookies'."""
    out, seen = {}, set()
    for name in headers:
        key = name.lower()
        if key not in HOP_HEADERS and key != "set-cookie" and key not in seen:
            seen.add(key)
            out[name] = ",".join(headers.getall(name))
    result = {"statusCode": status, "headers": out}
    cookies = headers.getall("Set-Cookie", [])
    if cookies:
        result["cookies"] = cookies
    text = as_text(headers, body)
    if text is None:
        result.update(body=base64.b64encode(body).decode("ascii"), isBase64Encoded=True)
    else:
        result.update(body=text, isBase64Encoded=False)
    return result


def error_result(exc: BaseException) -> dict:
    status, body = error_body(exc)
    return {"statusCode": status, "headers": {"Content-Type": "application/json"},
            "body": dumps(body), "isBase64Encoded": False}


def time_left(context) -> float | None:
    """Seconds the forwarded request may take: the invocation's remaining time less a margin."""
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    return None if remaining is None else max(remaining() / 1000 - RESPONSE_MARGIN_S, 0.1)


SERVER = LocalServer(Settings.from_env())


def handler(event, context) -> dict:
    """The Lambda entry point (edge.lambda_handler.handler)."""
    try:
        method, url, headers, body = parse_event(event)
        return to_result(*SERVER.forward(method, url, headers, body, time_left(context)))
    except TimeoutError:
        return error_result(HTTPError(504, "timeout", "the request did not finish within the function's time limit"))
    except Exception as e:  # noqa: BLE001 - the boundary: every failure is an error response
        return error_result(e)
