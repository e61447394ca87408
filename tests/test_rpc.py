"""The msgpack-RPC worker, live: `edge rpc` on loopback TCP (and on a Unix socket) driven by pynvim's
msgpack-rpc client, an independent implementation of the protocol, for every method, streaming and
the error cases; by raw sockets for garbage, truncated and oversized frames, pipelining and a client
that hangs up mid-generation; and, in process, `health` while the models load."""

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
from pynvim.api.common import NvimError
from pynvim.msgpack_rpc import socket_session, tcp_session

from conftest import ROOT

KV_TOKENS = 2048
LLM, ENC = "smollm2.int8", "minilm.int8"
pack = msgpack.packb


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    """`edge rpc` as a subprocess, its log in a file; address is (host, port) or a Unix socket path."""

    def __init__(self, models, log_path, unix=None):
        self.address = unix or ("127.0.0.1", free_port())
        where = ["--unix", unix] if unix else ["--port", str(self.address[1])]
        # one kernel thread: the test process computes too, and OpenMP threads that outnumber free
        # cores stall each other (the kernels' results do not depend on the thread count)
        args = [sys.executable, "-m", "edge.cli", "rpc", *where, "--kv-tokens", str(KV_TOKENS), "--threads", "1"]
        for m in models:
            args += ["-m", m]
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.wait_healthy()

    def wait_healthy(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                if raw_call(self, [0, 1, "health", []])[0][3]["status"] == "ok":
                    return
            except (OSError, IndexError, TypeError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"edge rpc did not become healthy:\n{self.log()}")

    def connect(self) -> socket.socket:
        family = socket.AF_UNIX if isinstance(self.address, str) else socket.AF_INET
        sock = socket.socket(family)
        sock.settimeout(60)
        sock.connect(self.address)
        return sock

    def session(self):
        s = socket_session(self.address) if isinstance(self.address, str) else tcp_session(*self.address)
        s.error_wrapper = lambda err: NvimError(*err)      # keep the error code, not just the message
        return s

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def read_messages(sock: socket.socket, n: int | None = None) -> list:
    """The next n messages, or (n None) every message until the server closes the connection."""
    unpacker, out = msgpack.Unpacker(), []
    while n is None or len(out) < n:
        data = sock.recv(65536)
        if not data:
            assert n is None, f"the connection closed after {out}"
            break
        unpacker.feed(data)
        out += list(unpacker)
    return out


def raw_call(worker: Worker, *messages) -> list:
    """Send messages on a fresh connection and read one response for each request among them."""
    with worker.connect() as sock:
        sock.sendall(b"".join(pack(m) for m in messages))
        return read_messages(sock, sum(m[0] == 0 for m in messages))


def request_streaming(session, method, *args):
    """(result, notifications) of one request.  pynvim hands the notifications that arrive while a
    request made from run()'s setup callback is pending to run()'s notification callback."""
    result, notes = [], []

    def setup():
        result.append(session.request(method, *args))
        session.stop()
    session.run(lambda name, args: None, lambda name, args: notes.append((name, args)), setup)
    return result[0], notes


def health(worker: Worker) -> dict:
    return raw_call(worker, [0, 1, "health", []])[0][3]


@pytest.fixture(scope="module")
def worker(converted, tmp_path_factory):
    w = Worker([converted("smollm2", "int8"), converted("minilm", "int8")],
               tmp_path_factory.mktemp("rpc") / "rpc.log")
    yield w
    assert w.stop() == 0, w.log()
    assert "Traceback" not in w.log(), w.log()


@pytest.fixture
def session(worker):
    s = worker.session()
    yield s
    s.close()


def test_generate_matches_the_engine_and_streams(session, loaded):
    prompt = "The history of the printing press"
    expected = loaded("smollm2", "int8").generate(prompt, max_tokens=12)
    body = {"model": LLM, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    r = session.request("generate", body)
    assert (r["text"], r["token_ids"], r["finish_reason"]) == (expected.text, expected.token_ids,
                                                               expected.finish_reason)
    n_prompt = len(expected.prompt_ids)
    assert r["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": len(expected.token_ids),
                          "total_tokens": n_prompt + len(expected.token_ids)}

    streamed, notes = request_streaming(session, "generate", dict(body, stream=True))
    assert streamed == r
    assert notes and {name for name, _ in notes} == {"stream"}
    assert len({msgid for _, (msgid, _) in notes}) == 1
    chunks = [chunk for _, (_, chunk) in notes]
    assert "".join(c["text"] for c in chunks) == r["text"]
    assert sum((c["token_ids"] for c in chunks), []) == r["token_ids"]
    assert [c["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [r["finish_reason"]]


def test_chat_matches_the_engine_and_streams(session, loaded):
    messages = [{"role": "user", "content": "Name a color."}]
    expected = loaded("smollm2", "int8").chat(messages, max_tokens=16)
    body = {"model": LLM, "messages": messages, "max_tokens": 16, "temperature": 0}
    r = session.request("chat", body)
    assert (r["text"], r["token_ids"], r["finish_reason"]) == (expected.text, expected.token_ids,
                                                               expected.finish_reason)
    streamed, notes = request_streaming(session, "chat", dict(body, stream=True))
    assert streamed == r and "".join(args[1]["text"] for _, args in notes) == expected.text


def test_embed_tokenize_detokenize_models_health(session, loaded):
    texts = ["A cat sits on the mat.", "Stocks fell sharply today."]
    r = session.request("embed", {"model": ENC, "input": texts})
    np.testing.assert_allclose(np.array(r["data"]), loaded("minilm", "int8").embed(texts), atol=1e-6)
    assert r["usage"]["prompt_tokens"] == r["usage"]["total_tokens"] > 0

    tokens = loaded("smollm2", "int8").tokenize("Hello world")
    assert session.request("tokenize", {"model": LLM, "content": "Hello world"}) == {"tokens": tokens}
    assert session.request("tokenize", LLM, "Hello world") == {"tokens": tokens}
    assert session.request("tokenize", "Hello world") == {"tokens": tokens}       # the first loaded model
    assert session.request("detokenize", {"model": LLM, "tokens": tokens}) == {"content": "Hello world"}
    assert session.request("detokenize", LLM, tokens) == {"content": "Hello world"}

    assert session.request("models") == [{"id": LLM, "task": "generate"}, {"id": ENC, "task": "embed"}]
    assert session.request("health") == {"status": "ok", "models": [LLM, ENC], "queue_depth": 0}


LONG = "word " * (KV_TOKENS + 10)
ERRORS = [
    # (method, args, code)
    ("generate", [{"model": "gpt-9", "prompt": "x"}], "model_not_found"),
    ("generate", [{"prompt": "x"}], "missing_parameter"),
    ("generate", [{"model": LLM, "prompt": ""}], "invalid_value"),
    ("generate", [{"model": LLM, "prompt": 5}], "invalid_type"),
    ("generate", [{"model": LLM, "prompt": "x", "stream": "yes"}], "invalid_type"),
    ("generate", [{"model": LLM, "prompt": "x", "temperature": 3}], "invalid_value"),
    ("generate", [{"model": LLM, "prompt": "x", "top_p": 0}], "invalid_request_error"),
    ("generate", [{"model": LLM, "prompt": LONG}], "context_length_exceeded"),
    ("generate", [{"model": LLM, "prompt": "x", "max_tokens": 10**6}], "context_length_exceeded"),
    ("generate", [{"model": ENC, "prompt": "x"}], "unsupported_task"),
    ("generate", ["not a map"], "invalid_params"),
    ("generate", [{"model": LLM, "prompt": "x"}, {}], "invalid_params"),
    ("chat", [{"model": LLM, "messages": []}], "invalid_value"),
    ("chat", [{"model": LLM, "messages": [{"content": "x"}]}], "invalid_value"),
    ("embed", [{"model": ENC, "input": []}], "invalid_value"),
    ("embed", [{"model": ENC, "input": "x", "dimensions": 7}], "invalid_value"),
    ("embed", [{"model": LLM, "input": "x"}], "unsupported_task"),
    ("tokenize", [{"model": LLM}], "missing_parameter"),
    ("tokenize", [LLM, "x", "y"], "invalid_params"),
    ("detokenize", [{"model": LLM, "tokens": [10**9]}], "invalid_request_error"),
    ("detokenize", [{"model": LLM, "tokens": ["a"]}], "invalid_value"),
    ("no_such_method", [], "method_not_found"),
]


@pytest.mark.parametrize("method,args,code", ERRORS, ids=[f"{m}-{c}-{i}" for i, (m, _, c) in enumerate(ERRORS)])
def test_errors_carry_code_and_message(session, method, args, code):
    with pytest.raises(NvimError) as e:
        session.request(method, *args)
    got_code, message = e.value.args
    assert got_code == code and isinstance(message, str) and message
    assert "Traceback" not in message and "/work" not in message


def test_malformed_requests_are_answered_and_the_connection_goes_on(worker):
    responses = raw_call(worker,
                         [0, 7, "generate"],                      # three elements
                         [0, 8, 42, []],                          # the method is not a string
                         [0, 9, "generate", {"model": LLM}],      # params is not an array
                         [2, "nvim_set_client_info", []],         # notifications are ignored
                         [1, 99, None, "a response nobody asked for"],
                         [0, 10, "health", []])
    by_id = {r[1]: r for r in responses}
    assert set(by_id) == {7, 8, 9, 10}
    assert [by_id[i][2][0] for i in (7, 8, 9)] == ["invalid_request", "invalid_request", "invalid_params"]
    assert by_id[10][2] is None and by_id[10][3]["status"] == "ok"


HEALTH = pack([0, 12, "health", []])
GARBAGE = [
    # (bytes, the error code answered before the connection closes, if the msgid can be told)
    (b"\xc1\xc1\xc1", None),
    (pack("a string, not an array"), None),
    (pack([0, "notint", "generate", []]), None),
    (pack([9, 1, 2]), None),
    (pack([True, 1, "health", []]), None),
    (b"\x91" * 5000, None),                                       # nested too deep
    (HEALTH[:-1] + b"\xc1", "invalid_msgpack"),                   # params is not msgpack
    (pack([0, 12, "tokenize", [{"content": "abc"}]]).replace(b"\xa3abc", b"\xa3\xff\xfe\xfd"),
     "invalid_msgpack"),                                          # a string that is not UTF-8
    (pack([0, 12, "embed", [{"model": ENC, "input": "x" * (2 << 20)}]]), "request_too_large"),
]


@pytest.mark.parametrize("data,code", GARBAGE, ids=[f"{i}-{c}" for i, (_, c) in enumerate(GARBAGE)])
def test_garbage_closes_only_its_own_connection(worker, data, code):
    with worker.connect() as sock:
        sock.sendall(data)
        responses = read_messages(sock)                            # until the server closes
    assert [r[2][0] for r in responses] == ([code] if code else [])
    assert all(r[:2] == [1, 12] for r in responses)
    assert health(worker)["status"] == "ok"


def test_truncated_frame_then_hang_up(worker):
    frame = pack([0, 1, "generate", [{"model": LLM, "prompt": "Hello", "max_tokens": 4}]])
    for _ in range(3):
        with worker.connect() as sock:
            sock.sendall(frame[:len(frame) // 2])
    s = worker.session()
    try:
        assert s.request("health")["queue_depth"] == 0
    finally:
        s.close()


def test_pipelined_requests_each_get_their_answer(worker, loaded):
    expected = loaded("smollm2", "int8").generate("The moon is", max_tokens=8).text
    with worker.connect() as sock:
        sock.sendall(pack([0, 21, "generate", [{"model": LLM, "prompt": "The moon is", "max_tokens": 8,
                                                "temperature": 0}]])
                     + pack([0, 22, "tokenize", [LLM, "Hello world"]])
                     + pack([0, 23, "health", []]))
        responses = {r[1]: r for r in read_messages(sock, 3)}
    assert set(responses) == {21, 22, 23} and all(r[0] == 1 and r[2] is None for r in responses.values())
    assert responses[21][3]["text"] == expected
    assert responses[22][3]["tokens"] == loaded("smollm2", "int8").tokenize("Hello world")
    assert responses[23][3]["status"] == "ok"


def test_concurrent_streams_each_get_their_solo_answer(worker, loaded):
    """12 generations pipelined on one connection, half of them streamed: the engine batches them,
    and each result (and each stream's concatenated chunks) is the solo greedy answer."""
    model = loaded("smollm2", "int8")
    prompts = [f"Fact number {i}: the sky" if i % 3 else f"A poem about the number {i}:" for i in range(12)]
    expected = [model.generate(p, max_tokens=6 + i % 4).text for i, p in enumerate(prompts)]
    with worker.connect() as sock:
        sock.sendall(b"".join(pack([0, 100 + i, "generate", [{"model": LLM, "prompt": p, "max_tokens": 6 + i % 4,
                                                               "temperature": 0, "stream": bool(i % 2)}]])
                              for i, p in enumerate(prompts)))
        responses, streamed = {}, {}
        while len(responses) < len(prompts):
            for m in read_messages(sock, 1):
                if m[0] == 1:
                    responses[m[1]] = m
                elif m[0] == 2 and m[1] == "stream":
                    msgid, chunk = m[2]
                    streamed.setdefault(msgid, []).append(chunk["text"])
    for i in range(len(prompts)):
        r = responses[100 + i]
        assert r[2] is None and r[3]["text"] == expected[i], (i, r)
    assert sorted(streamed) == [100 + i for i in range(1, 12, 2)]
    assert all("".join(streamed[m]) == expected[m - 100] for m in streamed)


def test_hanging_up_cancels_the_generation(worker):
    """Start a long stream, read three chunks, check that health answers meanwhile, hang up: the
    engine's queue must drain long before the 2000 tokens could have been generated."""
    with worker.connect() as sock:
        sock.sendall(pack([0, 31, "generate", [{"model": LLM, "prompt": "Tell me a very long story.",
                                                "max_tokens": 2000, "ignore_eos": True, "stream": True}]]))
        notes = read_messages(sock, 3)
        assert all(n[:2] == [2, "stream"] and n[2][0] == 31 for n in notes)
        t = time.time()
        assert health(worker)["queue_depth"] == 1
        assert time.time() - t < 5
    deadline = time.time() + 10
    while health(worker)["queue_depth"] != 0:
        assert time.time() < deadline, "the generation went on after the client left"
        time.sleep(0.1)


def test_unix_socket(converted, tmp_path, loaded):
    path = str(tmp_path / "edge.sock")
    w = Worker([converted("minilm", "int8")], tmp_path / "rpc.log", unix=path)
    try:
        s = w.session()
        try:
            assert s.request("models") == [{"id": ENC, "task": "embed"}]
            r = s.request("embed", {"model": ENC, "input": "A cat sits on the mat."})
            np.testing.assert_allclose(r["data"], loaded("minilm", "int8").embed(["A cat sits on the mat."]),
                                       atol=1e-6)
        finally:
            s.close()
    finally:
        assert w.stop() == 0, w.log()
    assert not os.path.exists(path)


def test_health_says_loading_until_the_models_are_ready(converted, tmp_path, monkeypatch):
    """In process, with raw msgpack over asyncio: hold model loading back and watch `health` go from
    "loading" to "ok", while other methods answer model_loading."""
    import edge.rpc as rpc
    from edge.settings import Settings

    gate = threading.Event()
    real = rpc.load_models

    def slow(*args):
        gate.wait(30)
        real(*args)
    monkeypatch.setattr(rpc, "load_models", slow)
    path = str(tmp_path / "loading.sock")

    async def call(method, params):
        """[error, result] of one request on a fresh connection."""
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(pack([0, 1, method, params]))
        unpacker = msgpack.Unpacker()
        while not (messages := list(unpacker)):
            data = await reader.read(65536)
            assert data, "the server closed the connection"
            unpacker.feed(data)
        writer.close()
        await writer.wait_closed()
        return messages[0][2:]

    async def scenario():
        server = rpc.RpcServer(Settings(models=[converted("minilm", "int8")]))
        await server.start(unix=path)
        try:
            assert await call("health", []) == [None, {"status": "loading"}]
            for method, params in (("models", []), ("embed", [{"model": ENC, "input": "x"}])):
                error, result = await call(method, params)
                assert error[0] == "model_loading" and result is None
            gate.set()
            deadline = time.time() + 60
            while (await call("health", []))[1]["status"] != "ok":
                assert time.time() < deadline
                await asyncio.sleep(0.05)
            assert (await call("models", []))[1] == [{"id": ENC, "task": "embed"}]
        finally:
            gate.set()
            await server.close()
    asyncio.run(scenario())
