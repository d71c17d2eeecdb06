"""Multi-node launch manifests (ConfigMap + headless Service + indexed Job), validated against the
Kubernetes OpenAPI schema with kubernetes-validate (no cluster here)."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest

from internlm2.plugins.runtime.k8s import ClusterSettings, build_manifests, resource_name, to_dicts
from internlm2.plugins.runtime.supervisor import resolve_launcher

pytestmark = pytest.mark.timeout(60)

K8S_VERSION = "1.30.0"


@pytest.fixture
def manifests():
    name = resource_name("0123456789abcdefXYZ", 2, 1)
    spec = {"job_id": "0123456789abcdef", "name": "sft", "stage": "sft", "index": 2, "attempt": 1}
    launch = {"num_nodes": 4, "nproc_per_node": 8, "gpus_per_node": 8, "image": "registry/internlm2:1",
              "env": {"NCCL_DEBUG": "WARN"}}
    objs = build_manifests(name, spec, launch, ClusterSettings(namespace="train", pvc_name="jobs"),
                           {"REDIS_URL": "redis://redis:6379/0"})
    return name, to_dicts(objs)


def test_manifests_validate_against_the_schema(manifests):
    name, docs = manifests
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "Job"]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    cm, svc, job = docs
    assert name == "il2-0123456789abcdef-2-1"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 4
    assert spec["backoffLimit"] == 0
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == name == svc["metadata"]["name"]
    assert svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    container = pod["containers"][0]
    cmd = container["command"]
    assert "--nnodes=4" in cmd and "--nproc-per-node=8" in cmd and "--node-rank=$(JOB_COMPLETION_INDEX)" in cmd
    assert f"--master-addr={name}-0.{name}" in cmd and cmd[-1] == "/etc/internlm2/run.json"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    env = {e["name"]: e for e in container["env"]}
    assert env["REDIS_URL"]["value"] == "redis://redis:6379/0" and env["NCCL_DEBUG"]["value"] == "WARN"
    assert "job-completion-index" in env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert {v["name"] for v in pod["volumes"]} == {"run-spec", "work", "dshm"}
    assert '"stage": "sft"' in cm["data"]["run.json"]


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


def test_launcher_choice():
    assert resolve_launcher({}) == "python"
    assert resolve_launcher({"nproc_per_node": 2}) == "torchrun"
    assert resolve_launcher({"num_nodes": 2}) == "kubernetes"
    assert resolve_launcher({"launcher": "deepspeed", "num_nodes": 1}) == "deepspeed"
