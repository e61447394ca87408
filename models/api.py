"""The Python API: load a converted weights file and use the model.

    model = load_model("smollm2.edge")
    model.generate("Once upon a time", max_tokens=32).text
    for chunk in model.generate_stream("Hello"): print(chunk.text, end="")
    model.chat([{"role": "user", "content": "Hi"}]).text
    load_model("minilm.edge").embed(["a sentence", "another"])       # (2, 384) float32

Decoders (llama, gpt2) generate; encoders (bert) embed and, with a classification head, classify.
`predict` runs a model's natural task; `encode_text` is tokenize.

Generating with a native forward pass (Llama) imports no numpy: a new process reaches its first
token sooner by the 0.1-0.2 s numpy takes to import.  Logits rows are then array('f') objects;
the methods that return arrays (logits, embed) give numpy arrays.
"""

from __future__ import annotations

import array
import math
import os
import random
import threading
from collections import namedtuple
from collections.abc import Iterator

from core.errors import ContextOverflowError, InvalidRequestError, UnsupportedTaskError, WeightsFormatError
from core.kernels._sampling import sample_logits, sample_rows
from core.kv_cache import KVCache, KVCacheFullError, default_kv_dtype
from core.threads import follow_num_threads
from core.wfile import WeightsFile
from models.lookup import DraftLength, PromptLookup
from models.tokenizer import Tokenizer


# The records of this module are named tuples and a plain class, not dataclasses: `dataclasses`
# imports `inspect` (with `ast` and `dis`), 11-14 ms of a new process's 0.12 s to its first token.
class Completion(namedtuple("Completion", "text token_ids prompt_ids finish_reason")):
    """text; token_ids: the generated ids (without the prompt); prompt_ids; finish_reason: "stop"
    (an end token or a stop string) or "length"."""
    __slots__ = ()


class StreamChunk(namedtuple("StreamChunk", "text token_ids finish_reason", defaults=(None,))):
    """text: new text since the previous chunk (may be ""); token_ids: the ids generated since the
    previous chunk; finish_reason: set on the last chunk."""
    __slots__ = ()


class SamplingParams:
    """How to pick tokens, checked as it is made (InvalidRequestError).

    temperature 0 is greedy; top_k 0 is off; repetition_penalty is HF/CTRL style, on prompt and
    generated tokens; frequency_penalty and presence_penalty are OpenAI style, on generated tokens
    (- f * count, - p * (count > 0)); stop: a string or a list of them; ignore_eos: keep generating
    past end tokens (benchmarks, parity tests); priority: batching order, higher first (then first
    come, first served)."""

    __slots__ = ("max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "frequency_penalty",
                 "presence_penalty", "seed", "stop", "ignore_eos", "priority")

    def __init__(self, max_tokens: int = 128, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                 seed: int | None = None, stop: list | str | None = None, ignore_eos: bool = False,
                 priority: int = 0):
        self.max_tokens, self.temperature, self.top_k, self.top_p = max_tokens, temperature, top_k, top_p
        self.repetition_penalty = repetition_penalty
        self.frequency_penalty, self.presence_penalty = frequency_penalty, presence_penalty
        self.seed, self.stop, self.ignore_eos, self.priority = seed, stop, ignore_eos, priority
        self._check()

    def __repr__(self) -> str:
        return "SamplingParams(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"

    def __eq__(self, other) -> bool:
        return type(other) is SamplingParams and all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def _check(self) -> None:
        def number(name, v, kind=float):
            if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
                raise InvalidRequestError(f"{name} must be {'a number' if kind is float else 'an integer'}")
            if kind is float and not math.isfinite(v):
                raise InvalidRequestError(f"{name} must be finite")
        number("max_tokens", self.max_tokens, int)
        number("temperature", self.temperature)
        number("top_k", self.top_k, int)
        number("top_p", self.top_p)
        number("repetition_penalty", self.repetition_penalty)
        number("frequency_penalty", self.frequency_penalty)
        number("presence_penalty", self.presence_penalty)
        number("priority", self.priority, int)
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise InvalidRequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidRequestError("seed must be an integer")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError("stop must be a non-empty string or a list of them")


def sample(logits, p: SamplingParams, rng, history: list, generated: list = ()) -> int:
    """Pick the next token from one row of logits (vocab,) float32: see core/kernels/_sampling.pyx.
    rng: anything with .random() (random.Random, numpy's Generator), drawn only when sampling;
    history: prompt and generated ids (repetition penalty); generated: the generated ids alone
    (frequency and presence penalties)."""
    u = rng.random() if p.temperature > 0 else 0.0
    return sample_logits(logits, p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.frequency_penalty,
                         p.presence_penalty, history, generated, u)


class Batch(namedtuple("Batch", "tokens positions seq_ids slots block_tables block_size")):
    """Rows of one decoder forward call (see models/llama.py): int32 buffers (array('i'),
    memoryviews or numpy arrays) tokens (T,), positions (T,), seq_ids (T,: the row of
    block_tables), slots (T,: the KV slot of each row), block_tables (n_seqs, max_blocks); and
    the cache's block_size."""
    __slots__ = ()

    @classmethod
    def of(cls, tokens, positions, seq_ids, slots, tables: list, block_size: int) -> "Batch":
        """A batch from lists of ints; tables: each sequence's block ids (zero-padded to the widest)."""
        width = max(len(t) for t in tables)
        flat = array.array("i", bytes(4 * len(tables) * width))
        for i, t in enumerate(tables):
            flat[i * width:i * width + len(t)] = array.array("i", t)
        ints = [array.array("i", x) for x in (tokens, positions, seq_ids, slots)]
        return cls(*ints, memoryview(flat).cast("B").cast("i", (len(tables), width)), block_size)

    def numpy(self) -> "Batch":
        """The same batch as numpy arrays (for the Python forward passes)."""
        import numpy as np

        return Batch(*(np.asarray(a, np.int32) for a in (self.tokens, self.positions, self.seq_ids, self.slots,
                                                          self.block_tables)), self.block_size)


def _stack(rows):
    """Logits rows (array('f') or numpy) as one (n, vocab) float32 numpy array."""
    import numpy as np

    return np.stack([np.frombuffer(r, np.float32) for r in rows])


# Rows of a forward pass (a prompt is fed in chunks of this many): the weights stream through the
# cores once per chunk, and a short last chunk costs almost as much as a full one (SmolLM2-135M on
# 2 cores, chunks of 512 against 256 rows, alternating in one process, the same logits: 300 tokens
# 1.075x in 19 of 21 rounds; 512 tokens 0.99-1.07x over five runs, 1.005x in 29 of 41 rounds in
# the longest; 2,000 tokens, where attention dominates, 0.99x).  The scratch it needs is committed
# as rows are used, 26 kB a row for SmolLM2.  While other sequences decode, the engine feeds a
# prompt in much smaller chunks (edge.engine's prefill_rows).
MAX_ROWS = 512

# The most rows whose logits are computed (and held) at once: a LOGIT_ROWS x vocabulary block of
# float32 (50 MB for SmolLM2's 49,152 tokens), whatever MAX_ROWS is.
LOGIT_ROWS = 256

# Keys after which a prompt row's attention costs about as much as its matmuls (SmolLM2-135M:
# 106 M int8 multiply-adds per row against 35 k fp32 ones per key, at about half the rate).
ATTENTION_ROW_EQUIVALENT = 1500

# Generations guess up to this many tokens a step by prompt lookup (models/lookup.py) and
# check them in the same forward pass (DecoderModel.draft_tokens; 0: no drafts).  A generation's
# drafts start at DRAFT_TOKENS_START tokens (or draft_tokens if fewer) and grow while they hold
# (models.lookup.DraftLength).
DRAFT_TOKENS = 4
DRAFT_TOKENS_START = 2



class Feed:
    """One sequence's request for a forward pass, yielded by generate_ids(batched=True) and answered
    by whoever batches the feeds of many sequences (DecoderModel.run_feeds, from the engine): when
    all of ids are in the cache, logits holds the last row's logits (or error the failure).

    A feed that checks a draft (rows > 1: its next token, then the drafted ones) wants the logits
    of all of them: logits is then a list of rows, the first `rows` of them, where the pass may
    have cut the draft short (rows is lowered then, to 1 at least).  Such a feed's tokens are
    not registered for prefix sharing: its sequence keeps only the drafted tokens it accepts.

    A feed may hand the pass its sampling (params without penalties, and the rng to draw from):
    a pass that answers several such feeds of one row each samples their rows together, in
    parallel (sample_rows), and sets each one's token, drawing its u as `sample` would.  The
    tokens are those each sequence would sample alone."""
    __slots__ = ("model", "seq", "ids", "done", "logits", "error", "priority", "rows", "checks_draft",
                 "sampling", "token")

    def __init__(self, model: "DecoderModel", seq, ids: list, priority: int = 0, rows: int | None = None,
                 sampling: tuple | None = None):
        self.model, self.seq, self.ids, self.priority = model, seq, ids, priority
        self.sampling = sampling      # (SamplingParams, rng) or None
        self.token = None             # the token sampled from the last row, when the pass sampled it
        self.done = 0                 # ids already fed
        self.logits = None
        self.error: BaseException | None = None
        self.checks_draft = rows is not None
        self.rows = rows or 1         # the last ids whose logits are wanted

    def cut_draft(self, rows: int) -> None:
        """Check only the first rows - 1 drafted tokens (nothing of it fed yet)."""
        self.ids = self.ids[:len(self.ids) - self.rows + rows]
        self.rows = rows

    @property
    def ready(self) -> bool:
        return self.logits is not None or self.error is not None


class Model:
    """What every model has: its file, tokenizer and config."""

    task = "none"

    def __init__(self, wf: WeightsFile, tokenizer: Tokenizer):
        self.file = wf
        self.tokenizer = tokenizer
        self.meta = wf.meta
        self.arch = wf.meta["arch"]
        self.created = int(os.path.getmtime(wf.path))
        self._lock = threading.Lock()

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(ids)

    encode_text = tokenize

    def info(self) -> dict:
        return {"arch": self.arch, "task": self.task, "config": self.meta["config"], "quant": self.meta["quant"],
                "n_params": self.meta.get("n_params"), "file_bytes": self.file.nbytes, "path": self.file.path}


class DecoderModel(Model):
    task = "generate"

    def __init__(self, wf: WeightsFile, tokenizer: Tokenizer, max_rows: int = MAX_ROWS,
                 kv_tokens: int | None = None, kv_dtype: str = "auto"):
        super().__init__(wf, tokenizer)
        if self.arch == "llama":
            from models import llama as arch
            self.config = arch.LlamaConfig(**wf.meta["config"])
            self._weights_class = arch.LlamaWeights
        else:
            from models import gpt2 as arch
            self.config = arch.GPT2Config(**wf.meta["config"])
            self._weights_class = arch.GPT2Weights
        self._arch = arch
        self.max_rows = max_rows
        self._weights = self._state = None
        cfg = self.config
        self.context = min(cfg.seq_len, kv_tokens or cfg.seq_len)
        block = 16
        n_blocks = -(-self.context // block) + 1
        if kv_dtype == "auto":
            kv_dtype = default_kv_dtype(self.meta["quant"].get("name", ""))
        self.cache = KVCache(cfg.n_layers, cfg.n_kv_heads * cfg.head_dim, n_blocks, block, kv_dtype)
        self.prefix_caching = True          # generations reuse cached prompt blocks (core/kv_cache.py)
        self.draft_tokens = DRAFT_TOKENS    # most drafted tokens a pass (0: none)
        self.forward_passes = 0             # counters: passes run, tokens drafted, drafts accepted
        self.drafted_tokens = self.accepted_tokens = 0
        # the forward pass: native (one call per step, with the logits head) where the
        # architecture has one; else the Python forward over numpy views of the file
        self._native = None
        if hasattr(arch, "native_forward") and os.environ.get("EDGE_NATIVE_FORWARD", "1") != "0":
            self._native = arch.native_forward(self.config, wf, self.cache, max_rows)

    @property
    def weights(self):
        """The architecture's weights objects (numpy views of the file), made on first use: the
        Python forward pass needs them, the native one does not."""
        if self._weights is None:
            self._weights = self._weights_class(self.file, self.config)
        return self._weights

    @property
    def state(self):
        """The Python forward pass's scratch, made on first use."""
        if self._state is None:
            self._state = self._arch.RunState(self.config, self.max_rows)
        return self._state

    # -- forward ----------------------------------------------------------------------------
    def _step(self, batch: Batch, rows: list) -> list:
        """One forward pass over batch; the logits of the given rows (copies: array('f') from
        the native pass, numpy rows from the Python one)."""
        with self._lock:
            follow_num_threads()    # OpenMP's count is per thread: take load_model's in this one
            self.forward_passes += 1
            if self._native is not None:
                self._native(batch)
                return [r for i in range(0, len(rows), LOGIT_ROWS)
                        for r in self._native.logits(rows[i:i + LOGIT_ROWS])]
            hidden = self._arch.forward(self.config, self.weights, self.state, self.cache, batch.numpy())
            import numpy as np

            out = []
            for i in range(0, len(rows), LOGIT_ROWS):
                picked = np.ascontiguousarray(hidden[rows[i:i + LOGIT_ROWS]])
                out += list(self.weights.output(self.state.logits[:len(picked)], picked).copy())
            return out

    def _run(self, seq, ids: list, all_logits: bool, tail: int = 0):
        """Feed ids to sequence seq in chunks; returns the logits of every row (all_logits: a list
        of rows), of the last `tail` rows (a list; the sequence's blocks are then not registered
        for prefix sharing, as a draft's rows may be taken back), or of the last row."""
        outs = []
        first_wanted = 0 if all_logits else len(ids) - max(tail, 1)
        for start in range(0, len(ids), self.max_rows):
            chunk = ids[start:start + self.max_rows]
            T = len(chunk)
            positions = range(seq.n_tokens, seq.n_tokens + T)
            seq.reserve(seq.n_tokens + T)
            batch = Batch.of(chunk, positions, [0] * T, seq.slots(positions), [seq.block_table()],
                             self.cache.block_size)
            outs += self._step(batch, list(range(max(0, first_wanted - start), T)))
            seq.n_tokens += T
            seq.tokens += chunk
        if tail:
            return outs
        self.cache.register(seq)
        return outs if all_logits else outs[-1]

    def run_feeds(self, feeds: list, prefill_rows: int | None = None) -> None:
        """One forward pass for many sequences (continuous batching).  Every decoding feed (one id
        left) gets a row; prompts then fill the rest of the state's rows (order: higher priority
        first, then first come, first served), at most
        prefill_rows of them while any sequence is decoding, fewer as the prompt gets long (so that
        a long prompt is fed in chunks of roughly constant cost between decode steps instead of
        stalling them).  Rows are independent in every kernel, so
        each sequence's results are bit for bit those of running it alone.  A feed that finds the
        KV pool full waits (stays pending) for blocks that finishing sequences release; if no feed
        can move at all, the youngest sequence holding blocks is preempted: its blocks go back to
        the pool and it recomputes its history once there is room (feeds are planned in order,
        so the earlier sequences get the blocks and finish)."""
        feeds = sorted(feeds, key=lambda f: -f.priority)     # stable: arrival order within a priority
        decoding = [f for f in feeds if len(f.ids) - f.done == f.rows]    # a token, maybe a draft
        prefilling = [f for f in feeds if len(f.ids) - f.done > f.rows]
        budget = self.max_rows
        plan = []                                          # (feed, first id, count)
        # drafts get the rows left after every decoding sequence's own, first come first served, up
        # to 1 + draft_tokens rows for a lone sequence and 1 + DRAFT_TOKENS_START in all when several
        # decode: beyond a few rows a step no longer costs about the same as one (it stops being
        # bound by streaming the weights; a 5-row step costs 1.15x a 4-row one), so many sequences
        # decoding at once check no drafts
        most = self.draft_tokens if len(decoding) == 1 else min(self.draft_tokens, DRAFT_TOKENS_START)
        spare = max(0, min(1 + most, budget) - len(decoding))
        for f in decoding[:budget]:
            if f.rows - 1 > spare:
                f.cut_draft(1 + spare)
            spare -= f.rows - 1
            plan.append((f, f.done, f.rows))
        budget -= sum(n for _, _, n in plan)
        limited = bool(decoding) and prefill_rows is not None
        if limited:
            budget = min(budget, prefill_rows)
        for f in prefilling:
            n = min(len(f.ids) - f.done, budget)
            if limited:   # a row deep into a long prompt also pays attention over all before it
                n = min(n, max(1, int(prefill_rows / (1 + f.seq.n_tokens / ATTENTION_ROW_EQUIVALENT))))
            if n <= 0:
                break
            plan.append((f, f.done, n))
            budget -= n
        waiting = []
        for entry in list(plan):
            f, first, n = entry
            try:
                f.seq.reserve(f.seq.n_tokens + n)
            except KVCacheFullError:          # the pool is full: wait for blocks to come free
                if f.rows > 1:                # or first check the token without its draft
                    f.cut_draft(1)
                    plan[plan.index(entry)] = entry = (f, first, 1)
                    try:
                        f.seq.reserve(f.seq.n_tokens + 1)
                        continue
                    except KVCacheFullError:
                        pass
                waiting.append(f)
                plan.remove(entry)
            except BaseException as e:  # noqa: BLE001 - that feed fails alone
                f.error = e
                plan.remove(entry)
        if not plan:
            if waiting:   # nobody can move, so nobody would free blocks: preempt the youngest holder
                holders = [f for f in feeds if f.seq.blocks]
                if holders:     # the youngest of the lowest priority
                    self._preempt(min(reversed(holders), key=lambda f: f.priority))
                else:
                    waiting[-1].error = KVCacheFullError(
                        f"KV cache is full ({self.cache.n_blocks} blocks in use); retry later")
            return
        tokens, positions, seq_ids, slots, wanted = [], [], [], [], []
        for i, (f, first, n) in enumerate(plan):
            pos = range(f.seq.n_tokens, f.seq.n_tokens + n)
            tokens += f.ids[first:first + n]
            positions += pos
            seq_ids += [i] * n
            slots += f.seq.slots(pos)
            # the rows whose logits the feed wants: its last `rows` ids, once they are all fed
            wanted.append(list(range(len(tokens) - f.rows, len(tokens))) if first + n == len(f.ids) else [])
        batch = Batch.of(tokens, positions, seq_ids, slots, [f.seq.block_table() for f, _, _ in plan],
                         self.cache.block_size)
        logits = self._step(batch, [r for rows in wanted for r in rows])
        at = 0
        sampled = []                    # feeds of one row whose token the pass samples
        for (f, first, n), rows in zip(plan, wanted):
            if rows:
                f.logits = logits[at:at + len(rows)] if f.checks_draft else logits[at]
                if f.sampling is not None and len(rows) == 1:
                    sampled.append((f, logits[at]))
                at += len(rows)
            f.done += n
            f.seq.n_tokens += n
            f.seq.tokens += f.ids[first:first + n]
            if not f.checks_draft:
                self.cache.register(f.seq)
        if len(sampled) > 1:
            params = [f.sampling[0] for f, _ in sampled]
            us = [rng.random() if p.temperature > 0 else 0.0 for p, rng in (f.sampling for f, _ in sampled)]
            try:
                tokens = sample_rows([row for _, row in sampled], [p.temperature for p in params],
                                     [p.top_k for p in params], [p.top_p for p in params], us)
            except MemoryError as e:    # their draws are spent: these feeds fail (503), the rest go on
                for f, _ in sampled:
                    f.error = e
                return
            for (f, _), token in zip(sampled, tokens):
                f.token = token

    @staticmethod
    def _preempt(f: Feed) -> None:
        """Give f's KV blocks back and make it feed its whole history again later (recomputation:
        the same tokens at the same positions give bit for bit the same cache and logits).  A
        draft it was to check is dropped."""
        if f.rows > 1:
            f.cut_draft(1)
        f.ids = f.seq.tokens + f.ids[f.done:]
        f.done = 0
        f.seq.release()

    def _check_ids(self, ids) -> list:
        ids = [int(i) for i in ids]
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary of {self.config.vocab_size}")
        return ids

    def logits(self, ids):
        """Logits (len(ids), vocab), a float32 numpy array, for every position of one sequence."""
        return _stack(self._fresh_run(ids, all_logits=True))

    def next_token_logits(self, ids):
        """Logits (vocab,), a float32 numpy array, after feeding ids to a fresh sequence (a prefill)."""
        return _stack([self._fresh_run(ids, all_logits=False)])[0]

    def _fresh_run(self, ids, all_logits: bool):
        ids = self._check_ids(ids)
        if len(ids) > self.context:
            raise ContextOverflowError(f"{len(ids)} tokens exceed the context of {self.context}")
        seq = self.cache.new_sequence()
        try:
            return self._run(seq, ids, all_logits=all_logits)
        finally:
            seq.release()

    def perplexity(self, ids, window: int | None = None) -> float:
        """exp(mean negative log-likelihood) of ids[1:], in non-overlapping windows of the context."""
        import numpy as np

        ids = self._check_ids(ids)
        window = min(window or self.context, self.context)
        nll, n = 0.0, 0
        for start in range(0, len(ids) - 1, window):
            part = ids[start:start + window + 1]
            if len(part) < 2:
                break
            seq = self.cache.new_sequence()
            try:
                for c in range(0, len(part) - 1, LOGIT_ROWS):     # logits held: LOGIT_ROWS rows at a time
                    rows = part[c:c + LOGIT_ROWS]
                    logits = _stack(self._run(seq, rows, all_logits=True)).astype(np.float64)
                    targets = np.asarray(part[c + 1:c + 1 + len(rows)])
                    logits = logits[:len(targets)]
                    m = logits.max(axis=1, keepdims=True)
                    lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
                    nll += float((lse - logits[np.arange(len(targets)), targets]).sum())
                    n += len(targets)
            finally:
                seq.release()
        if n == 0:
            raise InvalidRequestError("perplexity needs at least 2 tokens")
        return math.exp(nll / n)

    # -- generation -------------------------------------------------------------------------
    def check_fits(self, prompt_ids: list, max_tokens: int) -> None:
        """Raise ContextOverflowError unless the prompt plus max_tokens fit the context."""
        if len(prompt_ids) + max_tokens > self.context:
            raise ContextOverflowError(
                f"prompt has {len(prompt_ids)} tokens and max_tokens is {max_tokens}: "
                f"{len(prompt_ids) + max_tokens} exceed the context of {self.context}")

    def prompt_ids(self, prompt) -> list:
        """Token ids of a prompt given as text or as ids (checked against the vocabulary)."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty")
            return self.tokenizer.encode(prompt)
        if hasattr(prompt, "tolist"):                   # a numpy array, an array.array
            prompt = prompt.tolist()
        if isinstance(prompt, (list, tuple)):
            return self._check_ids(prompt)
        raise InvalidRequestError("prompt must be a string or a list of token ids")

    def generate_ids(self, prompt_ids: list, params: SamplingParams, batched: bool = False) -> Iterator:
        """Token ids as they are sampled; ends after an end token (which is yielded) or max_tokens.
        batched: instead of running the forward passes, yield a Feed for each and read its logits
        when resumed (the engine batches the feeds of all running sequences, see run_feeds).

        A generation without penalties guesses up to draft_tokens next tokens by prompt lookup
        (models/lookup.py: 2 at first, more while the guesses hold) and feeds them after its next
        token in the same pass; it keeps those its own choices confirm, and the KV rows of the
        others are overwritten later.  The tokens are those of decoding one at a time (every row
        is computed alike whatever else the pass holds, and a sampled token takes one draw of rng
        whatever was drafted), in fewer passes."""
        self.check_fits(prompt_ids, params.max_tokens)
        rng = random.Random(params.seed)
        seq = self.cache.new_sequence()
        # prefix caching: whole blocks of this prompt that another sequence already computed
        reused = self.cache.match_prefix(seq, prompt_ids) if self.prefix_caching else 0
        unpenalized = (params.repetition_penalty == 1 and params.frequency_penalty == 0
                       and params.presence_penalty == 0)
        # drafts where nothing pushes the model away from repeating its context (penalties make
        # drafts drawn from the context miss: 0.87-1.0x, measured)
        drafting = self.draft_tokens > 0 and unpenalized
        lookup = None
        draft_length = DraftLength(DRAFT_TOKENS_START, self.draft_tokens)
        # the sampling a batched pass may do for this sequence with others' (penalties need its history)
        sampling = (params, rng) if unpenalized else None

        def forward(ids, draft=()):
            """The logits of the last row of ids, then of each drafted token after them: a list
            of rows, which a batched pass may have cut short (the first row at least)."""
            ids = ids + list(draft)
            if not batched:
                return self._run(seq, ids, all_logits=False, tail=1 + len(draft)), None
            feed = Feed(self, seq, ids, params.priority, 1 + len(draft) if drafting else None, sampling)
            yield feed
            if feed.error is not None:
                raise feed.error
            return (feed.logits if drafting else [feed.logits]), feed.token

        try:
            rows, token = yield from forward(prompt_ids[reused:])
            self.cache.register(seq)
            history = list(prompt_ids)
            draft: list[int] = []
            n_out = 0
            while True:
                # row i follows the draft's first i tokens: its token counts only while they held
                for i, row in enumerate(rows):
                    self.accepted_tokens += i > 0        # row i: the draft's token i - 1 was right
                    if token is not None:           # sampled by the pass (one row: i is 0)
                        tok = token
                    else:
                        tok = sample(row, params, rng, history, history[len(prompt_ids):])
                    yield tok
                    n_out += 1
                    if (tok in self.tokenizer.end_ids and not params.ignore_eos) or n_out == params.max_tokens:
                        return
                    history.append(tok)
                    if i == len(draft) or tok != draft[i]:
                        break
                draft_length.checked(len(rows) - 1, i)        # i of the drafted tokens held
                rows = row = None       # the rows go back to the native forward's pool before its next call
                # the cache keeps the accepted tokens (all of history but its last token): a
                # rejected draft's rows are overwritten later
                del seq.tokens[len(history) - 1:]
                seq.n_tokens = len(history) - 1
                self.cache.register(seq)
                draft = []
                if drafting:
                    if lookup is None:
                        lookup = PromptLookup(history)
                    else:
                        lookup.extend(history[len(lookup.ids):])
                    draft = lookup.draft(min(draft_length.next(), self.draft_tokens, params.max_tokens - n_out - 1))
                    if draft and not batched:
                        try:
                            seq.reserve(len(history) + len(draft))
                        except KVCacheFullError:      # no room for the draft: the token alone
                            draft = []
                rows, token = yield from forward([history[-1]], draft)
                self.drafted_tokens += len(rows) - 1        # what the pass checked of the draft
        finally:
            seq.release()

    def generate_stream(self, prompt, **kw) -> Iterator[StreamChunk]:
        """Text as it is generated.  Stop strings are honoured across token boundaries: text that
        could begin a stop string is held back until it is known not to."""
        batched = kw.pop("batched", False)
        params = kw.pop("params", None) or SamplingParams(**kw)
        prompt_ids = self.prompt_ids(prompt)
        stream = self.tokenizer.stream()              # the generated text, decoded a token at a time
        emitted = 0
        pending: list[int] = []
        longest_stop = max((len(s) for s in params.stop), default=0)
        for tok in self.generate_ids(prompt_ids, params, batched=batched):
            if isinstance(tok, Feed):                # batched: handed up to the engine
                yield tok
                continue
            if tok in self.tokenizer.end_ids and not params.ignore_eos:
                yield StreamChunk(stream.final()[emitted:], pending + [tok], "stop")
                return
            pending.append(tok)
            if not stream.push(tok):             # an incomplete UTF-8 sequence: wait for the rest
                continue
            text = stream.text
            if params.stop:
                hits = [i for i in (text.find(s, max(0, emitted - longest_stop)) for s in params.stop) if i >= 0]
                if hits:
                    yield StreamChunk(text[emitted:min(hits)], pending, "stop")
                    return
                safe = len(text)
                for s in params.stop:
                    for k in range(min(len(s) - 1, len(text)), 0, -1):
                        if text.endswith(s[:k]):
                            safe = min(safe, len(text) - k)
                            break
            else:
                safe = len(text)
            if safe > emitted:
                yield StreamChunk(text[emitted:safe], pending)
                emitted, pending = safe, []
        yield StreamChunk(stream.final()[emitted:], pending, "length")

    def generate(self, prompt, **kw) -> Completion:
        params = kw.pop("params", None) or SamplingParams(**kw)
        prompt_ids = self.prompt_ids(prompt)
        text, ids, reason = [], [], None
        for chunk in self.generate_stream(prompt_ids, params=params):
            text.append(chunk.text)
            ids += chunk.token_ids
            reason = chunk.finish_reason
        if reason == "stop" and ids and ids[-1] in self.tokenizer.end_ids:
            ids.pop()
        return Completion("".join(text), ids, prompt_ids, reason)

    def chat_prompt(self, messages: list) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat(self, messages: list, **kw) -> Completion:
        return self.generate(self.chat_prompt(messages), **kw)

    def chat_stream(self, messages: list, **kw) -> Iterator[StreamChunk]:
        return self.generate_stream(self.chat_prompt(messages), **kw)

    def predict(self, prompt, **kw) -> str:
        """The natural task of a decoder: complete the text."""
        return self.generate(prompt, **kw).text


class EncoderModel(Model):
    task = "embed"

    def __init__(self, wf: WeightsFile, tokenizer: Tokenizer, max_rows: int = 4096):
        super().__init__(wf, tokenizer)
        from models import bert
        self._bert = bert
        self.config = bert.BertConfig(**wf.meta["config"])
        self.weights = bert.BertWeights(wf, self.config)
        self.state = bert.RunState(self.config, max(max_rows, self.config.max_tokens))
        if self.weights.classifier is not None:
            self.task = "classify"

    def _batches(self, texts) -> Iterator[list]:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not texts:
            raise InvalidRequestError("input must be a non-empty string or list of strings")
        for t in texts:
            if not isinstance(t, str) or not t:
                raise InvalidRequestError("every input must be a non-empty string")
        return self._batches_of_ids(self.tokenizer.encode_batch(list(texts)))

    def _batches_of_ids(self, sentences) -> Iterator[list]:
        n = self.config.max_tokens
        ids = [e[:n - 1] + e[-1:] if len(e) > n else e for e in sentences]
        batch, rows = [], 0
        for e in ids:
            if rows + len(e) > self.state.max_rows:
                yield batch
                batch, rows = [], 0
            batch.append(e)
            rows += len(e)
        yield batch

    def _hidden(self, sentences):
        packed = self._bert.pack(sentences)
        with self._lock:
            follow_num_threads()
            hidden = self._bert.forward(self.config, self.weights, self.state, packed)
            return hidden.copy(), packed

    def embed(self, texts):
        """Sentence embeddings (n, dim) float32, L2-normalised."""
        return self._embed_batches(self._batches(texts))

    def embed_ids(self, sentences: list) -> np.ndarray:
        """Embeddings of already tokenized sentences ([CLS] ... [SEP] included)."""
        for s in sentences:
            if not len(s) or not all(0 <= int(i) < self.config.vocab_size for i in s):
                raise InvalidRequestError("each sentence must be a non-empty list of ids in the vocabulary")
        return self._embed_batches(self._batches_of_ids([list(s) for s in sentences]))

    def _embed_batches(self, batches):
        import numpy as np

        out = []
        for sentences in batches:
            hidden, packed = self._hidden(sentences)
            out.append(self._bert.pool(self.config, hidden, packed))
        return np.concatenate(out)

    def classify(self, texts) -> list[dict]:
        """[{"label", "score", "scores": {label: p}}] per text."""
        if self.weights.classifier is None or self.weights.pooler is None:
            raise UnsupportedTaskError("this encoder has no classification head")
        import numpy as np

        labels = self.config.labels
        out = []
        for sentences in self._batches(texts):
            hidden, packed = self._hidden(sentences)
            for p in self._bert.classify(self.weights, hidden, packed):
                i = int(np.argmax(p))
                out.append({"label": labels[i], "score": float(p[i]),
                            "scores": {lab: float(x) for lab, x in zip(labels, p)}})
        return out

    def predict(self, texts):
        """The natural task: class predictions with a head, embeddings without."""
        return self.classify(texts) if self.task == "classify" else self.embed(texts)


def load_model(path, threads: int | None = None, kv_tokens: int | None = None, kv_dtype: str = "auto") -> Model:
    """Open a converted weights file and return a DecoderModel or EncoderModel.

    threads: kernel threads (default: core.threads.effective_n_threads()); kv_tokens: a decoder's
    KV cache capacity in tokens (default: its context length; memory is committed as it is used);
    kv_dtype: how the KV cache stores K and V: "f16" (half the memory, faster deep into a context),
    "f32", or "auto" (f16 for an int8 model, f32 for an fp32 one; core.kv_cache.default_kv_dtype).
    """
    from core.threads import set_num_threads

    set_num_threads(threads)
    wf = WeightsFile.open(path)
    arch = wf.meta.get("arch")
    if "tokenizer.json" not in wf:
        raise WeightsFormatError(f"{wf.path}: the file carries no tokenizer")
    tokenizer = Tokenizer.from_weights(wf)
    if arch in ("llama", "gpt2"):
        return DecoderModel(wf, tokenizer, kv_tokens=kv_tokens, kv_dtype=kv_dtype)
    if arch == "bert":
        return EncoderModel(wf, tokenizer)
    raise WeightsFormatError(f"{wf.path}: unknown architecture {arch!r}")
