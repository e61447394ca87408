"""The HTTP worker, live: `edge serve` on loopback driven by the official openai client and by raw
HTTP for every error case, auth on and off, a client that disconnects mid-stream, concurrency."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import ROOT, stop_process
from core.threads import SERVING_SPINCOUNT

KV_TOKENS = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, models, api_key=None, extra=()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, EDGE_API_KEY=api_key or "")
        args = [sys.executable, "-m", "edge.cli", "serve", "--port", str(self.port), "--kv-tokens", str(KV_TOKENS), "-q"]
        for m in models:
            args += ["-m", m]
        args += list(extra)
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read().decode()
            try:
                if request(self.url + "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError("edge serve did not become ready")

    def stop(self):
        stop_process(self.proc)


def request(url, body=None, headers=None, method=None, raw: bytes | None = None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})},
                                 method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def server(converted):
    s = Server([converted("smollm2", "int8"), converted("minilm", "int8")])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server.url + "/v1", api_key="unused")


LLM, ENC = "smollm2.int8", "minilm.int8"


def test_openai_completion_matches_the_engine(client, loaded):
    r = client.completions.create(model=LLM, prompt="The history of the printing press", max_tokens=12,
                                  temperature=0)
    expected = loaded("smollm2", "int8").generate("The history of the printing press", max_tokens=12)
    assert r.choices[0].text == expected.text
    assert r.usage.prompt_tokens == len(expected.prompt_ids)
    assert r.usage.completion_tokens == len(expected.token_ids)
    assert r.choices[0].finish_reason == expected.finish_reason


def test_openai_chat_plain_and_streaming(client, loaded):
    messages = [{"role": "user", "content": "Name a color."}]
    r = client.chat.completions.create(model=LLM, messages=messages, max_tokens=16, temperature=0)
    expected = loaded("smollm2", "int8").chat(messages, max_tokens=16)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected.text
    stream = client.chat.completions.create(model=LLM, messages=messages, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_openai_embeddings(client, loaded):
    import numpy as np
    texts = ["A cat sits on the mat.", "Stocks fell sharply today."]
    r = client.embeddings.create(model=ENC, input=texts)
    got = np.array([d.embedding for d in r.data])
    np.testing.assert_allclose(got, loaded("minilm", "int8").embed(texts), atol=1e-6)
    assert r.usage.prompt_tokens > 0
    r = client.embeddings.create(model=ENC, input="one", encoding_format="float")
    assert len(r.data[0].embedding) == 384


def test_models_tokenize_detokenize_openapi_metrics(server, loaded):
    status, body = request(server.url + "/v1/models")
    assert status == 200 and {m["id"] for m in json.loads(body)["data"]} == {LLM, ENC}
    status, body = request(server.url + "/tokenize", {"model": LLM, "content": "Hello world"})
    tokens = json.loads(body)["tokens"]
    assert status == 200 and tokens == loaded("smollm2", "int8").tokenize("Hello world")
    status, body = request(server.url + "/detokenize", {"model": LLM, "tokens": tokens})
    assert json.loads(body)["content"] == "Hello world"
    spec = json.loads(request(server.url + "/openapi.json")[1])
    assert {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics",
            "/tokenize", "/detokenize", "/openapi.json"} <= set(spec["paths"])
    assert {"200", "400", "429", "503"} <= set(spec["paths"]["/v1/completions"]["post"]["responses"])
    metrics = request(server.url + "/metrics")[1].decode()
    for name in ("edge_requests_total", "edge_request_seconds_bucket", "edge_prompt_tokens_total",
                 "edge_generated_tokens_total", "edge_queue_depth", "edge_model_load_seconds"):
        assert name in metrics, name
    assert 'route="/tokenize",status="200"' in metrics


LONG = "word " * (KV_TOKENS + 10)
ERRORS = [
    # (route, raw body, status, code)
    ("/v1/completions", b"{not json", 400, "invalid_json"),
    ("/v1/completions", b"[1, 2]", 400, "invalid_json"),
    ("/v1/completions", json.dumps({"model": LLM, "prompt": 5}).encode(), 400, "invalid_type"),
    ("/v1/completions", json.dumps({"model": LLM, "prompt": "x", "max_tokens": "7"}).encode(), 400, "invalid_type"),
    ("/v1/completions", json.dumps({"model": LLM, "prompt": "x", "temperature": "hot"}).encode(), 400, "invalid_type"),
    ("/v1/completions", json.dumps({"model": LLM, "prompt": "x", "priority": "high"}).encode(), 400, "invalid_type"),
    ("/v1/completions", json.dumps({"model": "gpt-9", "prompt": "x"}).encode(), 404, "model_not_found"),
    ("/v1/completions", json.dumps({"prompt": "x"}).encode(), 400, "missing_parameter"),
    ("/v1/completions", json.dumps({"model": LLM, "prompt": ""}).encode(), 400, "invalid_value"),
    ("/v1/completions", json.dumps({"model": LLM, "prompt": LONG}).encode(), 400, "context_length_exceeded"),
    ("/v1/completions", json.dumps({"model": LLM, "prompt": "x", "max_tokens": 0}).encode(), 400, "invalid_value"),
    ("/v1/completions", json.dumps({"model": LLM, "prompt": "x", "max_tokens": 10**6}).encode(), 400,
     "context_length_exceeded"),
    ("/v1/completions", json.dumps({"model": LLM, "prompt": "x", "top_p": 0}).encode(), 400, "invalid_request_error"),
    ("/v1/completions", json.dumps({"model": ENC, "prompt": "x"}).encode(), 400, "unsupported_task"),
    ("/v1/chat/completions", json.dumps({"model": LLM, "messages": []}).encode(), 400, "invalid_value"),
    ("/v1/chat/completions", json.dumps({"model": LLM, "messages": [{"content": "x"}]}).encode(), 400,
     "invalid_value"),
    ("/v1/embeddings", json.dumps({"model": ENC, "input": ""}).encode(), 400, "invalid_value"),
    ("/v1/embeddings", json.dumps({"model": ENC, "input": []}).encode(), 400, "invalid_value"),
    ("/v1/embeddings", json.dumps({"model": ENC, "input": [1.5]}).encode(), 400, "invalid_value"),
    ("/v1/embeddings", json.dumps({"model": LLM, "input": "x"}).encode(), 400, "unsupported_task"),
    ("/v1/completions", json.dumps({"model": LLM, "prompt": "x" * (2 << 20)}).encode(), 413, "request_too_large"),
    ("/detokenize", json.dumps({"model": LLM, "tokens": [10**9]}).encode(), 400, "invalid_request_error"),
]


@pytest.mark.parametrize("route,raw,status,code", ERRORS, ids=[f"{r}-{c}-{i}" for i, (r, _, _, c) in enumerate(ERRORS)])
def test_errors_are_openai_shaped(server, route, raw, status, code):
    got, body = request(server.url + route, raw=raw)
    assert got == status, body[:300]
    err = json.loads(body)["error"]
    assert err["code"] == code and isinstance(err["message"], str) and err["message"]
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert "Traceback" not in body.decode() and "/work" not in body.decode()


def test_unknown_route_and_method(server):
    assert request(server.url + "/v2/nothing")[0] == 404
    status, body = request(server.url + "/v1/completions", method="GET")
    assert status == 405 and json.loads(body)["error"]["code"] == "method_not_allowed"


def metric(server, name: str) -> float:
    """A metric's value: by plain name (the first series) or by name{labels} exactly."""
    for line in request(server.url + "/metrics")[1].decode().splitlines():
        if line.startswith(name + " ") or ("{" not in name and line.startswith(name + "{")):
            return float(line.split()[-1])
    raise KeyError(name)


def test_concurrent_streams_are_batched_and_each_get_their_own_answer(server, loaded):
    """16 requests at once (streaming and not, different prompts and lengths, a long prompt among
    them) are served by shared forward passes, and each gets exactly its solo greedy answer."""
    from openai import OpenAI
    model = loaded("smollm2", "int8")
    base = ["The moon is", "Python is a language", "In the forest", "My favourite food is",
            "Once upon a time", "The capital of France", "def fibonacci(n):", "Dear Sir,"]
    prompts = base + [p + " and then" for p in base]
    prompts[5] = "Here is a long story about a cat. " * 12 + "The end. Next,"      # a chunked prefill
    lengths = [4 + (i % 5) * 3 for i in range(len(prompts))]
    expected = [model.generate(p, max_tokens=n).text for p, n in zip(prompts, lengths)]
    rounds0, batched0 = metric(server, "edge_batched_rounds"), metric(server, "edge_batched_sequences")
    results = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def run(i):
        c = OpenAI(base_url=server.url + "/v1", api_key="x")
        barrier.wait()
        if i % 2:
            chunks = c.completions.create(model=LLM, prompt=prompts[i], max_tokens=lengths[i], temperature=0,
                                          stream=True, extra_body={"priority": i % 3})
            results[i] = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        else:
            results[i] = c.completions.create(model=LLM, prompt=prompts[i], max_tokens=lengths[i],
                                              temperature=0).choices[0].text
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert results == expected
    rounds = metric(server, "edge_batched_rounds") - rounds0
    batched = metric(server, "edge_batched_sequences") - batched0
    assert rounds > 0 and batched / rounds > 2, (rounds, batched)     # passes were shared
    assert metric(server, "edge_running_sequences") >= 0
    assert metric(server, 'edge_kv_blocks') >= 0


def test_full_kv_pool_makes_requests_wait_and_a_full_queue_gives_429(converted, loaded):
    """A pool of 5 blocks (80 tokens) for 6 requests of 2 blocks each: they wait for each other's
    blocks and all finish with their solo answers.  With 20 at once and a queue bound of 6, the
    rest get 429 with Retry-After; afterwards the worker serves again and every block is free."""
    tiny = Server([converted("smollm2", "int8")], extra=["--kv-tokens", "64", "--max-queue", "6"])
    try:
        model = loaded("smollm2", "int8")
        name = json.loads(request(tiny.url + "/v1/models")[1])["data"][0]["id"]
        prompts = [f"Story number {i}: once upon a time" for i in range(20)]
        expected = {p: model.generate(p, max_tokens=20).text for p in prompts[:6]}
        results = {}

        def run(p):
            body = {"model": name, "prompt": p, "max_tokens": 20, "temperature": 0}
            status, raw = request(tiny.url + "/v1/completions", body)
            results[p] = (status, json.loads(raw))

        def wave(ps):
            threads = [threading.Thread(target=run, args=(p,)) for p in ps]
            for t in threads:
                t.start()
            for t in threads:
                t.join(180)
        wave(prompts[:6])
        for p in prompts[:6]:
            status, body = results[p]
            assert status == 200, body
            assert body["choices"][0]["text"] == expected[p]
        results.clear()
        wave(prompts)
        statuses = [results[p][0] for p in prompts]
        assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
        busy = [results[p][1] for p in prompts if results[p][0] == 429]
        assert all(b["error"]["code"] in ("server_busy", "kv_cache_full") for b in busy)
        req = urllib.request.Request(tiny.url + "/v1/completions", json.dumps(
            {"model": name, "prompt": prompts[0], "max_tokens": 20, "temperature": 0}).encode(),
            {"Content-Type": "application/json"})
        assert json.loads(urllib.request.urlopen(req).read())["choices"][0]["text"] == expected[prompts[0]]
        assert metric(tiny, 'edge_kv_blocks{model="%s",state="used"}' % name) == 0
    finally:
        tiny.stop()


def test_shared_system_prompt_hits_the_prefix_cache(server, loaded):
    """Chats with one long system prompt: the later ones reuse its KV blocks (the metric grows)
    and still answer exactly as the engine does alone."""
    from openai import OpenAI
    model = loaded("smollm2", "int8")
    system = {"role": "system", "content": "You are a terse assistant. Reply with a single word. " * 6}
    c = OpenAI(base_url=server.url + "/v1", api_key="x")
    before = metric(server, 'edge_prefix_cache_blocks{model="%s",state="hit"}' % LLM)
    for q in ["Say hello.", "Say goodbye.", "Name a fruit."]:
        messages = [system, {"role": "user", "content": q}]
        got = c.chat.completions.create(model=LLM, messages=messages, max_tokens=6, temperature=0)
        assert got.choices[0].message.content == model.chat(messages, max_tokens=6).text
    assert metric(server, 'edge_prefix_cache_blocks{model="%s",state="hit"}' % LLM) - before >= 4


def test_retry_after_on_429(converted):
    tiny = Server([converted("smollm2", "int8")], extra=["--max-queue", "0"])
    try:
        name = json.loads(request(tiny.url + "/v1/models")[1])["data"][0]["id"]
        req = urllib.request.Request(tiny.url + "/v1/completions", json.dumps(
            {"model": name, "prompt": "hi", "max_tokens": 2}).encode(), {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code == 429 and e.value.headers["Retry-After"] == "1"
        assert json.loads(e.value.read())["error"]["code"] == "server_busy"
    finally:
        tiny.stop()


def test_kv_dtype_f32_serves_what_the_f32_cache_model_generates(converted):
    """`edge serve --kv-dtype f32` keeps the int8 model's K and V as floats (its default is halves):
    its greedy answer is the in-process model's with the same cache dtype.  A dtype other than
    auto, f16 or f32 is refused before anything loads."""
    from edge.settings import Settings
    from models.api import load_model
    path = converted("smollm2", "int8")
    s = Server([path], extra=["--kv-dtype", "f32", "--kv-tokens", "256"])
    try:
        name = json.loads(request(s.url + "/v1/models")[1])["data"][0]["id"]
        body = {"model": name, "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}
        status, raw = request(s.url + "/v1/completions", body)
        assert status == 200, raw
        want = load_model(path, kv_tokens=256, kv_dtype="f32").generate("The capital of France is", max_tokens=12)
        assert json.loads(raw)["choices"][0]["text"] == want.text
    finally:
        s.stop()
    with pytest.raises(ValueError, match="auto, f16 or f32"):
        Settings.from_env(kv_dtype="bf16")


def draft_tokens(server) -> dict:
    out = {}
    for line in request(server.url + "/metrics")[1].decode().splitlines():
        if line.startswith("edge_draft_tokens{"):
            out[line.split('state="')[1].split('"')[0]] = float(line.split()[-1])
    return out


def test_draft_tokens_setting_changes_passes_not_text(converted, real_text):
    """--draft-tokens 0 turns prompt-lookup drafts off; the default drafts, and /metrics counts the
    drafted and accepted tokens.  The completion is the same."""
    from edge.settings import Settings
    path = converted("smollm2", "int8")
    passage = " ".join(real_text.split()[300:520])
    body = {"model": "x", "messages": [{"role": "user", "content": "Summarize this passage:\n\n" + passage}],
            "max_tokens": 48, "temperature": 0}
    texts = []
    for extra in (["--draft-tokens", "0"], []):
        s = Server([path], extra=extra)
        try:
            body["model"] = json.loads(request(s.url + "/v1/models")[1])["data"][0]["id"]
            status, raw = request(s.url + "/v1/chat/completions", body)
            assert status == 200, raw
            texts.append(json.loads(raw)["choices"][0]["message"]["content"])
            counts = draft_tokens(s)
            if extra:
                assert counts.get("drafted", 0) == 0 and counts.get("accepted", 0) == 0
            else:
                assert 0 < counts["accepted"] <= counts["drafted"]
        finally:
            s.stop()
    assert texts[0] == texts[1] and texts[0]
    with pytest.raises(ValueError, match="draft tokens"):
        Settings.from_env(draft_tokens=99)


def generated_total(server) -> float:
    for line in request(server.url + "/metrics")[1].decode().splitlines():
        if line.startswith("edge_generated_tokens_total") and LLM in line:
            return float(line.split()[-1])
    return 0.0


def test_health_answers_during_generation_and_disconnect_stops_it(server):
    """Open a long stream, read two events, check /health answers meanwhile, hang up; the
    generation must stop (the generated-token counter freezes, the queue drains)."""
    body = json.dumps({"model": LLM, "prompt": "Tell me a very long story.", "max_tokens": 400, "stream": True,
                       "ignore_eos": True, "temperature": 0}).encode()
    start = generated_total(server)
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = b""
    while received.count(b"data: ") < 3:
        received += sock.recv(65536)
    t = time.time()
    assert request(server.url + "/health")[0] == 200
    assert time.time() - t < 5
    sock.close()
    deadline = time.time() + 20
    while "edge_queue_depth 0.0" not in request(server.url + "/metrics")[1].decode():
        assert time.time() < deadline, "the generation went on after the client left"
        time.sleep(0.1)
    before = generated_total(server)
    time.sleep(1.0)
    assert generated_total(server) == before < start + 400


def test_api_key(converted):
    s = Server([converted("smollm2", "int8")], api_key="s3cret")
    try:
        assert request(s.url + "/health")[0] == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, body = request(s.url + "/v1/models", headers=headers)
            assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        assert request(s.url + "/metrics")[0] == 401
        assert request(s.url + "/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
        from openai import AuthenticationError, OpenAI
        ok = OpenAI(base_url=s.url + "/v1", api_key="s3cret")
        assert ok.completions.create(model=LLM, prompt="Hi", max_tokens=2).choices[0].text is not None
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=s.url + "/v1", api_key="nope").models.list()
    finally:
        s.stop()


def test_health_is_503_while_loading(converted, monkeypatch):
    """In process: hold model loading back and watch /health go from 503 to 200."""
    from aiohttp.test_utils import TestClient, TestServer

    import edge.app as app_module
    from edge.settings import Settings

    gate = threading.Event()
    real = app_module.load_models

    def slow(*args):
        gate.wait(30)
        real(*args)
    monkeypatch.setattr(app_module, "load_models", slow)

    async def scenario():
        app = app_module.create_app(Settings(models=[converted("minilm", "int8")]))
        async with TestClient(TestServer(app)) as c:
            r = await c.get("/health")
            assert r.status == 503 and (await r.json())["status"] == "loading"
            r = await c.post("/v1/embeddings", json={"model": ENC, "input": "x"})
            assert r.status == 503 and (await r.json())["error"]["code"] == "model_loading"
            gate.set()
            await app_module.wait_ready(app, timeout=60)
            r = await c.get("/health")
            assert r.status == 200
    asyncio.run(scenario())


def test_out_of_memory_is_a_503_with_retry_after():
    """A kernel without scratch memory raises MemoryError (tests/test_native.py); the worker answers
    503 with Retry-After and a JSON body (HTTP), code out_of_memory (RPC): a passing condition of
    the server, not the request's fault, and no traceback."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from edge.app import error_middleware
    from edge.errors import rpc_error

    async def fails(request):
        raise MemoryError("native forward: no memory for the kernels' scratch (9 rows, 9 positions)")

    async def go():
        app = web.Application(middlewares=[error_middleware])
        app.router.add_post("/v1/completions", fails)
        async with TestClient(TestServer(app)) as c:
            r = await c.post("/v1/completions", json={})
            return r.status, r.headers.get("Retry-After"), await r.text()

    status, retry, text = asyncio.run(go())
    assert status == 503 and retry == "1"
    err = json.loads(text)["error"]
    assert err["code"] == "out_of_memory" and err["type"] == "server_error" and "retry" in err["message"]
    assert "Traceback" not in text and "scratch" not in text
    assert rpc_error(MemoryError())[0] == "out_of_memory"


SPIN_PROBE = """
import os
from edge.app import load_models
from edge.keys import ModelState
from edge.metrics import Metrics
from edge.settings import Settings
def libgomp_loaded():
    with open("/proc/self/maps") as f:
        return "libgomp" in f.read()
assert not libgomp_loaded(), "importing the app loaded the kernels' OpenMP runtime"
import core.threads
real_spin = core.threads.serving_spin
def spin_spy():
    assert not libgomp_loaded(), "serving_spin ran after the OpenMP runtime was loaded"
    print("spin set before libgomp")
    real_spin()
core.threads.serving_spin = spin_spy
load_models(Settings(models=[os.environ["PROBE_MODEL"]]), ModelState(), Metrics())
assert libgomp_loaded()
print(os.environ.get("GOMP_SPINCOUNT"), os.environ.get("OMP_WAIT_POLICY"))
"""


@pytest.mark.parametrize("given,expected", [({}, f"{SERVING_SPINCOUNT} None"),
                                            ({"GOMP_SPINCOUNT": "123"}, "123 None"),
                                            ({"OMP_WAIT_POLICY": "active"}, "None active")])
def test_a_server_sets_a_short_openmp_spin_before_the_kernels_load(converted, given, expected):
    """A serving process makes libgomp's idle threads spin briefly (core.threads.serving_spin)
    before loading any model, where libgomp reads it; a user's setting stays."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(given, PROBE_MODEL=converted("minilm", "int8"), PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", SPIN_PROBE], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[-3:-1] == ["spin set before libgomp", expected]
