"""Multi-node stages: a Kubernetes indexed Job + headless Service, built with the ``kubernetes``
client models, and the supervisor that follows it.

Objects (all named ``il2-<job>-<stage index>-<attempt>``, labelled ``internlm2/job``):
    ConfigMap  the run spec (``run.json``) every pod reads
    Service    headless (clusterIP None, publishNotReadyAddresses): stable DNS
               ``<name>-<i>.<name>`` for pod i, so rank 0's address is known before it is ready
    Job        completionMode Indexed, completions = parallelism = num_nodes, backoffLimit 0 (the
               runtime's lease/attempt logic decides about restarts); pod i runs
               ``torchrun --nnodes N --node-rank $JOB_COMPLETION_INDEX --master-addr <name>-0.<name>``
               on ``python -m internlm2.plugins.runtime.launch``
Events come back through Redis (``RedisChannel``), so pods need REDIS_URL; outputs go to a shared
volume (a PVC mounted at the same path as the workers' work dir).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s

from .launch import run_spec

LAUNCH_MODULE = "internlm2.plugins.runtime.launch"
RENDEZVOUS_PORT = 29500
SPEC_DIR = "/etc/internlm2"


@dataclass(frozen=True)
class ClusterSettings:
    namespace: str = "default"
    image: str = "internlm2-platform:latest"
    pvc_name: str | None = None  # shared volume holding the job work dir
    mount_path: str = "/data"
    service_account: str | None = None


def resource_name(job_id: str, index: int, attempt: int) -> str:
    return f"il2-{job_id[:16].lower()}-{index}-{attempt}"


def build_manifests(name: str, run_spec: dict[str, Any], launch: dict[str, Any], cluster: ClusterSettings,
                    env: dict[str, str]) -> list[Any]:
    """[ConfigMap, Service, Job] as kubernetes client model objects."""
    nodes = int(launch.get("num_nodes", 1))
    nproc = int(launch.get("nproc_per_node", 1))
    gpus = int(launch.get("gpus_per_node", 0))
    labels = {"app.kubernetes.io/name": "internlm2-stage", "internlm2/job": run_spec["job_id"][:63],
              "internlm2/stage": run_spec["name"][:63]}
    meta = k8s.V1ObjectMeta(name=name, namespace=cluster.namespace, labels=labels)
    config_map = k8s.V1ConfigMap(api_version="v1", kind="ConfigMap", metadata=meta,
                                 data={"run.json": json.dumps(run_spec)})
    service = k8s.V1Service(
        api_version="v1", kind="Service", metadata=meta,
        spec=k8s.V1ServiceSpec(
            cluster_ip="None", publish_not_ready_addresses=True,
            selector={"batch.kubernetes.io/job-name": name},
            ports=[k8s.V1ServicePort(name="rendezvous", port=RENDEZVOUS_PORT, target_port=RENDEZVOUS_PORT)],
        ),
    )
    command = [
        "python", "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc-per-node={nproc}",
        "--node-rank=$(JOB_COMPLETION_INDEX)", f"--master-addr={name}-0.{name}",
        f"--master-port={RENDEZVOUS_PORT}", "-m", LAUNCH_MODULE, f"{SPEC_DIR}/run.json",
    ]
    env_vars = [k8s.V1EnvVar(name=k, value=v) for k, v in sorted({**env, **launch.get("env", {})}.items())]
    env_vars.append(k8s.V1EnvVar(name="JOB_COMPLETION_INDEX", value_from=k8s.V1EnvVarSource(
        field_ref=k8s.V1ObjectFieldSelector(
            field_path="metadata.annotations['batch.kubernetes.io/job-completion-index']"))))
    mounts = [k8s.V1VolumeMount(name="run-spec", mount_path=SPEC_DIR, read_only=True)]
    volumes = [k8s.V1Volume(name="run-spec", config_map=k8s.V1ConfigMapVolumeSource(name=name))]
    if cluster.pvc_name:
        mounts.append(k8s.V1VolumeMount(name="work", mount_path=cluster.mount_path))
        volumes.append(k8s.V1Volume(name="work", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
            claim_name=cluster.pvc_name)))
    # /dev/shm for NCCL and dataloaders: the container default (64 MiB) is too small.
    mounts.append(k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"))
    volumes.append(k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory")))
    resources = k8s.V1ResourceRequirements(limits={"nvidia.com/gpu": str(gpus)}) if gpus else None
    container = k8s.V1Container(
        name="stage", image=launch.get("image") or cluster.image, command=command, env=env_vars,
        volume_mounts=mounts, resources=resources,
        ports=[k8s.V1ContainerPort(container_port=RENDEZVOUS_PORT, name="rendezvous")],
    )
    job = k8s.V1Job(
        api_version="batch/v1", kind="Job", metadata=meta,
        spec=k8s.V1JobSpec(
            completion_mode="Indexed", completions=nodes, parallelism=nodes, backoff_limit=0,
            ttl_seconds_after_finished=3600,
            template=k8s.V1PodTemplateSpec(
                metadata=k8s.V1ObjectMeta(labels=labels),
                spec=k8s.V1PodSpec(restart_policy="Never", subdomain=name, containers=[container],
                                   volumes=volumes, service_account_name=cluster.service_account),
            ),
        ),
    )
    return [config_map, service, job]


def to_dicts(objects: list[Any]) -> list[dict[str, Any]]:
    """Plain manifests (camelCase keys, as ``kubectl apply -f`` takes them)."""
    api = k8s.ApiClient()
    return [api.sanitize_for_serialization(o) for o in objects]


def cluster_settings_from_env() -> ClusterSettings:
    import os

    return ClusterSettings(
        namespace=os.environ.get("INTERNLM2_K8S_NAMESPACE", "default"),
        image=os.environ.get("INTERNLM2_K8S_IMAGE", ClusterSettings.image),
        pvc_name=os.environ.get("INTERNLM2_K8S_PVC"),
        mount_path=os.environ.get("INTERNLM2_K8S_MOUNT", ClusterSettings.mount_path),
        service_account=os.environ.get("INTERNLM2_K8S_SERVICE_ACCOUNT"),
    )


def supervise_kubernetes(store, job, index: int, claim, settings, cluster: ClusterSettings | None = None):
    """Create the objects, follow the Job (events from Redis, lease heartbeat, cancel), delete them,
    and finish the stage. Needs cluster credentials (in-cluster or kubeconfig). The pods see the
    job's cancel key themselves; the Job is deleted ``cancel_grace_s`` after a cancel at the latest."""
    from kubernetes import config as k8s_config

    from .channels import RedisChannel
    from .records import JobState

    cluster = cluster or cluster_settings_from_env()
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()
    st = job.stages[index]
    launch = st.config.get("launch", {})
    name = resource_name(job.job_id, index, claim.attempt)
    channel = RedisChannel(store.redis_url, store._k("stage-events", job.job_id, index, claim.attempt),
                           store._k("cancel", job.job_id))
    spec = run_spec(job_id=job.job_id, name=st.name, stage=st.stage, index=index, attempt=claim.attempt,
                    config=st.config, output_dir=st.output_dir, inputs=store.stage_inputs(job, index),
                    channel=channel.spec())
    cm, svc, kjob = build_manifests(name, spec, launch, cluster, {"REDIS_URL": store.redis_url})
    core, batch = k8s.CoreV1Api(), k8s.BatchV1Api()
    core.create_namespaced_config_map(cluster.namespace, cm)
    core.create_namespaced_service(cluster.namespace, svc)
    batch.create_namespaced_job(cluster.namespace, kjob)
    result, last_beat, cancel_at = None, 0.0, None
    try:
        while result is None:
            events = [json.loads(e) for e in (channel.r.lpop(channel.events_key, 256) or [])]
            result = next((e for e in events if e["type"] == "result"), None)
            if not store.record(job.job_id, index, claim.token, [e for e in events if e["type"] != "result"]):
                return None
            status = batch.read_namespaced_job_status(name, cluster.namespace).status
            if result is None and ((status.failed or 0) > 0 or (status.succeeded or 0) >= launch.get("num_nodes", 1)):
                break
            now = time.monotonic()
            if now - last_beat > settings.lease_ttl_s / 3:
                if not store.heartbeat(job.job_id, index, claim.token, settings.lease_ttl_s):
                    return None
                last_beat = now
            if cancel_at is None and store.cancel_requested(job.job_id):
                cancel_at = now
            if cancel_at is not None and now - cancel_at > settings.cancel_grace_s:
                result = {"state": "CANCELLED", "error": "deleted after cancel", "metrics": {}}
            time.sleep(max(1.0, settings.poll_s))
    finally:
        for delete in (lambda: batch.delete_namespaced_job(name, cluster.namespace,
                                                            propagation_policy="Foreground"),
                       lambda: core.delete_namespaced_service(name, cluster.namespace),
                       lambda: core.delete_namespaced_config_map(name, cluster.namespace)):
            with contextlib.suppress(Exception):  # already gone
                delete()
    if result is not None:
        state, error, metrics = JobState(result["state"]), result["error"], result["metrics"]
    else:
        state, error, metrics = JobState.FAILED, f"kubernetes job {name} failed", {}
    if not store.finish_stage(job.job_id, index, claim.token, state, error, metrics):
        return None
    return state
