"""Prometheus metrics of one server, in a registry of its own (several servers can live in one process: tests)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds: from a fast GPU step (ms) to a long CPU prefill (s)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, scheduler):
        r = self.registry = CollectorRegistry()
        Gauge("monokernel_queue_length", "Requests waiting for a slot", registry=r).set_function(
            lambda: scheduler.num_waiting)
        Gauge("monokernel_running_sequences", "Requests holding a slot (prefilling or decoding)",
              registry=r).set_function(lambda: scheduler.num_running)
        Gauge("monokernel_max_batch", "Slots of the fixed batch", registry=r).set(scheduler.batch)
        self.ttft = Histogram("monokernel_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("monokernel_inter_token_latency_seconds", "Time between a request's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.step = Histogram("monokernel_step_seconds", "One engine step (admit, prefill chunk, decode)",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.generated = Counter("monokernel_generated_tokens", "Tokens generated", registry=r)
        self.prompt = Counter("monokernel_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.prefilled = Counter("monokernel_prefill_computed_tokens",
                                 "Prompt tokens computed by prefill (the rest came cached from a slot)", registry=r)
        self.requests = Counter("monokernel_requests", "Finished requests by finish reason", ["finish_reason"],
                                registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
