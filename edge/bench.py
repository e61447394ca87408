"""`edge bench`: speed and memory of one model on this machine.

Decoders: time to open the file, to the first token of a short prompt (open included), prefill
tok/s for 128- and 512-token prompts, decode tok/s for 128 new tokens, peak RSS; and the read
bandwidth that bounds decoding, measured right before each decode run (the kernels' threads sum
the bytes of the mapped weights file, core.kernels._omp.sum_bytes), with decode's share of that
bound (decode tok/s x bytes read per token / bandwidth, the median over the runs of each run's
own ratio: on a shared machine the bandwidth moves by half from one minute to the next), and the
share of the weights map that those runs read through 2 MiB pages (core.wfile: 1.09-1.19x decode).
After peak RSS is read: decode tok/s for 64 new tokens after a 2,000-token prompt (attention then
reads 46 MB of keys and values a token besides the weights; the median of min(--runs, 3) runs).
Encoders: sentences/s for 128-token inputs at batch 1 and batch 32.
Each figure is the median of --runs repetitions after one warm-up.  The text is real English
(CPython's pydoc topics), so the tokenizer and the attention see realistic inputs.
"""

from __future__ import annotations

import json
import resource
import statistics
import time


def real_text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def _median_time(fn, runs: int, min_sample_s: float = 0.05) -> float:
    """Median wall time of one fn() call over runs samples, after one warm-up call.  A sample
    times as many calls as the warm-up says fill min_sample_s (a 9 ms call timed alone moved by
    10-20% from one sample to the next); calls longer than that are timed one per sample."""
    t = time.perf_counter()
    fn()
    reps = max(1, round(min_sample_s / max(time.perf_counter() - t, 1e-9)))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t) / reps)
    return statistics.median(times)


def decode_bytes_per_token(wf) -> int:
    """Bytes of the weights file a decode step reads: every tensor but the tokenizer's tables, and
    the token embedding only where it is also the logits head (tied; a lookup reads one row)."""
    tied = wf.meta["config"].get("tied_embeddings", False)
    return sum(info.nbytes for name, info in wf.tensors.items()
               if name != "tokenizer.json" and (tied or not name.startswith("token_embd.")))


def bench_decoder(model, runs: int) -> dict:
    from core.kernels._omp import sum_bytes
    from core.wfile import mapped_pages
    from models.api import SamplingParams

    ids = model.tokenize(real_text())
    t = time.perf_counter()
    gen = model.generate_ids(ids[:16], SamplingParams(max_tokens=1))
    next(gen)
    gen.close()
    first = time.perf_counter() - t
    out = {"prefill128_tok_s": 128 / _median_time(lambda: model.next_token_logits(ids[:128]), runs),
           "prefill_tok_s": 512 / _median_time(lambda: model.next_token_logits(ids[:512]), runs)}

    def decode():
        return decode_rate(model, ids[:16], 128)

    weights = model.file.mapped()

    def read_gbs():
        t = time.perf_counter()
        sum_bytes(weights)
        return len(weights) / (time.perf_counter() - t) / 1e9

    decode()
    read_gbs()
    rates, bandwidths = [], []
    for _ in range(runs):
        bandwidths.append(read_gbs())
        rates.append(decode())
    per_token = decode_bytes_per_token(model.file)
    out["decode_tok_s"] = statistics.median(rates)
    pages = mapped_pages(model.file.path)       # how much of the map the decode runs streamed in 2 MiB pages
    if pages is not None and pages[0]:
        out["weights_2mib_share"] = pages[1] / pages[0]
    out["read_gbs"] = statistics.median(bandwidths)
    out["decode_vs_bound"] = statistics.median(r * per_token / (b * 1e9) for r, b in zip(rates, bandwidths))
    return first, out


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: VmHWM, the high-water mark of its own address
    space.  getrusage's ru_maxrss also counts, after fork and exec, the RSS the parent had when it
    forked: `edge bench` run by bench/bench_llamacpp.py under bench/bench_all.py reported 216 MB
    where its own peak was 210 (a child of a process holding 800 MB reports 813)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


LONG_PROMPT_TOKENS = 2000
LONG_DECODE_TOKENS = 64


def decode_rate(model, prompt: list, n: int) -> float:
    """Greedy tok/s of n new tokens after prompt (end tokens ignored): n - 1 tokens over the time
    from the first to the last."""
    from models.api import SamplingParams

    stamps = [time.perf_counter() for _ in model.generate_ids(prompt, SamplingParams(max_tokens=n, ignore_eos=True))]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def bench_decoder_long(model, runs: int) -> dict:
    """Decode after a long prompt: LONG_DECODE_TOKENS after LONG_PROMPT_TOKENS of the real text."""
    prompt = model.tokenize(real_text())[:LONG_PROMPT_TOKENS]
    return {"decode_long_tok_s": statistics.median(decode_rate(model, prompt, LONG_DECODE_TOKENS)
                                                   for _ in range(min(runs, 3)))}


def bench_encoder(model, runs: int) -> dict:
    body = model.tokenize(real_text(), add_special_tokens=False)
    cls, sep = model.tokenize("")[0], model.tokenize("")[-1]
    sentences = [[cls] + body[i * 126:(i + 1) * 126] + [sep] for i in range(32)]
    return {"embed_sent_s_b1": 1 / _median_time(lambda: model.embed_ids(sentences[:1]), runs),
            "embed_sent_s_b32": 32 / _median_time(lambda: model.embed_ids(sentences), runs)}


def run_bench(args) -> dict:
    from core.kernels._omp import get_num_threads, simd_name
    from edge.registry import resolve
    from models.api import load_model

    path = resolve(args.model)
    t = time.perf_counter()
    model = load_model(path, threads=args.threads)
    load_s = time.perf_counter() - t
    result = {"model": args.model, "arch": model.arch, "quant": model.meta["quant"]["name"],
              "threads": get_num_threads(), "simd": simd_name(), "load_s": load_s}
    if model.task == "generate":
        first, figures = bench_decoder(model, args.runs)
        result["first_token_s"] = load_s + first
        result.update(figures)
    else:
        result.update(bench_encoder(model, args.runs))
    result["peak_rss_mb"] = peak_rss_mb()
    if model.task == "generate":
        result.update(bench_decoder_long(model, args.runs))
    for k, v in result.items():
        print(f"{k:>18}: {v:.4g}" if isinstance(v, float) else f"{k:>18}: {v}")
    if args.json:
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in result.items()}))
    return result


def _post(port: int, body: bytes, timeout: float = 30.0) -> int | None:
    import http.client
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        status = conn.getresponse().status
        conn.close()
        return status
    except OSError:
        return None


def run_cold_start(args) -> dict:
    """Process start of `edge serve -m MODEL` to the first 200 from /v1/completions (1 token),
    polled every 5 ms; one warm-up, then the median of --runs fresh processes."""
    import os
    import socket
    import subprocess
    import sys

    from edge.registry import canonical_name

    name = canonical_name(args.model) or os.path.basename(args.model).removesuffix(".edge")
    body = json.dumps({"model": name, "prompt": "Hello", "max_tokens": 1, "temperature": 0}).encode()
    env = dict(os.environ)
    if args.threads:
        env["EDGE_THREADS"] = str(args.threads)
    times = []
    for _ in range(args.runs + 1):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "serve", "-m", args.model, "--port", str(port), "-q"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while (status := _post(port, body)) != 200:
                if proc.poll() is not None or time.perf_counter() - start > 120:
                    raise RuntimeError(f"edge serve did not answer 200 (last status {status})")
                time.sleep(0.005)
            times.append(time.perf_counter() - start)
        finally:
            proc.terminate()
            proc.wait(10)
    result = {"model": args.model, "cold_start_s": statistics.median(times[1:]), "runs": args.runs,
              "all_s": [round(t, 4) for t in times[1:]]}
    print(f"cold start (process start to first 200 from /v1/completions): {result['cold_start_s']:.3f} s "
          f"(median of {args.runs}: {result['all_s']})")
    if args.json:
        print(json.dumps(result))
    return result
