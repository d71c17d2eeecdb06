"""JobStore: training jobs in Redis — submit, get, list, cancel, watch — and the worker-side state
transitions (claim, heartbeat, record, finish, recover) that keep them consistent.

Public API (the training service wraps exactly this)::

    from internlm2.plugins.runtime.jobs import JobStore, JobState, Job, JobEvent
    store = JobStore("redis://host:6379/0", work_dir="/data/jobs")
    job = store.submit([{"stage": "prepare_data", "config": {...}},
                        {"stage": "sft", "config": {"model": "/ckpt/base", ...}}],
                       idempotency_key="k1", name="my run", labels={"team": "a"},
                       inputs={"checkpoints": {"base": "/ckpt"}, "datasets": {"chat": "/d.jsonl"}})
    job.created                      # False when the key matched an earlier job (returned instead)
    store.get(job.job_id)            # JobNotFoundError (a KeyError) when unknown
    jobs, token = store.list(states=[JobState.RUNNING], labels={"team": "a"}, limit=50, page_token="")
    store.cancel(job.job_id, reason="...")   # JobFinishedError when already terminal
    for event in store.watch(job.job_id, after_sequence=0):   # ends after the terminal event
        ...

``submit`` raises :class:`~internlm2.plugins.contract.StageConfigError` (``.field`` like
``stages[1].config.lr`` or ``stages[0].stage``) before anything is stored or queued.

Everything lives in Redis, so records and event streams survive a restart of the service:
``{ns}:job:{id}`` (JSON record), ``{ns}:job:{id}:events`` (stream with ids ``0-<sequence>``),
``{ns}:jobs`` (sorted set by create time), ``{ns}:idem:{key}``, ``{ns}:lease:{id}:{i}`` (the lease
of a running stage), ``{ns}:cancel:{id}``, ``{ns}:running`` (stages holding a lease) and
``{ns}:dispatch`` (dispatch intents: ``{id}:{i}`` scored by the time they were recorded).
Every change of a record and the events it causes commit in one MULTI under WATCH, so a reader
never sees a state without its event or the reverse.

Nothing is lost between a commit and the Celery message it calls for. Each transition that makes a
stage due to run (submit -> stage 0, stage i SUCCEEDED -> stage i+1, lost stage requeued) records
a *dispatch intent* in its own MULTI; after EXEC the store sends the message and then drops the
intent. A process that dies (or a broker that fails) in between leaves the intent behind, and
every worker's recovery thread (:meth:`JobStore.resend_stale_dispatches`) sends any intent older
than the dispatch timeout (seconds) — instead of the job waiting for Redis to redeliver the
previous message after its visibility timeout (days). Sending twice is harmless: a stage runs only
under its lease (:meth:`JobStore.claim_stage`), so a duplicate message finds it ``busy`` or
``done`` and does nothing. An intent is dropped when its stage is claimed or its job ends, so a
cancel or a failure racing a dispatch never sends a stage of an ended job.

What the intent does not cover: a message taken off the queue by a worker that dies before its
claim commits (milliseconds) still waits for the visibility timeout; after the claim, the lease
covers the stage.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from ..contract import ArtifactKind, ArtifactRef, StageInputs, StageOutput
from .pipeline import validate_pipeline
from .records import Artifact, Job, JobEvent, JobState, StageRun

logger = logging.getLogger(__name__)

__all__ = [
    "Claim",
    "Job",
    "JobEvent",
    "JobFinishedError",
    "JobNotFoundError",
    "JobState",
    "JobStore",
    "default_work_dir",
]

# INCR the job's sequence and XADD the event under id 0-<seq>: ids are the proto's 1, 2, 3...
_APPEND_EVENT = """
local n = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], '0-' .. n, 'e', ARGV[1])
return n
"""
_RENEW_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# Compare-and-set of one dispatch intent: only the caller that saw its current time changes it
# (ARGV[3] == "": drop it). Two recovery threads that see the same stale intent send it once.
_SWAP_INTENT = """
local t = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not t or tonumber(t) ~= tonumber(ARGV[2]) then return 0 end
if ARGV[3] == '' then redis.call('ZREM', KEYS[1], ARGV[1]) else redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1]) end
return 1
"""


class JobNotFoundError(KeyError):
    def __str__(self) -> str:
        return f"no job {self.args[0]!r}"


class JobFinishedError(RuntimeError):
    """The job already ended (FAILED_PRECONDITION for CancelJob)."""


def default_work_dir() -> Path:
    """Where stage outputs go unless JobStore is told: ``$INTERNLM2_WORK_DIR`` or ~/.cache/internlm2/jobs."""
    return Path(os.environ.get("INTERNLM2_WORK_DIR", Path.home() / ".cache" / "internlm2" / "jobs"))


@dataclass(frozen=True)
class Claim:
    """Outcome of a worker's attempt to run stage ``index`` of a job.

    ``run``: the caller holds the lease ``token`` and must run the stage (``attempt`` > 0: resume).
    ``busy``: another live copy holds the lease — do nothing. ``done``: the stage (or job) already
    ended — do nothing (the next stage has its own dispatch intent). ``early``: an earlier stage has
    not succeeded — do nothing (this stage is sent again when that one succeeds).
    """

    outcome: str
    token: str = ""
    attempt: int = 0


class _Tx:
    """Collects what a mutation changes: the record is rewritten and events appended in one MULTI."""

    def __init__(self, pipe: redis.client.Pipeline, now: float):
        self.pipe = pipe
        self.now = now
        self.changed = False
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.commands: list[Callable[[redis.client.Pipeline], Any]] = []
        self.sends: list[tuple[str, int]] = []  # (job_id, index) to send once the MULTI committed

    def event(self, stage: str, kind: str, data: dict[str, Any]) -> None:
        self.changed = True
        self.events.append((stage, kind, data))

    def do(self, command: Callable[[redis.client.Pipeline], Any]) -> None:
        self.changed = True
        self.commands.append(command)


class JobStore:
    """Jobs in Redis. Thread-safe (one connection pool); cheap to create."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        work_dir: str | os.PathLike | None = None,
        dispatcher: Callable[[str, int], None] | None = None,
        namespace: str = "il2",
    ):
        """``dispatcher(job_id, index)`` sends one Celery message for stage ``index``; default:
        :func:`internlm2.plugins.runtime.tasks.dispatch` on this Redis."""
        self.redis_url = redis_url or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        self.r = redis.Redis.from_url(self.redis_url, decode_responses=True)
        self.work_dir = Path(work_dir) if work_dir is not None else default_work_dir()
        self.ns = namespace
        self._dispatcher = dispatcher

    # ---- keys ---------------------------------------------------------------------------------
    def _k(self, *parts: Any) -> str:
        return ":".join((self.ns, *map(str, parts)))

    def lease_key(self, job_id: str, index: int) -> str:
        return self._k("lease", job_id, index)

    @property
    def intents_key(self) -> str:
        return self._k("dispatch")

    # ---- public API ---------------------------------------------------------------------------
    def submit(
        self,
        pipeline: Sequence[Mapping[str, Any]],
        *,
        idempotency_key: str | None = None,
        name: str = "",
        labels: Mapping[str, str] | None = None,
        inputs: Mapping[str, Mapping[str, str]] | None = None,
    ) -> Job:
        """Validate every stage, store the job (QUEUED) and queue its chain. See the module docstring."""
        planned = validate_pipeline(pipeline, inputs)
        job_id = uuid.uuid4().hex[:16]
        now = time.time()
        root = self.work_dir / job_id
        job = Job(
            job_id=job_id, name=name or job_id, state=JobState.QUEUED,
            stages=[StageRun(name=p.name, stage=p.stage.name, config=p.config.model_dump(mode="json"),
                             queue=p.stage.queue,
                             output_dir=str(root / f"{i:02d}-{p.name}")) for i, p in enumerate(planned)],
            labels=dict(labels or {}), idempotency_key=idempotency_key or "",
            inputs={k: dict(v) for k, v in (inputs or {}).items()}, work_dir=str(root), create_time=now,
        )
        key, idem = self._k("job", job_id), self._k("idem", idempotency_key or "")
        while True:
            # The idempotency key, the record, its first event and the intent to send stage 0 commit
            # together: a crash leaves either nothing or a job that will run. A concurrent submit
            # with the same key makes EXEC fail here; the retry returns that job.
            with self.r.pipeline() as pipe:
                try:
                    if idempotency_key:
                        pipe.watch(idem)
                        existing = pipe.get(idem)
                        if existing:
                            pipe.unwatch()
                            job = self.get(existing)
                            job.created = False
                            return job
                    pipe.multi()
                    if idempotency_key:
                        pipe.set(idem, job_id)
                    pipe.set(key, json.dumps(job.to_dict()))
                    pipe.zadd(self._k("jobs"), {job_id: now})
                    self._append(pipe, job_id, "", "state",
                                 {"state": JobState.QUEUED.value, "message": "submitted"}, now)
                    pipe.zadd(self.intents_key, {self._intent(job_id, 0): now})
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        self._send(job_id, 0, now)
        return job

    def get(self, job_id: str) -> Job:
        raw = self.r.get(self._k("job", job_id))
        if raw is None:
            raise JobNotFoundError(job_id)
        return Job.from_dict(json.loads(raw))

    def list(
        self,
        states: Sequence[JobState | str] | None = None,
        labels: Mapping[str, str] | None = None,
        limit: int = 50,
        page_token: str = "",
    ) -> tuple[list[Job], str]:
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
            batch = self.r.zrevrangebyscore(self._k("jobs"), max_score, "-inf", start=0, num=200, withscores=True)
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
        """Ask a job to stop: CANCELLED at once if no stage is running, else CANCELLING until the
        running stage has stopped (cooperatively, then SIGTERM after the worker's grace period)."""

        def fn(job: Job, tx: _Tx) -> Job:
            if job.state.terminal:
                raise JobFinishedError(f"job {job_id} already ended ({job.state.value})")
            if job.state is JobState.CANCELLING:
                return job
            job.cancel_reason = reason
            if any(s.state is JobState.RUNNING for s in job.stages):
                job.state = JobState.CANCELLING
                tx.event("", "state", {"state": JobState.CANCELLING.value, "message": reason})
                tx.do(lambda p: p.set(self._k("cancel", job_id), reason or "cancelled"))
            else:
                self._end_job(job, tx, JobState.CANCELLED, reason)
            return job

        return self._mutate(job_id, fn)

    def watch(self, job_id: str, after_sequence: int = 0, block_s: float = 1.0,
              stop: Callable[[], bool] | None = None) -> Iterator[JobEvent]:
        """Events with sequence > ``after_sequence``, then new ones as they happen; ends after the
        event that makes the job terminal (or at once if that event was already passed), or when
        ``stop()`` returns True (checked at least every ``block_s``)."""
        self.get(job_id)
        last = int(after_sequence)
        stream = self._k("job", job_id, "events")
        while True:
            res = self.r.xread({stream: f"0-{last}"}, count=256, block=max(1, int(block_s * 1000)))
            for _, entries in res or []:
                for entry_id, fields in entries:
                    event = self._parse_event(job_id, entry_id, fields)
                    last = event.sequence
                    yield event
                    if event.is_terminal:
                        return
            if not res:
                if stop is not None and stop():
                    return
                if self.get(job_id).state.terminal and int(self.r.get(self._k("job", job_id, "seq")) or 0) <= last:
                    return

    def events(self, job_id: str, after_sequence: int = 0) -> list[JobEvent]:
        """Every stored event with sequence > ``after_sequence`` (no waiting)."""
        entries = self.r.xrange(self._k("job", job_id, "events"), f"({'0-' + str(after_sequence)}", "+")
        return [self._parse_event(job_id, i, f) for i, f in entries]

    # ---- dispatch -----------------------------------------------------------------------------
    def dispatch(self, job_id: str, index: int) -> None:
        """Send one message for stage ``index`` of the job (no intent: callers that need the send to
        survive a crash record an intent first, see the module docstring)."""
        if self._dispatcher is None:
            from .tasks import dispatcher_for

            self._dispatcher = dispatcher_for(self.redis_url)
        self._dispatcher(job_id, index)

    def resend_stale_dispatches(self, timeout_s: float) -> list[tuple[str, int]]:
        """Send every dispatch intent recorded more than ``timeout_s`` ago and still there (the
        process that recorded it died before sending, or the broker refused the message). Safe to
        call from every worker concurrently: each stale intent is taken by one caller, whose send
        re-arms it for another ``timeout_s`` until it succeeds. Returns the (job_id, index) sent."""
        now = time.time()
        sent = []
        for member, recorded in self.r.zrangebyscore(self.intents_key, "-inf", now - timeout_s, withscores=True):
            if not self._swap_intent(member, recorded, now):
                continue  # another worker took it, or it was sent/claimed meanwhile
            job_id, _, idx = member.rpartition(":")
            index = int(idx)
            try:
                job = self.get(job_id)
            except JobNotFoundError:
                self._swap_intent(member, now, None)
                continue
            if job.state.terminal or job.stages[index].state is not JobState.QUEUED:
                self._swap_intent(member, now, None)  # ended or claimed: nothing to send
                continue
            logger.warning("job %s stage %d: dispatch intent unsent for %.0f s; sending it",
                           job_id, index, now - recorded)
            if self._send(job_id, index, now):
                sent.append((job_id, index))
        return sent

    # ---- worker side --------------------------------------------------------------------------
    def claim_stage(self, job_id: str, index: int, worker: str, lease_ttl_s: float,
                    max_attempts: int = 3) -> Claim:
        """Take the lease of stage ``index`` if nobody alive holds it (see :class:`Claim`)."""
        token = f"{worker}:{uuid.uuid4().hex[:8]}"
        lease = self.lease_key(job_id, index)

        def fn(job: Job, tx: _Tx) -> Claim:
            st = job.stages[index]
            if job.state.terminal:
                return Claim("done")
            if st.state.terminal:
                return Claim("done")
            if tx.pipe.exists(lease):
                return Claim("busy")
            if job.state is JobState.CANCELLING:
                # Cancel was requested and the stage's holder is gone: nothing left to stop.
                self._end_job(job, tx, JobState.CANCELLED, job.cancel_reason)
                return Claim("done")
            if any(s.state is not JobState.SUCCEEDED for s in job.stages[:index]):
                return Claim("early")
            if st.state is JobState.RUNNING:  # the previous holder's lease expired: take over
                st.attempt += 1
                if st.attempt >= max_attempts:
                    self._finish(job, tx, index, JobState.FAILED, f"worker lost {st.attempt} times")
                    return Claim("done")
                tx.event(st.name, "log", {"level": "WARNING",
                                          "message": f"worker {st.worker} lost; resuming (attempt {st.attempt})"})
            st.state = JobState.RUNNING
            st.worker = worker
            st.start_time = st.start_time or tx.now
            job.current_stage = index
            tx.event(st.name, "state", {"state": JobState.RUNNING.value,
                                        "message": f"attempt {st.attempt} on {worker}"})
            if job.state is not JobState.RUNNING:
                job.state = JobState.RUNNING
                job.start_time = job.start_time or tx.now
                tx.event("", "state", {"state": JobState.RUNNING.value, "message": ""})
            tx.do(lambda p: p.set(lease, token, px=int(lease_ttl_s * 1000)))
            tx.do(lambda p: p.sadd(self._k("running"), f"{job_id}:{index}"))
            tx.do(lambda p: p.zrem(self.intents_key, self._intent(job_id, index)))  # delivered
            return Claim("run", token=token, attempt=st.attempt)

        return self._mutate(job_id, fn, watch=(lease,))

    def heartbeat(self, job_id: str, index: int, token: str, lease_ttl_s: float) -> bool:
        """Extend the lease; False when it was lost (expired and maybe taken): stop the stage."""
        return bool(self.r.eval(_RENEW_LEASE, 1, self.lease_key(job_id, index), token,
                                int(lease_ttl_s * 1000)))

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.r.exists(self._k("cancel", job_id)))

    def record(self, job_id: str, index: int, token: str, events: Sequence[Mapping[str, Any]]) -> bool:
        """Apply a running stage's context events (progress, metrics, log, artifact, checkpoint) to
        its record and stream. False (nothing applied) when ``token`` no longer holds the lease."""
        if not events:
            return True
        lease = self.lease_key(job_id, index)

        def fn(job: Job, tx: _Tx) -> bool:
            if tx.pipe.get(lease) != token:
                return False
            st = job.stages[index]
            for e in events:
                self._apply_stage_event(job, st, tx, e)
            return True

        return self._mutate(job_id, fn, watch=(lease,))

    def finish_stage(self, job_id: str, index: int, token: str, state: JobState, error: str = "",
                     metrics: Mapping[str, float] | None = None) -> bool:
        """End a stage (SUCCEEDED / FAILED / CANCELLED) and release its lease; the job follows. On
        SUCCEEDED the intent to send the next stage commits with it, then the message is sent.
        False when ``token`` no longer holds the lease (another copy owns the stage now)."""
        lease = self.lease_key(job_id, index)

        def fn(job: Job, tx: _Tx) -> bool:
            if tx.pipe.get(lease) != token:
                return False
            if metrics:
                job.stages[index].metrics.update({k: float(v) for k, v in metrics.items()})
            self._finish(job, tx, index, JobState(state), error)
            return True

        return self._mutate(job_id, fn, watch=(lease,))

    def recover_lost_stages(self, max_attempts: int = 3) -> list[tuple[str, int]]:
        """Requeue every RUNNING stage whose lease expired (its worker died) and send it again (with
        a dispatch intent); a cancelling job whose stage was lost just ends CANCELLED. Safe to call from every worker
        concurrently. Returns the (job_id, index) requeued."""
        requeued = []
        for member in self.r.smembers(self._k("running")):
            job_id, _, idx = member.rpartition(":")
            index = int(idx)
            lease = self.lease_key(job_id, index)
            if self.r.exists(lease):
                continue

            def fn(job: Job, tx: _Tx, index=index, lease=lease, member=member) -> bool:
                st = job.stages[index]
                if st.state is not JobState.RUNNING or tx.pipe.exists(lease):
                    if st.state is not JobState.RUNNING:
                        tx.do(lambda p: p.srem(self._k("running"), member))
                    return False
                tx.do(lambda p: p.srem(self._k("running"), member))
                if job.state is JobState.CANCELLING:
                    self._end_job(job, tx, JobState.CANCELLED, job.cancel_reason)
                    return False
                st.attempt += 1
                if st.attempt >= max_attempts:
                    self._finish(job, tx, index, JobState.FAILED, f"worker lost {st.attempt} times")
                    return False
                st.state = JobState.QUEUED
                tx.event(st.name, "log", {"level": "WARNING",
                                          "message": f"worker {st.worker} lost; requeued (attempt {st.attempt})"})
                tx.event(st.name, "state", {"state": JobState.QUEUED.value, "message": "worker lost"})
                self._intend(job, tx, index)
                return True

            try:
                if self._mutate(job_id, fn, watch=(lease,)):
                    requeued.append((job_id, index))
            except JobNotFoundError:
                self.r.srem(self._k("running"), member)
        return requeued

    def stage_inputs(self, job: Job, index: int) -> StageInputs:
        """What stage ``index`` sees of the job inputs and the earlier stages' outputs."""
        previous = tuple(
            StageOutput(
                name=s.name, stage=s.stage, output_dir=Path(s.output_dir),
                artifacts={a.name: ArtifactRef(a.name, ArtifactKind(a.kind), Path(a.uri)) for a in s.artifacts},
                metrics=dict(s.metrics),
            )
            for s in job.stages[:index]
        )
        return StageInputs(
            datasets={k: Path(v) for k, v in job.inputs.get("datasets", {}).items()},
            checkpoints={k: Path(v) for k, v in job.inputs.get("checkpoints", {}).items()},
            previous=previous,
        )

    # ---- internals ----------------------------------------------------------------------------
    def _mutate(self, job_id: str, fn: Callable[[Job, _Tx], Any], watch: Sequence[str] = ()) -> Any:
        """Run ``fn(job, tx)`` under WATCH of the record (and ``watch``) and commit what it changed in
        one MULTI, retrying on a concurrent change; then send the stages it intended (``tx.sends``)."""
        key = self._k("job", job_id)
        while True:
            with self.r.pipeline() as pipe:
                try:
                    pipe.watch(key, *watch)
                    raw = pipe.get(key)
                    if raw is None:
                        raise JobNotFoundError(job_id)
                    job = Job.from_dict(json.loads(raw))
                    tx = _Tx(pipe, time.time())
                    result = fn(job, tx)
                    if not tx.changed:
                        pipe.unwatch()
                        return result
                    pipe.multi()
                    pipe.set(key, json.dumps(job.to_dict()))
                    for stage, kind, data in tx.events:
                        self._append(pipe, job_id, stage, kind, data, tx.now)
                    for command in tx.commands:
                        command(pipe)
                    pipe.execute()
                except redis.WatchError:
                    continue
            for sent_job, index in tx.sends:
                self._send(sent_job, index, tx.now)
            return result

    # ---- dispatch intents (see the module docstring) ------------------------------------------
    @staticmethod
    def _intent(job_id: str, index: int) -> str:
        return f"{job_id}:{index}"

    def _intend(self, job: Job, tx: _Tx, index: int) -> None:
        """Record, in this transaction, that stage ``index`` must be sent; sent after the commit."""
        member = self._intent(job.job_id, index)
        tx.do(lambda p: p.zadd(self.intents_key, {member: tx.now}))
        tx.sends.append((job.job_id, index))

    def _swap_intent(self, member: str, seen: float, new: float | None) -> bool:
        return bool(self.r.eval(_SWAP_INTENT, 1, self.intents_key, member, repr(seen),
                                "" if new is None else repr(new)))

    def _send(self, job_id: str, index: int, recorded: float) -> bool:
        """Send the message of an intent recorded at ``recorded``, then drop the intent unless it
        changed meanwhile. A failure is logged, not raised: the transition is committed and the
        intent left behind is sent by a recovery thread."""
        try:
            self.dispatch(job_id, index)
            self._swap_intent(self._intent(job_id, index), recorded, None)
            return True
        except Exception:
            logger.exception("job %s stage %d: sending failed; a worker will resend it", job_id, index)
            return False

    def _append(self, pipe: Any, job_id: str, stage: str, kind: str, data: dict[str, Any], now: float) -> None:
        payload = json.dumps({"t": now, "s": stage, "k": kind, "d": data})
        pipe.eval(_APPEND_EVENT, 2, self._k("job", job_id, "seq"), self._k("job", job_id, "events"), payload)

    @staticmethod
    def _parse_event(job_id: str, entry_id: str, fields: Mapping[str, str]) -> JobEvent:
        e = json.loads(fields["e"])
        return JobEvent(job_id=job_id, sequence=int(entry_id.split("-")[1]), time=e["t"], stage=e["s"],
                        kind=e["k"], data=e["d"])

    def _apply_stage_event(self, job: Job, st: StageRun, tx: _Tx, e: Mapping[str, Any]) -> None:
        kind = e.get("type")
        if kind == "progress":
            st.progress = float(e["fraction"])
            st.step, st.total_steps = int(e["step"]), int(e["total"])
            job.progress = self._job_progress(job)
            tx.event(st.name, "progress", {"fraction": st.progress, "step": st.step,
                                           "total_steps": st.total_steps, "message": e.get("message", "")})
        elif kind == "metrics":
            st.metrics.update(e["values"])
            tx.event(st.name, "metrics", {"step": int(e["step"]), "values": dict(e["values"])})
        elif kind == "log":
            tx.event(st.name, "log", {"level": e.get("level", "INFO"), "message": e["message"]})
        elif kind == "artifact":
            art = Artifact(name=e["name"], kind=e["kind"], uri=e["path"], stage=st.name,
                           size_bytes=int(e.get("size_bytes", 0)), create_time=tx.now)
            st.artifacts = [a for a in st.artifacts if a.name != art.name] + [art]
            tx.event(st.name, "artifact", art.__dict__.copy())
        elif kind == "checkpoint":
            tx.event(st.name, "log", {"level": "INFO", "message": f"checkpoint {e['tag']} saved"})

    @staticmethod
    def _job_progress(job: Job) -> float:
        done = sum(1.0 if s.state is JobState.SUCCEEDED else s.progress for s in job.stages)
        return min(1.0, done / len(job.stages))

    def _finish(self, job: Job, tx: _Tx, index: int, state: JobState, error: str) -> None:
        st = job.stages[index]
        st.state, st.end_time, st.error = state, tx.now, error
        if state is JobState.SUCCEEDED:
            st.progress = 1.0
        tx.event(st.name, "state", {"state": state.value, "message": error})
        lease = self.lease_key(job.job_id, index)
        tx.do(lambda p: p.delete(lease))
        tx.do(lambda p: p.srem(self._k("running"), f"{job.job_id}:{index}"))
        job.progress = self._job_progress(job)
        if state is JobState.SUCCEEDED and index == len(job.stages) - 1:
            self._end_job(job, tx, JobState.SUCCEEDED, "")
        elif state is JobState.SUCCEEDED and job.state is JobState.CANCELLING:
            self._end_job(job, tx, JobState.CANCELLED, job.cancel_reason)
        elif state is JobState.SUCCEEDED:
            self._intend(job, tx, index + 1)
        elif state is JobState.FAILED:
            self._end_job(job, tx, JobState.FAILED, f"stage {st.name}: {error}")
        elif state is JobState.CANCELLED:
            self._end_job(job, tx, JobState.CANCELLED, job.cancel_reason)

    def _end_job(self, job: Job, tx: _Tx, state: JobState, message: str) -> None:
        for i, st in enumerate(job.stages):
            if not st.state.terminal:
                if st.state is JobState.RUNNING:
                    lease = self.lease_key(job.job_id, i)
                    tx.do(lambda p, lease=lease: p.delete(lease))
                st.state, st.end_time = JobState.CANCELLED, tx.now
                tx.event(st.name, "state", {"state": JobState.CANCELLED.value, "message": message})
        job.state, job.end_time = state, tx.now
        if state is JobState.FAILED:
            job.error = message
        tx.do(lambda p: p.delete(self._k("cancel", job.job_id)))
        # An ended job sends nothing more: drop its intents (a cancel racing a dispatch).
        intents = [self._intent(job.job_id, i) for i in range(len(job.stages))]
        tx.do(lambda p: p.zrem(self.intents_key, *intents))
        tx.sends = [s for s in tx.sends if s[0] != job.job_id]
        tx.event("", "state", {"state": state.value, "message": message})
