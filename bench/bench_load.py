"""Many users at once: a load generator on loopback against `edge serve` with the default decoder.

    .venv/bin/python bench/bench_load.py [--tokens 64] [--levels 1,4,16] [--rounds 3] [--max-seconds 120]
                                         [--json] [--model NAME_OR_FILE] [--temperature 0] [--top-p 1]

For each concurrency level C, C clients each stream (SSE) completions of --tokens tokens
(ignore_eos; greedy, or sampled with --temperature and --top-p) from short prompts, one after the
other, until max(4 C, 16) requests are done or --max-seconds pass: a round of a level is 6-7 s of
decoding on two cores.  The levels run in turn, --rounds times (1, 4, 16, 1, 4, 16, ...), and a
level's throughput is the median of its rounds': this machine's speed drifts by up to 20% from
minute to minute, and with one round a level, a slow minute during one level moved the 16-stream
ratio from 4.1-5.4x down to 3.57x in one run of twelve.  Reported per level: aggregate decode
throughput (generated tokens / wall time, the median of the rounds, each round's too), its ratio to
the single stream's (x single: of the medians; paired: the median over rounds of each round's
ratio to the single-stream round run seconds before it, which a drift between minutes moves
less), p50/p99 time to first token and p50/p99 inter-token latency (gaps between streamed chunks)
over every round's samples.

Interference: 8 streams decode; once they run, one 2,000-token prompt (CPython's documentation
text) arrives; the 8 streams' p99 inter-token latency while it is prefilled is compared with their
p99 without it (the same 8 streams alone).  The engine feeds long prompts in chunks between decode
steps (edge/engine.py), which is what keeps this ratio small.

KV waste: paged blocks hold 16 tokens; a sequence wastes only the unused tail of its last block.
Reported against what a contiguous allocator would reserve per request (prompt + max_tokens).

Shared weights (--workers N, default 4): `edge serve --workers 1`, then `edge serve --workers N`;
once every worker has served a completion (a keep-alive connection asks /health for the worker's
pid, then completes on the same connection), the PSS of all the server's processes is read from
/proc/PID/smaps_rollup.  extra PSS per worker = (PSS with N workers - PSS with 1) / (N - 1).

The server runs with the same thread count as `edge serve` defaults; the clients share the machine
(their cost is small: one asyncio loop).  Bounded in time and count; the server is stopped at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODEL = "smollm2-135m-instruct"     # --model: a default model's name or a weights file
NAME = MODEL                        # the name the API knows it by (a file: its name without .edge)
BLOCK = 16
SAMPLING = {"temperature": 0.0}     # --temperature, --top-p
MIN_REQUESTS = 16                   # per level (and 4 per stream): each level is timed over several seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs, q) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def stream_one(session, url, prompt, max_tokens, marks=None) -> dict:
    """One streamed completion: time to first token, chunk arrival times, token counts."""
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, **SAMPLING, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times, usage = [], None
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            return {"error": r.status}
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if event.get("error"):
                return {"error": event["error"].get("message", "error event")}
            if event.get("usage"):
                usage = event["usage"]
            if event.get("choices") and event["choices"][0].get("text"):
                times.append(time.perf_counter())
                if marks is not None:
                    marks.append(times[-1])
    return {"start": start, "times": times, "usage": usage}


async def one_round(url, concurrency, tokens, max_seconds) -> dict:
    """One round of a level: its streams' results and the wall time they took."""
    import aiohttp
    prompts = [f"Story {i}: once upon a time, in a faraway land," for i in range(max(4 * concurrency, MIN_REQUESTS))]
    results = []
    deadline = time.perf_counter() + max_seconds
    queue = list(prompts)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=max_seconds + 60)) as session:
        async def client():
            while queue and time.perf_counter() < deadline:
                results.append(await stream_one(session, url, queue.pop(), tokens))
        wall = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - wall
    return {"results": results, "wall": wall}


def summary(concurrency, tokens, rounds: list) -> dict:
    """A level over its rounds: throughput, the median of the rounds' (the host's speed drifts by
    20% from minute to minute, and the levels' rounds alternate, so that a slow minute moves one
    round of each level rather than one level); latencies, percentiles of every round's samples."""
    results = [r for one in rounds for r in one["results"]]
    ok = [r for r in results if "error" not in r and r["times"]]
    ttft = [r["times"][0] - r["start"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    rates = [sum(r["usage"]["completion_tokens"] for r in one["results"]
                 if "error" not in r and r["times"] and r["usage"]) / one["wall"] for one in rounds]
    waste = sum(-(-n // BLOCK) * BLOCK - n for n in (r["usage"]["total_tokens"] for r in ok if r["usage"]))
    reserved = sum(r["usage"]["prompt_tokens"] + tokens for r in ok if r["usage"])
    return {"concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
            "tok_s": statistics.median(rates), "tok_s_rounds": rates,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99), "kv_waste": waste / max(reserved, 1)}


async def level(url, concurrency, tokens, max_seconds) -> dict:
    """One level, one round."""
    return summary(concurrency, tokens, [await one_round(url, concurrency, tokens, max_seconds)])


def levels_in_rounds(url, concurrencies: list, tokens: int, max_seconds: float, n_rounds: int) -> list:
    """Every level n_rounds times, the levels alternating (1, 4, 16, 1, 4, 16, ...)."""
    rounds: dict = {c: [] for c in concurrencies}
    for _ in range(n_rounds):
        for c in concurrencies:
            rounds[c].append(asyncio.run(one_round(url, c, tokens, max_seconds)))
    return [summary(c, tokens, rounds[c]) for c in concurrencies]


async def interference(url, long_prompt: str, tokens: int) -> dict:
    """p99 inter-token latency of 8 streams alone, and while a long prompt is prefilled."""
    import aiohttp
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        alone = await asyncio.gather(*(stream_one(session, url, f"Stream {i}: the sea", tokens) for i in range(8)))
        marks: list = []
        streams = [asyncio.create_task(stream_one(session, url, f"Stream {i}: the sea", tokens, marks))
                   for i in range(8)]
        while len(marks) < 16:                 # the streams are decoding
            if all(t.done() for t in streams):
                raise RuntimeError(f"the 8 streams ended after {len(marks)} tokens: "
                                   f"{[t.result() for t in streams][:1]}")
            await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        long = await stream_one(session, url, long_prompt, 1)
        t1 = long["times"][0] if long.get("times") else time.perf_counter()
        loaded = await asyncio.gather(*streams)

    def gaps(rs, lo=None, hi=None):
        return [b - a for r in rs for a, b in zip(r["times"], r["times"][1:])
                if lo is None or (b >= lo and a <= hi)]
    base = gaps(alone)
    during = gaps(loaded, t0, t1)
    return {"long_prompt_tokens": long["usage"]["prompt_tokens"] if long.get("usage") else None,
            "prefill_s": t1 - t0, "itl_p99_alone_s": pct(base, 99), "itl_p99_during_s": pct(during, 99),
            "ratio": pct(during, 99) / pct(base, 99), "gaps_during": len(during)}


def _pss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))


def serve_pss(workers: int, threads: int | None) -> dict:
    """PSS of `edge serve --workers N` (parent and workers) once every worker has generated."""
    import http.client
    port = free_port()
    cmd = [sys.executable, "-m", "edge.cli", "serve", "-m", MODEL, "--port", str(port), "-q",
           "--workers", str(workers)] + (["--threads", str(threads)] if threads else [])
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    served: set[int] = set()
    body = json.dumps({"model": NAME, "prompt": "The sea is", "max_tokens": 16, "temperature": 0})
    try:
        deadline = time.monotonic() + 120
        while len(served) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(served)} of {workers} workers answered")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            try:
                conn.request("GET", "/health")
                health = conn.getresponse()
                doc = json.loads(health.read())
                if health.status != 200:
                    continue
                conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
                done = conn.getresponse()
                done.read()
                if done.status == 200:
                    served.add(doc["pid"])
            except (OSError, ValueError, http.client.HTTPException):
                time.sleep(0.2)
            finally:
                conn.close()
        pss = {pid: _pss(pid) for pid in [server.pid, *served]}
    finally:
        server.terminate()
        server.wait(30)
    return {"workers": workers, "pss_bytes": sum(pss.values()), "per_process": pss}


def long_prompt_text(n_tokens: int) -> str:
    from pydoc_data.topics import topics
    text = " ".join(topics[k] for k in sorted(topics))
    sys.path.insert(0, ROOT)
    from edge.registry import resolve
    from models.api import load_model
    tok = load_model(resolve(MODEL)).tokenizer
    ids = tok.encode(text[:40000])[:n_tokens]
    return tok.decode(ids)


def main(argv=None) -> int:
    global MODEL, NAME, SAMPLING
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--levels", default="1,4,16")
    p.add_argument("--max-seconds", type=float, default=120, help="per round of a level")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every level, alternating; throughput: their median")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workers", type=int, default=4, help="workers for the shared-weights PSS (0: skip)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--model", default=MODEL, help="a default decoder's name or a weights file (bench/bench_shapes.py "
                                                  "writes a SmolLM2-shaped one for machines without the real model)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    args = p.parse_args(argv)
    SAMPLING = {"temperature": args.temperature, "top_p": args.top_p}
    MODEL = args.model
    NAME = os.path.basename(MODEL).removesuffix(".edge") if os.path.exists(MODEL) else MODEL
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "edge.cli", "serve", "-m", MODEL, "--port", str(port), "-q"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import urllib.request
        for _ in range(600):
            try:
                if urllib.request.urlopen(url + "/health").status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        long_prompt = long_prompt_text(2000)
        asyncio.run(level(url, 1, 8, 30))          # warm-up
        levels = levels_in_rounds(url, [int(c) for c in args.levels.split(",")], args.tokens, args.max_seconds,
                                  args.rounds)
        inter = asyncio.run(interference(url, long_prompt, 4 * args.tokens))
    finally:
        server.terminate()
        server.wait(30)
    single = levels[0]["tok_s"]
    for r in levels:        # each round's rate over the same round's single-stream rate, seconds apart
        r["x_single_paired"] = statistics.median(a / b for a, b in zip(r["tok_s_rounds"], levels[0]["tok_s_rounds"]))
    print(f"{'streams':>8}{'tok/s':>9}{'x single':>10}{'paired':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}"
          f"{'ITL p99':>9}{'KV waste':>10}{'errors':>8}   tok/s of each round")
    for r in levels:
        print(f"{r['concurrency']:>8}{r['tok_s']:>9.1f}{r['tok_s'] / single:>9.2f}x{r['x_single_paired']:>7.2f}x"
              f"{r['ttft_p50_s']:>9.3f}s{r['ttft_p99_s']:>9.3f}s{r['itl_p50_s'] * 1e3:>7.1f}ms"
              f"{r['itl_p99_s'] * 1e3:>7.1f}ms{r['kv_waste']:>9.2%}{r['errors']:>8}   "
              f"{' / '.join(f'{x:.1f}' for x in r['tok_s_rounds'])}")
    print(f"\na {inter['long_prompt_tokens']}-token prompt arriving while 8 streams decode: prefilled in "
          f"{inter['prefill_s']:.2f} s; the streams' p99 inter-token latency {inter['itl_p99_during_s'] * 1e3:.1f} ms "
          f"vs {inter['itl_p99_alone_s'] * 1e3:.1f} ms alone ({inter['ratio']:.2f}x)")
    shared = None
    if args.workers > 1:
        sys.path.insert(0, ROOT)
        from edge.registry import resolve
        file_bytes = os.path.getsize(resolve(MODEL))
        one, many = serve_pss(1, args.threads), serve_pss(args.workers, args.threads)
        extra = (many["pss_bytes"] - one["pss_bytes"]) / (args.workers - 1)
        shared = {"workers": args.workers, "pss_one_mb": one["pss_bytes"] / 1e6, "pss_many_mb": many["pss_bytes"] / 1e6,
                  "extra_pss_per_worker_mb": extra / 1e6, "file_mb": file_bytes / 1e6,
                  "extra_fraction_of_file": extra / file_bytes}
        print(f"edge serve --workers {args.workers}: PSS {shared['pss_many_mb']:.1f} MB in all vs "
              f"{shared['pss_one_mb']:.1f} MB with 1 worker; extra PSS per worker {shared['extra_pss_per_worker_mb']:.1f} MB"
              f" = {shared['extra_fraction_of_file']:.1%} of the {shared['file_mb']:.0f} MB weights file")
    if args.json:
        print(json.dumps({"levels": levels, "interference": inter, "shared_weights": shared}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
