"""int8 against f32 perplexity of SmolLM2 over several windows of real text, not one.

The int8 model's excess perplexity moves by a few tenths of a percent from one window of text to
the next (and with any change of rounding in the kernels), so one window, as the test suite uses,
says little about the quality budget (within 1% of f32).  This prints each window's figures and
the mean excess.

    .venv/bin/python bench/bench_quality.py [--windows 6] [--tokens 1024] [--text FILE] [--json]

Text: botchan.txt (the README's test command fetches it into .cache/data), from "CHAPTER I" on,
as the perplexity test reads it.  Windows are consecutive and do not overlap; each is evaluated
from an empty cache.  The f32 model is converted once into $EDGE_HOME/bench.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "smollm2-135m-instruct"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=6)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per window")
    p.add_argument("--text", default=os.path.join(ROOT, ".cache", "data", "botchan.txt"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    from edge.registry import cache_dir, resolve, source_path
    from models.api import load_model
    from models.convert import convert

    f32_path = os.path.join(cache_dir(), "bench", "smollm2-f32.edge")
    if not os.path.exists(f32_path):
        os.makedirs(os.path.dirname(f32_path), exist_ok=True)
        convert(source_path(MODEL), f32_path, quant="f32", progress=False)
    f32, q8 = load_model(f32_path), load_model(resolve(MODEL))
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    text = text[text.index("CHAPTER I"):] if "CHAPTER I" in text else text
    ids = f32.tokenize(text)
    rows = []
    for w in range(args.windows):
        part = ids[w * args.tokens:(w + 1) * args.tokens]
        if len(part) < args.tokens:
            break
        t = time.perf_counter()
        a, b = f32.perplexity(part), q8.perplexity(part)
        rows.append({"first_token": w * args.tokens, "f32": a, "int8": b, "excess_pct": 100 * (b / a - 1)})
        print(f"tokens {w * args.tokens:>6}-{(w + 1) * args.tokens:<6} f32 {a:9.4f}  int8 {b:9.4f}  "
              f"{rows[-1]['excess_pct']:+.3f}%   ({time.perf_counter() - t:.0f} s)", flush=True)
    excess = [r["excess_pct"] for r in rows]
    over = sum(e > 1.0 for e in excess)
    print(f"int8 excess over {len(rows)} windows: mean {statistics.mean(excess):+.3f}%, "
          f"max {max(excess):+.3f}%, {over} window(s) above +1%")
    if args.json:
        print(json.dumps({"windows": rows, "mean_excess_pct": statistics.mean(excess)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
