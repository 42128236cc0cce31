"""Prometheus metrics for one server, fed by AsyncEngine as its EngineObserver.

Each ServerMetrics owns its CollectorRegistry, so two apps in one process (tests,
a library user) never collide on metric names. Names follow vLLM's ``vllm:*``
with the ``kvloom:`` prefix.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvloom.engine.async_engine import EngineObserver
from kvloom.engine.stats import EngineStats
from kvloom.outputs import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics(EngineObserver):
    """Gauges of engine state, token counters and latency histograms."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"kvloom:{name}", doc, labels, registry=self.registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"kvloom:{name}", doc, labels, registry=self.registry).labels(model_name)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(f"kvloom:{name}", doc, labels, buckets=_LATENCY_BUCKETS,
                             registry=self.registry).labels(model_name)

        self.num_running = gauge("num_requests_running", "Sequences running in the engine.")
        self.num_waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use.")
        self.num_free_blocks = gauge("kv_cache_free_blocks", "KV-cache blocks free.")
        self.num_total_blocks = gauge("kv_cache_total_blocks", "KV-cache blocks in all.")
        self.prefix_hit_rate = gauge("prefix_cache_hit_rate",
                                     "Prefix-cache hit tokens / queried tokens since start.")
        self.num_preemptions = counter("num_preemptions", "Sequences preempted.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens",
                                         "Generated tokens of finished requests.")
        self.num_finished = counter("request_success", "Requests that finished.")
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.")
        self.inter_token = histogram("inter_token_latency_seconds",
                                     "Time between successive outputs of a request.")
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.")
        self.spec_counters = {
            "spec_num_drafts": counter("spec_decode_num_drafts",
                                       "Verified rows that carried draft tokens."),
            "spec_num_draft_tokens": counter("spec_decode_num_draft_tokens",
                                             "Draft tokens verified."),
            "spec_num_accepted_tokens": counter("spec_decode_num_accepted_tokens",
                                                "Draft tokens accepted."),
        }
        self._last_preemptions = 0
        self._last_spec = dict.fromkeys(self.spec_counters, 0)

    # --------------------------------------------------------------- observer
    def on_step(self, stats: EngineStats) -> None:
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        self.num_free_blocks.set(stats.num_free_blocks)
        self.num_total_blocks.set(stats.num_total_blocks)
        self.prefix_hit_rate.set(stats.prefix_cache_hit_rate)
        if stats.num_preemptions > self._last_preemptions:
            self.num_preemptions.inc(stats.num_preemptions - self._last_preemptions)
        self._last_preemptions = stats.num_preemptions
        for name, metric in self.spec_counters.items():
            value = getattr(stats, name)
            if value > self._last_spec[name]:
                metric.inc(value - self._last_spec[name])
            self._last_spec[name] = value

    def on_first_token(self, seconds_since_arrival: float) -> None:
        self.ttft.observe(seconds_since_arrival)

    def on_inter_token(self, seconds: float, num_tokens: int) -> None:
        self.inter_token.observe(seconds)

    def on_finished(self, output: RequestOutput, e2e_seconds: float,
                    num_generated: int) -> None:
        self.num_finished.inc()
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        self.generation_tokens.inc(num_generated)
        self.e2e.observe(e2e_seconds)

    # ------------------------------------------------------------------ export
    def render(self) -> bytes:
        return generate_latest(self.registry)
