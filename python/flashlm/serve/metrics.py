"""The server's Prometheus metrics (prometheus-client, text format at GET /metrics), named as vLLM names them.

Each server has its own registry, so two servers in one process (tests) keep their own counts. Gauges of the
engine's state are set by the engine thread after each step; counters and histograms as tokens arrive.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds; from a millisecond (a small model's decode step) to a minute (a long queue).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]

        def gauge(name, doc):
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        self.num_requests_running = gauge("flashlm:num_requests_running", "Sequences in the running batch")
        self.num_requests_waiting = gauge("flashlm:num_requests_waiting", "Sequences waiting to be scheduled")
        self.kv_cache_usage = gauge("flashlm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1)")
        self.kv_blocks_used = gauge("flashlm:kv_cache_blocks_used", "KV-cache blocks some sequence holds")
        self.prefix_cache_hit_rate = gauge("flashlm:prefix_cache_hit_rate",
                                           "Prompt tokens found in the prefix cache over those looked up (0 to 1)")
        self.num_preemptions = gauge("flashlm:num_preemptions", "Sequences preempted since the server started")
        # the engine's busy time: beside wall time, what the server (HTTP, detokenize, SSE) leaves to the model
        self.engine_steps = gauge("flashlm:engine_steps", "Engine steps since the server started")
        self.engine_step_seconds = gauge("flashlm:engine_step_seconds", "Seconds spent in engine steps since the "
                                                                         "server started")
        self.requests_total = Counter("flashlm:requests", "Requests admitted to the engine", labels,
                                      registry=r).labels(model_name)
        self.requests_aborted = Counter("flashlm:requests_aborted", "Requests aborted (client gone)", labels,
                                        registry=r).labels(model_name)
        self.generation_tokens = Counter("flashlm:generation_tokens", "Output tokens generated", labels,
                                         registry=r).labels(model_name)
        self.time_to_first_token = Histogram("flashlm:time_to_first_token_seconds",
                                             "From admission to the first output token", labels,
                                             buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.inter_token_latency = Histogram("flashlm:inter_token_latency_seconds", "Between output tokens",
                                             labels, buckets=ITL_BUCKETS, registry=r).labels(model_name)

    def observe_engine(self, llm) -> None:
        """Called on the engine thread, which owns llm."""
        sched, bm = llm.scheduler, llm.block_manager
        self.num_requests_running.set(len(sched.running))
        self.num_requests_waiting.set(len(sched.waiting))
        self.kv_cache_usage.set(bm.usage)
        self.kv_blocks_used.set(bm.num_blocks - bm.num_free_blocks)
        self.prefix_cache_hit_rate.set(bm.stats.hit_rate)
        self.num_preemptions.set(sched.num_preemptions)
        self.engine_steps.set(llm.stats.steps)
        self.engine_step_seconds.set(llm.stats.step_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
