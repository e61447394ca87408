"""The `edge` command line.

    edge fetch                                   install + convert the default models
    edge convert SRC -o OUT [--quant int8|f32]   Hugging Face folder or GGUF -> weights file
    edge generate -m MODEL -p TEXT [-n N] [--temperature T] [--seed S] [--chat] [--json]
    edge embed -m MODEL TEXT... [--similarity]
    edge classify -m MODEL TEXT...
    edge perplexity -m MODEL FILE [--max-tokens N]
    edge info MODEL
    edge bench -m MODEL [--json] [--threads N] [--runs R]
    edge serve [-m MODEL ...] [--host H] [--port P]
    edge rpc [-m MODEL ...] (--port P [--host H] | --unix PATH)   msgpack-RPC worker

MODEL is a weights file or a default model's name.  Errors print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import json
import sys


def _model(args):
    from edge.registry import resolve
    from models.api import load_model

    return load_model(resolve(args.model), threads=getattr(args, "threads", None))


def cmd_fetch(args):
    from edge.registry import fetch_default_models

    for name, path in fetch_default_models(quant=args.quant, force=args.force).items():
        print(f"{name}: {path}")


def cmd_convert(args):
    from models.convert import convert

    summary = convert(args.src, args.output, quant=args.quant, progress=not args.quiet)
    print(json.dumps(summary))


DRAFT_HELP = ("the most tokens a generation without penalties guesses per forward pass by prompt lookup and "
              "checks in the same pass (default 4, from 2 up while its guesses hold; 0: none); the output is "
              "the same either way, greedy or seeded")


def _sampling(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop or [],
                ignore_eos=args.ignore_eos)


def cmd_generate(args):
    from core.errors import UnsupportedTaskError
    from models.api import SamplingParams

    model = _model(args)
    if model.task != "generate":
        raise UnsupportedTaskError(f"{args.model} is an encoder; use `edge embed`")
    params = SamplingParams(**_sampling(args))
    if args.draft_tokens is not None:
        from edge.settings import check_draft_tokens

        model.draft_tokens = check_draft_tokens(args.draft_tokens)
    prompt = model.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else model.tokenize(args.prompt)
    if args.json:
        c = model.generate(prompt, params=params)
        print(json.dumps({"prompt_ids": c.prompt_ids, "token_ids": c.token_ids, "text": c.text,
                          "finish_reason": c.finish_reason}, ensure_ascii=False))
        return
    for chunk in model.generate_stream(prompt, params=params):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_embed(args):
    from core.errors import UnsupportedTaskError

    model = _model(args)
    if not hasattr(model, "embed"):
        raise UnsupportedTaskError(f"{args.model} is a decoder; use `edge generate`")
    vectors = model.embed(args.texts)
    if args.similarity:
        sims = vectors @ vectors.T
        print(json.dumps({"texts": args.texts, "cosine": [[round(float(x), 4) for x in row] for row in sims]}))
    else:
        print(json.dumps({"model": args.model, "dim": int(vectors.shape[1]), "data": vectors.tolist()}))


def cmd_classify(args):
    model = _model(args)
    if not hasattr(model, "classify"):
        from core.errors import UnsupportedTaskError
        raise UnsupportedTaskError(f"{args.model} is a decoder; it has no classification head")
    print(json.dumps(model.classify(args.texts)))


def cmd_perplexity(args):
    from core.errors import InvalidRequestError, UnsupportedTaskError

    model = _model(args)
    if model.task != "generate":
        raise UnsupportedTaskError("perplexity needs a decoder")
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise InvalidRequestError(f"{args.file}: {e.strerror}") from None
    ids = model.tokenize(text)[: args.max_tokens]
    ppl = model.perplexity(ids, window=args.window)
    print(f"tokens: {len(ids)}  window: {min(args.window or model.context, model.context)}  "
          f"quant: {model.meta['quant']['name']}", file=sys.stderr)
    print(f"{ppl:.6f}")


def cmd_info(args):
    from core.wfile import WeightsFile
    from edge.registry import resolve

    wf = WeightsFile.open(resolve(args.model))
    meta = {k: v for k, v in wf.meta.items() if k != "chat_template"}
    meta["has_chat_template"] = bool(wf.meta.get("chat_template"))
    meta["file_bytes"] = wf.nbytes
    meta["n_tensors"] = len(wf.tensors)
    print(json.dumps(meta, indent=2))


def cmd_serve(args):
    import logging

    from aiohttp import web

    from edge.app import create_app
    from edge.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.from_env(models=args.model or None, host=args.host, port=args.port, threads=args.threads,
                                 kv_tokens=args.kv_tokens, kv_dtype=args.kv_dtype, max_queue=args.max_queue,
                                 prefill_chunk=args.prefill_chunk, draft_tokens=args.draft_tokens)
    access_log = None if args.quiet else logging.getLogger("aiohttp.access")
    if args.workers is not None and args.workers < 1:
        raise ValueError("--workers must be at least 1")
    if (args.workers or 1) == 1:
        web.run_app(create_app(settings), host=settings.host, port=settings.port, print=None,
                    handler_cancellation=True, access_log=access_log)
        return
    from edge.workers import serve_workers, threads_per_worker

    settings.threads = threads_per_worker(args.workers, settings.threads)
    if settings.threads is not None:
        logging.getLogger("edge").info("%d workers, %d kernel threads each", args.workers, settings.threads)

    def run_worker():
        web.run_app(create_app(settings), host=settings.host, port=settings.port, print=None,
                    handler_cancellation=True, access_log=access_log, reuse_port=True)
    serve_workers(args.workers, run_worker)


def cmd_rpc(args):
    import asyncio
    import logging

    from edge.rpc import serve
    from edge.settings import Settings

    if args.unix and args.host:
        raise ValueError("--host goes with --port, not with --unix")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.from_env(models=args.model or None, host=args.host, port=args.port, threads=args.threads,
                                 kv_tokens=args.kv_tokens, kv_dtype=args.kv_dtype, max_queue=args.max_queue,
                                 prefill_chunk=args.prefill_chunk, draft_tokens=args.draft_tokens)
    asyncio.run(serve(settings, unix=args.unix))


def cmd_bench(args):
    from edge.bench import run_bench, run_cold_start

    (run_cold_start if args.cold_start else run_bench)(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge", description="Small language models on a CPU, at the edge.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("fetch", help="install and convert the default models")
    s.add_argument("--quant", choices=["int8", "f32"], default="int8")
    s.add_argument("--force", action="store_true", help="convert again even if cached")
    s.set_defaults(func=cmd_fetch)

    s = sub.add_parser("convert", help="convert a Hugging Face folder or GGUF file")
    s.add_argument("src")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--quant", choices=["int8", "f32"], default="int8")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("generate", help="complete a prompt")
    s.add_argument("-m", "--model", required=True)
    s.add_argument("-p", "--prompt", required=True)
    s.add_argument("-n", "--max-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--seed", type=int)
    s.add_argument("--stop", action="append", help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true")
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    s.add_argument("--draft-tokens", type=int, help=DRAFT_HELP)
    s.add_argument("--json", action="store_true", help="print prompt ids, generated ids and text as JSON")
    s.add_argument("--threads", type=int)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("embed", help="sentence embeddings as JSON")
    s.add_argument("-m", "--model", required=True)
    s.add_argument("texts", nargs="+")
    s.add_argument("--similarity", action="store_true", help="print the cosine similarity matrix instead")
    s.add_argument("--threads", type=int)
    s.set_defaults(func=cmd_embed)

    s = sub.add_parser("classify", help="class probabilities from an encoder with a classification head")
    s.add_argument("-m", "--model", required=True)
    s.add_argument("texts", nargs="+")
    s.add_argument("--threads", type=int)
    s.set_defaults(func=cmd_classify)

    s = sub.add_parser("perplexity", help="perplexity of a text file (last line: the number)")
    s.add_argument("-m", "--model", required=True)
    s.add_argument("file")
    s.add_argument("--max-tokens", type=int, default=1024)
    s.add_argument("--window", type=int, help="context window per evaluation (default: the model's)")
    s.add_argument("--threads", type=int)
    s.set_defaults(func=cmd_perplexity)

    s = sub.add_parser("info", help="a weights file's header")
    s.add_argument("model")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("serve", help="the HTTP worker: OpenAI-compatible API, health, metrics")
    s.add_argument("-m", "--model", action="append", help="model name or file (repeatable; default: the default models)")
    s.add_argument("--host", default=None, help="default 127.0.0.1")
    s.add_argument("--port", type=int, default=None, help="default 8080")
    s.add_argument("--threads", type=int)
    s.add_argument("--kv-tokens", type=int, help="KV cache capacity per model, in tokens")
    s.add_argument("--kv-dtype", choices=("auto", "f16", "f32"),
                   help="how the KV cache stores K and V (default auto: f16, half the memory, for int8 "
                        "models; f32 for fp32 ones)")
    s.add_argument("--max-queue", type=int, help="requests waiting or running before new ones get 429 (default 64)")
    s.add_argument("--prefill-chunk", type=int, help="prompt tokens per forward pass while other sequences decode "
                                                     "(default 16: smaller keeps their streams smoother)")
    s.add_argument("--draft-tokens", type=int, help=DRAFT_HELP)
    s.add_argument("--workers", type=int, help="worker processes sharing the port (SO_REUSEPORT) and the "
                                               "weights (one mmapped copy), each with its share of the CPUs "
                                               "unless --threads says otherwise; a dead one is replaced")
    s.add_argument("-q", "--quiet", action="store_true", help="no access log")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("rpc", help="the msgpack-RPC worker: the same API on TCP or a Unix socket")
    s.add_argument("-m", "--model", action="append", help="model name or file (repeatable; default: the default models)")
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int, help="listen on TCP")
    where.add_argument("--unix", metavar="PATH", help="listen on a Unix socket")
    s.add_argument("--host", default=None, help="with --port; default 127.0.0.1")
    s.add_argument("--threads", type=int)
    s.add_argument("--kv-tokens", type=int, help="KV cache capacity per model, in tokens")
    s.add_argument("--kv-dtype", choices=("auto", "f16", "f32"),
                   help="how the KV cache stores K and V (default auto: f16, half the memory, for int8 "
                        "models; f32 for fp32 ones)")
    s.add_argument("--max-queue", type=int, help="requests waiting or running before new ones get 429 (default 64)")
    s.add_argument("--prefill-chunk", type=int, help="prompt tokens per forward pass while other sequences decode "
                                                     "(default 16: smaller keeps their streams smoother)")
    s.add_argument("--draft-tokens", type=int, help=DRAFT_HELP)
    s.set_defaults(func=cmd_rpc)

    s = sub.add_parser("bench", help="speed and memory of a model on this machine")
    s.add_argument("-m", "--model", required=True)
    s.add_argument("--threads", type=int)
    s.add_argument("--runs", type=int, default=5, help="repetitions; medians are reported")
    s.add_argument("--json", action="store_true", help="last line: one JSON object")
    s.add_argument("--cold-start", action="store_true",
                   help="time from starting `edge serve` to the first 200 from /v1/completions")
    s.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from core.errors import EdgeError       # core picks its kernel build here (EDGE_KERNELS)
    except ImportError as e:
        print(f"edge: error: {e}", file=sys.stderr)
        return 1
    try:
        args.func(args)
    except EdgeError as e:
        print(f"edge: error: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"edge: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
