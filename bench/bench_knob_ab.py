"""A benchmark knob of the kernels or the native forward, off against on, in one process.

This machine's speed drifts by 10-20% from minute to minute, so settings timed in separate runs say
nothing about a 3% change.  Here the setting alternates round by round on the same model and input,
in the order given (--new-first reverses it: run both, the first setting of a round tends to lose),
the outputs of the two settings are compared bit for bit before any timing (a knob that changes
speed must not change numbers; --allow-different to time one that does), and the medians and the
rounds the setting 1 won are printed.

    .venv/bin/python bench/bench_knob_ab.py models._llama_native._set_fused_silu --prefill 512
    .venv/bin/python bench/bench_knob_ab.py core.kernels._attention._set_rows_in_lanes --embed 32
    .venv/bin/python bench/bench_knob_ab.py core.kernels._matmul._set_steal_tiles --decode 128

Workloads (one per run): --prefill N (a prompt of N tokens into an empty cache, SmolLM2), --decode N
(N greedy steps after a prompt of --prompt tokens, 16 by default, SmolLM2), --embed B (MiniLM, B sentences of 128 tokens).
The knob is a function of one int, set to 0 and to 1; it is left at 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("knob", help="module.function taking 0 or 1, e.g. models._llama_native._set_fused_silu")
    work = p.add_mutually_exclusive_group(required=True)
    work.add_argument("--prefill", type=int, metavar="N")
    work.add_argument("--decode", type=int, metavar="N")
    work.add_argument("--embed", type=int, metavar="B")
    p.add_argument("--prompt", type=int, default=16, metavar="P", help="--decode's prompt tokens (default 16)")
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-first", action="store_true", help="time setting 1 first in each round")
    p.add_argument("--allow-different", action="store_true", help="time the settings even if outputs differ")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.prompt < 1 or min(v for v in (args.prefill, args.decode, args.embed) if v is not None) < 1:
        p.error("--rounds and the workload's size must be at least 1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")       # numpy's BLAS threads must not spin here
    sys.path.insert(0, ROOT)
    import numpy as np

    from edge.registry import resolve
    from models.api import load_model

    module, _, name = args.knob.rpartition(".")
    try:
        knob = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        p.error(f"no knob {args.knob}: {e}")
    rng = np.random.default_rng(1)
    timed = [0.0]       # when the timed part of a run began
    if args.embed is not None:
        model = load_model(resolve("all-minilm-l6-v2"), threads=args.threads)
        sentences = [rng.integers(1000, 20000, 128).tolist() for _ in range(args.embed)]
        size, unit = args.embed, "sent/s"

        def run():
            return model.embed_ids(sentences)
    else:
        model = load_model(resolve("smollm2-135m-instruct"), threads=args.threads)
        n = args.prefill if args.prefill is not None else args.decode
        ids = rng.integers(300, 49000, n + args.prompt).tolist()
        size, unit = n, "tok/s"
        if args.prefill is not None:
            def run():
                return np.array(model.next_token_logits(ids[:n]))
        else:
            def run():
                seq = model.cache.new_sequence()
                try:
                    model._run(seq, ids[:args.prompt], False)
                    timed[0] = time.perf_counter()          # the steps alone, not the prompt
                    return np.stack([np.array(model._run(seq, [ids[args.prompt + i]], False)) for i in range(n)])
                finally:
                    seq.release()

    outs = {}
    for on in (0, 1):
        knob(on)
        outs[on] = run()
    same = np.array_equal(outs[0], outs[1])
    if not same and not args.allow_different:
        knob(1)
        print("the two settings' outputs differ (--allow-different to time them anyway)")
        return 1
    rates = {0: [], 1: []}
    for _ in range(args.rounds):
        for on in ((1, 0) if args.new_first else (0, 1)):
            knob(on)
            timed[0] = time.perf_counter()
            run()
            rates[on].append(size / (time.perf_counter() - timed[0]))
    knob(1)
    off, on = statistics.median(rates[0]), statistics.median(rates[1])
    wins = sum(b > a for a, b in zip(rates[0], rates[1]))
    print(f"{args.knob}: 0 {off:.1f} {unit}, 1 {on:.1f} {unit}, {on / off:.3f}x; 1 faster in {wins}/{args.rounds} "
          f"rounds ({'1 first' if args.new_first else '0 first'}; outputs {'identical' if same else 'differ'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
