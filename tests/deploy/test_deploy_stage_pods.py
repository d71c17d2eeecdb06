"""Multi-node training as the chart ships it: the worker's Role, the stage-pod settings and the stage
manifests the worker generates from them.

The chart is rendered offline (helm-python-sdk); the stage-pod settings file is parsed out of the rendered
ConfigMap exactly as the worker would read it (`StagePodSettings.load`), handed to the runtime's own
`build_manifests`, and the resulting ConfigMap/Service/Job are validated against the Kubernetes schema
(kubernetes-validate, strict) and checked against the chart's objects: same namespace, image, claims,
hardening, GPU scheduling and Redis Secret, reachable through the Redis NetworkPolicy, and every API call
of the worker allowed by its Role.
"""

from __future__ import annotations

import base64
import json

import kubernetes_validate
import pytest
import yaml
from deploy_support import (
    CHART_VALUES,
    NAMESPACE,
    RELEASE,
    TOKEN,
    by_kind,
    component_of,
    deployment,
    env_of,
    render,
    stage_pod_settings,
)

from internlm2.plugins.runtime.k8s import (
    KUEUE_LABEL,
    RBAC_RULES,
    StagePodSettings,
    build_manifests,
    resource_name,
    to_dicts,
)

pytestmark = pytest.mark.timeout(120)

# Chart values sets that run multi-node stages.
STAGE_CASES = [case for case, values in CHART_VALUES.items() if values.get("stagePods", {}).get("enabled", True)]
# ... with the chart's own Redis (an external one's network rules are its operator's).
INTERNAL_REDIS_CASES = [case for case in STAGE_CASES
                        if CHART_VALUES[case].get("redis", {}).get("internal", {}).get("enabled", True)]
JOB_ID = "0123456789abcdef"
LAUNCH = {"num_nodes": 4, "nproc_per_node": 8, "gpus_per_node": 8, "env": {"NCCL_DEBUG": "WARN"}}
CPU_LAUNCH = {"num_nodes": 2, "nproc_per_node": 2, "gpus_per_node": 0}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {case: render(CHART_VALUES[case]) for case in STAGE_CASES}


def _launch(case: str) -> dict:
    return CPU_LAUNCH if case == "cpu" else LAUNCH


def stage_objects(docs: list[dict], tmp_path, launch: dict) -> dict[str, dict]:
    """The worker's view: load stage-pod.yaml from the rendered ConfigMap, build the stage's objects."""
    settings_file = tmp_path / "stage-pod.yaml"
    settings_file.write_text(yaml.safe_dump(stage_pod_settings(docs)))
    pod = StagePodSettings.load(settings_file)
    name = resource_name(JOB_ID, 1, 2)
    spec = {"job_id": JOB_ID, "name": "sft", "stage": "sft", "index": 1, "attempt": 2}
    return {d["kind"]: d for d in to_dicts(build_manifests(name, spec, launch, pod))}


# ---- RBAC: the Role allows every call the worker makes ------------------------------------------

def _grants(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def _missing(role_rules: list[dict], needed: list[dict]) -> set[tuple[str, str, str]]:
    granted = _grants(role_rules)
    return {g for g in _grants(needed)
            if g not in granted and (g[0], g[1], "*") not in granted and (g[0], "*", g[2]) not in granted}


@pytest.mark.parametrize("case", STAGE_CASES)
def test_the_role_covers_every_api_call_of_the_worker(rendered, case):
    docs = rendered[case]
    (role,) = by_kind(docs, "Role").values()
    assert role["metadata"]["namespace"] == NAMESPACE
    assert RBAC_RULES, "internlm2.plugins.runtime.k8s.RBAC_RULES lists the worker's API calls"
    assert _missing(role["rules"], RBAC_RULES) == set()


WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection", "*"}


def test_the_role_writes_only_what_the_worker_writes(rendered):
    """Least privilege: every write the Role grants is one RBAC_RULES lists (reads of the worker's own
    Jobs and their pods are allowed beyond it, for diagnosis)."""
    (role,) = by_kind(rendered["default"], "Role").values()
    writes = {g for g in _grants(role["rules"]) if g[2] in WRITE_VERBS}
    assert writes <= _grants(RBAC_RULES), writes - _grants(RBAC_RULES)
    assert {g[1] for g in _grants(role["rules"])} <= {"jobs", "jobs/status", "configmaps", "services", "pods",
                                                       "pods/log"}


def test_the_coverage_check_catches_a_missing_permission(rendered):
    """Guard for the test above: the shipped Role of the previous release (no ConfigMaps) fails it."""
    old_role = [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "delete"]},
                {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "create", "delete"]},
                {"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list", "watch"]}]
    assert ("", "configmaps", "create") in _missing(old_role, RBAC_RULES)


# ---- the generated stage manifests --------------------------------------------------------------

@pytest.mark.parametrize("kube_version", ["1.27.0", "1.36.0"])
@pytest.mark.parametrize("case", STAGE_CASES)
def test_generated_stage_manifests_validate(rendered, tmp_path, case, kube_version):
    objects = stage_objects(rendered[case], tmp_path, _launch(case))
    assert set(objects) == {"ConfigMap", "Service", "Job"}
    for doc in objects.values():
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{case}: stage {doc['kind']} invalid for {kube_version}: {e.message}")


@pytest.mark.parametrize("case", STAGE_CASES)
def test_stage_pods_run_like_the_chart_pods(rendered, tmp_path, case):
    docs = rendered[case]
    values = CHART_VALUES[case]
    objects = stage_objects(docs, tmp_path, _launch(case))
    job = objects["Job"]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    worker_pod = deployment(docs, "worker")["spec"]["template"]["spec"]
    worker = worker_pod["containers"][0]

    for doc in objects.values():
        assert doc["metadata"]["namespace"] == NAMESPACE
    # The chart's image: CUDA for GPU stage pods, the CPU image otherwise.
    flavor = "-cpu" if values.get("stagePods", {}).get("gpu") is False else "-cuda"
    assert container["image"] == f"internlm2:0.1.0{flavor}"
    assert container["imagePullPolicy"] == worker["imagePullPolicy"]

    # Hardening: the chart's pod and container security contexts, read-only root filesystem included;
    # /tmp and $HOME (where torchrun, Triton and DeepSpeed write) are scratch emptyDirs, as in the worker.
    assert pod["securityContext"] == worker_pod["securityContext"]
    sc = container["securityContext"]
    assert sc == worker["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    worker_scratch = {m["mountPath"] for m in worker["volumeMounts"]
                      if "emptyDir" in next(v for v in worker_pod["volumes"] if v["name"] == m["name"])}
    assert {"/tmp", "/home/internlm2"} <= worker_scratch <= mounts.keys()
    for path in ("/tmp", "/home/internlm2"):
        assert next(v for v in pod["volumes"] if v["name"] == mounts[path]["name"])["emptyDir"] == {}
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == deployment(docs, "training")["spec"]["template"]["spec"]["serviceAccountName"]

    # Claims: the worker's artifacts claim read-write at the same path; models (and data) read-only.
    worker_claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in worker_pod["volumes"]
                     if "persistentVolumeClaim" in v}
    stage_claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert {k: v["claimName"] for k, v in stage_claims.items()} == worker_claims
    worker_mounts = {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}
    for name, claim in stage_claims.items():
        mount = next(m for m in container["volumeMounts"] if m["name"] == name)
        assert mount["mountPath"] == worker_mounts[name]
        assert bool(mount.get("readOnly")) == (name != "artifacts") == bool(claim.get("readOnly"))

    # /dev/shm sized as configured.
    dshm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert mounts["/dev/shm"]["name"] == "dshm"

    # Resources: the chart's per-pod requests, GPUs from the job's launch.gpus_per_node.
    gpus = _launch(case)["gpus_per_node"]
    resources = container["resources"]
    assert resources["requests"]["memory"] == "64Gi" and resources["limits"]["memory"] == "128Gi"
    assert resources["limits"].get("nvidia.com/gpu") == (str(gpus) if gpus else None)

    # Scheduling: the GPU block for GPU stage pods, plus stagePods' own.
    stage_values = values.get("stagePods", {})
    tolerations = pod.get("tolerations", [])
    if flavor == "-cuda":
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    else:
        assert "runtimeClassName" not in pod and not tolerations
    for tol in stage_values.get("tolerations", []):
        assert tol in tolerations
    if case == "gpu":
        assert pod["runtimeClassName"] == "nvidia"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true",
                                       "node.kubernetes.io/instance-type": "p5.48xlarge"}
        assert pod["affinity"] == values["gpu"]["affinity"]
        assert pod["priorityClassName"] == "training"
        # Gang admission by Kueue: the Job is labelled with the queue and created suspended.
        assert job["metadata"]["labels"][KUEUE_LABEL] == "team-a" and job["spec"]["suspend"] is True
    else:
        assert KUEUE_LABEL not in job["metadata"]["labels"] and not job["spec"].get("suspend")


@pytest.mark.parametrize("case", STAGE_CASES)
def test_stage_pods_reach_redis_with_the_password_from_its_secret(rendered, tmp_path, case):
    docs = rendered[case]
    container = stage_objects(docs, tmp_path, _launch(case))["Job"]["spec"]["template"]["spec"]["containers"][0]
    env = env_of(container)
    worker_env = env_of(deployment(docs, "worker")["spec"]["template"]["spec"]["containers"][0])
    assert env["REDIS_URL"] == worker_env["REDIS_URL"]
    assert "$(REDIS_PASSWORD)@" in env["REDIS_URL"]["value"]
    assert env["REDIS_PASSWORD"] == worker_env["REDIS_PASSWORD"]
    assert set(env["REDIS_PASSWORD"]["valueFrom"]) == {"secretKeyRef"}
    names = [e["name"] for e in container["env"]]
    assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL"), "$(VAR) expands only if defined before"


@pytest.mark.parametrize("case", INTERNAL_REDIS_CASES)
def test_the_redis_network_policy_admits_this_release_s_stage_pods(rendered, tmp_path, case):
    docs = rendered[case]
    (redis_policy,) = [d for d in docs if d["kind"] == "NetworkPolicy" and component_of(d) == "redis"]
    pod_labels = stage_objects(docs, tmp_path, _launch(case))["Job"]["spec"]["template"]["metadata"]["labels"]
    peers = redis_policy["spec"]["ingress"][0]["from"]
    assert any(p["podSelector"].get("matchLabels", {}).items() <= pod_labels.items()
               and not p["podSelector"].get("matchExpressions") for p in peers)
    # ... and only this release's: another release's stage pods do not match.
    other = {**pod_labels, "app.kubernetes.io/instance": "other-release"}
    assert not any(p["podSelector"].get("matchLabels", {}).items() <= other.items()
                   and not p["podSelector"].get("matchExpressions") for p in peers)


# ---- no secret in plain text --------------------------------------------------------------------

def _secret_values(docs: list[dict]) -> set[str]:
    return {base64.b64decode(v).decode() for d in docs if d["kind"] == "Secret" for v in d.get("data", {}).values()}


@pytest.mark.parametrize("case", STAGE_CASES)
def test_no_password_or_token_in_plain_text_anywhere(rendered, tmp_path, case):
    docs = rendered[case]
    secrets = _secret_values(docs)
    if CHART_VALUES[case].get("auth", {}).get("enabled"):
        assert TOKEN in secrets
    if CHART_VALUES[case].get("redis", {}).get("internal", {}).get("enabled", True):
        assert len([s for s in secrets if s != TOKEN]) == 1, "the generated Redis password"
    outside_secrets = json.dumps([d for d in docs if d["kind"] != "Secret"])
    stage = json.dumps(list(stage_objects(docs, tmp_path, _launch(case)).values()))
    for secret in secrets:
        assert secret not in outside_secrets and secret not in stage, f"{case}: a secret leaked into a manifest"
    assert "redis://:$(REDIS_PASSWORD)@" in outside_secrets or "rediss://:$(REDIS_PASSWORD)@" in outside_secrets


def test_without_stage_pods_the_worker_has_no_stage_settings():
    docs = render(CHART_VALUES["no-stage-pods"])
    assert not [d for d in docs if d["kind"] == "ConfigMap"]
    for name in ("worker", "training"):
        env = env_of(deployment(docs, name)["spec"]["template"]["spec"]["containers"][0])
        assert "INTERNLM2_K8S_STAGE_POD" not in env, "multi-node requests then fail at submit, naming launch.nodes"


def test_the_chart_refuses_stage_pods_without_a_shared_artifacts_claim():
    import helm_python as helm

    with pytest.raises(helm.HelmRenderError, match=r"stagePods\.enabled needs artifacts\.persistence\.enabled"):
        render({"artifacts": {"persistence": {"enabled": False}}})
    with pytest.raises(helm.HelmRenderError, match="ReadWriteMany"):
        render({"artifacts": {"persistence": {"accessModes": ["ReadWriteOnce"]}}})
    # A claim of one's own is trusted to be shared.
    assert stage_pod_settings(render({"artifacts": {"persistence": {"existingClaim": "nfs-jobs"}}}))[
        "artifacts"] == {"claimName": "nfs-jobs", "mountPath": "/artifacts"}


def test_the_worker_and_the_training_service_read_the_same_settings_file(rendered):
    docs = rendered["default"]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    for name in ("worker", "training"):
        pod = deployment(docs, name)["spec"]["template"]["spec"]
        env = env_of(pod["containers"][0])
        path = env["INTERNLM2_K8S_STAGE_POD"]["value"]
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["configMap"]["name"] == cm["metadata"]["name"]
        assert path.rsplit("/", 1)[1] in cm["data"]
        # Job folders on the shared claim, and the roots submitted paths must lie under.
        assert env["INTERNLM2_WORK_DIR"]["value"] == "/artifacts/jobs"
        assert env["INTERNLM2_ARTIFACTS_ROOTS"]["value"] == "/artifacts"
        assert env["INTERNLM2_MODELS_ROOTS"]["value"] == "/models"
    settings = stage_pod_settings(docs)
    assert settings["namespace"] == NAMESPACE and settings["labels"]["app.kubernetes.io/instance"] == RELEASE
    # The worker rolls when the settings change.
    annotations = deployment(docs, "worker")["spec"]["template"]["metadata"]["annotations"]
    assert len(annotations["checksum/stage-pod"]) == 64
