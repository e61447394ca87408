"""Decoding deep into a context with the KV cache in float32 and in float16 (`--kv-dtype`).

    .venv/bin/python bench/bench_kv.py [--contexts 16,500,2000] [--runs 8] [--tokens 64] [--threads 2]

For each context length: a prompt of that many tokens is prefilled, then --tokens greedy decode
steps are timed (tok/s), once with each dtype, alternating in one process (f32 first on even runs,
f16 first on odd ones) so that both see the same machine.  Printed: the medians of --runs, the
median of the per-run ratios f16 / f32 and how many runs f16 won, then the KV bytes per token;
with --json, one JSON object.  The model is a default model's name or a weights file (--model).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DTYPES = ("f32", "f16")


def decode_tok_s(model, ids: list, context: int, tokens: int) -> float:
    seq = model.cache.new_sequence()
    try:
        for start in range(0, context, model.max_rows):
            model._run(seq, ids[start:min(start + model.max_rows, context)], False)
        t = time.perf_counter()
        for i in range(tokens):
            model._run(seq, [ids[context + i]], False)
        return tokens / (time.perf_counter() - t)
    finally:
        seq.release()


def measure(path: str, contexts: list, runs: int, tokens: int, threads: int) -> dict:
    from models.api import load_model

    longest = max(contexts) + tokens
    models = {d: load_model(path, threads=threads, kv_tokens=longest + 16, kv_dtype=d) for d in DTYPES}
    vocab = models["f32"].config.vocab_size
    ids = [300 + (i * 7919) % (vocab - 400) for i in range(longest + 1)]     # no special tokens
    cache = models["f32"].cache
    out = {"threads": threads, "tokens": tokens, "runs": runs,
           "kv_bytes_per_token": {d: models[d].cache.block_bytes // cache.block_size for d in DTYPES},
           "contexts": {}}
    for context in contexts:
        got = {d: [] for d in DTYPES}
        for r in range(runs):
            for d in (DTYPES if r % 2 == 0 else DTYPES[::-1]):
                got[d].append(decode_tok_s(models[d], ids, context, tokens))
        ratios = [b / a for a, b in zip(got["f32"], got["f16"])]
        out["contexts"][context] = {**{f"{d}_tok_s": statistics.median(got[d]) for d in DTYPES},
                                    "ratio": statistics.median(ratios), "f16_faster": sum(x > 1 for x in ratios)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a default model's name or a weights file")
    p.add_argument("--contexts", default="16,500,2000", help="prompt lengths, comma separated")
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64, help="decode steps timed after each prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from edge.registry import resolve

    path = args.model if os.path.exists(args.model) else resolve(args.model)
    contexts = [int(c) for c in args.contexts.split(",")]
    out = measure(path, contexts, args.runs, args.tokens, args.threads)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"decode tok/s after a prompt, {args.threads} threads, medians of {args.runs} alternating runs")
    print(f"{'context':>8} {'f32':>8} {'f16':>8} {'f16/f32':>8} {'f16 won':>8}")
    for context, c in out["contexts"].items():
        print(f"{context:>8} {c['f32_tok_s']:>8.1f} {c['f16_tok_s']:>8.1f} {c['ratio']:>8.3f} "
              f"{c['f16_faster']:>5}/{args.runs}")
    per = out["kv_bytes_per_token"]
    print(f"KV bytes per token: f32 {per['f32']}, f16 {per['f16']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
