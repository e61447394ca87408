"""Every performance target of issue 4 in one run and one table: edge against llama.cpp
(bench_llamacpp.py), torch fp32 and onnxruntime int8 (bench_peers.py), the machine's read bandwidth
(which bounds decoding), and memory (peak RSS; PSS of extra workers sharing the weights file).

    .venv/bin/python bench/bench_all.py [--runs 5] [--rounds 3] [--threads 2] [--workers 4] [--json]

Each comparison runs its engines in turn, --rounds times (edge, peer, edge, peer, ...), and reports
the median of their rounds: on a shared machine whose speed drifts by 20% from minute to minute,
one process of each, one after the other, gave prefill ratios of 1.60x to 2.87x in three runs.

Read bandwidth: core.kernels._omp.sum_bytes over the mapped weights file with the same thread
count, right before each of `edge bench`'s decode runs (edge/bench.py), and once over a 1 GiB
buffer at the start for reference.  Decode bound: bandwidth / bytes read per generated token, i.e.
every tensor of the weights file but the tokenizer (and, when the logits head is not the token
embedding, but the embedding table, of which one row is read); decode's share of it is the median
over the decode runs of each run's ratio to the bandwidth measured just before it (this machine's
bandwidth moves by half between minutes, so a bound taken minutes away says little).

Peak RSS budget: the weights file + the KV cache of the longest sequence `edge bench` runs (its
512-token prefill, in whole blocks) + 60 MB.

PSS: --workers processes each open SmolLM2 and decode 16 tokens, then wait; their Pss and Rss are
read from /proc/PID/smaps_rollup.  extra PSS per worker = (sum of PSS - PSS of the first worker
alone) / (workers - 1): what each further worker costs when the weights are shared.

Decode after a 2,000-token prompt (edge/bench.py's decode_long_tok_s, against llama.cpp's) is
reported too; issue 4 sets no target for it.

The table's last columns give the target and whether it holds in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from bench_llamacpp import _last_json, _run, cpu_model  # noqa: E402

MODEL = "smollm2-135m-instruct"

_WORKER = r"""
import sys
from models.api import load_model
from edge.registry import resolve
from core.threads import set_num_threads
set_num_threads(int(sys.argv[1]))
m = load_model(resolve("smollm2"))
m.generate("Once upon a time", max_tokens=16, temperature=0.0, ignore_eos=True)
print("ready", flush=True)
sys.stdin.read()
"""


def read_bandwidth_gbs(threads: int, runs: int, nbytes: int = 1 << 30) -> float:
    import numpy as np

    from core.kernels._omp import set_num_threads, sum_bytes
    set_num_threads(threads)
    buf = np.ones(nbytes, np.uint8)
    sum_bytes(buf)
    times = []
    for _ in range(max(runs, 3)):
        t = time.perf_counter()
        sum_bytes(buf)
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times) / 1e9


def bytes_per_token(path: str) -> tuple[int, int]:
    """(bytes read per decoded token, file size)."""
    from core.wfile import WeightsFile
    from edge.bench import decode_bytes_per_token
    return decode_bytes_per_token(WeightsFile.open(path)), os.path.getsize(path)


def kv_bytes_of_bench(path: str, tokens: int = 512 + 1) -> int:
    """KV cache bytes of the longest sequence `edge bench` runs (the 512-token prefill), in whole
    16-token blocks of the model's default KV dtype: what the peak-RSS budget allows for the cache."""
    from core.kv_cache import KV_DTYPES, default_kv_dtype
    from core.wfile import WeightsFile
    meta = WeightsFile.open(path).meta
    c, per_value = meta["config"], KV_DTYPES[default_kv_dtype(meta["quant"].get("name", ""))]
    return -(-tokens // 16) * 16 * c["n_layers"] * 2 * c["n_kv_heads"] * c["head_dim"] * per_value


def _smaps(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def processes_mapping(path: str) -> list[int]:
    """The pids whose address space maps the file at path (this process's included).  Such a
    process shares the file's pages with the PSS workers, so the first worker alone is charged
    only its share of them and every further worker seems to add more: a leftover `edge serve`
    made it 24.3 MB a worker where it was 9.5."""
    target = os.path.realpath(path)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/maps") as f:
                if any(line.rstrip("\n").endswith(" " + target) for line in f):
                    pids.append(int(entry))
        except OSError:         # gone, or not ours to read
            continue
    return pids


def worker_pss(workers: int, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    from edge.registry import resolve
    others = processes_mapping(resolve(MODEL))
    if others:
        print(f"warning: processes {others} map the weights file too; the extra PSS per worker is overstated",
              file=sys.stderr)
    procs, pss, rss = [], [], []
    try:
        for i in range(workers):
            p = subprocess.Popen([sys.executable, "-c", _WORKER, str(threads)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
            procs.append(p)
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a PSS worker failed to start")
            if i == 0:
                first_alone = _smaps(p.pid)["Pss"]
        for p in procs:
            s = _smaps(p.pid)
            pss.append(s["Pss"])
            rss.append(s["Rss"])
    finally:
        for p in procs:
            p.kill()
            p.wait()
    extra = (sum(pss) - first_alone) / (workers - 1) if workers > 1 else 0.0
    return {"workers": workers, "other_mappers": others, "first_alone_pss_mb": first_alone / 1e6,
            "pss_mb": [x / 1e6 for x in pss],
            "rss_mb": [x / 1e6 for x in rss], "extra_pss_per_worker_mb": extra / 1e6}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = p.parse_args(argv)
    common = ["--runs", str(args.runs), "--rounds", str(args.rounds), "--threads", str(args.threads)]

    from edge.registry import resolve
    path = resolve(MODEL)
    print("read bandwidth...", file=sys.stderr)
    bw = read_bandwidth_gbs(args.threads, args.runs)
    per_token, file_size = bytes_per_token(path)
    kv_bytes = kv_bytes_of_bench(path)
    print("bench_llamacpp.py...", file=sys.stderr)
    lc = _last_json(_run([sys.executable, os.path.join(HERE, "bench_llamacpp.py"), "--json", *common],
                         "bench_llamacpp"), "bench_llamacpp")
    print("bench_peers.py...", file=sys.stderr)
    pe = _last_json(_run([sys.executable, os.path.join(HERE, "bench_peers.py"), "--json", *common],
                         "bench_peers"), "bench_peers")
    print("PSS of workers...", file=sys.stderr)
    mem = worker_pss(args.workers, args.threads)

    e, l = lc["edge"], lc["llama_cpp"]
    bound = e["read_gbs"] * 1e9 / per_token       # the bandwidth measured beside decode (edge/bench.py)
    ed, td = pe["edge"]["decoder"], pe["peer"]["decoder"]
    ee, oe = pe["edge"]["encoder"], pe["peer"]["encoder"]
    mb = 1e6
    rows = [
        # metric, edge, peer name, peer value, ratio (edge advantage), target ratio
        ("decode 128 tok/s", e["decode_tok_s"], "llama.cpp", l["decode_tok_s"], e["decode_tok_s"] / l["decode_tok_s"], 2.0),
        ("decode vs bandwidth bound", e["decode_tok_s"], "bound", bound, e["decode_vs_bound"], 0.75),
        ("decode 64 after 2,000 tok/s", e["decode_long_tok_s"], "llama.cpp", l["decode_long_tok_s"],
         e["decode_long_tok_s"] / l["decode_long_tok_s"], None),
        ("prefill 512 tok/s", e["prefill_tok_s"], "llama.cpp", l["prefill_tok_s"], e["prefill_tok_s"] / l["prefill_tok_s"], 3.0),
        ("prefill 512 tok/s", ed["prefill_tok_s"], "torch fp32", td["prefill_tok_s"], ed["prefill_tok_s"] / td["prefill_tok_s"], 1.5),
        ("MiniLM b32 sent/s", ee["embed_sent_s_b32"], "onnxruntime", oe["embed_sent_s_b32"], ee["embed_sent_s_b32"] / oe["embed_sent_s_b32"], 2.0),
        ("MiniLM b1 sent/s", ee["embed_sent_s_b1"], "onnxruntime", oe["embed_sent_s_b1"], ee["embed_sent_s_b1"] / oe["embed_sent_s_b1"], 2.0),
        ("MiniLM cosine to fp32", ee["cosine_to_fp32"], "onnxruntime", oe["cosine_to_fp32"], ee["cosine_to_fp32"] / oe["cosine_to_fp32"], 1.0),
        ("first token, new process s", e["cold_first_token_s"], "llama-cpp-py", l["cold_first_token_s"], l["cold_first_token_s"] / e["cold_first_token_s"], 1 / 0.35),
        ("peak RSS decoding MB", e["peak_rss_mb"], "budget MB", (file_size + kv_bytes) / mb + 60,
         ((file_size + kv_bytes) / mb + 60) / e["peak_rss_mb"], 1.0),
        ("extra PSS per worker MB", mem["extra_pss_per_worker_mb"], "file MB", file_size / mb, file_size / mb / max(mem["extra_pss_per_worker_mb"], 1e-9), 1 / 0.15),
    ]
    print(f"CPU: {lc['cpu']}   threads: {args.threads}   runs: {args.runs}   rounds: {args.rounds}   "
          f"date: {lc['date']}   "
          f"edge simd: {lc['edge_simd']}")
    print(f"other processes' CPU: {lc['other_cpu_pct']}% (llama.cpp run), {pe['other_cpu_pct']}% (peers run)")
    print(f"read bandwidth {e['read_gbs']:.1f} GB/s right before each decode run (medians; {bw:.1f} GB/s over "
          f"1 GiB at the start); {per_token / mb:.1f} MB read per token -> decode bound {bound:.0f} tok/s")
    if "weights_2mib_share" in e:
        print(f"edge's weights map read through 2 MiB pages: {100 * e['weights_2mib_share']:.0f}% of its resident "
              f"pages (core/wfile.py)")
    print(f"peak RSS while decoding (edge bench): {e['peak_rss_mb']:.0f} MB; budget = weights file "
          f"{file_size / mb:.0f} MB + KV cache {kv_bytes / mb:.0f} MB (512-token prefill) + 60 MB")
    print()
    print(f"{'metric':<28}{'edge':>10}  {'vs':<13}{'theirs':>10}{'advantage':>11}{'target':>9}  holds")
    for name, ours, peer, theirs, ratio, target in rows:
        print(f"{name:<28}{ours:>10.4g}  {peer:<13}{theirs:>10.4g}{ratio:>10.2f}x" +
              (f"{target:>8.2f}x  {'yes' if ratio >= target else 'NO'}" if target is not None else f"{'-':>9}  -"))
    if args.json:
        print(json.dumps({"cpu": lc["cpu"], "threads": args.threads, "runs": args.runs, "rounds": args.rounds,
                          "date": lc["date"],
                          "bandwidth_gbs": e["read_gbs"], "bandwidth_1gib_gbs": bw, "bytes_per_token": per_token,
                          "decode_bound_tok_s": bound,
                          "file_bytes": file_size, "kv_bytes": kv_bytes, "memory": mem, "llamacpp": lc, "peers": pe,
                          "targets": [dict(zip(["metric", "edge", "peer", "theirs", "advantage", "target"], r))
                                      for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
