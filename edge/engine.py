"""The inference thread: the one owner of the models' run state and KV caches.

Requests submit jobs; a job is a generator factory that runs on this thread, and its items travel
back to the request's coroutine through an asyncio queue.  The thread works in rounds:

  1. every active job is advanced until it needs a forward pass (a generation yields a Feed, see
     models.api.DecoderModel.generate_ids(batched=True)), ends, or yields one item (a streamed
     chunk, an embedding result);
  2. one forward pass per model then serves all the waiting feeds at once (continuous batching,
     DecoderModel.run_feeds): every decoding sequence gets a row, and prompts are fed in chunks of
     at most `prefill_rows` rows while others decode, so a long prompt never stalls their streams.
     Order: higher `priority` first (a request field, default 0), then first come, first served.

Sequences join and leave the batch at every round.  A request that goes away (client disconnect,
cancellation) marks its job cancelled; the thread then closes the generator, which frees its KV
blocks at once.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from contextlib import aclosing
from typing import AsyncIterator, Callable, Iterator

from core.threads import follow_num_threads

_ITEM, _DONE, _ERROR = 0, 1, 2


class _Job:
    def __init__(self, loop: asyncio.AbstractEventLoop, make: Callable[[], Iterator]):
        self.loop = loop
        self.make = make
        self.it: Iterator | None = None
        self.out: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.feed = None              # the Feed the job waits on, if any
        self.outbox: list = []        # the items of the round being run (Engine._flush sends them)

    def emit(self, kind: int, value=None) -> None:
        self.outbox.append((self, (kind, value)))


def _deliver(items: list) -> None:
    """On the event loop: a round's items, each into its job's queue, in the order emitted."""
    for job, item in items:
        job.out.put_nowait(item)


class Engine:
    def __init__(self, prefill_rows: int = 16):
        self.prefill_rows = prefill_rows   # prompt rows per round while other sequences decode
        self.rounds = 0                    # forward passes run (batched), for the metrics
        self.batched_rows = 0              # sequences served by them, summed over rounds
        self.running = 0                   # sequences in the last round's batch
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
        """Run fn() on the engine thread and return its result (once the job has ended, so that
        depth no longer counts it when the caller answers)."""
        def one():
            yield fn()
        result = None
        async with aclosing(self.stream(one)) as items:
            async for value in items:
                result = value
        return result

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
            follow_num_threads()        # the kernels' thread count, set where the models were loaded
            feeds: dict = {}
            outbox: list = []
            for _ in range(len(active)):
                job = active.popleft()
                if job.cancelled:
                    self._close(job)
                    self._finished += 1
                    continue
                if job.feed is not None and not job.feed.ready:   # still being fed (a long prompt)
                    feeds.setdefault(job.feed.model, []).append(job.feed)
                    active.append(job)
                    continue
                job.outbox = outbox
                if self._advance(job):
                    if job.feed is not None:
                        feeds.setdefault(job.feed.model, []).append(job.feed)
                    active.append(job)
            self._flush(outbox)
            self.running = sum(len(b) for b in feeds.values())
            for model, batch in feeds.items():
                try:
                    model.run_feeds(batch, prefill_rows=self.prefill_rows)
                except BaseException as e:  # noqa: BLE001 - a failed pass fails its feeds, not the thread
                    for f in batch:
                        if not f.ready:
                            f.error = e
                self.rounds += 1
                self.batched_rows += len(batch)

    @staticmethod
    def _flush(outbox: list) -> None:
        """Hand a round's items to their event loops, one wake-up per loop: waking the loop for
        each item (call_soon_threadsafe writes to its socket) handed the GIL to it and back
        every time, 40 us an item with 16 streams."""
        by_loop: dict = {}
        for job, item in outbox:
            by_loop.setdefault(job.loop, []).append((job, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:   # the loop is closed: nobody is listening any more
                for job, _ in items:
                    job.cancelled = True

    def _advance(self, job: _Job) -> bool:
        """Run job, passing its items on, until it waits on a Feed (True) or ends (False)."""
        from models.api import Feed
        job.feed = None
        try:
            if job.it is None:
                job.it = iter(job.make())
            while True:
                value = next(job.it)
                if isinstance(value, Feed):
                    job.feed = value
                    return True
                job.emit(_ITEM, value)
                if job.cancelled:
                    return True                  # closed at the next round
        except StopIteration:
            self._finished += 1                  # before the caller hears of it: depth is exact then
            job.emit(_DONE)
        except BaseException as e:  # noqa: BLE001 - every failure goes back to its request
            self._finished += 1
            job.emit(_ERROR, e)
        return False

    @staticmethod
    def _close(job: _Job) -> None:
        if job.it is not None and hasattr(job.it, "close"):
            try:
                job.it.close()
            except Exception:  # noqa: BLE001 - closing must not kill the engine thread
                pass
