"""How many threads the kernels use: OMP_NUM_THREADS / EDGE_THREADS if set, else the CPUs this
process may run on, capped by the container's CPU quota (cgroup v2 cpu.max or v1 cfs quota); and
how long their idle threads spin in a server (serving_spin)."""

from __future__ import annotations

import math
import os
import threading


def _cgroup_cpu_limit() -> float | None:
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
            if quota != "max":
                return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def env_n_threads() -> int | None:
    """The thread count EDGE_THREADS or OMP_NUM_THREADS asks for, or None."""
    for var in ("EDGE_THREADS", "OMP_NUM_THREADS"):
        v = os.environ.get(var, "").split(",")[0].strip()
        if v.isdigit() and int(v) > 0:
            return int(v)
    return None


def effective_n_threads() -> int:
    n = env_n_threads()
    if n is not None:
        return n
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, math.ceil(limit)))
    return max(1, n)


# OpenMP keeps the thread count per thread: omp_set_num_threads in one thread leaves the teams of
# every other at libgomp's default, every CPU the process may use.  The count set last, for threads
# that run kernels without having set it (follow_num_threads), and what each of them has taken.
_requested: int | None = None
_followed = threading.local()


def set_num_threads(n: int | None = None) -> int:
    """Set the kernels' thread count (default: effective_n_threads()) for the calling thread, and
    for every thread that calls follow_num_threads.  Returns it."""
    global _requested
    from core.kernels._omp import set_num_threads as _set

    n = effective_n_threads() if n is None else int(n)
    _set(n)
    _requested = n
    _followed.n = n
    return n


def follow_num_threads() -> None:
    """Give the calling thread the count set_num_threads set last, in whichever thread: a server
    loads its models in one thread and runs their forward passes in another (edge/engine.py),
    whose teams would otherwise take every CPU whatever --threads, EDGE_THREADS or the
    container's CPU quota said.  Cheap when nothing changed."""
    n = _requested
    if n is not None and getattr(_followed, "n", None) != n:
        from core.kernels._omp import set_num_threads as _set

        _set(n)
        _followed.n = n


# How many times an idle OpenMP thread of a serving process polls for work before it sleeps
# (libgomp's GOMP_SPINCOUNT; its default is 300000).  In a server the kernels' team shares the
# cores with the event loop, the engine thread's Python and, on a small box, the clients; a worker
# thread spinning through those gaps takes a core from them, and the step then waits for whichever
# thread they preempted.  SmolLM2 served to 16 streams on 2 cores (bench/bench_load.py, runs
# alternating): 843 tok/s with spin counts of 2000-10000 against 713 with the default (medians of
# 9 and 7 runs), one stream unchanged; 20000-50000 gained less.
SERVING_SPINCOUNT = "5000"


def serving_spin() -> None:
    """For a serving process, before the kernels are first imported (libgomp reads its environment
    once, when it is loaded): idle kernel threads spin SERVING_SPINCOUNT times, then sleep.  A
    GOMP_SPINCOUNT or OMP_WAIT_POLICY already set is left alone."""
    if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SERVING_SPINCOUNT
