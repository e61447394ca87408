"""The inference thread: the one owner of the models' run state and KV caches.

Requests submit jobs; a job is a generator factory that runs on this thread.  The thread steps
every active job in turn, one item each (for a generation: one streamed chunk), so concurrent
streams all make progress and the event loop never runs a kernel.  Items travel back to the
request's coroutine through an asyncio queue.  A request that goes away (client disconnect,
cancellation) marks its job cancelled; the thread then closes the generator, which frees its KV
blocks at once.  (The batched scheduler of a later issue replaces the round-robin stepping.)
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from contextlib import aclosing
from typing import AsyncIterator, Callable, Iterator

_ITEM, _DONE, _ERROR = 0, 1, 2


class _Job:
    def __init__(self, loop: asyncio.AbstractEventLoop, make: Callable[[], Iterator]):
        self.loop = loop
        self.make = make
        self.it: Iterator | None = None
        self.out: asyncio.Queue = asyncio.Queue()
        self.cancelled = False

    def emit(self, kind: int, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, value))
        except RuntimeError:   # the loop is closed: nobody is listening any more
            self.cancelled = True


class Engine:
    def __init__(self):
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._active: deque[_Job] = deque()
        # depth = submitted - finished; each counter has one writer (the event loop, the engine
        # thread), so neither loses an update
        self._submitted = 0
        self._finished = 0
        self._thread = threading.Thread(target=self._loop, name="edge-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=10)

    @property
    def depth(self) -> int:
        """Jobs waiting or running."""
        return self._submitted - self._finished

    async def stream(self, make: Callable[[], Iterator]) -> AsyncIterator:
        """Run make() on the engine thread and yield its items here."""
        job = _Job(asyncio.get_running_loop(), make)
        self._submitted += 1
        self._inbox.put(job)
        finished = False
        try:
            while True:
                kind, value = await job.out.get()
                if kind == _ITEM:
                    yield value
                elif kind == _DONE:
                    finished = True
                    return
                else:
                    finished = True
                    raise value
        finally:
            if not finished:
                job.cancelled = True

    async def call(self, fn: Callable):
        """Run fn() on the engine thread and return its result."""
        def one():
            yield fn()
        async with aclosing(self.stream(one)) as items:
            async for value in items:
                return value

    def _loop(self) -> None:
        active = self._active
        while True:
            try:
                block = not active
                while True:
                    job = self._inbox.get(block=block)
                    block = False
                    if job is None:
                        for j in active:
                            self._close(j)
                        active.clear()
                        self._finished = self._submitted
                        return
                    active.append(job)
            except queue.Empty:
                pass
            for _ in range(len(active)):
                job = active.popleft()
                if job.cancelled:
                    self._close(job)
                    self._finished += 1
                    continue
                try:
                    if job.it is None:
                        job.it = iter(job.make())
                    value = next(job.it)
                except StopIteration:
                    job.emit(_DONE)
                    self._finished += 1
                    continue
                except BaseException as e:  # noqa: BLE001 - every failure goes back to its request
                    job.emit(_ERROR, e)
                    self._finished += 1
                    continue
                job.emit(_ITEM, value)
                active.append(job)

    @staticmethod
    def _close(job: _Job) -> None:
        if job.it is not None and hasattr(job.it, "close"):
            try:
                job.it.close()
            except Exception:  # noqa: BLE001 - closing must not kill the engine thread
                pass
