"""A stale run can neither commit nor outlive its lease: the training process entry point
(``python -m internlm2.plugins.runtime.launch RUN.json``) run for real with the ticker stage, once with
the one-node file channel and once with the Redis channel of Kubernetes pods (real redis-server).

- fencing: a run whose attempt is no longer the stage's fence stops at its first checkpoint commit
  (exit 4) and never moves ``checkpoints/latest``;
- watchdog: a run whose lease stops being renewed kills itself, and keeps running while it is renewed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from training_support import REPO, RedisServer, install_ticker, wait_for

from internlm2.plugins.runtime.channels import FileChannel, write_fence
from internlm2.plugins.runtime.launch import EXIT_FENCED
from internlm2.plugins.runtime.records import Job, JobState, StageRun
from internlm2.plugins.runtime.runspec import run_spec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    install_ticker(site)
    return site


def start_run(site: Path, out: Path, attempt: int, channel: dict, watchdog: dict, steps: int = 4000,
              env: dict | None = None) -> subprocess.Popen:
    job = Job(job_id="fencetest", name="f", state=JobState.RUNNING, stages=[StageRun(
        name="ticker", stage="ticker", config={"steps": steps, "step_s": 0.05, "checkpoint_every": 4},
        output_dir=str(out))])
    spec = run_spec(job, 0, attempt, channel)
    spec["watchdog"] = watchdog
    path = out / f".run-{attempt}.json"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec))
    full_env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "internlm2.plugins.runtime.launch", str(path)], cwd=REPO,
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_file_channel_fence_and_watchdog(site, tmp_path):
    out = tmp_path / "stage"
    out.mkdir()
    alive = out / ".alive-0"
    alive.touch()
    channel = FileChannel(out / ".events-0.jsonl", out / ".cancel", out / ".fence", attempt=0)
    write_fence(out / ".fence", 1)  # a newer run (attempt 1) owns the stage
    proc = start_run(site, out, 0, channel.spec(), {"path": str(alive), "deadline_s": 60})
    assert proc.wait(120) == EXIT_FENCED, proc.stdout.read()
    assert not (out / "checkpoints" / "latest").exists()
    assert (out / "checkpoints" / "step-4").is_dir()  # it got as far as writing, not committing

    # The owner commits while renewed; then its supervisor goes silent and the watchdog stops the run.
    write_fence(out / ".fence", 0)
    proc = start_run(site, out, 0, channel.spec(), {"path": str(alive), "deadline_s": 3.0})

    def renewed_and_committed() -> bool:
        assert proc.poll() is None, proc.stdout.read()
        alive.touch()
        return (out / "checkpoints" / "latest").exists()

    wait_for(renewed_and_committed, 60, interval=0.3, what="a committed checkpoint")
    last_renewal = time.time()
    assert proc.wait(60) == -9  # SIGKILL of its own process group, about 3 s after the last renewal
    assert time.time() - last_renewal >= 3.0


def test_redis_channel_fence_and_watchdog_of_pods(site, tmp_path):
    redis_server = RedisServer(tmp_path / "redis")
    try:
        import redis

        r = redis.Redis.from_url(redis_server.url, decode_responses=True)
        out = tmp_path / "pod"
        channel = {"type": "redis", "url": "", "events": "ev", "cancel": "cancel", "fence": "fence", "attempt": 0}
        watchdog = {"fence_key": "fence", "lease_ttl_s": 4.0, "deadline_s": 2.8}
        env = {"REDIS_URL": redis_server.url}  # as the pod gets it (from a secretKeyRef'd password)

        # Renewed (the fence's TTL topped up like the lease) the run keeps going and commits.
        r.set("fence", "0", px=4000)
        proc = start_run(site, out, 0, channel, watchdog, env=env)
        started = time.monotonic()
        while not (out / "checkpoints" / "latest").exists() or time.monotonic() < started + 6:
            assert proc.poll() is None, proc.stdout.read()  # alive for longer than the lease while renewed
            r.pexpire("fence", 4000)
            time.sleep(0.3)
            assert time.monotonic() < started + 90
        assert any(json.loads(e)["type"] == "checkpoint" for e in r.lrange("ev", 0, -1))
        # Renewals stop (the worker is gone): the run stops itself before the fence could expire.
        stopped = time.monotonic()
        assert proc.wait(30) == -9
        assert time.monotonic() - stopped < 4.0

        # A newer attempt owns the stage: the watchdog stops this run at once, and even without
        # a watchdog it may not commit.
        r.set("fence", "1", px=60000)
        (out / "checkpoints" / "latest").unlink()
        proc = start_run(site, out, 0, channel, watchdog, env=env)
        assert proc.wait(60) == -9 and "no lease renewal for inf s" in proc.stdout.read()
        proc = start_run(site, out, 0, channel, {}, env=env)
        assert proc.wait(120) == EXIT_FENCED, proc.stdout.read()
        assert not (out / "checkpoints" / "latest").exists()
    finally:
        redis_server.close()
