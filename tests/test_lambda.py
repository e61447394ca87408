"""The Lambda adapter under the real runtime client: `python -m awslambdaric
edge.lambda_handler.handler` in a subprocess, polling a fake Lambda Runtime API (http.server on
loopback) that hands it API Gateway HTTP API and Function URL events.  Answers are compared with
the in-process model and the OpenAI error shape; no event may end as an invocation error.  A model
that fails to load must be reported as an init error."""

import base64
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT, stop_process

RUNTIME = "/2018-06-01/runtime"
LLM = "smollm2.int8"                 # the name the app gives a model loaded from smollm2.int8.edge
PROMPT = "The capital of France is"


class FakeRuntimeAPI:
    """The part of the Lambda Runtime API a runtime client uses.  GET .../invocation/next hands out
    queued events (and blocks while there are none); responses, invocation errors and init errors
    are recorded by request id."""

    def __init__(self):
        self.pending: list[tuple[str, bytes, float]] = []     # (request id, event, seconds to its deadline)
        self.results: dict[str, tuple[str, dict]] = {}     # request id -> ("response" | "error", payload)
        self.init_errors: list[dict] = []
        self.polled = False                                 # init finished: the client asked for an event
        self.changed = threading.Condition()
        self.closed = False
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, name="fake-runtime-api", daemon=True).start()
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"

    def _handler_class(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def reply(self, status: int, body: bytes, headers=()):
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path != f"{RUNTIME}/invocation/next":
                    return self.reply(404, b"{}")
                with api.changed:
                    api.polled = True
                    api.changed.notify_all()
                    while not api.pending and not api.closed:
                        api.changed.wait()
                    if api.closed:
                        self.close_connection = True
                        return None
                    request_id, event, deadline_s = api.pending.pop(0)
                self.reply(200, event, [
                    ("Content-Type", "application/json"),
                    ("Lambda-Runtime-Aws-Request-Id", request_id),
                    ("Lambda-Runtime-Deadline-Ms", str(int((time.time() + deadline_s) * 1000))),
                    ("Lambda-Runtime-Invoked-Function-Arn", "arn:aws:lambda:us-east-1:123456789012:function:edge"),
                    ("Lambda-Runtime-Trace-Id", f"Root=1-{uuid.uuid4().hex[:8]}-{uuid.uuid4().hex[:24]};Sampled=0"),
                ])
                return None

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
                parts = self.path.removeprefix(f"{RUNTIME}/").split("/")
                with api.changed:
                    if parts == ["init", "error"]:
                        api.init_errors.append(payload)
                    elif len(parts) == 3 and parts[0] == "invocation" and parts[2] in ("response", "error"):
                        api.results[parts[1]] = (parts[2], payload)
                    else:
                        return self.reply(404, b"{}")
                    api.changed.notify_all()
                return self.reply(202, b'{"status":"OK"}')

        return Handler

    def wait_for(self, ready, proc: subprocess.Popen, log_path, timeout: float):
        """Wait until ready() holds; fail with the runtime's log if it exits or time runs out."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not ready():
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = open(log_path, encoding="utf-8", errors="replace").read()
                    pytest.fail(f"runtime exited ({proc.returncode}) or timed out; init errors "
                                f"{self.init_errors}; log:\n{log}")
                self.changed.wait(0.1)

    def close(self):
        with self.changed:
            self.closed = True
            self.changed.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()


class Runtime:
    """`python -m awslambdaric edge.lambda_handler.handler` polling a FakeRuntimeAPI."""

    def __init__(self, models: str, log_path):
        self.api = FakeRuntimeAPI()
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "EDGE_"))}
        env.update(AWS_LAMBDA_RUNTIME_API=self.api.address, _HANDLER="edge.lambda_handler.handler",
                   LAMBDA_TASK_ROOT=str(ROOT), AWS_LAMBDA_FUNCTION_NAME="edge", AWS_REGION="us-east-1",
                   AWS_LAMBDA_FUNCTION_MEMORY_SIZE="3538", EDGE_MODELS=models, EDGE_THREADS="2")
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "awslambdaric", "edge.lambda_handler.handler"],
                                         cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_until_initialised(self):
        self.api.wait_for(lambda: self.api.polled, self.proc, self.log_path, timeout=120)

    def invoke(self, event, deadline_s: float = 60) -> dict:
        """The handler's result for an event (any JSON value); an invocation error fails the test."""
        request_id = uuid.uuid4().hex
        with self.api.changed:
            self.api.pending.append((request_id, json.dumps(event).encode(), deadline_s))
            self.api.changed.notify_all()
        self.api.wait_for(lambda: request_id in self.api.results, self.proc, self.log_path, timeout=60)
        kind, payload = self.api.results[request_id]
        assert kind == "response", f"the handler raised: {payload}"
        return payload

    def stop(self):
        stop_process(self.proc)
        self.api.close()


def http_event(method: str, path: str, body=None, **fields) -> dict:
    """An API Gateway HTTP API event (payload format 2.0), as API Gateway sends it."""
    text = body if isinstance(body, str) or body is None else json.dumps(body)
    return {
        "version": "2.0", "routeKey": f"{method} {path}", "rawPath": path, "rawQueryString": "",
        "headers": {"content-type": "application/json", "host": "abc123.execute-api.us-east-1.amazonaws.com",
                    "user-agent": "test", "x-forwarded-proto": "https"},
        "requestContext": {
            "accountId": "123456789012", "apiId": "abc123", "domainName": "abc123.execute-api.us-east-1.amazonaws.com",
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": "192.0.2.1",
                     "userAgent": "test"},
            "requestId": uuid.uuid4().hex, "routeKey": f"{method} {path}", "stage": "$default",
            "time": "22/Nov/2026:17:00:00 +0000", "timeEpoch": int(time.time() * 1000),
        },
        "body": text, "isBase64Encoded": False, **fields,
    }


def json_body(result: dict) -> dict:
    assert result["isBase64Encoded"] is False
    assert result["headers"]["Content-Type"].startswith("application/json")
    return json.loads(result["body"])


@pytest.fixture(scope="module")
def runtime(converted, tmp_path_factory):
    rt = Runtime(converted("smollm2", "int8"), tmp_path_factory.mktemp("lambda") / "runtime.log")
    try:
        rt.wait_until_initialised()
        yield rt
    finally:
        rt.stop()


@pytest.fixture(scope="module")
def expected_text(loaded):
    return loaded("smollm2", "int8").generate(PROMPT, max_tokens=8).text


def test_completion_matches_the_in_process_model(runtime, expected_text):
    result = runtime.invoke(http_event("POST", "/v1/completions",
                                       {"model": LLM, "prompt": PROMPT, "temperature": 0, "max_tokens": 8}))
    assert result["statusCode"] == 200, result
    body = json_body(result)
    assert body["choices"][0]["text"] == expected_text
    assert body["usage"]["completion_tokens"] == 8


def test_a_stream_comes_back_whole_as_sse(runtime, expected_text):
    result = runtime.invoke(http_event("POST", "/v1/completions", {"model": LLM, "prompt": PROMPT, "temperature": 0,
                                                                   "max_tokens": 8, "stream": True}))
    assert result["statusCode"] == 200 and result["isBase64Encoded"] is False
    assert result["headers"]["Content-Type"] == "text/event-stream"
    events = [line.removeprefix("data: ") for line in result["body"].split("\n\n") if line]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == expected_text


def test_a_request_that_would_outlive_the_invocation_is_a_504(runtime, expected_text):
    endless = {"model": LLM, "prompt": PROMPT, "max_tokens": 8000, "ignore_eos": True}
    result = runtime.invoke(http_event("POST", "/v1/completions", endless), deadline_s=1.5)
    assert result["statusCode"] == 504
    assert json_body(result)["error"]["code"] == "timeout"
    # the abandoned generation was cancelled: the next request does not queue behind 8000 tokens
    start = time.monotonic()
    result = runtime.invoke(http_event("POST", "/v1/completions", {"model": LLM, "prompt": PROMPT, "temperature": 0,
                                                                   "max_tokens": 8}))
    assert result["statusCode"] == 200, result
    assert json_body(result)["choices"][0]["text"] == expected_text
    assert time.monotonic() - start < 20


@pytest.mark.parametrize("event, status, code", [
    (http_event("POST", "/v1/completions", {"model": "no-such-model", "prompt": "Hi"}), 404, "model_not_found"),
    (http_event("POST", "/v1/completions", '{"model": "smollm2.int8", "prompt": '), 400, "invalid_json"),
    (http_event("GET", "/v1/nothing-here"), 404, "not_found"),
], ids=["unknown-model", "malformed-json", "unknown-route"])
def test_app_errors_are_openai_shaped(runtime, event, status, code):
    result = runtime.invoke(event)
    assert result["statusCode"] == status
    error = json_body(result)["error"]
    assert error["code"] == code and error["message"] and error["type"] == "invalid_request_error"


def test_health_and_metrics(runtime):
    health = runtime.invoke(http_event("GET", "/health"))
    assert health["statusCode"] == 200
    body = json_body(health)
    assert body["status"] == "ok" and body["models"] == [LLM] and isinstance(body["pid"], int)
    metrics = runtime.invoke(http_event("GET", "/metrics"))
    assert metrics["statusCode"] == 200 and metrics["isBase64Encoded"] is False
    assert metrics["headers"]["Content-Type"].startswith("text/plain")
    assert 'edge_requests_total{route="/health",status="200"}' in metrics["body"]


def test_function_url_event(runtime):
    event = {
        "version": "2.0", "routeKey": "$default", "rawPath": "/v1/models", "rawQueryString": "limit=5&order=asc",
        "cookies": ["session=abc", "theme=dark"],
        "headers": {"host": "abcdefghij.lambda-url.us-east-1.on.aws", "accept": "application/json",
                    "x-forwarded-for": "192.0.2.1", "x-forwarded-proto": "https"},
        "queryStringParameters": {"limit": "5", "order": "asc"},
        "requestContext": {
            "accountId": "anonymous", "apiId": "abcdefghij", "domainName": "abcdefghij.lambda-url.us-east-1.on.aws",
            "domainPrefix": "abcdefghij", "http": {"method": "GET", "path": "/v1/models", "protocol": "HTTP/1.1",
                                                   "sourceIp": "192.0.2.1", "userAgent": "curl/8.5.0"},
            "requestId": uuid.uuid4().hex, "routeKey": "$default", "stage": "$default",
            "time": "22/Nov/2026:17:00:00 +0000", "timeEpoch": int(time.time() * 1000),
        },
        "isBase64Encoded": False,
    }
    result = runtime.invoke(event)
    assert result["statusCode"] == 200
    assert [m["id"] for m in json_body(result)["data"]] == [LLM]


def test_base64_body(runtime, loaded):
    text = "Héllo, wörld: base64 bodies arrive decoded."
    raw = json.dumps({"model": LLM, "content": text}).encode()
    result = runtime.invoke(http_event("POST", "/tokenize", base64.b64encode(raw).decode(), isBase64Encoded=True))
    assert result["statusCode"] == 200
    assert json_body(result)["tokens"] == loaded("smollm2", "int8").tokenize(text)


def event_without(*path) -> dict:
    event = http_event("GET", "/health")
    holder = event
    for key in path[:-1]:
        holder = holder[key]
    del holder[path[-1]]
    return event


@pytest.mark.parametrize("event", [
    [1, 2], "GET /health", None, {},
    dict(http_event("GET", "/health"), version="1.0"),
    event_without("requestContext", "http", "method"),
    event_without("requestContext"),
    event_without("rawPath"),
    dict(http_event("GET", "/health"), rawPath="health"),
    dict(http_event("GET", "/health"), headers={"accept": ["application/json"]}),
    dict(http_event("GET", "/health"), cookies="a=b"),
    dict(http_event("POST", "/tokenize", "not base64!"), isBase64Encoded=True),
], ids=["list", "string", "null", "empty", "version-1.0", "no-method", "no-request-context", "no-raw-path",
        "relative-path", "header-not-string", "cookies-not-list", "bad-base64"])
def test_malformed_events_are_400s(runtime, event):
    result = runtime.invoke(event)
    assert result["statusCode"] == 400
    error = json_body(result)["error"]
    assert error["code"] == "invalid_event" and error["type"] == "invalid_request_error"


def test_a_model_that_fails_to_load_is_an_init_error(tmp_path):
    rt = Runtime(str(tmp_path / "missing.edge"), tmp_path / "runtime.log")
    try:
        rt.api.wait_for(lambda: rt.api.init_errors, rt.proc, rt.log_path, timeout=60)
        assert rt.proc.wait(30) != 0
    finally:
        rt.stop()
    [error] = rt.api.init_errors
    assert "missing.edge" in error["errorMessage"]
    assert not rt.api.polled and not rt.api.results
