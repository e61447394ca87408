"""matmul_q8 of this tree against another build of core/kernels/_matmul, alternating in one process.

This machine's speed drifts by up to 20% from minute to minute, so two builds timed one after the
other say nothing about a 5% change.  Here both modules are loaded side by side (the other one from
its .so file, under the same module name) and called in turn, A B B A..., on the same arrays; the
medians of each and the number of rounds the new one won are printed.  Results must agree bit for
bit: a change of speed is not allowed to be a change of numbers.

    # build the old one somewhere (a worktree of the old commit), then
    .venv/bin/python bench/bench_matmul_ab.py --other OLD_TREE/core/kernels/_matmul.cpython-311-x86_64-linux-gnu.so
        [--shapes 512x1536x576,16x1536x576] [--threads 1] [--rounds 21] [--bias]

Shapes are MxNxK (activation rows x weight rows x depth); the defaults are SmolLM2-135M's: a
prefill chunk and a 16-sequence decode step through the gate/up (K 576) and down (K 1536)
projections, and one decode row.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SHAPES = "512x1536x576,512x576x1536,16x1536x576,16x576x1536,1x1536x576"


def load_other(path: str):
    spec = importlib.util.spec_from_file_location("core.kernels._matmul", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not an extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--other", required=True, help="the other build's _matmul .so")
    p.add_argument("--shapes", default=DEFAULT_SHAPES)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--bias", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")       # numpy's BLAS threads must not spin here
    sys.path.insert(0, ROOT)
    import numpy as np

    import core.kernels._matmul as this
    from core.kernels._omp import set_num_threads

    other = load_other(args.other)
    set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"{'shape':>16}{'other':>9}{'this':>9}{'ratio':>8}  this faster   (GMAC/s, medians of {args.rounds}, "
          f"{args.threads} thread{'s' if args.threads > 1 else ''})")
    for shape in args.shapes.split(","):
        M, N, K = (int(v) for v in shape.split("x"))
        x = rng.standard_normal((M, K), dtype=np.float32)
        w = rng.integers(-127, 128, (N, K), dtype=np.int8)
        s = (rng.integers(0x2000, 0x2400, (N, (K + 31) // 32))).astype(np.uint16)
        b = rng.standard_normal(N, dtype=np.float32) if args.bias else None
        outs = {"other": np.empty((M, N), np.float32), "this": np.empty((M, N), np.float32)}
        mods = {"other": other, "this": this}
        for name in mods:
            mods[name].matmul_q8(outs[name], x, w, s, b)
        if not np.array_equal(outs["other"], outs["this"]):
            print(f"{shape:>16}  the two builds' results differ")
            return 1
        reps = max(1, int(3e8 / (M * N * K)))
        rates = {"other": [], "this": []}
        for r in range(args.rounds):
            for name in (("other", "this") if r % 2 == 0 else ("this", "other")):
                t = time.perf_counter()
                for _ in range(reps):
                    mods[name].matmul_q8(outs[name], x, w, s, b)
                rates[name].append(M * N * K * reps / (time.perf_counter() - t) / 1e9)
        mo, mt = statistics.median(rates["other"]), statistics.median(rates["this"])
        wins = sum(t > o for o, t in zip(rates["other"], rates["this"]))
        print(f"{shape:>16}{mo:>9.1f}{mt:>9.1f}{mt / mo:>7.3f}x  {wins:>4}/{args.rounds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
