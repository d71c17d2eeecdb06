"""The job state machine: pure transitions over Job / StageRun records (no Redis, no clock, no I/O).

Each transition changes the record it is given and says in an :class:`Effects` what else must
commit with it — events for the job's stream, stages that became due (dispatch intents), leases
taken or dropped, the cancel flag — so the store can write all of it in one MULTI.

    QUEUED --claim--> RUNNING --finish--> SUCCEEDED | FAILED | CANCELLED
       ^                 |  \\--lost (lease expired)--> QUEUED (losses+1; FAILED at max_attempts)
       |                 \\----release (worker stopping)--> QUEUED
       \\------------- retry (FAILED / CANCELLED job) -----------/

Stage i+1 becomes due when stage i succeeds; a job ends when its last stage succeeds, one fails,
or it is cancelled (CANCELLING while a stage still runs). ``attempt`` of a stage is its launch
number (0, 1, 2, ...): it grows with every run started, so it fences a stale run's commits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .records import Artifact, Job, JobState


@dataclass
class Effects:
    now: float
    events: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)  # (stage, kind, data)
    due: list[int] = field(default_factory=list)  # stages to send (intent now, message after commit)
    drop_intents: list[int] = field(default_factory=list)
    take_lease: int | None = None
    drop_leases: list[int] = field(default_factory=list)
    set_cancel: str | None = None  # the job's cancel flag (the reason)
    clear_cancel: bool = False
    changed: bool = False

    def event(self, stage: str, kind: str, data: dict[str, Any]) -> None:
        self.changed = True
        self.events.append((stage, kind, data))


class JobFinishedError(RuntimeError):
    """The job already ended (FAILED_PRECONDITION for CancelJob)."""


class JobNotRetryableError(RuntimeError):
    """Only a FAILED or CANCELLED job can be retried (FAILED_PRECONDITION for RetryJob)."""


@dataclass(frozen=True)
class Claim:
    """Outcome of a worker's attempt to run stage ``index`` of a job.

    ``run``: the caller holds the lease ``token`` and must run the stage (``attempt`` > 0: resume).
    ``busy``: another live copy holds the lease. ``done``: the stage (or job) already ended.
    ``early``: an earlier stage has not succeeded (this one is sent again when that one succeeds).
    """

    outcome: str
    token: str = ""
    attempt: int = 0


def job_progress(job: Job) -> float:
    done = sum(1.0 if s.state is JobState.SUCCEEDED else s.progress for s in job.stages)
    return min(1.0, done / len(job.stages))


def submitted(job: Job, fx: Effects) -> None:
    fx.event("", "state", {"state": JobState.QUEUED.value, "message": "submitted"})
    fx.due.append(0)


def claim(job: Job, index: int, *, lease_held: bool, worker: str, token: str, max_attempts: int,
          fx: Effects) -> Claim:
    st = job.stages[index]
    if job.state.terminal or st.state.terminal:
        return Claim("done")
    if lease_held:
        return Claim("busy")
    if job.state is JobState.CANCELLING:
        # Cancel was requested and the stage's holder is gone: nothing left to stop.
        end_job(job, JobState.CANCELLED, job.cancel_reason, fx)
        return Claim("done")
    if any(s.state is not JobState.SUCCEEDED for s in job.stages[:index]):
        return Claim("early")
    # RUNNING without a lease: the previous holder's lease expired before recovery saw it.
    if st.state is JobState.RUNNING and not _count_loss(job, index, max_attempts, fx, "resuming"):
        return Claim("done")
    st.attempt = st.launches
    st.launches += 1
    st.state = JobState.RUNNING
    st.worker = worker
    st.start_time = st.start_time or fx.now
    job.current_stage = index
    fx.event(st.name, "state", {"state": JobState.RUNNING.value, "message": f"attempt {st.attempt} on {worker}"})
    if job.state is not JobState.RUNNING:
        job.state = JobState.RUNNING
        job.start_time = job.start_time or fx.now
        fx.event("", "state", {"state": JobState.RUNNING.value, "message": ""})
    fx.take_lease = index
    fx.drop_intents.append(index)  # delivered
    return Claim("run", token=token, attempt=st.attempt)


def _count_loss(job: Job, index: int, max_attempts: int, fx: Effects, then: str) -> bool:
    """A run of stage ``index`` was lost with its worker; False when that failed the stage."""
    st = job.stages[index]
    st.losses += 1
    if st.losses >= max_attempts:
        finish(job, index, JobState.FAILED, f"worker lost {st.losses} times", None, fx)
        return False
    fx.event(st.name, "log", {"level": "WARNING",
                              "message": f"worker {st.worker} lost; {then} (loss {st.losses} of {max_attempts})"})
    return True


def lost(job: Job, index: int, max_attempts: int, fx: Effects) -> bool:
    """The lease of RUNNING stage ``index`` expired (its worker died or was cut off): requeue it
    (True) or fail it after ``max_attempts`` losses; a cancelling job just ends CANCELLED."""
    st = job.stages[index]
    fx.drop_leases.append(index)
    fx.changed = True
    if st.state is not JobState.RUNNING:
        return False
    if job.state is JobState.CANCELLING:
        end_job(job, JobState.CANCELLED, job.cancel_reason, fx)
        return False
    if not _count_loss(job, index, max_attempts, fx, "requeued"):
        return False
    st.state = JobState.QUEUED
    fx.event(st.name, "state", {"state": JobState.QUEUED.value, "message": "worker lost"})
    fx.due.append(index)
    return True


def release(job: Job, index: int, reason: str, fx: Effects) -> None:
    """The worker running stage ``index`` is stopping (not lost): requeue it without counting a
    loss; it resumes from its last committed checkpoint on the next worker."""
    st = job.stages[index]
    fx.drop_leases.append(index)
    fx.changed = True
    if job.state is JobState.CANCELLING:
        end_job(job, JobState.CANCELLED, job.cancel_reason, fx)
        return
    st.state = JobState.QUEUED
    fx.event(st.name, "log", {"level": "WARNING", "message": f"{reason}; requeued"})
    fx.event(st.name, "state", {"state": JobState.QUEUED.value, "message": reason})
    fx.due.append(index)


def apply_stage_events(job: Job, index: int, events: Sequence[Mapping[str, Any]], fx: Effects) -> None:
    """Project a running stage's context events (progress, metrics, log, artifact, checkpoint) onto
    its record and the job's stream."""
    st = job.stages[index]
    for e in events:
        kind = e.get("type")
        if kind == "progress":
            st.progress = float(e["fraction"])
            st.step, st.total_steps = int(e["step"]), int(e["total"])
            job.progress = job_progress(job)
            fx.event(st.name, "progress", {"fraction": st.progress, "step": st.step,
                                           "total_steps": st.total_steps, "message": e.get("message", "")})
        elif kind == "metrics":
            st.metrics.update(e["values"])
            fx.event(st.name, "metrics", {"step": int(e["step"]), "values": dict(e["values"])})
        elif kind == "log":
            fx.event(st.name, "log", {"level": e.get("level", "INFO"), "message": e["message"]})
        elif kind == "artifact":
            art = Artifact(name=e["name"], kind=e["kind"], uri=e["path"], stage=st.name,
                           size_bytes=int(e.get("size_bytes", 0)), create_time=fx.now)
            st.artifacts = [a for a in st.artifacts if a.name != art.name] + [art]
            fx.event(st.name, "artifact", art.__dict__.copy())
        elif kind == "checkpoint":
            fx.event(st.name, "log", {"level": "INFO", "message": f"checkpoint {e['tag']} saved"})


def finish(job: Job, index: int, state: JobState, error: str, metrics: Mapping[str, float] | None,
           fx: Effects) -> None:
    """End stage ``index``; the job follows (next stage due, or the job ends)."""
    st = job.stages[index]
    if metrics:
        st.metrics.update({k: float(v) for k, v in metrics.items()})
    st.state, st.end_time, st.error = state, fx.now, error
    if state is JobState.SUCCEEDED:
        st.progress = 1.0
    fx.event(st.name, "state", {"state": state.value, "message": error})
    fx.drop_leases.append(index)
    job.progress = job_progress(job)
    if state is JobState.SUCCEEDED and index == len(job.stages) - 1:
        end_job(job, JobState.SUCCEEDED, "", fx)
    elif state is JobState.SUCCEEDED and job.state is JobState.CANCELLING:
        end_job(job, JobState.CANCELLED, job.cancel_reason, fx)
    elif state is JobState.SUCCEEDED:
        fx.due.append(index + 1)
    elif state is JobState.FAILED:
        end_job(job, JobState.FAILED, f"stage {st.name}: {error}", fx)
    elif state is JobState.CANCELLED:
        end_job(job, JobState.CANCELLED, job.cancel_reason, fx)


def cancel(job: Job, reason: str, fx: Effects) -> None:
    """CANCELLED at once if no stage runs, else CANCELLING until the running stage stopped."""
    if job.state.terminal:
        raise JobFinishedError(f"job {job.job_id} already ended ({job.state.value})")
    if job.state is JobState.CANCELLING:
        return
    job.cancel_reason = reason
    if any(s.state is JobState.RUNNING for s in job.stages):
        job.state = JobState.CANCELLING
        fx.event("", "state", {"state": JobState.CANCELLING.value, "message": reason})
        fx.set_cancel = reason or "cancelled"
    else:
        end_job(job, JobState.CANCELLED, reason, fx)


def retry(job: Job, fx: Effects) -> int:
    """Queue a FAILED or CANCELLED job again from its first unfinished stage, which resumes from its
    last committed checkpoint (same output folder); returns that stage's index."""
    if job.state not in (JobState.FAILED, JobState.CANCELLED):
        raise JobNotRetryableError(f"job {job.job_id} is {job.state.value}; "
                                   "only FAILED or CANCELLED jobs can be retried")
    first = next(i for i, s in enumerate(job.stages) if s.state is not JobState.SUCCEEDED)
    for st in job.stages[first:]:
        st.state, st.error, st.end_time, st.losses = JobState.QUEUED, "", None, 0
    job.state, job.error, job.end_time, job.cancel_reason = JobState.QUEUED, "", None, ""
    job.current_stage = first
    fx.event("", "state", {"state": JobState.QUEUED.value, "message": f"retried from stage {job.stages[first].name}"})
    fx.due.append(first)
    return first


def end_job(job: Job, state: JobState, message: str, fx: Effects) -> None:
    for i, st in enumerate(job.stages):
        if not st.state.terminal:
            if st.state is JobState.RUNNING:
                fx.drop_leases.append(i)
            st.state, st.end_time = JobState.CANCELLED, fx.now
            fx.event(st.name, "state", {"state": JobState.CANCELLED.value, "message": message})
    job.state, job.end_time = state, fx.now
    if state is JobState.FAILED:
        job.error = message
    fx.clear_cancel = True
    fx.set_cancel = None
    # An ended job sends nothing more: drop its intents (a cancel racing a dispatch).
    fx.due.clear()
    fx.drop_intents.extend(range(len(job.stages)))
    fx.event("", "state", {"state": state.value, "message": message})
