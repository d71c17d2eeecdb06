"""The one Celery task of the runtime, ``internlm2.training.run_stage(job_id, index)``, and dispatch.

A job's stages are sent one message at a time, each to its stage's queue, by the JobStore: stage 0
when the job is submitted, stage i+1 when stage i succeeds (``finish_stage``), a lost stage again
when it is requeued. Each send follows a dispatch intent committed with the transition, so a worker
that dies between the two is covered by the other workers' recovery threads (see ``jobs``). No
Celery chain: the continuation must be a record in Redis, not a field of an unacked message that
only comes back after the visibility timeout.

The task is thin and idempotent: it claims the stage's lease in the JobStore, then a supervisor
launches and follows the training process. Whatever copy of a message arrives (first delivery, a
duplicate send, a redelivery after the visibility timeout, a requeue after a lost worker), the
lease decides whether it runs:

    claim "run"            -> supervise; finish_stage records the end and sends the next stage
    "done"/"busy"/"early"  -> the stage ended / another live copy owns it / not its turn: Ignore
"""

from __future__ import annotations

import logging
import os
import socket

from celery import Celery
from celery.exceptions import Ignore

from .records import JobState

logger = logging.getLogger(__name__)

TASK_NAME = "internlm2.training.run_stage"
# RuntimeSettings.failpoint value for the crash tests: the worker process exits (os._exit) where it
# would send a message, i.e. right after finish_stage committed a stage's success.
EXIT_BEFORE_DISPATCH = "exit_before_dispatch"
FAILPOINT_EXIT_CODE = 70


def register(app: Celery) -> None:
    # shared=False: each app (one per Redis URL) registers its own copy.
    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, shared=False)
    def run_stage(self, job_id: str, index: int) -> dict:
        from .celery_app import settings_of
        from .jobs import JobStore
        from .supervisor import supervise

        settings = settings_of(self.app)
        store = JobStore(self.app.conf.internlm2_redis_url, dispatcher=_dispatcher(self.app, settings.failpoint))
        worker = f"{self.request.hostname or socket.gethostname()}/{os.getpid()}"
        claim = store.claim_stage(job_id, index, worker, settings.lease_ttl_s, settings.max_attempts)
        logger.info("job %s stage %d: claim %s (attempt %d)", job_id, index, claim.outcome, claim.attempt)
        if claim.outcome == "run":
            state = supervise(store, job_id, index, claim, settings)
            if state is JobState.SUCCEEDED:
                return {"job_id": job_id, "index": index, "state": state.value}
        raise Ignore()  # not run here, or FAILED / CANCELLED / lease lost: the record says so


def _dispatcher(app: Celery, failpoint: str):
    if failpoint == EXIT_BEFORE_DISPATCH:
        def die(job_id: str, index: int) -> None:
            logger.warning("failpoint %s: exiting instead of sending job %s stage %d", failpoint, job_id, index)
            logging.shutdown()
            os._exit(FAILPOINT_EXIT_CODE)

        return die
    return lambda job_id, index: dispatch(app, job_id, index)


def dispatch(app: Celery, job_id: str, index: int) -> None:
    """Send one ``run_stage(job_id, index)`` message to the stage's queue."""
    from .jobs import JobStore

    job = JobStore(app.conf.internlm2_redis_url, dispatcher=lambda *_: None).get(job_id)
    app.send_task(TASK_NAME, args=(job_id, index), queue=job.stages[index].queue)


def dispatcher_for(redis_url: str):
    """``(job_id, index) -> None`` sending through this process's app for ``redis_url``."""
    from .celery_app import app_for

    app = app_for(redis_url)
    return lambda job_id, index: dispatch(app, job_id, index)
