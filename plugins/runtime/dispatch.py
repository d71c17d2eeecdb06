"""The dispatcher port: how a stage that became due reaches a worker, and its Celery adapter.

A dispatcher sends one message ``run_stage(job_id, index)`` to the stage's queue; the caller passes
the queue from the record it holds (no second read). Messages may be sent twice: a stage runs only
under its lease, so duplicates do nothing (see ``tasks``).
"""

from __future__ import annotations

import threading
from typing import Protocol

TASK_NAME = "internlm2.training.run_stage"


class Dispatcher(Protocol):
    def send(self, job_id: str, index: int, queue: str) -> None: ...


class CeleryDispatcher:
    """Sends through a Celery app: the worker's own app, or a producer-only one for ``redis_url``
    (the training service needs no task code to send a task by name)."""

    def __init__(self, redis_url: str | None = None, app=None):
        if app is None:
            from celery import Celery

            app = Celery("internlm2-producer", broker=redis_url, set_as_current=False)
            app.conf.update(task_serializer="json", accept_content=["json"],
                            broker_connection_retry_on_startup=True)
        self.app = app
        self._lock = threading.Lock()

    def send(self, job_id: str, index: int, queue: str) -> None:
        with self._lock:  # kombu producers are not thread-safe across the service's pool
            self.app.send_task(TASK_NAME, args=(job_id, index), queue=queue)


class RecordingDispatcher:
    """Keeps what would be sent (tests, and a store that must not send)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, str]] = []

    def send(self, job_id: str, index: int, queue: str) -> None:
        self.sent.append((job_id, index, queue))


class FailingDispatcher:
    """Every send fails, as when the broker is unreachable or the sender dies before sending."""

    def send(self, job_id: str, index: int, queue: str) -> None:
        raise ConnectionError("broker unreachable")
