"""Multi-node launch on Kubernetes: the manifests made from a stage-pod settings file (ConfigMap +
headless Service + indexed Job), validated against the Kubernetes OpenAPI schema with
kubernetes-validate (no cluster here), and RBAC_RULES checked against every API call the launcher makes."""

from __future__ import annotations

import copy
import json
import signal
from typing import ClassVar

import kubernetes_validate
import pytest
import yaml

from internlm2.plugins.runtime import k8s
from internlm2.plugins.runtime.k8s import RBAC_RULES, StagePodSettings, build_manifests, resource_name, to_dicts
from internlm2.plugins.runtime.launchers import resolve_launcher
from internlm2.plugins.runtime.records import Job, JobState, StageRun

pytestmark = pytest.mark.timeout(60)

K8S_VERSION = "1.30.0"

STAGE_POD = {
    "namespace": "train",
    "image": "registry/internlm2:1.2",
    "imagePullSecrets": [{"name": "regcred"}],
    "serviceAccountName": "internlm2-stage",
    "artifacts": {"claimName": "internlm2-artifacts", "mountPath": "/artifacts"},
    "models": {"claimName": "internlm2-models", "mountPath": "/models", "readOnly": True},
    "data": {"claimName": "internlm2-data", "mountPath": "/data", "readOnly": True},
    "redis": {"url": "redis://:$(REDIS_PASSWORD)@internlm2-redis:6379/0",
              "passwordSecret": {"name": "internlm2-redis", "key": "password"}},
    "podSecurityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001,
                           "seccompProfile": {"type": "RuntimeDefault"}},
    "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                        "readOnlyRootFilesystem": True},
    "nodeSelector": {"nvidia.com/gpu.present": "true"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "runtimeClassName": "nvidia",
    "priorityClassName": "training",
    "resources": {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "128Gi", "nvidia.com/gpu": "1"}},
    "shmSize": "8Gi",
    "kueueQueue": "gpu-queue",
    "labels": {"team": "llm"},
    "annotations": {"example.com/owner": "platform"},
}


@pytest.fixture
def pod_settings(tmp_path):
    path = tmp_path / "stage-pod.yaml"
    path.write_text(yaml.safe_dump(STAGE_POD))
    return StagePodSettings.load(path)


def sample_job() -> Job:
    launch = {"num_nodes": 4, "nproc_per_node": 8, "gpus_per_node": 8, "env": {"NCCL_DEBUG": "WARN"}}
    stages = [StageRun(name=f"s{i}", stage="sft", config={"launch": launch}, output_dir=f"/artifacts/j/{i:02d}")
              for i in range(3)]
    return Job(job_id="0123456789abcdef", name="j", state=JobState.RUNNING, stages=stages)


@pytest.fixture
def manifests(pod_settings):
    name = resource_name("0123456789abcdefXYZ", 2, 1)
    spec = {"job_id": "0123456789abcdef", "name": "sft", "stage": "sft", "index": 2, "attempt": 1,
            "channel": {"type": "redis", "url": "", "events": "e", "cancel": "c", "fence": "f", "attempt": 1}}
    launch = sample_job().stages[2].config["launch"]
    return name, to_dicts(build_manifests(name, spec, launch, pod_settings))


def test_manifests_validate_against_the_schema(manifests):
    name, docs = manifests
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "Job"]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    cm, svc, job = docs
    assert name == "il2-0123456789abcdef-2-1"
    assert {d["metadata"]["namespace"] for d in docs} == {"train"}
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 4
    assert spec["backoffLimit"] == 0
    # Kueue: the Job waits suspended in the named queue until the whole gang is admitted.
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue" and spec["suspend"] is True
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == name == svc["metadata"]["name"]
    assert svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    container = pod["containers"][0]
    cmd = container["command"]
    assert "--nnodes=4" in cmd and "--nproc-per-node=8" in cmd and "--node-rank=$(JOB_COMPLETION_INDEX)" in cmd
    assert f"--master-addr={name}-0.{name}" in cmd and cmd[-1] == "/etc/internlm2/run/run.json"
    assert container["image"] == "registry/internlm2:1.2" and container["imagePullPolicy"] == "IfNotPresent"
    # The job's gpus_per_node overrides the chart's GPU count; the rest of the resources are the chart's.
    assert container["resources"]["limits"] == {"memory": "128Gi", "nvidia.com/gpu": "8"}
    assert container["resources"]["requests"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "8"}
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["tolerations"] == STAGE_POD["tolerations"] and pod["nodeSelector"] == STAGE_POD["nodeSelector"]
    assert pod["runtimeClassName"] == "nvidia" and pod["priorityClassName"] == "training"
    assert pod["serviceAccountName"] == "internlm2-stage" and pod["automountServiceAccountToken"] is False
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    env = {e["name"]: e for e in container["env"]}
    assert env["NCCL_DEBUG"]["value"] == "WARN"
    assert "job-completion-index" in env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(volumes) == {"run-spec", "artifacts", "models", "data", "dshm", "tmp", "home"}
    assert volumes["artifacts"]["persistentVolumeClaim"] == {"claimName": "internlm2-artifacts"}
    assert volumes["models"]["persistentVolumeClaim"]["readOnly"] is True
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["artifacts"] == "/artifacts" and mounts["dshm"] == "/dev/shm"
    assert mounts["tmp"] == "/tmp" and volumes["tmp"]["emptyDir"] == {}
    assert mounts["home"] == "/home/internlm2" and volumes["home"]["emptyDir"] == {}
    assert json.loads(cm["data"]["run.json"])["stage"] == "sft"


def test_the_redis_password_reaches_pods_only_through_a_secret_key_ref(manifests):
    _, docs = manifests
    container = docs[2]["spec"]["template"]["spec"]["containers"][0]
    names = [e["name"] for e in container["env"]]
    # The kubelet expands $(REDIS_PASSWORD) in REDIS_URL only when it is defined earlier.
    assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL")
    env = {e["name"]: e for e in container["env"]}
    assert env["REDIS_PASSWORD"] == {"name": "REDIS_PASSWORD", "valueFrom": {
        "secretKeyRef": {"name": "internlm2-redis", "key": "password"}}}
    assert env["REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@internlm2-redis:6379/0"
    # Nothing else holds a Redis URL: the run spec's channel takes it from the pod's environment.
    assert "redis://" not in json.dumps(docs[0]) and "redis://" not in json.dumps(docs[1])


def test_schema_validation_rejects_a_broken_manifest(manifests):
    _, docs = manifests
    bad = copy.deepcopy(docs[2])
    bad["spec"]["completionMode"] = 7
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = copy.deepcopy(docs[2])
    bad["spec"]["template"]["spec"]["containers"][0]["gpus"] = 8  # unknown field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_stage_pod_settings_file_is_checked(tmp_path):
    path = tmp_path / "stage-pod.yaml"
    path.write_text(yaml.safe_dump({"namespace": "x", "image": "i", "shm": "1Gi"}))
    with pytest.raises(ValueError, match="unknown stage-pod keys"):
        StagePodSettings.load(path)
    path.write_text(yaml.safe_dump({"image": "i"}))
    with pytest.raises(ValueError, match="namespace is required"):
        StagePodSettings.load(path)


class RecordingApi:
    """Stands in for CoreV1Api / BatchV1Api: records each call as (resource, verb)."""

    VERBS: ClassVar[dict[str, str]] = {"create": "create", "delete": "delete", "read": "get", "patch": "patch",
                                       "list": "list", "replace": "update"}

    def __init__(self, calls: list[tuple[str, str]]):
        self.calls = calls

    def __getattr__(self, method: str):
        verb, _, rest = method.partition("_namespaced_")
        resource = {"config_map": "configmaps", "service": "services", "job": "jobs",
                    "job_status": "jobs/status"}[rest]

        def call(*args, **kwargs):
            self.calls.append((resource, self.VERBS[verb]))
            if rest == "job_status":
                return type("R", (), {"status": type("S", (), {"failed": 0, "succeeded": 4})()})()
            return None

        return call


def test_rbac_rules_cover_every_call_the_launcher_makes(pod_settings, monkeypatch):
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(k8s.k8s, "CoreV1Api", lambda: RecordingApi(calls))
    monkeypatch.setattr(k8s.k8s, "BatchV1Api", lambda: RecordingApi(calls))
    from kubernetes import config as k8s_config

    monkeypatch.setattr(k8s_config, "load_incluster_config", lambda: None)

    class Store:  # the launcher only asks the store for key names and pops pod events
        def stage_events_key(self, *a):
            return "events"

        def cancel_key(self, *a):
            return "cancel"

        def fence_key(self, *a):
            return "fence"

        def pop_list(self, key, count):
            return [json.dumps({"type": "log", "message": "hi"})]

    run = k8s.KubernetesLauncher(pod_settings, Store()).start(sample_job(), 2, 1)
    assert run.poll() == 0 and run.events() == [{"type": "log", "message": "hi"}]
    run.signal(signal.SIGKILL)
    run.close()
    assert {("configmaps", "create"), ("services", "create"), ("jobs", "create"), ("jobs/status", "get"),
            ("jobs", "delete"), ("services", "delete"), ("configmaps", "delete")} == set(calls)
    allowed = {(r, v) for rule in RBAC_RULES for r in rule["resources"] for v in rule["verbs"]}
    assert set(calls) <= allowed
    assert all(set(rule) == {"apiGroups", "resources", "verbs"} for rule in RBAC_RULES)


def test_an_unreachable_api_server_is_waited_out_and_a_deleted_job_is_a_failure(pod_settings, monkeypatch):
    import urllib3
    from kubernetes.client import ApiException

    outcomes = iter([ApiException(status=503, reason="unavailable"),
                     urllib3.exceptions.MaxRetryError(None, "/apis/batch", "refused"),
                     ApiException(status=404, reason="not found")])

    class FlakyBatch:
        def read_namespaced_job_status(self, *args):
            raise next(outcomes)

    monkeypatch.setattr(k8s.k8s, "CoreV1Api", lambda: None)
    monkeypatch.setattr(k8s.k8s, "BatchV1Api", FlakyBatch)
    run = k8s.KubernetesRun(store=None, events_key="e", name="n", namespace="ns", nodes=2, attempt=0)
    assert [run.poll(), run.poll(), run.poll()] == [None, None, 1]


def test_launcher_choice():
    assert resolve_launcher({}) == "python"
    assert resolve_launcher({"nproc_per_node": 2}) == "torchrun"
    assert resolve_launcher({"num_nodes": 2}) == "kubernetes"
    assert resolve_launcher({"launcher": "deepspeed", "num_nodes": 1}) == "deepspeed"
