"""The engine on a SmolLM2-135M-shaped model with random int8 weights: figures for any machine,
without the default models (a lent GPU host, a new CPU), to compare builds on one CPU.

    .venv/bin/python bench/bench_shapes.py [--threads 2] [--runs 3]

Compare instruction sets on one machine with a portable build, which carries the kernels for
the baseline and each build of core/kernel_builds.py, picked by EDGE_KERNELS:

    EDGE_PORTABLE=1 python setup.py build_ext --inplace --force
    EDGE_KERNELS=baseline python bench/bench_shapes.py               # the scalar body
    EDGE_KERNELS=x86_64_v3 python bench/bench_shapes.py              # the AVX2 body
    python bench/bench_shapes.py                                     # the best this CPU runs

The model: SmolLM2-135M's shapes (dim 576, FFN 1536, 30 layers, 9 query and 3 KV heads, vocab
49152, tied head), N(0, 1/K) weights quantized as the converter does, and a byte-level tokenizer
(bytes, then ASCII words up to the vocabulary's size, so that any sampled id decodes: `edge serve
-m` and bench/bench_load.py --model can serve the file).  It is written once to --path.
Printed as one JSON object:

    prefill512_tok_s    512 prompt tokens, empty cache (median of --runs)
    decode_tok_s        128 greedy steps after a 16-token prompt, through DecoderModel._run
    batchB_tok_s        B sequences (64 tokens in) stepping together through run_feeds, B = 1, 4, 16
    bandwidth_gbs       sum_bytes over 1 GiB with --threads threads
    matmul_M*_gmacs     matmul_q8 (K 576, N 1536) on one thread, M = 16 and 1, best of 30 x 50 calls

Figures are the same code paths as `edge bench`; only the weights differ, and with them nothing
that the kernels' speed depends on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import string
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPE = dict(vocab=49152, dim=576, hidden=1536, layers=30, heads=9, kv_heads=3)


def byte_level_tokenizer(vocab_size: int) -> str:
    """tokenizer.json of a byte-level BPE over the 256 byte symbols, padded to vocab_size ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    # then ASCII words of two and three letters or digits: any id the model samples decodes to
    # text at once (byte tokens alone could end inside a UTF-8 character and hold the text back)
    chars = string.ascii_letters + string.digits
    words = (a + b + c for c in [""] + list(chars) for a in chars for b in chars)
    while len(vocab) < vocab_size - 1:
        vocab[next(words)] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    assert tok.get_vocab_size() == vocab_size
    return tok.to_str()


def write_model(path: str) -> None:
    import numpy as np

    from core.kernels.reference import pack_q8_rows, quantize_weights_q8
    from core.wfile import write_weights

    V, D, H, L = SHAPE["vocab"], SHAPE["dim"], SHAPE["hidden"], SHAPE["layers"]
    hd = D // SHAPE["heads"]
    kv = SHAPE["kv_heads"] * hd
    shapes = {"token_embd.weight": (V, D), "output_norm.weight": (D,)}
    for l in range(L):
        p = f"blk.{l}"
        shapes.update({f"{p}.attn_norm.weight": (D,), f"{p}.ffn_norm.weight": (D,), f"{p}.attn_q.weight": (D, D),
                       f"{p}.attn_k.weight": (kv, D), f"{p}.attn_v.weight": (kv, D), f"{p}.attn_output.weight": (D, D),
                       f"{p}.ffn_gate.weight": (H, D), f"{p}.ffn_up.weight": (H, D), f"{p}.ffn_down.weight": (D, H)})
    rng = np.random.default_rng(0)
    tensors = []
    for name, shape in shapes.items():
        if len(shape) == 1:
            tensors.append((name, np.ones(shape, np.float32)))
            continue
        q, s = quantize_weights_q8((rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32))
        tensors += [(name, pack_q8_rows(q)), (name.replace(".weight", ".scale"), s)]
    tensors.append(("tokenizer.json", np.frombuffer(byte_level_tokenizer(V).encode(), np.uint8)))
    config = dict(dim=D, hidden_dim=H, n_layers=L, n_heads=SHAPE["heads"], n_kv_heads=SHAPE["kv_heads"], head_dim=hd,
                  vocab_size=V, seq_len=2048, norm_eps=1e-5, rope_base=100000.0, rope_dim=hd, rope_style="neox",
                  attn_bias=False, tied_embeddings=True)
    write_weights(path, dict(arch="llama", config=config, quant={"name": "int8"}, eos_token_id=V - 1), tensors)


def measure(path: str, threads: int, runs: int) -> dict:
    import numpy as np

    from core import kernels as K
    from core.kernels._omp import set_num_threads, simd_name, sum_bytes
    from edge.bench import _median_time as median_time     # one warm-up call, then the median
    from models.api import Feed, load_model

    out = {"simd": simd_name(), "threads": threads}
    m = load_model(path, threads=threads)
    rng = np.random.default_rng(1)
    ids = rng.integers(300, SHAPE["vocab"], 600).tolist()
    out["prefill512_tok_s"] = 512 / median_time(lambda: m.next_token_logits(ids[:512]), runs)

    def decode() -> float:
        seq = m.cache.new_sequence()
        try:
            m._run(seq, ids[:16], False)
            t = time.perf_counter()
            for i in range(128):
                m._run(seq, [ids[16 + i]], False)
            return time.perf_counter() - t
        finally:
            seq.release()
    out["decode_tok_s"] = 128 / statistics.median(decode() for _ in range(runs))
    for B in (1, 4, 16):
        seqs = [m.cache.new_sequence() for _ in range(B)]
        try:
            for i, seq in enumerate(seqs):
                m._run(seq, ids[i:i + 64], False)
            steps = []
            for step in range(10):
                feeds = [Feed(m, seq, [ids[100 + step]]) for seq in seqs]
                t = time.perf_counter()
                m.run_feeds(feeds, 16)
                steps.append(time.perf_counter() - t)
        finally:
            for seq in seqs:
                seq.release()
        out[f"batch{B}_tok_s"] = B / statistics.median(steps)
    big = np.ones(1 << 30, np.uint8)
    out["bandwidth_gbs"] = big.nbytes / median_time(lambda: sum_bytes(big), max(runs, 3)) / 1e9
    del big
    set_num_threads(1)
    N, Kd = 1536, 576
    w = rng.integers(-127, 128, (N, Kd), dtype=np.int8)
    scale = (rng.random((N, Kd // 32)) * 0.01).astype(np.float16).view(np.uint16)
    for M in (16, 1):
        x = rng.standard_normal((M, Kd)).astype(np.float32)
        o = np.zeros((M, N), np.float32)
        best = float("inf")
        for _ in range(30):
            t = time.perf_counter()
            for _ in range(50):
                K.matmul_q8(o, x, w, scale)
            best = min(best, (time.perf_counter() - t) / 50)
        out[f"matmul_M{M}_1thread_gmacs"] = M * N * Kd / best / 1e9
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--path", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "edge-smollm2-shaped.edge"))
    args = p.parse_args(argv)
    from core.wfile import FORMAT_VERSION, file_version
    if not os.path.exists(args.path) or file_version(args.path) != FORMAT_VERSION:   # none yet, or an old format
        write_model(args.path)
    result = measure(args.path, args.threads, args.runs)
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
