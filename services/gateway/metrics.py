"""The gateway's Prometheus metrics (served on --metrics-port like every service's).

Names follow the platform's ``internlm2:`` prefix. Routes are labelled by their template
(``/v1/internlm2/jobs/{job_id}``), never by the raw path, so label sets stay bounded.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from ..common.metrics import RPC_LATENCY_BUCKETS, new_registry

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    def __init__(self, registry=None):
        self.registry = registry or new_registry()
        self.requests = Counter(
            "internlm2:gateway_requests_total",
            "HTTP requests completed, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "internlm2:gateway_request_duration_seconds",
            "Time from a request's arrival to the end of its response (whole stream), in seconds.",
            ["route"],
            buckets=RPC_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "internlm2:gateway_time_to_first_token_seconds",
            "Time from a completion request's arrival to its first generated token leaving the gateway.",
            ["route"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.streams = Gauge(
            "internlm2:gateway_streams_in_flight",
            "Server-sent-event streams currently open.",
            registry=self.registry,
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)
