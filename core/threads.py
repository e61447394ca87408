"""How many threads the kernels use: OMP_NUM_THREADS / EDGE_THREADS if set, else the CPUs this
process may run on, capped by the container's CPU quota (cgroup v2 cpu.max or v1 cfs quota)."""

from __future__ import annotations

import math
import os


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


def effective_n_threads() -> int:
    for var in ("EDGE_THREADS", "OMP_NUM_THREADS"):
        v = os.environ.get(var, "").split(",")[0].strip()
        if v.isdigit() and int(v) > 0:
            return int(v)
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, math.ceil(limit)))
    return max(1, n)


def set_num_threads(n: int | None = None) -> int:
    """Set the kernels' thread count (default: effective_n_threads()).  Returns it."""
    from core.kernels._omp import set_num_threads as _set

    n = effective_n_threads() if n is None else int(n)
    _set(n)
    return n
