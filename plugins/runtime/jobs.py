"""JobStore: the job API — submit, get, list, cancel, retry, watch — and the worker-side calls
(claim, heartbeat, record, finish, release, recover), each one state-machine transition committed
by the RedisStore, then the stages it made due sent by the dispatcher.

    from internlm2.plugins.runtime.jobs import JobStore
    from internlm2.plugins.runtime.settings import RuntimeSettings
    store = JobStore(settings=RuntimeSettings.from_env())       # or JobStore(url, work_dir=...)
    job = store.submit([{"stage": "prepare_data", "config": {...}}, {"stage": "sft", "config": {...}}],
                       idempotency_key="k1", name="my run", labels={"team": "a"},
                       inputs={"checkpoints": {"base": "/models/base"}, "datasets": {"chat": "/data/d.jsonl"}})
    store.get(job.job_id); store.list(...); store.cancel(job.job_id); store.retry(job.job_id)
    for event in store.watch(job.job_id, after_sequence=0): ...

``submit`` raises :class:`~internlm2.plugins.contract.StageConfigError` (``.field`` like
``stages[1].config.lr``, ``inputs.checkpoints.base`` or ``stages[0].config.launch.num_nodes``)
before anything is stored or queued.

Nothing is lost between a commit and the message it calls for: every transition that makes a stage
due (submit, stage succeeded, stage requeued, retry) records a *dispatch intent* in its MULTI; after
EXEC the message is sent and the intent dropped. A process that dies in between leaves the intent,
and every worker's recovery thread (:meth:`JobStore.resend_stale_dispatches`) sends intents older
than the dispatch timeout. Sending twice is harmless: a stage runs only under its lease.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import machine
from .dispatch import CeleryDispatcher, Dispatcher
from .machine import Claim, Effects, JobFinishedError, JobNotRetryableError
from .pipeline import Boundaries, validate_pipeline
from .records import Job, JobEvent, JobState, StageRun
from .settings import RuntimeSettings
from .store import JobNotFoundError, RedisStore

logger = logging.getLogger(__name__)

__all__ = [
    "Claim",
    "Job",
    "JobEvent",
    "JobFinishedError",
    "JobNotFoundError",
    "JobNotRetryableError",
    "JobState",
    "JobStore",
]


class JobStore:
    """Jobs in Redis. Thread-safe; cheap to create. ``dispatcher``: how due stages are sent
    (default: Celery on the same Redis)."""

    def __init__(self, redis_url: str | None = None, *, work_dir: str | Path | None = None,
                 dispatcher: Dispatcher | None = None, settings: RuntimeSettings | None = None,
                 check_paths: bool = True):
        settings = settings or RuntimeSettings.from_env()
        settings = settings.with_(**{k: str(v) for k, v in (("redis_url", redis_url), ("work_dir", work_dir))
                                     if v is not None})
        self.settings = settings
        self.redis_url = settings.redis_url
        self.work_dir = Path(settings.work_dir)
        self.store = RedisStore(settings.redis_url)
        self.r = self.store.r
        self._dispatcher = dispatcher
        self.boundaries = Boundaries(settings.path_roots if check_paths else None, settings.kubernetes,
                                     settings.gpu_memory_gib)

    # ---- keys tests and the Kubernetes launcher may name ---------------------------------------
    def lease_key(self, job_id: str, index: int) -> str:
        return self.store.lease_key(job_id, index)

    @property
    def intents_key(self) -> str:
        return self.store.intents_key

    # ---- public API ---------------------------------------------------------------------------
    def submit(self, pipeline: Sequence[Mapping[str, Any]], *, idempotency_key: str | None = None,
               name: str = "", labels: Mapping[str, str] | None = None,
               inputs: Mapping[str, Mapping[str, str]] | None = None) -> Job:
        """Validate every stage, store the job (QUEUED) and send stage 0."""
        planned = validate_pipeline(pipeline, inputs, self.boundaries)
        job_id = uuid.uuid4().hex[:16]
        now = time.time()
        root = self.work_dir / job_id
        job = Job(
            job_id=job_id, name=name or job_id, state=JobState.QUEUED,
            stages=[StageRun(name=p.name, stage=p.stage.name, config=p.config.model_dump(mode="json"),
                             queue=p.stage.queue, output_dir=str(root / f"{i:02d}-{p.name}"))
                    for i, p in enumerate(planned)],
            labels=dict(labels or {}), idempotency_key=idempotency_key or "",
            inputs={k: dict(v) for k, v in (inputs or {}).items()}, work_dir=str(root), create_time=now,
        )
        fx = Effects(now=now)
        machine.submitted(job, fx)
        existing = self.store.create(job, idempotency_key or "", fx)
        if existing is not None:
            earlier = self.get(existing)
            earlier.created = False
            return earlier
        self._send_due(job, fx)
        return job

    def get(self, job_id: str) -> Job:
        return self.store.load(job_id)

    def list(self, states: Sequence[JobState | str] | None = None, labels: Mapping[str, str] | None = None,
             limit: int = 50, page_token: str = "") -> tuple[list[Job], str]:
        """Jobs newest first, filtered (AND); returns (page, next_page_token or "")."""
        if not 1 <= limit <= 1000:
            raise ValueError(f"limit: must be in 1..1000, got {limit}")
        wanted = {JobState(s) for s in states} if states else None
        max_score, after_id = "+inf", ""
        if page_token:
            try:
                score, after_id = page_token.split("|", 1)
                max_score = repr(float(score))
            except ValueError:
                raise ValueError(f"page_token: malformed {page_token!r}") from None
        out: list[Job] = []
        skipping = bool(after_id)
        while True:
            batch = self.store.newest_first(max_score)
            if not batch:
                return out, ""
            for job_id, score in batch:
                if skipping:
                    # Ties on the score: skip up to and including the last id of the previous page.
                    if repr(score) == max_score and job_id != after_id:
                        continue
                    skipping = False
                    if job_id == after_id:
                        continue
                try:
                    job = self.get(job_id)
                except JobNotFoundError:
                    continue
                if wanted and job.state not in wanted:
                    continue
                if labels and any(job.labels.get(k) != v for k, v in labels.items()):
                    continue
                out.append(job)
                if len(out) == limit:
                    return out, f"{score!r}|{job_id}"
            last_id, last_score = batch[-1]
            if len(batch) < 200:
                return out, ""
            max_score, after_id, skipping = repr(last_score), last_id, True

    def cancel(self, job_id: str, reason: str = "") -> Job:
        """CANCELLED at once if no stage runs, else CANCELLING until the running stage stopped
        (cooperatively, then SIGTERM after the worker's grace period). JobFinishedError if ended."""
        def decide(job: Job, _leases, fx: Effects) -> Job:
            machine.cancel(job, reason, fx)
            return job

        return self._transact(job_id, decide)

    def retry(self, job_id: str) -> Job:
        """Queue a FAILED or CANCELLED job again; its first unfinished stage resumes from its last
        committed checkpoint. JobNotRetryableError for other states."""
        def decide(job: Job, _leases, fx: Effects) -> Job:
            machine.retry(job, fx)
            return job

        return self._transact(job_id, decide)

    def watch(self, job_id: str, after_sequence: int = 0, block_s: float = 1.0,
              stop: Callable[[], bool] | None = None) -> Iterator[JobEvent]:
        """Events with sequence > ``after_sequence``, then new ones as they happen; ends after the
        event that makes the job terminal (or at once if that event was already passed), or when
        ``stop()`` returns True (checked at least every ``block_s``). A terminal event followed by
        more (the job was retried) does not end the stream."""
        self.get(job_id)
        last = int(after_sequence)
        while True:
            events = self.store.read_events(job_id, last, block_s)
            for event in events:
                last = event.sequence
                yield event
                if event.is_terminal and self.store.last_sequence(job_id) <= last:
                    return
            if not events:
                if stop is not None and stop():
                    return
                if self.get(job_id).state.terminal and self.store.last_sequence(job_id) <= last:
                    return

    def events(self, job_id: str, after_sequence: int = 0) -> list[JobEvent]:
        """Every stored event with sequence > ``after_sequence`` (no waiting)."""
        return self.store.events(job_id, after_sequence)

    # ---- dispatch -----------------------------------------------------------------------------
    @property
    def dispatcher(self) -> Dispatcher:
        if self._dispatcher is None:
            self._dispatcher = CeleryDispatcher(self.redis_url)
        return self._dispatcher

    def dispatch(self, job_id: str, index: int) -> None:
        """Send one message for stage ``index`` (no intent: a bare duplicate, as a test would)."""
        self.dispatcher.send(job_id, index, self.get(job_id).stages[index].queue)

    def resend_stale_dispatches(self, timeout_s: float) -> list[tuple[str, int]]:
        """Send every intent recorded more than ``timeout_s`` ago and still there. Safe from every
        worker at once: each stale intent is taken by one caller (compare-and-set), whose send
        re-arms it for another ``timeout_s`` until it succeeds. Returns the (job_id, index) sent."""
        now = time.time()
        sent = []
        for job_id, index, recorded in self.store.intents(now - timeout_s):
            if not self.store.swap_intent(job_id, index, recorded, now):
                continue  # another worker took it, or it was sent/claimed meanwhile
            try:
                job = self.get(job_id)
            except JobNotFoundError:
                self.store.swap_intent(job_id, index, now, None)
                continue
            if job.state.terminal or job.stages[index].state is not JobState.QUEUED:
                self.store.swap_intent(job_id, index, now, None)  # ended or claimed: nothing to send
                continue
            logger.warning("job %s stage %d: dispatch intent unsent for %.0f s; sending it",
                           job_id, index, now - recorded)
            if self._send(job, index, now):
                sent.append((job_id, index))
        return sent

    # ---- worker side --------------------------------------------------------------------------
    def claim_stage(self, job_id: str, index: int, worker: str, lease_ttl_s: float, max_attempts: int = 3) -> Claim:
        """Take the lease of stage ``index`` if nobody alive holds it (see :class:`Claim`)."""
        token = f"{worker}:{uuid.uuid4().hex[:8]}"

        def decide(job: Job, leases, fx: Effects) -> Claim:
            return machine.claim(job, index, lease_held=leases[index] is not None, worker=worker, token=token,
                                 max_attempts=max_attempts, fx=fx)

        return self._transact(job_id, decide, leases=(index,), lease_token=token, lease_ttl_s=lease_ttl_s)

    def heartbeat(self, job_id: str, index: int, token: str, lease_ttl_s: float) -> bool:
        """Extend the lease; False when it was lost (expired and maybe taken): stop the stage."""
        return self.store.renew_lease(job_id, index, token, lease_ttl_s)

    def cancel_requested(self, job_id: str) -> bool:
        return self.store.cancel_requested(job_id)

    def record(self, job_id: str, index: int, token: str, events: Sequence[Mapping[str, Any]]) -> bool:
        """Apply a running stage's events; False (nothing applied) when ``token`` lost the lease."""
        if not events:
            return True
        return self._as_holder(job_id, index, token, lambda job, fx: machine.apply_stage_events(job, index, events, fx))

    def finish_stage(self, job_id: str, index: int, token: str, state: JobState, error: str = "",
                     metrics: Mapping[str, float] | None = None) -> bool:
        """End a stage and release its lease; the job follows. False when ``token`` lost the lease."""
        return self._as_holder(job_id, index, token,
                               lambda job, fx: machine.finish(job, index, JobState(state), error, metrics, fx))

    def release_stage(self, job_id: str, index: int, token: str, reason: str) -> bool:
        """Give a running stage back (this worker is stopping): requeued, resumes from its checkpoint."""
        return self._as_holder(job_id, index, token, lambda job, fx: machine.release(job, index, reason, fx))

    def recover_lost_stages(self, max_attempts: int = 3) -> list[tuple[str, int]]:
        """Requeue every RUNNING stage whose lease expired (its worker died) — or fail it after
        ``max_attempts`` losses. Safe from every worker at once. Returns the (job_id, index) requeued."""
        requeued = []
        for job_id, index in self.store.running_members():
            if self.store.lease_exists(job_id, index):
                continue

            def decide(job: Job, leases, fx: Effects, index=index) -> bool:
                if leases[index] is not None:
                    return False
                return machine.lost(job, index, max_attempts, fx)

            try:
                if self._transact(job_id, decide, leases=(index,)):
                    requeued.append((job_id, index))
            except JobNotFoundError:
                self.store.forget_running(job_id, index)
        return requeued

    # ---- internals ----------------------------------------------------------------------------
    def _as_holder(self, job_id: str, index: int, token: str, change: Callable[[Job, Effects], None]) -> bool:
        def decide(job: Job, leases, fx: Effects) -> bool:
            if leases[index] != token:
                return False
            change(job, fx)
            fx.changed = True
            return True

        return self._transact(job_id, decide, leases=(index,))

    def _transact(self, job_id: str, decide, **kwargs) -> Any:
        result, fx, job = self.store.transact(job_id, decide, now=time.time(), **kwargs)
        self._send_due(job, fx)
        return result

    def _send_due(self, job: Job, fx: Effects) -> None:
        for index in fx.due:
            self._send(job, index, fx.now)

    def _send(self, job: Job, index: int, recorded: float) -> bool:
        """Send the message of an intent recorded at ``recorded``, then drop the intent unless it
        changed meanwhile. A failure is logged, not raised: the transition is committed and the
        intent left behind is sent by a recovery thread."""
        try:
            self.dispatcher.send(job.job_id, index, job.stages[index].queue)
            self.store.swap_intent(job.job_id, index, recorded, None)
            return True
        except Exception:
            logger.exception("job %s stage %d: sending failed; a worker will resend it", job.job_id, index)
            return False
