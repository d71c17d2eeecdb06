"""The engine's Prometheus metrics, named like vLLM's (``vllm:`` -> ``internlm2:``) so its dashboards
and KEDA queries carry over.

Gauges, the engine's cumulative counters (prefix cache queries / hits, preemptions), the tokens-per-step
histogram and the cache config are read from ``engine.stats()`` when Prometheus scrapes (no background
polling, nothing recorded on the engine thread); request histograms and token counters are recorded once
per finished sequence from its engine timings.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

# vLLM's bucket layouts (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
REQUEST_LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


class EngineStatsCollector(Collector):
    """At scrape: ``internlm2:num_requests_running`` / ``_waiting`` / ``kv_cache_usage_perc`` (0..1) /
    ``num_kv_cache_free_blocks`` gauges; ``prefix_cache_queries_total`` / ``prefix_cache_hits_total``
    (prompt tokens looked up in / served by the prefix cache) and ``num_preemptions_total`` counters;
    ``iteration_tokens_total`` (a histogram of tokens scheduled per engine step); ``cache_config_info``
    (1, with the KV cache's settings as labels)."""

    def __init__(self, engine_getter, model_name: str):
        self.engine_getter = engine_getter
        self.model_name = model_name

    def collect(self):
        engine = self.engine_getter()
        if engine is None:
            return
        stats = engine.stats()
        labels = ["model_name"]
        for name, doc, value in (
            ("internlm2:num_requests_running", "Requests in the running batch.", stats.num_running),
            ("internlm2:num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting),
            ("internlm2:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", stats.kv_cache_usage),
            ("internlm2:num_kv_cache_free_blocks", "Free KV-cache blocks.", stats.num_free_blocks),
        ):
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric([self.model_name], float(value))
            yield family
        for name, doc, value in (
            ("internlm2:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             stats.prefix_cache_queried_tokens),
            ("internlm2:prefix_cache_hits", "Prompt tokens served by the prefix cache.", stats.prefix_cache_hit_tokens),
            ("internlm2:num_preemptions", "Sequences preempted (KV blocks freed, recomputed later).",
             stats.num_preemptions),
        ):
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric([self.model_name], float(value))
            yield family
        if stats.iteration_tokens_buckets:
            from internlm2.core.engine.outputs import ITERATION_TOKENS_BUCKETS

            bounds = [*(str(float(b)) for b in ITERATION_TOKENS_BUCKETS), "+Inf"]
            family = HistogramMetricFamily("internlm2:iteration_tokens_total", "Tokens scheduled per engine step.",
                                           labels=labels)
            family.add_metric([self.model_name], list(zip(bounds, stats.iteration_tokens_buckets)),
                              sum_value=float(stats.iteration_tokens_sum))
            yield family
        config = getattr(getattr(engine, "engine", None), "config", None)
        info = {
            "block_size": str(stats.block_size),
            "num_gpu_blocks": str(stats.num_total_blocks),
            "enable_prefix_caching": str(stats.enable_prefix_caching),
            "max_model_len": str(stats.max_model_len),
            "gpu_memory_utilization": str(getattr(config, "kv_cache_memory_fraction", "")),
        }
        family = GaugeMetricFamily("internlm2:cache_config_info", "Settings of the KV cache (value 1).",
                                   labels=[*labels, *info])
        family.add_metric([self.model_name, *info.values()], 1.0)
        yield family


class RequestMetricsRecorder:
    """Per-request histograms and token counters."""

    def __init__(self, registry, model_name: str):
        self.model_name = model_name
        labels = ["model_name"]
        self.ttft = Histogram(
            "internlm2:time_to_first_token_seconds",
            "Time to first token.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.itl = Histogram(
            "internlm2:inter_token_latency_seconds",
            "Time between consecutive output tokens.",
            labels,
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            "internlm2:e2e_request_latency_seconds",
            "Arrival to last token.",
            labels,
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue = Histogram(
            "internlm2:request_queue_time_seconds",
            "Time waiting before the first schedule.",
            labels,
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=registry,
        )
        self.prefill_time = Histogram(
            "internlm2:request_prefill_time_seconds",
            "First schedule to first token (the prompt's prefill).",
            labels,
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=registry,
        )
        self.decode_time = Histogram(
            "internlm2:request_decode_time_seconds",
            "First token to last token (the decode phase).",
            labels,
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter("internlm2:prompt_tokens", "Prompt tokens processed.", labels, registry=registry)
        self.generation_tokens = Counter("internlm2:generation_tokens", "Tokens generated.", labels, registry=registry)
        self.success = Counter(
            "internlm2:request_success",
            "Finished requests, by finish reason.",
            ["model_name", "finished_reason"],
            registry=registry,
        )

    def finished(self, output, count_prompt: bool = True) -> None:
        """Record a sequence the engine finished (its final RequestOutput); ``count_prompt`` False for the
        siblings after the first of an n > 1 request (the prompt ran once)."""
        m = output.metrics
        name = self.model_name
        if m is not None:
            if m.first_token_time is not None:
                self.ttft.labels(name).observe(m.first_token_time)
            for gap in m.inter_token_latencies or ():
                self.itl.labels(name).observe(gap)
            if m.e2e_latency is not None:
                self.e2e.labels(name).observe(m.e2e_latency)
            if m.queue_time is not None:
                self.queue.labels(name).observe(m.queue_time)
            if m.prefill_time is not None:
                self.prefill_time.labels(name).observe(m.prefill_time)
            if m.decode_time is not None:
                self.decode_time.labels(name).observe(m.decode_time)
        if count_prompt:
            self.prompt_tokens.labels(name).inc(output.prompt_tokens)
        self.generation_tokens.labels(name).inc(output.completion_tokens)
        self.success.labels(name, output.finish_reason or "unknown").inc()

    def cancelled(self, prompt_tokens: int, completion_tokens: int, reason: str = "cancelled") -> None:
        """Record a request whose RPC ended before the engine finished it; ``reason`` "cancelled" (the
        client went away) or "deadline_exceeded" (its deadline passed)."""
        name = self.model_name
        self.prompt_tokens.labels(name).inc(prompt_tokens)
        self.generation_tokens.labels(name).inc(completion_tokens)
        self.success.labels(name, reason).inc()
