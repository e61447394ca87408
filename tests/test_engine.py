"""The engine thread's hand-off of items to the event loop (edge/engine.py), without a model."""
import asyncio
import threading

from edge.engine import Engine, _Job


def test_a_rounds_items_reach_each_job_in_order_with_one_wake_up_per_round():
    async def main():
        loop = asyncio.get_running_loop()
        wake_ups = []
        plain = loop.call_soon_threadsafe

        def counting(callback, *args):
            wake_ups.append(len(args[0]) if args and isinstance(args[0], list) else 1)
            return plain(callback, *args)

        loop.call_soon_threadsafe = counting
        engine = Engine()
        engine.start()
        try:
            async def collect(n, tag):
                return [x async for x in engine.stream(lambda: (f"{tag}{i}" for i in range(n)))]
            got = await asyncio.gather(collect(3, "a"), collect(5, "b"), collect(1, "c"))
            assert await engine.call(lambda: 42) == 42
        finally:
            engine.stop()
            loop.call_soon_threadsafe = plain
        return got, wake_ups

    got, wake_ups = asyncio.run(main())
    assert got == [["a0", "a1", "a2"], ["b0", "b1", "b2", "b3", "b4"], ["c0"]]
    # every item and end of the three jobs (3 + 5 + 1 items, 3 ends) and of the call (1 + 1), in
    # as many wake-ups as rounds: far fewer than items
    assert sum(wake_ups) == 14
    assert len(wake_ups) <= 4


def test_items_for_a_closed_loop_cancel_their_job():
    loop = asyncio.new_event_loop()
    loop.close()
    job = _Job.__new__(_Job)
    job.loop, job.cancelled = loop, False
    Engine._flush([(job, (0, "item"))])
    assert job.cancelled


def test_the_engine_runs_its_kernels_with_the_thread_count_set_elsewhere():
    """OpenMP keeps the kernels' thread count per thread, and a server sets it where it loads its
    models, not on the engine's thread: the engine takes the count set last, not libgomp's
    default (every CPU), which would ignore --threads, EDGE_THREADS and a container's CPU quota."""
    from core.kernels._omp import get_num_threads
    from core.threads import set_num_threads

    def in_a_new_thread(fn, *args):
        out = []
        t = threading.Thread(target=lambda: out.append(fn(*args)))
        t.start()
        t.join()
        return out[0]

    before = get_num_threads()
    default = in_a_new_thread(get_num_threads)      # what a thread that never set it gets
    wanted = default + 1

    async def main():
        engine = Engine()
        engine.start()
        try:
            in_a_new_thread(set_num_threads, wanted)     # as the app's loader thread does
            return await engine.call(get_num_threads)
        finally:
            engine.stop()

    try:
        assert asyncio.run(main()) == wanted
    finally:
        set_num_threads(before)
