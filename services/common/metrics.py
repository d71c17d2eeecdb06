"""Prometheus metrics: a registry per server, RPC metrics for every service, the HTTP endpoint.

A registry per server (not the process-global one) lets tests run several servers in one process.
Names use the ``internlm2:`` prefix the way vLLM uses ``vllm:``, so its dashboards port by
renaming the prefix; the engine's metrics live in ``internlm2.services.inference.metrics``.
"""

from __future__ import annotations

import threading

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

RPC_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)


def new_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class RpcMetrics:
    """Handled calls by method and status code, and their latency."""

    def __init__(self, registry: CollectorRegistry, service: str):
        self.service = service
        self.handled = Counter(
            "internlm2:grpc_server_handled_total",
            "RPCs completed, by method and status code.",
            ["service", "grpc_method", "grpc_code"],
            registry=registry,
        )
        self.latency = Histogram(
            "internlm2:grpc_server_handling_seconds",
            "Time to complete an RPC, in seconds.",
            ["service", "grpc_method"],
            buckets=RPC_LATENCY_BUCKETS,
            registry=registry,
        )

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.handled.labels(self.service, method, code.name).inc()
        self.latency.labels(self.service, method).observe(seconds)


class MetricsServer:
    """The ``/metrics`` HTTP endpoint of one registry, in a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = self._server.server_port

    def close(self) -> None:
        server = self._server
        # shutdown() blocks until serve_forever returns; do it off the event loop's thread.
        threading.Thread(target=lambda: (server.shutdown(), server.server_close()), daemon=True).start()
