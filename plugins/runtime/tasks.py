"""The one Celery task of the runtime, ``internlm2.training.run_stage(job_id, index)``, and dispatch.

A job is a chain of these tasks, one per pipeline stage, each sent to its stage's queue. The task is
thin and idempotent: it claims the stage's lease in the JobStore, then a supervisor launches and
follows the training process. Whatever copy of a message arrives (first delivery, a redelivery
after the visibility timeout, a requeue after a lost worker), the lease decides whether it runs:

    claim "run"    -> supervise; on success return (the chain sends the next stage)
    claim "done"   -> the stage already succeeded: return, so a continuation lost with a dead
                      worker is sent again (duplicates are "busy"/"done" and end here); otherwise
                      the job ended: Ignore (no continuation)
    "busy"/"early" -> another live copy owns it / not its turn: Ignore
"""

from __future__ import annotations

import logging
import os
import socket

from celery import Celery, chain
from celery.exceptions import Ignore

from .records import JobState

logger = logging.getLogger(__name__)

TASK_NAME = "internlm2.training.run_stage"


def register(app: Celery) -> None:
    # shared=False: each app (one per Redis URL) registers its own copy.
    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, shared=False)
    def run_stage(self, job_id: str, index: int) -> dict:
        from .celery_app import settings_of
        from .jobs import JobStore
        from .supervisor import supervise

        settings = settings_of(self.app)
        store = JobStore(self.app.conf.internlm2_redis_url,
                         dispatcher=lambda j, i: dispatch(self.app, j, i))
        worker = f"{self.request.hostname or socket.gethostname()}/{os.getpid()}"
        claim = store.claim_stage(job_id, index, worker, settings.lease_ttl_s, settings.max_attempts)
        logger.info("job %s stage %d: claim %s (attempt %d)", job_id, index, claim.outcome, claim.attempt)
        if claim.outcome == "run":
            state = supervise(store, job_id, index, claim, settings)
            if state is JobState.SUCCEEDED:
                return {"job_id": job_id, "index": index, "state": state.value}
            raise Ignore()  # FAILED / CANCELLED / lease lost: the record says so; stop the chain
        if claim.outcome == "done" and claim.continue_chain:
            return {"job_id": job_id, "index": index, "state": "SUCCEEDED"}
        raise Ignore()


def dispatch(app: Celery, job_id: str, start_index: int) -> None:
    """Send stages ``start_index..`` of the job as a chain of immutable signatures."""
    from .jobs import JobStore

    job = JobStore(app.conf.internlm2_redis_url, dispatcher=lambda *_: None).get(job_id)
    sigs = [
        app.signature(TASK_NAME, args=(job_id, i), immutable=True, queue=job.stages[i].queue)
        for i in range(start_index, len(job.stages))
    ]
    if sigs:
        chain(*sigs).apply_async()


def dispatcher_for(redis_url: str):
    """``(job_id, start_index) -> None`` sending chains through this process's app for ``redis_url``."""
    from .celery_app import app_for

    app = app_for(redis_url)
    return lambda job_id, start_index: dispatch(app, job_id, start_index)
