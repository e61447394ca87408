"""`edge serve --workers N`: N worker processes on one port.

Each worker is a whole `edge serve` (its own engine thread, KV caches and event loop) listening with
SO_REUSEPORT, so the kernel spreads incoming connections across them; each maps the same weights
file read-only, so the page cache holds one copy of the weights for all of them.  The parent forks
the workers before importing anything heavy and then only watches: a worker that dies is replaced
(at most once a second), and SIGTERM or SIGINT to the parent stops them all.
"""

from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger("edge")


def threads_per_worker(workers: int, threads: int | None) -> int | None:
    """Kernel threads for each of `workers` processes: `threads` where it was asked for (--threads),
    None where EDGE_THREADS or OMP_NUM_THREADS asks (each process reads it), else the CPUs this
    process may use (core.threads) shared out among the workers, at least one each.

    Each worker's kernels run their whole team at every step (about 180 barriers a decode step), so
    workers that each take every CPU fight over them once several are busy: a thread waits at a
    barrier for one the OS has put aside.  `edge serve --workers 2` on 2 cores (Zen 4, 2026-11-25),
    4 clients of 3 greedy completions of 64 tokens: 388 tok/s with one thread per worker against
    150 with two; one client alone: 164 against 242."""
    from core.threads import effective_n_threads, env_n_threads

    if threads is not None or workers <= 1 or env_n_threads() is not None:
        return threads
    return max(1, effective_n_threads() // workers)


def serve_workers(n: int, run_worker) -> int:
    """Fork n processes that each call run_worker() (which serves with reuse_port=True until
    SIGTERM), keep n alive, return 0 after a clean shutdown."""
    children: dict[int, int] = {}          # pid -> worker index
    stopping = False

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:                        # the worker
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 0
            try:
                run_worker()
            except BaseException:           # noqa: BLE001 - reported, then the parent replaces us
                log.exception("worker %d failed", index)
                code = 1
            finally:
                os._exit(code)
        children[pid] = index

    def stop(signum, frame):
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for i in range(n):
        spawn(i)
    last_spawn = 0.0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index = children.pop(pid, None)
        if index is None or stopping:
            continue
        log.warning("worker %d (pid %d) exited with status %d; starting a new one", index, pid, status)
        wait = 1.0 - (time.monotonic() - last_spawn)
        if wait > 0:
            time.sleep(wait)
        last_spawn = time.monotonic()
        if not stopping:
            spawn(index)
    return 0
