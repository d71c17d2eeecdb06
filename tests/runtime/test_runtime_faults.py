"""Fault injection with real processes: a real redis-server (``internlm2 up``'s durable one) killed with
SIGKILL and restarted, cleanly restarted, and down for longer than the lease; workers (the production
``internlm2 serve worker``) killed with SIGKILL; a supervisor frozen with SIGSTOP (as a partitioned or
stalled node). A tiny checkpointing stage runs through each fault while a sampler counts, from the
process table, how many copies of each stage run at once.

A training process killed with SIGKILL fails its stage with the cause; RetryJob resumes it.

Invariants: no job lost, no stage ever running twice at once, every job SUCCEEDED, a short outage
restarts nothing, a lost run resumes from its last committed checkpoint, no zombie under a worker,
and a job that SUCCEEDED before a crash of Redis neither disappears nor runs again. The figures are
printed in one summary line and written to ``fault-summary.json`` in the test's tmp dir."""

from __future__ import annotations

import collections
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from training_support import RedisServer, Worker, install_ticker, wait_for

from internlm2.plugins.runtime.jobs import JobState, JobStore
from internlm2.plugins.runtime.launchers import RUN_MARKER

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

LEASE_TTL_S = 10.0  # renewal every 1.7 s, SIGTERM after 5 s without one, SIGKILL (and watchdog) at 7 s

class CopySampler:
    """Samples /proc: for every stage folder, the most runs of it alive at one moment."""

    def __init__(self, root: Path):
        self.root = str(root)
        self.most: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def alive(self) -> collections.Counter[str]:
        return collections.Counter(stage for stage, _ in self.runs())

    def pid_of(self, stage: str) -> int:
        pids = [pid for s, pid in self.runs() if s == stage]
        assert len(pids) == 1, pids
        return pids[0]

    def runs(self) -> list[tuple[str, int]]:
        """(stage folder, pid) of every live run."""
        now = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if self.root in cmd and RUN_MARKER in cmd and state != "Z":
                now.append((cmd.split(RUN_MARKER)[0].split()[-1].rstrip("/"), int(entry.name)))  # stage folder
        return now

    def _loop(self) -> None:
        while not self._stop.is_set():
            for stage, n in self.alive().items():
                self.most[stage] = max(self.most[stage], n)
            self.samples += 1
            self._stop.wait(0.05)

    def __enter__(self) -> CopySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def zombies_under(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def test_jobs_survive_redis_worker_and_supervisor_faults(tmp_path, capsys):
    site = tmp_path / "site"
    install_ticker(site)
    env = {"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "INTERNLM2_LEASE_TTL_S": str(LEASE_TTL_S), "INTERNLM2_CANCEL_GRACE_S": "3",
           "INTERNLM2_DISPATCH_TIMEOUT_S": "5"}
    sys.path.insert(0, str(site))  # this process validates the ticker's config at submit
    from internlm2.plugins import registry

    registry.load_stages(reload=True)
    redis = RedisServer(tmp_path / "redis")
    work = tmp_path / "jobs"
    store = JobStore(redis.url, work_dir=work)
    workers: list[Worker] = []
    faults: collections.Counter[str] = collections.Counter()
    jobs: list[str] = []

    def start_worker() -> Worker:
        w = Worker(f"w{len(workers)}", redis.url, work, tmp_path, **env)
        workers.append(w)
        w.wait_ready()
        return w

    def submit(steps: int = 36) -> str:
        job = store.submit([{"stage": "ticker", "config": {"steps": steps}}])
        jobs.append(job.job_id)
        return job.job_id

    def stage(job_id: str):
        return store.get(job_id).stages[0]

    def at_step(job_id: str, step: int) -> None:
        wait_for(lambda: stage(job_id).step >= step, 120, what=f"job {job_id} at step {step}")

    def finished(job_id: str) -> JobState:
        wait_for(lambda: store.get(job_id).state.terminal, 150, interval=0.3, what=f"job {job_id} to end")
        return store.get(job_id).state

    def runs(job_id: str) -> list[str]:
        path = Path(stage(job_id).output_dir) / "runs"
        return path.read_text().split() if path.exists() else []

    def owner_of(job_id: str) -> Worker:
        holder = wait_for(lambda: stage(job_id).worker, 60, what="a claim")
        return next(w for w in workers if w.owns(holder))

    def sampler_count(job_id: str) -> int:
        return sampler.alive()[str(work / job_id / "00-ticker")]

    try:
        for _ in range(2):
            start_worker()
        with CopySampler(work) as sampler:
            # 1. Redis killed (SIGKILL) and restarted at once while a stage runs: nothing restarts.
            quick = submit()
            at_step(quick, 5)
            redis.kill9()
            redis.restart()
            faults["redis_sigkill"] += 1
            assert finished(quick) is JobState.SUCCEEDED and runs(quick) == ["0"]

            # 2. Durability: a job acknowledged > 1 s before a crash of Redis is there afterwards,
            #    and the job that SUCCEEDED before it stays SUCCEEDED and never runs again.
            durable = submit()
            time.sleep(1.5)
            redis.kill9()
            redis.restart()
            faults["redis_sigkill"] += 1
            assert store.get(durable).job_id == durable
            assert store.get(quick).state is JobState.SUCCEEDED
            assert finished(durable) is JobState.SUCCEEDED

            # 3. A clean Redis restart (SHUTDOWN SAVE) while a stage runs: nothing restarts.
            clean = submit()
            at_step(clean, 5)
            redis.stop()
            redis.restart()
            faults["redis_clean_restart"] += 1
            assert finished(clean) is JobState.SUCCEEDED and runs(clean) == ["0"]

            # 4. The worker running a stage is killed (SIGKILL): its run dies with it (no orphan),
            #    and another worker resumes the stage from its last checkpoint after the lease.
            lost = submit()
            at_step(lost, 9)
            victim = owner_of(lost)
            victim.kill9()
            faults["worker_sigkill"] += 1
            wait_for(lambda: sampler_count(lost) == 0, 10, what="the killed worker's run to die with it")
            start_worker()
            assert finished(lost) is JobState.SUCCEEDED and runs(lost) == ["0", "1"]

            # 5. A supervisor frozen (SIGSTOP, as a stalled or partitioned node): its run's watchdog
            #    stops the run before the lease expires; another worker takes over; once thawed,
            #    the old supervisor finds its lease gone and leaves the stage alone.
            frozen = submit()
            at_step(frozen, 9)
            stalled = owner_of(frozen)
            os.kill(stalled.proc.pid, signal.SIGSTOP)
            faults["supervisor_frozen"] += 1
            try:
                wait_for(lambda: stage(frozen).attempt == 1, 60, what="another worker to take the stage over")
            finally:
                os.kill(stalled.proc.pid, signal.SIGCONT)
            assert finished(frozen) is JobState.SUCCEEDED and runs(frozen) == ["0", "1"]

            # 6. Redis down longer than the lease: the supervisor stops its run before the lease can
            #    expire; after Redis is back the stage is requeued and resumes from its checkpoint.
            long = submit()
            at_step(long, 9)
            redis.kill9()
            down_at = time.monotonic()
            faults["redis_sigkill"] += 1
            faults["redis_outage_longer_than_lease"] += 1
            wait_for(lambda: sampler_count(long) == 0, LEASE_TTL_S, what="the run to stop while Redis is down")
            stopped_after = time.monotonic() - down_at
            time.sleep(max(0.0, LEASE_TTL_S + 1 - stopped_after))
            redis.restart()
            assert finished(long) is JobState.SUCCEEDED and runs(long) == ["0", "1"]
            assert stopped_after < LEASE_TTL_S

            # 7. The training process itself is killed (SIGKILL, as the OOM killer would): the stage
            #    FAILS with the cause (a crash is not retried blindly); RetryJob resumes it from its
            #    last checkpoint.
            crashed = submit()
            at_step(crashed, 9)
            os.kill(sampler.pid_of(str(work / crashed / "00-ticker")), signal.SIGKILL)
            faults["training_process_sigkill"] += 1
            assert finished(crashed) is JobState.FAILED
            assert "training process exited with -9" in store.get(crashed).stages[0].error
            assert store.retry(crashed).state is JobState.QUEUED
            assert finished(crashed) is JobState.SUCCEEDED and runs(crashed) == ["0", "1"]

        lost_jobs = [j for j in jobs if not store.get(j).state.terminal]
        twice = sorted(s for s, n in sampler.most.items() if n > 1)
        succeeded = sum(store.get(j).state is JobState.SUCCEEDED for j in jobs)
        zombies = {w.name: zombies_under(w.proc.pid) for w in workers if w.proc.poll() is None}
        resumed = [j for j in (lost, frozen, long, crashed)
                   if any(e.kind == "log" and e.data["message"].startswith("resumed from checkpoint step")
                          for e in store.events(j))]
        summary = {"jobs": len(jobs), "faults": dict(faults), "jobs_lost": len(lost_jobs),
                   "stages_running_twice": len(twice), "jobs_succeeded": succeeded,
                   "process_table_samples": sampler.samples, "resumed_from_checkpoint": len(resumed),
                   "run_stopped_s_after_redis_died": round(stopped_after, 1)}
        (tmp_path / "fault-summary.json").write_text(json.dumps(summary, indent=1))
        with capsys.disabled():
            print(f"\nfault injection: {json.dumps(summary)}", file=sys.stderr)
        assert sampler.samples > 100
        # The sampler saw every job's run (so "never twice" is not vacuous).
        assert {str(work / j / "00-ticker") for j in jobs} <= {s for s, n in sampler.most.items() if n >= 1}
        assert lost_jobs == [] and twice == [] and succeeded == len(jobs) == 7
        assert len(resumed) == 4
        assert all(z == [] for z in zombies.values()), zombies
    finally:
        for w in workers:
            if w.proc.poll() is None:
                os.kill(w.proc.pid, signal.SIGCONT)
            w.stop()
        redis.close()
        sys.path.remove(str(site))
        registry.load_stages(reload=True)
