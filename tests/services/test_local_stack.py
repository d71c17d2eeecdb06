"""`internlm2 up` in a subprocess: it makes a tiny model, starts Redis, the four services, the gateway and a
worker, prints the endpoints, answers through the SDK and — the README's "Use it" example — through the
official `openai` client and the playground page, and stops everything cleanly on SIGINT (Ctrl-C)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from internlm2_client import InferenceClient, RewardClient, TokenizerClient, TrainingClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CLI = "import sys; from internlm2_client.cli import main; sys.exit(main(sys.argv[1:]))"


def read_json_line(proc, deadline: float) -> dict:
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"`internlm2 up` exited with {proc.wait()}")
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError("`internlm2 up` printed no endpoints in time")


def test_up_starts_everything_and_sigint_stops_it_cleanly():
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "INTERNLM2_AUTH_TOKEN")}
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, "--json", "up"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        up = read_json_line(proc, time.monotonic() + 180)
        assert up["status"] == "up" and up["redis"]["embedded"]
        with TokenizerClient(up["tokenizer"]["address"], timeout=30) as tok:
            ids = tok.tokenize(["Hello world"])[0].token_ids
            assert ids[0] == 1
        with InferenceClient(up["inference"]["address"], timeout=60) as inference:
            result = inference.generate(messages=[{"role": "user", "content": "Hi"}], max_new_tokens=8)
            assert result.usage.completion_tokens >= 1
            assert inference.model_info().vocab_size == tok_vocab(up)
        with RewardClient(up["reward"]["address"], timeout=30) as reward:
            assert (
                len(reward.score([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]])) == 1
            )
        with TrainingClient(up["training"]["address"], timeout=30) as training:
            assert "prepare_data" in {s.name for s in training.list_stages()}
        url = up["gateway"]["url"]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=8)
        assert answer.usage.completion_tokens >= 1 and answer.choices[0].message.role == "assistant"
        streamed = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=8, stream=True)
        assert sum(1 for chunk in streamed if chunk.choices and chunk.choices[0].delta.content) >= 1
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "InternLM2 playground" in page.text
        assert httpx.get(url + "/ready").json()["status"] == "ready"
        pids = [up[name]["pid"] for name in ("tokenizer", "inference", "reward", "training", "gateway", "worker")]
        assert all(psutil.pid_exists(pid) for pid in pids)

        proc.send_signal(signal.SIGINT)
        stopped = read_json_line(proc, time.monotonic() + 60)
        assert stopped == {"status": "stopped", "clean": True}
        assert proc.wait(30) == 0
        assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
        assert not Path(up["work_dir"]).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr = proc.stderr.read()
        assert "Traceback" not in stderr, stderr


def tok_vocab(up) -> int:
    from internlm2.core.tokenizer import InternLM2Tokenizer

    return InternLM2Tokenizer.from_pretrained(up["models"]["policy"]).vocab_size


def descendants(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def running(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.timeout(480)
def test_up_restarts_a_dead_worker_and_every_child_dies_with_up_however_it_ends(tmp_path):
    """A ticker stage runs under `up`; its worker is killed (SIGKILL) and `up` starts another, which resumes
    the stage. Then `up`'s stdout reader goes away (as with `up | tee` and Ctrl-C) and SIGINT arrives: exit 0,
    no child left, the stage given back resumable. A second `up` on the same work dir resumes it from its
    checkpoint; `up` killed with SIGKILL takes every child with it (PR_SET_PDEATHSIG)."""
    from training_support import install_ticker

    from internlm2.plugins.runtime.records import JobState
    from internlm2.plugins.runtime.store import RedisStore
    from internlm2.services.local_stack import EmbeddedRedis

    site = tmp_path / "site"
    install_ticker(site)
    work = tmp_path / "stack"
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "INTERNLM2_AUTH_TOKEN")}
    env.update(PYTHONPATH=f"{site}{os.pathsep}{env.get('PYTHONPATH', '')}", INTERNLM2_LEASE_TTL_S="6",
               INTERNLM2_CANCEL_GRACE_S="5")

    def start_up():
        with open(tmp_path / "up.err", "ab") as err:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen([sys.executable, "-c", CLI, "--json", "up", "--work-dir", str(work)],
                                    stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        return proc, read_json_line(proc, time.monotonic() + 240)

    def workers_of(proc) -> list[int]:
        out = []
        for pid in descendants(proc.pid):
            try:
                cmd = psutil.Process(pid).cmdline()
            except psutil.Error:  # gone, or a zombie not yet reaped
                continue
            if "serve" in cmd and "worker" in cmd:
                out.append(pid)
        return out

    proc, up = start_up()
    try:
        with TrainingClient(up["training"]["address"], timeout=30) as training:
            job_id = training.submit_job([{"stage": "ticker", "config": {"steps": 1000, "step_s": 0.2}}]).job.job_id
            runs = work / "jobs" / job_id / "00-ticker" / "runs"

            def step() -> float:
                return training.get_job(job_id).stages[0].progress * 1000

            wait_until(lambda: step() >= 5, 120, "the stage to pass a checkpoint")
            first = up["worker"]["pid"]
            os.kill(first, signal.SIGKILL)
            wait_until(lambda: [p for p in workers_of(proc) if p != first], 60, "up to start another worker")
            assert proc.poll() is None
            wait_until(lambda: runs.read_text().split() == ["0", "1"], 120, "the stage to resume on the new worker")
            wait_until(lambda: step() >= 9, 60, "the resumed stage to make progress")
        children = descendants(proc.pid)
        proc.stdout.close()  # the reader of up's output is gone (`up | tee`, Ctrl-C killed tee)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0
        assert running(children) == []
        redis = EmbeddedRedis(work / "redis")
        try:  # the stage was given back: queued again, resumable, not failed
            job = RedisStore(redis.url).load(job_id)
            assert job.state is JobState.RUNNING and job.stages[0].state is JobState.QUEUED, job
        finally:
            redis.close()

        proc, up = start_up()  # same work dir: the same Redis data, the stage resumes from its checkpoint
        wait_until(lambda: runs.read_text().split() == ["0", "1", "2"], 120, "the second up to resume the stage")
        children = descendants(proc.pid)
        proc.kill()  # SIGKILL: no chance to stop anything itself
        proc.wait()
        wait_until(lambda: running(children) == [], 90, "every child of the killed up to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in (tmp_path / "up.err").read_text()

