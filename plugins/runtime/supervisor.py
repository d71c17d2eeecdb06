"""The one supervision loop: record -> lease renewal -> cancel -> result, for every launcher.

Every ``poll_s``: forward the run's events into the job record (fenced by the lease token), renew
the lease every ``renew_every_s``, pass a cancel request on (cooperative; SIGTERM to the whole run
after ``cancel_grace_s``; SIGKILL after as long again), and end with the run's result.

Failure semantics:
    Redis unreachable     calls are retried with backoff, events kept until they can be recorded;
                          the stage simply continues if Redis is back in time.
    ... for too long      without a renewal for ``stop_after_s`` the run gets SIGTERM, at
                          ``kill_after_s`` SIGKILL — both before the lease (``lease_ttl_s``, counted
                          from the last renewal's send) can expire and another worker start the stage.
                          The run is reaped; the stage is requeued by a recovery thread (a loss).
    lease lost            (renewal refused: it expired and may be taken) the run is killed at once.
    worker stopping       (Celery warm shutdown, e.g. ``internlm2 up`` ending) SIGTERM, SIGKILL after
                          ``cancel_grace_s``; the stage is released (requeued without a loss) and
                          resumes from its last committed checkpoint.
Whatever a stale run still tries, its checkpoint commits are fenced (``channels``).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from .jobs import JobStore
from .launchers import LocalLauncher, Run, resolve_launcher
from .machine import Claim
from .records import Job, JobState
from .settings import RuntimeSettings
from .store import UNREACHABLE

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 2.0


def launcher_for(job: Job, index: int, settings: RuntimeSettings):
    if resolve_launcher(job.stages[index].config.get("launch", {})) == "kubernetes":
        from .k8s import KubernetesLauncher

        return KubernetesLauncher.from_settings(settings)
    return LocalLauncher(watchdog_s=settings.kill_after_s)


class Supervision:
    def __init__(self, jobs: JobStore, job: Job, index: int, claim: Claim, run: Run, settings: RuntimeSettings,
                 stopping: Callable[[], bool]):
        self.jobs, self.job, self.index, self.claim, self.run = jobs, job, index, claim, run
        self.settings, self.stopping = settings, stopping
        self.job_id = job.job_id
        self.pending: list[dict[str, Any]] = []
        self.result: dict[str, Any] | None = None
        self.renewed_at = time.monotonic()  # the claim's commit renewed it last
        self.unreachable_since: float | None = None
        self.backoff = 0.1

    def log(self, level: int, message: str, *args: Any) -> None:
        logger.log(level, "job %s stage %d: " + message, self.job_id, self.index, *args)

    # ---- Redis, with retry --------------------------------------------------------------------
    def talk(self, call: Callable[[], Any]) -> tuple[bool, Any]:
        """(True, value) or (False, None) while Redis is unreachable."""
        try:
            value = call()
        except UNREACHABLE as exc:
            if self.unreachable_since is None:
                self.unreachable_since = time.monotonic()
                self.log(logging.WARNING, "Redis unreachable (%s); retrying with backoff", exc)
            self.backoff = min(self.backoff * 2, MAX_BACKOFF_S)
            return False, None
        if self.unreachable_since is not None:
            self.log(logging.WARNING, "Redis reachable again after %.1f s", time.monotonic() - self.unreachable_since)
            self.unreachable_since = None
        self.backoff = 0.1
        return True, value

    def renew(self) -> bool | None:
        """True renewed, False lease lost, None Redis unreachable."""
        sent, sent_wall = time.monotonic(), time.time()
        ok, renewed = self.talk(lambda: self.jobs.heartbeat(self.job_id, self.index, self.claim.token,
                                                            self.settings.lease_ttl_s))
        if not ok:
            return None
        if renewed:
            self.renewed_at = sent
            self.run.keepalive(sent_wall)
        return bool(renewed)

    def flush(self) -> bool | None:
        if not self.pending:
            return True
        batch = list(self.pending)
        ok, applied = self.talk(lambda: self.jobs.record(self.job_id, self.index, self.claim.token, batch))
        if not ok:
            return None
        if applied:
            del self.pending[:len(batch)]
        return bool(applied)

    def collect(self) -> None:
        ok, events = self.talk(self.run.events)  # pods' events come through Redis
        for e in events if ok else ():
            if e.get("type") == "result":
                self.result = e
            else:
                self.pending.append(e)

    # ---- stopping the run ---------------------------------------------------------------------
    def stop(self, why: str, term_wait_s: float) -> None:
        """SIGTERM the whole run, SIGKILL after ``term_wait_s``; reaped before returning."""
        self.log(logging.WARNING, "%s; stopping the training process", why)
        if term_wait_s > 0:
            self.run.signal(signal.SIGTERM)
            if self.run.wait(term_wait_s):
                self.pending.extend(self.run.close())
                return
        self.run.signal(signal.SIGKILL)
        self.run.wait(30)
        self.pending.extend(self.run.close())

    # ---- the loop -----------------------------------------------------------------------------
    def follow(self) -> JobState | None:
        s = self.settings
        cancel_at = term_at = None
        while True:
            rc = self.run.poll()
            self.collect()
            if self.flush() is False:
                self.stop("lease lost", 0)
                return None
            if rc is not None:
                break
            now = time.monotonic()
            due = now - self.renewed_at >= s.renew_every_s or self.unreachable_since is not None
            if due and self.renew() is False:
                self.stop("lease lost", 0)
                return None
            silent = time.monotonic() - self.renewed_at
            if silent >= s.stop_after_s:
                # Stop before the lease can expire: SIGTERM now, SIGKILL by kill_after_s at the latest.
                self.stop(f"lease not renewed for {silent:.1f} s (Redis unreachable)",
                          max(0.0, s.kill_after_s - silent))
                return None
            if self.stopping():
                return self.release()
            if cancel_at is None and self.talk(lambda: self.jobs.cancel_requested(self.job_id))[1]:
                self.run.request_cancel()
                cancel_at = now
                self.pending.append({"type": "log", "level": "INFO", "message": "cancel requested"})
            if cancel_at is not None and term_at is None and now - cancel_at > s.cancel_grace_s:
                self.run.signal(signal.SIGTERM)
                term_at = now
            if term_at is not None and now - term_at > s.cancel_grace_s:
                self.run.signal(signal.SIGKILL)
            time.sleep(s.poll_s if self.unreachable_since is None else min(self.backoff, s.renew_every_s / 2))
        return self.conclude(rc, cancel_at is not None)

    def release(self) -> JobState | None:
        """This worker is stopping: stop the run (it resumes from its checkpoint elsewhere). The
        SIGTERM grace ends before the lease could expire, so no other worker starts it meanwhile."""
        self.renew()
        held = time.monotonic() - self.renewed_at
        self.stop("worker stopping", min(self.settings.cancel_grace_s, max(0.0, self.settings.kill_after_s - held)))
        self.collect()
        self.retrying(lambda: self.flush() is not None)
        self.retrying(lambda: self.talk(lambda: self.jobs.release_stage(
            self.job_id, self.index, self.claim.token, "worker stopping; resumes from the last checkpoint"))[0])
        return None

    def conclude(self, rc: int, cancelled: bool) -> JobState | None:
        self.collect()
        self.pending.extend(self.run.close())
        if self.result is not None:
            state, error, metrics = JobState(self.result["state"]), self.result["error"], self.result["metrics"]
        elif cancelled:
            state, error, metrics = JobState.CANCELLED, "stopped by signal after cancel", {}
        else:
            state, error, metrics = JobState.FAILED, self.run.failure(rc), {}
        outcome: dict[str, Any] = {}

        def finish() -> bool:
            if self.flush() is None:
                return False
            ok, done = self.talk(lambda: self.jobs.finish_stage(self.job_id, self.index, self.claim.token, state,
                                                                error, metrics))
            outcome["done"] = done
            return ok

        if not self.retrying(finish) or not outcome.get("done"):
            return None
        return state

    def retrying(self, attempt: Callable[[], bool]) -> bool:
        """Retry a Redis step until it goes through or the lease must be presumed expired."""
        while not attempt():
            if time.monotonic() - self.renewed_at >= self.settings.lease_ttl_s:
                self.log(logging.WARNING, "Redis unreachable for longer than the lease; giving the stage up")
                return False
            time.sleep(self.backoff)
        return True


def supervise(jobs: JobStore, job: Job, index: int, claim: Claim, settings: RuntimeSettings,
              stopping: Callable[[], bool] = lambda: False, launcher=None) -> JobState | None:
    """Run stage ``index`` to its end; its final state, or None when this worker gave it up (lease
    lost, Redis gone too long, worker stopping: the record says what happens next)."""
    launcher = launcher or launcher_for(job, index, settings)
    run = launcher.start(job, index, claim.attempt)
    return Supervision(jobs, job, index, claim, run, settings, stopping).follow()
