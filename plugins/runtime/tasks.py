"""The one Celery task of the runtime, ``internlm2.training.run_stage(job_id, index)``.

Thin and idempotent: it claims the stage's lease, then the supervisor launches and follows the
run. Whatever copy of a message arrives (first delivery, a duplicate send, a redelivery after the
visibility timeout, a requeue after a lost worker), the lease decides whether it runs:

    claim "run"            -> supervise; finish_stage records the end and sends the next stage
    "done"/"busy"/"early"  -> the stage ended / another live copy owns it / not its turn: Ignore

A job's stages are sent one message at a time by the JobStore (no Celery chain: the continuation
is a record in Redis, not a field of an unacked message).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from celery import Celery
from celery.exceptions import Ignore

from .dispatch import TASK_NAME, CeleryDispatcher
from .jobs import JobStore
from .records import JobState
from .settings import RuntimeSettings
from .store import UNREACHABLE
from .supervisor import supervise

logger = logging.getLogger(__name__)

# RuntimeSettings.failpoint value for the crash tests: the worker process exits (os._exit) where it
# would send a message, i.e. right after finish_stage committed a stage's success.
EXIT_BEFORE_DISPATCH = "exit_before_dispatch"
FAILPOINT_EXIT_CODE = 70


class _ExitBeforeDispatch:
    def send(self, job_id: str, index: int, queue: str) -> None:
        logger.warning("failpoint %s: exiting instead of sending job %s stage %d", EXIT_BEFORE_DISPATCH, job_id, index)
        logging.shutdown()
        os._exit(FAILPOINT_EXIT_CODE)


def register(app: Celery, settings: RuntimeSettings, stopping: threading.Event) -> None:
    dispatcher = _ExitBeforeDispatch() if settings.failpoint == EXIT_BEFORE_DISPATCH else CeleryDispatcher(app=app)

    # shared=False: each app registers its own copy.
    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, shared=False)
    def run_stage(self, job_id: str, index: int) -> dict:
        jobs = JobStore(settings=settings, dispatcher=dispatcher, check_paths=False)
        worker = f"{self.request.hostname or socket.gethostname()}/{os.getpid()}"
        claim = _with_redis(lambda: jobs.claim_stage(job_id, index, worker, settings.lease_ttl_s,
                                                     settings.max_attempts), stopping)
        logger.info("job %s stage %d: claim %s (attempt %d)", job_id, index, claim.outcome, claim.attempt)
        if claim.outcome == "run":
            job = _with_redis(lambda: jobs.get(job_id), stopping)
            state = supervise(jobs, job, index, claim, settings, stopping.is_set)
            if state is JobState.SUCCEEDED:
                return {"job_id": job_id, "index": index, "state": state.value}
        raise Ignore()  # not run here, or FAILED / CANCELLED / given up: the record says so


def _with_redis(call, stopping: threading.Event):
    """Wait out a Redis outage instead of failing the task (a failed task's message is acked and
    would be gone while the stage still needs a worker)."""
    delay = 0.2
    while True:
        try:
            return call()
        except UNREACHABLE as exc:
            if stopping.is_set():
                raise
            logger.warning("Redis unreachable (%s); retrying in %.1f s", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
