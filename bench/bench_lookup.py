"""Decoding with prompt-lookup drafts (models/lookup.py) against without, in one process.

For each task (a chat prompt asking SmolLM2-135M-Instruct to summarise a passage of botchan.txt, to
answer a question about it, to add type hints to a file of this repository, to write a story; and
the 16 raw tokens of botchan.txt that `edge bench` decodes after), the settings of `draft_tokens`
alternate round by round on the same model, each round in the reverse order of the last.  Every
setting's tokens are compared with those of no drafts before any timing (drafts must not change a
greedy or a seeded generation), then the medians over the rounds are printed: decode tok/s (the generated
tokens after the first over the time from the first to the last), forward passes per generated
token, and the speed-up against draft_tokens 0.  With --llamacpp, llama.cpp (llama-cpp-python on the
same GGUF requantized to Q8_0, as bench/bench_llamacpp.py) decodes the same prompt ids greedily in
the same rounds, and each setting's ratio to it is printed too.  With --temperature T (and --top-p)
every generation samples, seeded with --seed.

    .venv/bin/python bench/bench_lookup.py [--tokens 128] [--rounds 7] [--drafts 0,1,2] [--threads 2] [--llamacpp]
                                           [--temperature 0] [--top-p 1] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def task_prompts(model) -> dict:
    """name -> prompt ids: chat tasks over real text and code, and edge bench's decode prompt."""
    from edge.bench import real_text

    ids = model.tokenize(real_text())
    passage = model.detokenize(ids[200:600])
    with open(os.path.join(ROOT, "core", "kv_cache.py"), encoding="utf-8") as f:
        code = f.read()[:2500]

    def chat(text):
        return model.chat_prompt([{"role": "user", "content": text}])

    return {"summarise": chat("Summarize this passage:\n\n" + passage),
            "question": chat(passage + "\n\nWhat did the narrator's father say? Quote the text."),
            "code": chat("Add type hints to this code and return the whole code:\n\n" + code),
            "story": chat("Write a short story about a robot who learns to paint."),
            "bench16": ids[:16]}


def llama_decoder(threads: int, n_ctx: int):
    """decode(ids, n) -> llama.cpp's greedy decode tok/s of n tokens after the prompt ids (the
    tokens after the first over the time from the first to the last, as edge's)."""
    import numpy as np

    import llama_cpp
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from bench_llamacpp import q8_0_gguf

    llm = llama_cpp.Llama(q8_0_gguf(), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512,
                          logits_all=False, verbose=False)
    n_vocab = llm.n_vocab()

    def next_token() -> int:
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

    def decode(ids, n) -> float:
        llm.reset()
        llm._ctx.kv_cache_clear()
        llm.eval(ids)
        tok = next_token()
        stamps = [time.perf_counter()]
        for _ in range(n - 1):
            llm.eval([tok])
            tok = next_token()
            stamps.append(time.perf_counter())
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return decode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128, help="tokens to generate (end tokens ignored)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--drafts", default="0,1,2", help="draft_tokens settings, 0 (the reference) first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tasks", default=None, help="comma-separated subset of the tasks")
    p.add_argument("--llamacpp", action="store_true", help="time llama.cpp's greedy decode of the same prompts")
    p.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1, help="the seed of every sampled generation")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        drafts = [int(v) for v in args.drafts.split(",")]
    except ValueError:
        p.error("--drafts takes integers, e.g. 0,1,2,3")
    if drafts[0] != 0 or min(drafts) < 0 or args.rounds < 1 or args.tokens < 2:
        p.error("--drafts must start with 0 and be >= 0; --rounds >= 1; --tokens >= 2")
    sys.path.insert(0, ROOT)
    from edge.registry import resolve
    from models.api import SamplingParams, load_model

    model = load_model(resolve("smollm2-135m-instruct"), threads=args.threads)
    model.prefix_caching = False            # every run feeds its whole prompt
    prompts = task_prompts(model)
    if args.tasks:
        unknown = set(args.tasks.split(",")) - set(prompts)
        if unknown:
            p.error(f"no task {', '.join(sorted(unknown))}; tasks: {', '.join(prompts)}")
        prompts = {k: v for k, v in prompts.items() if k in args.tasks.split(",")}
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed if args.temperature > 0 else None)

    def generate(ids, k):
        model.draft_tokens = k
        stamps, out = [], []
        for tok in model.generate_ids(ids, params):
            stamps.append(time.perf_counter())
            if not out:
                passes = model.forward_passes          # the prompt's are done
            out.append(tok)
        return out, (len(out) - 1) / (stamps[-1] - stamps[0]), (model.forward_passes - passes) / (len(out) - 1)

    llama = llama_decoder(args.threads, max(len(ids) for ids in prompts.values()) + args.tokens) \
        if args.llamacpp else None
    results = {}
    for name, ids in prompts.items():
        reference = generate(ids, 0)[0]
        for k in drafts[1:]:
            if generate(ids, k)[0] != reference:
                print(f"{name}: draft_tokens {k} changed the generation", file=sys.stderr)
                return 1
        rates = {k: [] for k in drafts}
        passes = {}
        theirs = []
        for r in range(args.rounds):
            for k in (drafts if r % 2 == 0 else drafts[::-1]):
                _, rate, per_token = generate(ids, k)
                rates[k].append(rate)
                passes[k] = per_token
            if llama is not None:
                theirs.append(llama(ids, args.tokens))
        base = statistics.median(rates[0])
        results[name] = {k: {"decode_tok_s": statistics.median(rates[k]), "passes_per_token": passes[k],
                             "speedup": statistics.median(rates[k]) / base} for k in drafts}
        if llama is not None:
            results[name]["llama.cpp"] = {"decode_tok_s": statistics.median(theirs)}
            for k in drafts:
                results[name][k]["vs_llamacpp"] = results[name][k]["decode_tok_s"] / statistics.median(theirs)
        if not args.json:
            print(f"{name:10s} ({len(ids)} prompt tokens)" + (
                f"  llama.cpp {statistics.median(theirs):6.1f} tok/s" if llama is not None else ""))
            for k in drafts:
                v = results[name][k]
                print(f"    draft_tokens {k}: {v['decode_tok_s']:6.1f} tok/s, {v['passes_per_token']:.2f} passes "
                      f"a token, {v['speedup']:.2f}x no drafts" + (
                          f", {v['vs_llamacpp']:.2f}x llama.cpp" if llama is not None else ""), flush=True)
    model.draft_tokens = drafts[0]
    if args.json:
        print(json.dumps({"tokens": args.tokens, "rounds": args.rounds, "threads": args.threads,
                          "tasks": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
