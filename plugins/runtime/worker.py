"""The one worker factory: ``internlm2 serve worker`` (and through it ``internlm2 up``, compose, Helm
and every test) runs :func:`run_worker`.

Defaults suit GPU hosts: the ``gpu`` queue, one stage at a time (prefetch 1) and the ``solo`` pool
— the worker only supervises; training runs in processes it launches, so nothing in the worker
touches CUDA and there is no fork after CUDA init. Concurrency > 1 uses threads (one supervisor each).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from celery import Celery

from .celery_app import make_app
from .settings import RuntimeSettings


def worker_argv(queues: str = "gpu", concurrency: int = 1, name: str | None = None,
                loglevel: str = "INFO") -> list[str]:
    pool = "solo" if concurrency == 1 else "threads"
    return [
        "worker", "-Q", queues, "-c", str(concurrency), "-P", pool, "--loglevel", loglevel,
        "-n", name or f"internlm2-{os.getpid()}@{socket.gethostname()}",
        "--prefetch-multiplier=1", "-O", "fair", "--without-gossip", "--without-mingle",
    ]


def run_worker(settings: RuntimeSettings, queues: str = "gpu", concurrency: int = 1, name: str | None = None,
               loglevel: str = "INFO", on_app: Callable[[Celery], None] | None = None) -> None:
    """Run a worker in this process until it is stopped (SIGTERM: warm shutdown; a running stage is
    stopped and given back, see ``supervisor``). ``on_app`` sees the app before it starts."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    app = make_app(settings)
    if on_app is not None:
        on_app(app)
    app.worker_main(worker_argv(queues, concurrency, name, loglevel))
