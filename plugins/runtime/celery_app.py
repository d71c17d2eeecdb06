"""The Celery app of a training worker: Redis as broker and result store, the stage task, and the
recovery thread. Built only by the worker factory (``worker.py``) from a RuntimeSettings.

Settings that matter for hour-long stages (research notes: Celery docs, celery#5935):
    task_acks_late + task_reject_on_worker_lost   a stage lost with its worker is delivered again
    worker_prefetch_multiplier = 1                 a GPU worker never reserves a second stage
    visibility_timeout (all three places)          long (default 7 days): Redis would otherwise
                                                   redeliver a still-running stage after 1 h
    + a lease per running stage: a redelivered copy whose lease is alive does nothing, and each
      worker's recovery thread requeues a stage whose lease expired and sends dispatch intents
      left unsent longer than dispatch_timeout_s, so recovery never waits for the visibility timeout.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from .dispatch import CeleryDispatcher
from .jobs import JobStore
from .settings import RuntimeSettings
from .tasks import register

logger = logging.getLogger(__name__)


def make_app(settings: RuntimeSettings) -> Celery:
    """A configured app with the stage task registered; ``app.internlm2_stopping`` is set when the
    worker begins its shutdown (the supervisor then gives its stage back)."""
    url = settings.redis_url
    app = Celery("internlm2", broker=url, backend=url, set_as_current=False)
    transport = {"visibility_timeout": settings.visibility_timeout_s}
    if settings.restore_interval_s is not None:
        transport.update(unacked_restore_interval=settings.restore_interval_s, unacked_restore_throttle=1)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport,
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        visibility_timeout=settings.visibility_timeout_s,
        task_default_queue="gpu",
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_track_started=True,
        result_expires=30 * 24 * 3600,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a Redis outage must not end the worker
        # ... nor the stage it supervises: the lease, not the broker connection, decides (Celery 6 flips this).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
    )
    stopping = threading.Event()
    app.internlm2_stopping = stopping
    register(app, settings, stopping)
    _recovery_on_worker_start(app, settings, stopping)
    return app


def _recovery_on_worker_start(app: Celery, settings: RuntimeSettings, stopping: threading.Event) -> None:
    """Each worker runs a thread that requeues stages whose lease expired (their worker died) and
    sends dispatch intents that their sender left unsent (it died between commit and send)."""
    stop = threading.Event()

    def loop() -> None:
        jobs = JobStore(settings=settings, dispatcher=CeleryDispatcher(app=app), check_paths=False)
        period = max(0.5, min(settings.lease_ttl_s, settings.dispatch_timeout_s) / 3)
        while not stop.wait(period):
            try:
                jobs.recover_lost_stages(settings.max_attempts)
                jobs.resend_stale_dispatches(settings.dispatch_timeout_s)
            except Exception as exc:  # Redis blips must not kill the thread
                logger.warning("recovering lost stages failed: %s", exc)

    def on_ready(sender=None, **_):
        if getattr(sender, "app", None) is app:
            threading.Thread(target=loop, name="internlm2-recovery", daemon=True).start()

    def on_shutting_down(**_):
        stopping.set()

    def on_shutdown(sender=None, **_):
        stop.set()

    worker_ready.connect(on_ready, weak=False)
    worker_shutting_down.connect(on_shutting_down, weak=False)
    worker_shutdown.connect(on_shutdown, weak=False)
