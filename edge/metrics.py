"""Prometheus metrics of one worker, in a registry of its own (so apps in one process, as in the
tests, do not share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("edge_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("edge_request_seconds", "time to the full response, by route", ["route"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                                 registry=r)
        self.prompt_tokens = Counter("edge_prompt_tokens", "prompt tokens processed", ["model"], registry=r)
        self.generated_tokens = Counter("edge_generated_tokens", "tokens generated", ["model"], registry=r)
        self.queue_depth = Gauge("edge_queue_depth", "inference jobs waiting or running", registry=r)
        self.running = Gauge("edge_running_sequences", "sequences in the batch of the last round", registry=r)
        self.rounds = Gauge("edge_batched_rounds", "forward passes run for generations (each serves a batch)",
                            registry=r)
        self.batched = Gauge("edge_batched_sequences", "sequences served by those passes, summed", registry=r)
        self.kv_blocks = Gauge("edge_kv_blocks", "KV cache blocks of each decoder, used or free", ["model", "state"],
                               registry=r)
        self.prefix = Gauge("edge_prefix_cache_blocks", "full prompt blocks looked up in the prefix cache, "
                            "and found (their prefill skipped)", ["model", "state"], registry=r)
        self.drafts = Gauge("edge_draft_tokens", "tokens generations drafted by prompt lookup, and "
                            "accepted (each saved a forward pass)", ["model", "state"], registry=r)
        self.model_load = Gauge("edge_model_load_seconds", "time to load each model", ["model"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
