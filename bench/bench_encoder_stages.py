"""Where an encoder forward spends its time: all-MiniLM-L6-v2 (int8), random
128-token sentences, at batch 32 and batch 1, split by stage.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/bench_encoder_stages.py [--threads 2] [--runs 5]

Each stage is timed by wrapping the function the forward calls (models.layers.Linear and Norm,
models.bert.project for the fused Q/K/V projections, the attention and GELU kernels), so the
figures add the wrappers' small cost to the whole. The rest of a call (embedding lookup, pooling,
residual adds, Python) is what the stages do not cover. Also printed: the matmuls' rate in GMAC/s,
the figure that bounds the encoder against onnxruntime.
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np

import models.bert as bert
import models.layers as layers
from core import kernels as K
from edge.registry import resolve
from models.api import load_model


def stage_times(model, sentences, runs: int) -> tuple[float, dict]:
    spent = collections.Counter()

    def timed(name, fn):
        def call(*args, **kwargs):
            t = time.perf_counter()
            result = fn(*args, **kwargs)
            spent[name] += time.perf_counter() - t
            return result
        return call

    patched = [(K, "attention_varlen"), (K, "gelu_erf"), (bert, "project"),
               (layers.Linear, "__call__"), (layers.Norm, "__call__")]
    originals = [getattr(owner, name) for owner, name in patched]
    model.embed_ids(sentences)                                       # warm-up, unwrapped
    try:
        for (owner, name), fn in zip(patched, originals):
            label = {"project": "linear (q, k, v)", "__call__": owner.__name__.lower()}.get(name, name)
            setattr(owner, name, timed(label, fn))
        t = time.perf_counter()
        for _ in range(runs):
            model.embed_ids(sentences)
        total = (time.perf_counter() - t) / runs
    finally:
        for (owner, name), fn in zip(patched, originals):
            setattr(owner, name, fn)
    return total, {k: v / runs for k, v in spent.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="all-minilm-l6-v2", help="a weights file or a default model's name")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    model = load_model(resolve(args.model), threads=args.threads)
    cfg = model.config
    rng = np.random.default_rng(0)
    for batch in (32, 1):
        sentences = [rng.integers(1000, 20000, 128).tolist() for _ in range(batch)]
        runs = args.runs if batch > 1 else args.runs * 8
        total, spent = stage_times(model, sentences, runs)
        print(f"batch {batch} x 128: {total * 1e3:.1f} ms per call, {batch / total:.1f} sentences/s")
        for name, t in sorted(spent.items(), key=lambda kv: -kv[1]):
            print(f"  {name:18s} {t * 1e3:8.2f} ms  {100 * t / total:5.1f}%")
        print(f"  {'rest':18s} {(total - sum(spent.values())) * 1e3:8.2f} ms")
        macs = batch * 128 * cfg.n_layers * (4 * cfg.dim * cfg.dim + 2 * cfg.dim * cfg.hidden_dim)
        linear = spent.get("linear", 0) + spent.get("linear (q, k, v)", 0)
        print(f"  matmuls: {macs / linear / 1e9:.1f} GMAC/s on {args.threads} threads")


if __name__ == "__main__":
    main()
