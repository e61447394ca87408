"""Worker settings: command-line flags over environment variables over defaults.

    EDGE_MODELS        comma-separated model names or paths (default: the default models)
    EDGE_API_KEY       require `Authorization: Bearer KEY` on every route but /health
    EDGE_API_KEY_FILE  ... or read the key from this file
    EDGE_THREADS       kernel threads (default: the CPUs this process may use)
    EDGE_MAX_BODY      largest request body in bytes (default 1 MiB)
    EDGE_DRAFT_TOKENS  most tokens a generation drafts by prompt lookup a pass (default 4; 0: none)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from edge.registry import DEFAULT_MODELS

# Beyond a few rows a decode step stops costing about one row's (bench/bench_lookup.py), so more
# drafted tokens than this only slow a generation down.
MAX_DRAFT_TOKENS = 8


def check_draft_tokens(n: int) -> int:
    if not 0 <= n <= MAX_DRAFT_TOKENS:
        raise ValueError(f"draft tokens must be 0..{MAX_DRAFT_TOKENS}, got {n}")
    return n


@dataclass
class Settings:
    models: list = field(default_factory=lambda: list(DEFAULT_MODELS))
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    threads: int | None = None
    max_body_bytes: int = 1 << 20
    max_new_tokens: int = 1024      # cap on generated tokens when a request names none (chat)
    kv_tokens: int | None = None    # KV cache capacity per model, in tokens (default: the context)
    kv_dtype: str = "auto"          # how the KV cache stores K and V: f16, f32, or auto (f16 for int8 models)
    max_queue: int = 64             # inference jobs waiting or running; past it requests get 429
    prefill_chunk: int = 16         # prompt rows per forward pass while other sequences decode
    draft_tokens: int | None = None  # most prompt-lookup drafts per pass (None: the model's, 4)

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        env = os.environ
        s = cls()
        if env.get("EDGE_MODELS"):
            s.models = [m.strip() for m in env["EDGE_MODELS"].split(",") if m.strip()]
        key = env.get("EDGE_API_KEY")
        if not key and env.get("EDGE_API_KEY_FILE"):
            with open(env["EDGE_API_KEY_FILE"], encoding="utf-8") as f:
                key = f.read().strip()
        s.api_key = key or None
        if env.get("EDGE_THREADS", "").isdigit():
            s.threads = int(env["EDGE_THREADS"])
        if env.get("EDGE_PREFILL_CHUNK", "").isdigit():
            s.prefill_chunk = max(1, int(env["EDGE_PREFILL_CHUNK"]))
        if env.get("EDGE_MAX_QUEUE", "").isdigit():
            s.max_queue = int(env["EDGE_MAX_QUEUE"])
        if env.get("EDGE_KV_DTYPE"):
            s.kv_dtype = env["EDGE_KV_DTYPE"].strip()
        if env.get("EDGE_MAX_BODY", "").isdigit():
            s.max_body_bytes = int(env["EDGE_MAX_BODY"])
        if env.get("EDGE_DRAFT_TOKENS", "").isdigit():
            s.draft_tokens = int(env["EDGE_DRAFT_TOKENS"])
        for k, v in overrides.items():
            if v is not None:
                setattr(s, k, v)
        if s.kv_dtype not in ("auto", "f16", "f32"):
            raise ValueError(f"the KV cache dtype must be auto, f16 or f32, got {s.kv_dtype!r}")
        if s.prefill_chunk < 1:
            raise ValueError(f"the prefill chunk must be at least 1 token, got {s.prefill_chunk}")
        if s.draft_tokens is not None:
            check_draft_tokens(s.draft_tokens)
        if s.max_queue < 0:
            raise ValueError(f"the queue bound must be >= 0, got {s.max_queue}")
        return s
