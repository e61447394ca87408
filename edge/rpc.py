"""The msgpack-RPC worker (`edge rpc`): the HTTP API's work over msgpack-rpc, on TCP or a Unix
socket, with one engine thread.

    request       [0, msgid, method, params]  ->  response [1, msgid, error, result]
    notification  [2, method, params]             (from a client: ignored)
    error         [code, message]                 (edge.errors.rpc_error, the codes of the HTTP API)

params is an array; a method takes one map with the HTTP API's fields, checked by edge.schemas:

    generate    [{model, prompt, max_tokens, temperature, ..., stream}]  -> {text, token_ids, finish_reason, usage}
    chat        [{model, messages, max_tokens, ..., stream}]             -> the same
    embed       [{model, input, dimensions}]                             -> {data: [[float, ...], ...], usage}
    tokenize    [{model, content, add_special_tokens}], [content] or [model, content]  -> {tokens}
    detokenize  [{model, tokens}], [tokens] or [model, tokens]           -> {content}
    models      []                                                       -> [{id, task}, ...]
    health      []                                                       -> {status: "ok", models, queue_depth}
                                                                            (or "loading", or "error")

With "stream": true each chunk is first sent as a notification [2, "stream", [msgid, {text, token_ids,
finish_reason}]]; the response still carries the whole result.  Each request runs in a task of its
own, so responses may come out of order; a connection's writes go out one frame at a time; a client
that goes away cancels its generations (freeing their KV blocks).  A message that breaks the framing
or the protocol closes its connection, after an error response where its msgid can be told; the
server serves on.  Models load in the background: until they are ready `health` says "loading" and
other methods answer "model_loading".
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from contextlib import aclosing, suppress
from dataclasses import dataclass

import msgpack

from edge import schemas
from edge.app import load_models
from edge.engine import Engine
from edge.errors import HTTPError, rpc_error
from edge.keys import ModelState
from edge.metrics import Metrics
from edge.service import (check_capacity, check_dimensions, detokenize_fields, embedding_job, generated_ids, generation_job,
                          get_model, require_ready, tokenize_fields)
from edge.settings import Settings

log = logging.getLogger("edge")

REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2
READ_SIZE = 64 * 1024
HEAD_BYTES = 64          # enough for the [0, msgid, ...] that begins any request
LINGER_SECONDS = 1.0     # after an error that closes a connection, what the client still sends is read and dropped


def is_msgid(x) -> bool:
    return type(x) is int and 0 <= x < 1 << 32


def pack(message: list) -> bytes:
    return msgpack.packb(message, use_single_float=True)   # the only floats sent are float32 embeddings


class ProtocolError(HTTPError):
    """The client broke the framing or the protocol: its connection cannot go on.  msgid names the
    request to answer before closing, where it can be told."""

    def __init__(self, code: str, message: str, msgid: int | None = None):
        super().__init__(400, code, message)
        self.msgid = msgid


def request_id(head: bytes) -> int | None:
    """The msgid of the request that begins with these bytes, if they tell it."""
    unpacker = msgpack.Unpacker()
    unpacker.feed(head)
    try:
        if unpacker.read_array_header() != 4:
            return None
        kind, msgid = unpacker.unpack(), unpacker.unpack()
    except (msgpack.UnpackException, ValueError):
        return None
    return msgid if type(kind) is int and kind == REQUEST and is_msgid(msgid) else None


class FrameReader:
    """The messages of a byte stream, each at most `limit` bytes.  It keeps the first bytes of the
    message being received, so that a request too large or not msgpack can still be answered."""

    def __init__(self, limit: int):
        self.limit = limit
        self.unpacker = msgpack.Unpacker(max_buffer_size=limit, strict_map_key=False)
        self.head = b""
        self.fed = 0

    def feed(self, data: bytes):
        """Yield the messages that data completes; raise ProtocolError where the bytes go wrong."""
        start, self.fed = self.fed, self.fed + len(data)
        self.head += data[:HEAD_BYTES - len(self.head)]
        try:
            self.unpacker.feed(data)
            for message in self.unpacker:
                self.head = data[self.unpacker.tell() - start:][:HEAD_BYTES]
                yield message
        except msgpack.BufferFull:
            raise ProtocolError("request_too_large", f"a message may be at most {self.limit} bytes",
                                request_id(self.head)) from None
        except (msgpack.UnpackException, ValueError, TypeError):   # TypeError: an array or map as a map key
            raise ProtocolError("invalid_msgpack", "the message is not valid msgpack", request_id(self.head)) from None


class Connection:
    """One client: its writes, one frame at a time, and its requests in flight."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.write_lock = asyncio.Lock()
        self.requests: set[asyncio.Task] = set()

    @property
    def peer(self) -> str:
        return str(self.writer.get_extra_info("peername") or "a unix socket client")

    async def send(self, message: list) -> None:
        frame = pack(message)
        async with self.write_lock:
            self.writer.write(frame)
            await self.writer.drain()

    def start(self, request) -> None:
        task = asyncio.create_task(request)
        self.requests.add(task)
        task.add_done_callback(self.requests.discard)

    async def refuse(self, error: ProtocolError) -> None:
        """Answer the request that broke the protocol, if it can be told, before the connection closes."""
        log.info("closing the connection of %s: %s", self.peer, error)
        if error.msgid is None:
            return
        with suppress(ConnectionError):
            await self.send([RESPONSE, error.msgid, rpc_error(error), None])
            self.writer.write_eof()
            await self.drop_input()

    async def drop_input(self) -> None:
        """Read what the client still sends for a while: closing with unread input would reset the
        connection, and the client could lose the answer."""
        async def drain():
            while await self.reader.read(READ_SIZE):
                pass
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(drain(), LINGER_SECONDS)

    def abort(self) -> None:
        """Drop the connection: its reader sees the end, and its requests are cancelled as it closes.
        (Rather than cancelling the task that serves it, which asyncio 3.11 reports as an error.)"""
        self.writer.transport.abort()

    async def close(self) -> None:
        """Cancel the requests in flight (their generations stop) and close."""
        for task in self.requests:
            task.cancel()
        await asyncio.gather(*self.requests, return_exceptions=True)
        self.writer.close()
        with suppress(ConnectionError):
            await self.writer.wait_closed()


@dataclass
class Call:
    """One request as its method sees it: the params, and the way to stream chunks back."""
    method: str
    params: list
    conn: Connection
    msgid: int

    def fields(self, positional: tuple = ()) -> dict:
        """The one map argument, or, given values, the last len(params) of the positional names (for
        tokenize: [content] or [model, content])."""
        if len(self.params) == 1 and isinstance(self.params[0], dict):
            return self.params[0]
        if len(self.params) <= len(positional):
            return dict(zip(positional[len(positional) - len(self.params):], self.params))
        usage = f"[{{...}}] or [{', '.join(positional)}]" if positional else "[{...}]"
        raise HTTPError(400, "invalid_params", f"{self.method} takes {usage}")

    async def notify(self, chunk: dict) -> None:
        await self.conn.send([NOTIFICATION, "stream", [self.msgid, chunk]])


class RpcServer:
    """The listener, its connections, the models and the engine thread of one `edge rpc`."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.state = ModelState()
        self.metrics = Metrics()         # load_models records load times; this front serves no metrics
        self.engine = Engine(prefill_rows=settings.prefill_chunk)
        self.listener: asyncio.Server | None = None
        self.unix_path: str | None = None
        self.loading: asyncio.Task | None = None
        self.connections: dict[asyncio.Task, Connection] = {}    # by the task that serves each
        self.methods = {"generate": self.generate, "chat": self.chat, "embed": self.embed,
                        "tokenize": self.tokenize, "detokenize": self.detokenize, "models": self.models,
                        "health": self.health}

    # -- life cycle -----------------------------------------------------------------------------
    async def start(self, unix: str | None = None) -> None:
        """Listen (on settings.host:port, or on a Unix socket), then load the models in the background."""
        if unix:
            self.listener = await asyncio.start_unix_server(self.serve_client, path=unix)
            self.unix_path = unix
        else:
            self.listener = await asyncio.start_server(self.serve_client, self.settings.host, self.settings.port)
        log.info("msgpack-rpc listening on %s", unix or self.listener.sockets[0].getsockname())
        self.engine.start()
        self.loading = asyncio.create_task(self.load())

    async def load(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, load_models, self.settings, self.state, self.metrics)
        except Exception as e:  # noqa: BLE001 - reported by health, logged in full
            log.exception("loading models failed")
            self.state.failed = str(e)

    async def close(self) -> None:
        self.listener.close()
        for conn in self.connections.values():
            conn.abort()
        await asyncio.gather(*self.connections, return_exceptions=True)
        await self.listener.wait_closed()
        self.loading.cancel()
        self.engine.stop()
        if self.unix_path:
            with suppress(FileNotFoundError):
                os.unlink(self.unix_path)

    # -- connections ----------------------------------------------------------------------------
    async def serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        conn = self.connections[task] = Connection(reader, writer)
        frames = FrameReader(self.settings.max_body_bytes)
        try:
            while data := await reader.read(READ_SIZE):
                for message in frames.feed(data):
                    self.dispatch(conn, message)
        except ProtocolError as e:
            await conn.refuse(e)
        except ConnectionError:
            pass
        finally:
            await conn.close()
            del self.connections[task]

    def dispatch(self, conn: Connection, message) -> None:
        """Start a task for a request; ignore responses and notifications (pynvim, for one, sends
        nvim_set_client_info); anything else breaks the protocol."""
        kind = message[0] if isinstance(message, list) and message else None
        if type(kind) is not int:
            raise ProtocolError("invalid_message", "a message must be an array that begins with its type")
        if kind == REQUEST and len(message) >= 2 and is_msgid(message[1]):
            conn.start(self.answer(conn, message))
        elif not (kind == RESPONSE and len(message) == 4 or kind == NOTIFICATION and len(message) == 3):
            raise ProtocolError("invalid_message", "a message must be [0, msgid, method, params], "
                                                   "[1, msgid, error, result] or [2, method, params]")

    async def answer(self, conn: Connection, message: list) -> None:
        """Run one request and send its response."""
        msgid = message[1]
        try:
            call = self.parse_request(conn, message)
            reply = [RESPONSE, msgid, None, await self.methods[call.method](call)]
        except ConnectionError:          # the client went away while chunks were streaming
            return
        except Exception as e:  # noqa: BLE001 - the boundary: every failure becomes an error response
            reply = [RESPONSE, msgid, rpc_error(e), None]
        with suppress(ConnectionError):
            await conn.send(reply)

    def parse_request(self, conn: Connection, message: list) -> Call:
        if len(message) != 4:
            raise HTTPError(400, "invalid_request", "a request must be [0, msgid, method, params]")
        _, msgid, method, params = message
        if isinstance(method, bytes):
            method = method.decode("utf-8", "replace")
        if not isinstance(method, str):
            raise HTTPError(400, "invalid_request", "the method must be a string")
        if method not in self.methods:
            raise HTTPError(400, "method_not_found",
                            f"there is no method {method[:64]!r}; the methods are {', '.join(self.methods)}")
        if not isinstance(params, list):
            raise HTTPError(400, "invalid_params", "params must be an array")
        return Call(method, params, conn, msgid)

    # -- methods --------------------------------------------------------------------------------
    async def generate(self, call: Call) -> dict:
        body = call.fields()
        _, model = get_model(self.state, body, "generate")
        prompt = schemas.prompt(body)
        kw = schemas.sampling(body, default_max_tokens=16)
        stream = schemas.field(body, "stream", bool, False)
        job = generation_job(self.settings, model, prompt=prompt, kw=kw)
        return await self.run_generation(model, job, call if stream else None)

    async def chat(self, call: Call) -> dict:
        body = call.fields()
        _, model = get_model(self.state, body, "generate")
        messages = schemas.messages(body)
        kw = schemas.sampling(body, default_max_tokens=None)
        stream = schemas.field(body, "stream", bool, False)
        job = generation_job(self.settings, model, messages=messages, kw=kw)
        return await self.run_generation(model, job, call if stream else None)

    async def run_generation(self, model, job, stream_to: Call | None) -> dict:
        """Drive a generation job; stream_to, if given, gets each chunk as a notification."""
        check_capacity(self.settings, self.engine)
        async with aclosing(self.engine.stream(job)) as items:
            n_prompt = await anext(items)
            parts, ids, reason = [], [], None
            async for chunk in items:
                new_ids = generated_ids(model, chunk)
                parts.append(chunk.text)
                ids += new_ids
                reason = chunk.finish_reason
                if stream_to is not None:
                    await stream_to.notify({"text": chunk.text, "token_ids": new_ids, "finish_reason": reason})
        return {"text": "".join(parts), "token_ids": ids, "finish_reason": reason,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(ids),
                          "total_tokens": n_prompt + len(ids)}}

    async def embed(self, call: Call) -> dict:
        body = call.fields()
        _, model = get_model(self.state, body, "embed")
        inputs = schemas.embedding_input(body)
        check_dimensions(body, model)
        vectors, n_tokens = await self.engine.call(embedding_job(model, inputs))
        return {"data": vectors.tolist(), "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    async def tokenize(self, call: Call) -> dict:
        body = call.fields(("model", "content"))
        _, model = get_model(self.state, body, required=False)
        text, special = tokenize_fields(body)
        return {"tokens": await self.engine.call(lambda: model.tokenize(text, special))}

    async def detokenize(self, call: Call) -> dict:
        body = call.fields(("model", "tokens"))
        _, model = get_model(self.state, body, required=False)
        tokens = detokenize_fields(body)
        return {"content": await self.engine.call(lambda: model.detokenize(tokens))}

    async def models(self, call: Call) -> list:
        require_ready(self.state)
        return [{"id": name, "task": model.task} for name, model in self.state.models.items()]

    async def health(self, call: Call) -> dict:
        if self.state.failed:
            return {"status": "error", "error": self.state.failed}
        if not self.state.ready:
            return {"status": "loading"}
        return {"status": "ok", "models": list(self.state.models), "queue_depth": self.engine.depth}


async def serve(settings: Settings, unix: str | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then close every connection and stop the engine."""
    server = RpcServer(settings)
    await server.start(unix)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.close()
