"""``internlm2 serve worker``: a Celery worker for training stages.

Defaults suit GPU hosts: the ``gpu`` queue, one stage at a time (concurrency 1, prefetch 1) and the
``solo`` pool — the worker only supervises; training runs in processes it launches, so nothing in
the worker touches CUDA and there is no fork after CUDA init.
"""

from __future__ import annotations

import argparse
import os
import socket


def worker_argv(queues: str = "gpu", concurrency: int = 1, pool: str = "solo", name: str | None = None,
                loglevel: str = "INFO") -> list[str]:
    return [
        "worker", "-Q", queues, "-c", str(concurrency), "-P", pool, "-l", loglevel,
        "-n", name or f"internlm2-{socket.gethostname()}-{os.getpid()}@%h",
        "--prefetch-multiplier=1", "-O", "fair", "--without-gossip", "--without-mingle",
    ]


def run_worker(redis_url: str | None = None, queues: str = "gpu", concurrency: int = 1, pool: str = "solo",
               name: str | None = None, loglevel: str = "INFO") -> None:
    """Run a worker in this process until it is stopped (SIGTERM: warm shutdown)."""
    if redis_url:
        os.environ["REDIS_URL"] = redis_url
    from .celery_app import _env_app

    app = _env_app()  # REDIS_URL and INTERNLM2_* as set now
    app.worker_main(worker_argv(queues, concurrency, pool, name, loglevel))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="internlm2 serve worker", description=__doc__)
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--queues", default="gpu")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--pool", default="solo", choices=["solo", "threads", "prefork"])
    p.add_argument("--name", default=None)
    p.add_argument("--loglevel", default="INFO")
    a = p.parse_args(argv)
    run_worker(a.redis_url, a.queues, a.concurrency, a.pool, a.name, a.loglevel)


if __name__ == "__main__":
    main()
