"""`edge serve --workers N`: several processes answer on one port, a killed worker is replaced, and
SIGTERM to the parent stops them all."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from conftest import ROOT
from test_server import free_port


def health(url):
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return json.loads(r.read())
    except OSError:
        return None


def pids_seen(url, want, timeout=120.0, exclude=()) -> set:
    """Ask /health on fresh connections until `want` distinct worker pids (not in exclude) answered."""
    seen = set()
    deadline = time.time() + timeout
    while time.time() < deadline and len(seen - set(exclude)) < want:
        h = health(url)
        if h and h.get("status") == "ok":
            seen.add(h["pid"])
        else:
            time.sleep(0.2)
    return seen - set(exclude)


def alive(pid) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_workers_share_the_port_and_are_replaced(converted):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first, replacement = set(), set()
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "serve", "--workers", "2", "--port", str(port),
                             "-m", converted("smollm2", "int8"), "--threads", "1", "-q"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = pids_seen(url, 2)
        assert len(first) == 2, first
        models = json.loads(urllib.request.urlopen(url + "/v1/models").read())["data"]
        body = json.dumps({"model": models[0]["id"], "prompt": "Hello", "max_tokens": 3, "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        assert json.loads(urllib.request.urlopen(req).read())["usage"]["completion_tokens"] == 3

        victim = sorted(first)[0]
        os.kill(victim, signal.SIGKILL)
        replacement = pids_seen(url, 1, exclude=first)
        assert len(replacement) == 1, "the killed worker was not replaced"
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    time.sleep(0.5)
    assert not any(alive(p) for p in first | replacement)


def test_workers_share_the_cpus_unless_told_otherwise(monkeypatch):
    """Each of N workers runs its kernels on its share of the CPUs (at least one thread); a thread
    count asked for (--threads, EDGE_THREADS) or set in OMP_NUM_THREADS is left as it is."""
    import core.threads
    from edge.workers import threads_per_worker

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("EDGE_THREADS", raising=False)
    monkeypatch.setattr(core.threads, "effective_n_threads", lambda: 8)
    assert threads_per_worker(1, None) is None          # one process: the usual default
    assert threads_per_worker(2, None) == 4
    assert threads_per_worker(3, None) == 2
    assert threads_per_worker(16, None) == 1
    assert threads_per_worker(4, 3) == 3                # --threads
    for var in ("OMP_NUM_THREADS", "EDGE_THREADS"):
        monkeypatch.setenv(var, "6")
        assert threads_per_worker(4, None) is None      # each process reads it itself
        monkeypatch.delenv(var)
