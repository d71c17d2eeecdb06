"""``internlm2 serve worker``: a Celery worker for the training stages, with Prometheus metrics.

The worker itself is the runtime's one factory (``internlm2.plugins.runtime.worker.run_worker``,
settings from ``RuntimeSettings.from_env`` plus the flags); this module parses the flags and exposes
task counters. Tasks supervise a training subprocess rather than train in the worker, so ``solo``
(concurrency 1, the default for a GPU worker) or ``threads`` pools suffice and keep the metrics in
one process.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import CollectorRegistry, Counter, Gauge

from .common.config import ConfigError
from .common.logs import configure_logging
from .common.metrics import MetricsServer

log = logging.getLogger("internlm2.services.worker")

DEFAULT_METRICS_PORT = 9105
REDIS_ENV = "REDIS_URL"


class WorkerMetrics:
    """Stage tasks started / finished (by state) / running, from Celery's task signals."""

    def __init__(self, registry: CollectorRegistry):
        self.started = Counter("internlm2:worker_tasks_started", "Stage tasks started.", ["task"], registry=registry)
        self.finished = Counter(
            "internlm2:worker_tasks_finished",
            "Stage tasks finished, by Celery state.",
            ["task", "state"],
            registry=registry,
        )
        self.running = Gauge("internlm2:worker_tasks_running", "Stage tasks running now.", registry=registry)

    def connect(self) -> None:
        from celery.signals import task_postrun, task_prerun

        def on_prerun(sender=None, **_):
            self.started.labels(getattr(sender, "name", "?")).inc()
            self.running.inc()

        def on_postrun(sender=None, state=None, **_):
            self.finished.labels(getattr(sender, "name", "?"), state or "UNKNOWN").inc()
            self.running.dec()

        task_prerun.connect(on_prerun, weak=False)
        task_postrun.connect(on_postrun, weak=False)


def serve(args) -> int:
    redis_url = getattr(args, "redis_url", None) or os.environ.get(REDIS_ENV)
    if not redis_url:
        raise ConfigError(f"give --redis-url URL or set {REDIS_ENV} (the Celery broker)")
    concurrency = getattr(args, "concurrency", None) or 1
    if concurrency < 1:
        raise ConfigError("--concurrency must be >= 1")
    queues = getattr(args, "queues", None) or "gpu"
    configure_logging("worker", getattr(args, "log_level", None) or "INFO")

    from internlm2.plugins.runtime.settings import RuntimeSettings
    from internlm2.plugins.runtime.worker import run_worker

    settings = RuntimeSettings.from_env(redis_url=redis_url, work_dir=getattr(args, "work_dir", None))
    metrics_server = None
    metrics_port = getattr(args, "metrics_port", DEFAULT_METRICS_PORT)
    if metrics_port:  # the CLI's 0 = off
        registry = CollectorRegistry()
        WorkerMetrics(registry).connect()
        metrics_server = MetricsServer(registry, getattr(args, "host", None) or "0.0.0.0", metrics_port)
    log.info(
        "worker starting",
        extra={"fields": {"queues": queues, "concurrency": concurrency, "metrics_port": metrics_port or None,
                          "lease_ttl_s": settings.lease_ttl_s}},
    )
    try:
        run_worker(settings, queues, concurrency)
    finally:
        if metrics_server is not None:
            metrics_server.close()
    return 0
