"""The runtime's parts on their own: no import cycle among its modules, the pure job state machine
(no Redis), submit-time trust boundaries, and settings read from the environment in one place."""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
from pathlib import Path

import pytest

import internlm2.plugins.runtime as runtime
from internlm2.plugins.contract import StageConfigError
from internlm2.plugins.runtime import machine
from internlm2.plugins.runtime.machine import Effects, JobFinishedError, JobNotRetryableError
from internlm2.plugins.runtime.pipeline import Boundaries, validate_pipeline
from internlm2.plugins.runtime.records import Job, JobState, StageRun
from internlm2.plugins.runtime.settings import RuntimeSettings

pytestmark = pytest.mark.timeout(60)


# ---- structure ------------------------------------------------------------------------------------
def runtime_imports() -> dict[str, set[str]]:
    """Module -> runtime modules it imports anywhere (module level or inside functions)."""
    folder = Path(runtime.__file__).parent
    names = {m.name for m in pkgutil.iter_modules([str(folder)])}
    graph: dict[str, set[str]] = {}
    for name in names:
        tree = ast.parse((folder / f"{name}.py").read_text())
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:  # from .x import y / from . import x
                    targets = [node.module] if node.module else [a.name for a in node.names]
                    deps.update(t.split(".")[0] for t in targets)
                elif node.module and node.module.startswith("internlm2.plugins.runtime."):
                    deps.add(node.module.split(".")[3])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[3] for a in node.names
                            if a.name.startswith("internlm2.plugins.runtime."))
        graph[name] = deps & names - {name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    visiting, done, cycles = set(), set(), []

    def visit(node: str, path: list[str]) -> None:
        if node in done:
            return
        if node in visiting:
            cycles.append([*path[path.index(node):], node])
            return
        visiting.add(node)
        for dep in sorted(graph[node]):
            visit(dep, [*path, node])
        visiting.discard(node)
        done.add(node)

    for name in sorted(graph):
        visit(name, [])
    return cycles


def test_every_runtime_module_imports_and_none_is_in_an_import_cycle():
    graph = runtime_imports()
    assert {"machine", "store", "dispatch", "launchers", "supervisor", "settings", "worker", "k8s"} <= set(graph)
    for name in graph:
        importlib.import_module(f"internlm2.plugins.runtime.{name}")
    assert find_cycles(graph) == []
    # The pure parts stay pure: the state machine and the records know nothing of Redis or Celery.
    assert graph["machine"] <= {"records"} and graph["records"] == set()
    assert graph["settings"] == set() and "celery_app" not in graph["jobs"] | graph["store"]


def test_cycle_detection_would_see_a_cycle(tmp_path, monkeypatch):
    # The check above cannot pass vacuously: a two-module loop in a copy of the package is found.
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from .a import y\n")
    monkeypatch.setattr(runtime, "__file__", str(pkg / "__init__.py"))
    graph = runtime_imports()
    assert graph == {"a": {"b"}, "b": {"a"}} and find_cycles(graph) == [["a", "b", "a"]]


# ---- the state machine, without Redis ------------------------------------------------------------
def new_job(n: int = 2) -> Job:
    stages = [StageRun(name=f"s{i}", stage="probe", config={}, output_dir=f"/w/{i}") for i in range(n)]
    job = Job(job_id="j1", name="j", state=JobState.QUEUED, stages=stages)
    machine.submitted(job, Effects(now=1.0))
    return job


def claim(job: Job, index: int, held: bool = False, max_attempts: int = 3) -> tuple[machine.Claim, Effects]:
    fx = Effects(now=2.0)
    return machine.claim(job, index, lease_held=held, worker="w", token="t", max_attempts=max_attempts, fx=fx), fx


def test_claims_run_once_in_order_and_attempts_only_grow():
    job = new_job()
    assert claim(job, 1)[0].outcome == "early"
    c, fx = claim(job, 0)
    assert (c.outcome, c.attempt, fx.take_lease, fx.drop_intents) == ("run", 0, 0, [0])
    assert job.state is JobState.RUNNING and [e[2]["state"] for e in fx.events] == ["RUNNING", "RUNNING"]
    assert claim(job, 0, held=True)[0].outcome == "busy"
    # Lost: requeued with a loss counted, then run again as attempt 1 (the fencing token grows).
    fx = Effects(now=3.0)
    assert machine.lost(job, 0, 3, fx) and fx.due == [0] and job.stages[0].state is JobState.QUEUED
    c, _ = claim(job, 0)
    assert c.attempt == 1 and job.stages[0].losses == 1
    # Released by a stopping worker: requeued without a loss, next run is attempt 2.
    fx = Effects(now=4.0)
    machine.release(job, 0, "worker stopping", fx)
    assert fx.due == [0] and fx.drop_leases == [0] and job.stages[0].losses == 1
    assert claim(job, 0)[0].attempt == 2
    fx = Effects(now=5.0)
    machine.finish(job, 0, JobState.SUCCEEDED, "", {"loss": 1.0}, fx)
    assert fx.due == [1] and job.progress == 0.5 and job.stages[0].metrics == {"loss": 1.0}
    assert claim(job, 0)[0].outcome == "done"
    assert claim(job, 1)[0].outcome == "run"
    fx = Effects(now=6.0)
    machine.finish(job, 1, JobState.SUCCEEDED, "", None, fx)
    assert job.state is JobState.SUCCEEDED and fx.due == [] and fx.clear_cancel
    with pytest.raises(JobNotRetryableError):
        machine.retry(job, Effects(now=7.0))
    with pytest.raises(JobFinishedError):
        machine.cancel(job, "late", Effects(now=7.0))


def test_losses_fail_a_stage_at_max_attempts():
    job = new_job(1)
    for _ in range(2):
        claim(job, 0, max_attempts=2)
        machine.lost(job, 0, 2, Effects(now=3.0))
    assert job.state is JobState.FAILED and job.error == "stage s0: worker lost 2 times"
    # A claim that finds a RUNNING stage without its lease counts the loss too.
    job = new_job(1)
    claim(job, 0, max_attempts=1)
    assert claim(job, 0, max_attempts=1)[0].outcome == "done" and job.state is JobState.FAILED


def test_cancel_and_retry_resume_from_the_first_unfinished_stage():
    job = new_job(3)
    claim(job, 0)
    machine.finish(job, 0, JobState.SUCCEEDED, "", None, Effects(now=3.0))
    claim(job, 1)
    fx = Effects(now=4.0)
    machine.cancel(job, "stop", fx)
    assert job.state is JobState.CANCELLING and fx.set_cancel == "stop"
    fx = Effects(now=5.0)
    machine.finish(job, 1, JobState.CANCELLED, "", None, fx)
    assert job.state is JobState.CANCELLED and [s.state for s in job.stages] == [
        JobState.SUCCEEDED, JobState.CANCELLED, JobState.CANCELLED]
    assert set(fx.drop_intents) == {0, 1, 2} and fx.due == []
    fx = Effects(now=6.0)
    assert machine.retry(job, fx) == 1
    assert job.state is JobState.QUEUED and fx.due == [1] and job.end_time is None
    assert [s.state for s in job.stages] == [JobState.SUCCEEDED, JobState.QUEUED, JobState.QUEUED]
    c, _ = claim(job, 1)
    assert c.outcome == "run" and c.attempt == 1  # its second run: resumes from its checkpoint


def test_a_queued_job_cancels_at_once():
    job = new_job()
    fx = Effects(now=2.0)
    machine.cancel(job, "no", fx)
    assert job.state is JobState.CANCELLED and fx.set_cancel is None and fx.clear_cancel


# ---- trust boundaries at submit ------------------------------------------------------------------
def test_paths_env_and_nodes_are_checked_at_submit(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    corpus = data / "corpus.jsonl"
    corpus.write_text('{"text": "a b c"}\n')
    inside = Boundaries(roots=(data.resolve(),), kubernetes=False)

    def field_of(config: dict, inputs=None) -> list[str]:
        with pytest.raises(StageConfigError) as err:
            validate_pipeline([{"stage": "prepare_data", "config": config}], inputs, inside)
        return [f for f, _ in err.value.errors]

    ok = {"sources": [str(corpus)]}
    validate_pipeline([{"stage": "prepare_data", "config": ok}], {"datasets": {"c": str(corpus)}}, inside)
    assert field_of({"sources": ["/etc/passwd"]}) == ["stages[0].config.sources[0]"]
    assert field_of({"sources": [str(data / "missing.jsonl")]}) == ["stages[0].config.sources[0]"]
    assert field_of({"sources": [str(data / ".." / ".." / "x")]}) == ["stages[0].config.sources[0]"]
    assert field_of({"sources": ["../../etc/passwd"]}) == ["stages[0].config.sources[0]"]
    assert field_of(ok, {"checkpoints": {"base": "/etc"}}) == ["inputs.checkpoints.base"]
    assert field_of({**ok, "launch": {"env": {"LD_PRELOAD": "/x.so", "NCCL_DEBUG": "INFO"}}}) == [
        "stages[0].config.launch.env.LD_PRELOAD"]
    assert field_of({**ok, "launch": {"num_nodes": 2}}) == ["stages[0].config.launch.num_nodes"]
    # With Kubernetes configured the same request is accepted.
    validate_pipeline([{"stage": "prepare_data", "config": {**ok, "launch": {"num_nodes": 2}}}], None,
                      Boundaries(roots=(data.resolve(),), kubernetes=True))
    # A symlink inside a root that points outside it is outside.
    (data / "escape").symlink_to("/etc/passwd")
    assert field_of({"sources": [str(data / "escape")]}) == ["stages[0].config.sources[0]"]


def test_settings_come_from_the_environment_in_one_place(tmp_path):
    env = {"REDIS_URL": "redis://r:1/0", "INTERNLM2_LEASE_TTL_S": "12", "INTERNLM2_DATA_ROOTS": f"/data:{tmp_path}",
           "INTERNLM2_K8S_STAGE_POD": "/etc/pod.yaml", "INTERNLM2_RESTORE_INTERVAL_S": "1"}
    s = RuntimeSettings.from_env(env, work_dir=str(tmp_path / "w"))
    assert (s.redis_url, s.lease_ttl_s, s.restore_interval_s, s.kubernetes) == ("redis://r:1/0", 12.0, 1.0, True)
    assert s.data_roots == ("/data", str(tmp_path)) and s.work_dir == str(tmp_path / "w")
    # Renewal, SIGTERM and SIGKILL all come before the lease can expire.
    assert s.renew_every_s < s.stop_after_s < s.kill_after_s < s.lease_ttl_s
    assert RuntimeSettings.from_dict(s.to_dict()) == s


def test_top_level_core_plugins_services_refuse_to_load_a_second_copy():
    import subprocess
    import sys

    repo = Path(runtime.__file__).resolve().parents[2]
    for folder in ("core", "plugins", "services"):
        done = subprocess.run([sys.executable, "-c", f"import {folder}"], cwd=repo, capture_output=True, text=True)
        assert done.returncode == 1 and f"import internlm2.{folder} (not '{folder}')" in done.stderr, done.stderr
    done = subprocess.run([sys.executable, "-c", "import internlm2.core, internlm2.plugins, internlm2.services"],
                          cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", ["", None, 5])
def test_a_missing_stage_name_lists_the_installed_stages(name):
    with pytest.raises(StageConfigError) as info:
        validate_pipeline([{"stage": name}])
    (field, message), = info.value.errors
    assert field == "stages[0].stage"
    assert "prepare_data" in message and "none" not in message.split("installed:")[1]


def test_submit_refuses_a_pipeline_the_planner_says_cannot_fit(tmp_path):
    # Admission uses the same estimate as PlanJob (plugins/planner.py), with the shapes of the model the
    # stage config names: the 7B preset's config.json, so the numbers are a 7B's.
    from internlm2.core import InternLM2Config

    model = tmp_path / "internlm2-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(InternLM2Config.preset("7b").to_dict()))
    data = tmp_path / "chat.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    roots = (tmp_path.resolve(),)

    def sft(**config):
        return [{"stage": "sft", "config": {"model": str(model), "data": str(data), **config}}]

    validate_pipeline(sft(), None, Boundaries(roots))  # no GPU size declared: not checked
    with pytest.raises(StageConfigError) as err:  # a 7B's ZeRO-2 states on one 80 GiB GPU: no
        validate_pipeline(sft(), None, Boundaries(roots, gpu_memory_gib=80))
    (field, message), = err.value.errors
    assert field == "stages[0].config.zero_stage" and "GiB per GPU" in message
    # Spread over 8 GPUs with ZeRO-3 it fits the same GPUs.
    validate_pipeline(sft(zero_stage=3, launch={"nproc_per_node": 8}), None, Boundaries(roots, gpu_memory_gib=80))
