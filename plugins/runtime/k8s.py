"""Multi-node stages on Kubernetes: the stage-pod settings, the manifests, RBAC_RULES and the launcher.

Stage-pod settings: ONE YAML file, path in ``INTERNLM2_K8S_STAGE_POD`` (``RuntimeSettings.k8s_stage_pod``;
the chart mounts it at ``/etc/internlm2/stage-pod/stage-pod.yaml``), keys as in docs/CONTRACTS
(:class:`StagePodSettings`): namespace, image, pull policy/secrets, serviceAccountName, the
artifacts / models / data claims, redis {url, passwordSecret}, security contexts, scheduling
(nodeSelector, tolerations, affinity, runtimeClassName, priorityClassName), resources, shmSize,
kueueQueue, labels, annotations.

:func:`build_manifests` makes, for run ``attempt`` of stage ``index`` (all named
``il2-<job>-<index>-<attempt>``, labelled ``internlm2/job``):
    ConfigMap  the run spec (``run.json``) every pod reads — no secret in it
    Service    headless (publishNotReadyAddresses): ``<name>-0.<name>`` is rank 0's address
    Job        Indexed, completions = parallelism = num_nodes, backoffLimit 0 (the runtime's lease
               decides about restarts); pod i runs ``torchrun --node-rank $JOB_COMPLETION_INDEX``
               on ``python -m internlm2.plugins.runtime.launch``; with ``kueueQueue`` it is created
               suspended and labelled ``kueue.x-k8s.io/queue-name`` for gang admission.
Pods reach Redis (events, cancel, fence) with ``REDIS_URL``, whose password comes only from a
``secretKeyRef`` (``$(REDIS_PASSWORD)`` is expanded by the kubelet).

:data:`RBAC_RULES` lists every API call :class:`KubernetesLauncher` makes (the chart's Role covers it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import urllib3
import yaml
from kubernetes import client as k8s

from .launchers import LAUNCH_MODULE
from .records import Job
from .runspec import run_spec
from .settings import RuntimeSettings
from .store import RedisStore

logger = logging.getLogger(__name__)

RENDEZVOUS_PORT = 29500
SPEC_DIR = "/etc/internlm2/run"
# Where torchrun, Triton, DeepSpeed (JIT ops), matplotlib and W&B write: /tmp and the images' $HOME
# (deploy/docker, the non-root user's home). Both are emptyDirs, so the root filesystem can stay read-only.
SCRATCH_DIRS = {"tmp": "/tmp", "home": "/home/internlm2"}
KUEUE_LABEL = "kueue.x-k8s.io/queue-name"

RBAC_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": [""], "resources": ["configmaps", "services"], "verbs": ["create", "delete"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "delete"]},
    {"apiGroups": ["batch"], "resources": ["jobs/status"], "verbs": ["get"]},
]


@dataclass(frozen=True)
class StagePodSettings:
    namespace: str
    image: str
    imagePullPolicy: str = "IfNotPresent"
    imagePullSecrets: list[dict[str, str]] = field(default_factory=list)
    serviceAccountName: str | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    redis: dict[str, Any] = field(default_factory=dict)
    podSecurityContext: dict[str, Any] = field(default_factory=dict)
    securityContext: dict[str, Any] = field(default_factory=dict)
    nodeSelector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    affinity: dict[str, Any] = field(default_factory=dict)
    runtimeClassName: str | None = None
    priorityClassName: str | None = None
    resources: dict[str, Any] = field(default_factory=dict)
    shmSize: str | None = None
    kueueQueue: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> StagePodSettings:
        data = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown stage-pod keys {sorted(unknown)}")
        for key in ("namespace", "image"):
            if not data.get(key):
                raise ValueError(f"{path}: {key} is required")
        return cls(**data)


def resource_name(job_id: str, index: int, attempt: int) -> str:
    return f"il2-{job_id[:16].lower()}-{index}-{attempt}"


def _claim_volume(name: str, claim: dict[str, Any]) -> tuple[Any, Any]:
    ro = bool(claim.get("readOnly", False))
    return (k8s.V1Volume(name=name, persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                claim_name=claim["claimName"], read_only=ro or None)),
            k8s.V1VolumeMount(name=name, mount_path=claim["mountPath"], read_only=ro or None))


def _redis_env(pod: StagePodSettings) -> list[Any]:
    redis = pod.redis or {}
    env = []
    secret = redis.get("passwordSecret")
    if secret:  # must precede REDIS_URL so that $(REDIS_PASSWORD) expands in it
        env.append(k8s.V1EnvVar(name="REDIS_PASSWORD", value_from=k8s.V1EnvVarSource(
            secret_key_ref=k8s.V1SecretKeySelector(name=secret["name"], key=secret["key"]))))
    if redis.get("url"):
        env.append(k8s.V1EnvVar(name="REDIS_URL", value=redis["url"]))
    return env


def build_manifests(name: str, spec: dict[str, Any], launch: dict[str, Any], pod: StagePodSettings) -> list[Any]:
    """[ConfigMap, Service, Job] (kubernetes client models) for one multi-node run."""
    nodes = int(launch.get("num_nodes", 1))
    nproc = int(launch.get("nproc_per_node", 1))
    gpus = int(launch.get("gpus_per_node", 0))
    labels = {**pod.labels, "app.kubernetes.io/name": "internlm2-stage", "app.kubernetes.io/component": "stage",
              "internlm2/job": spec["job_id"][:63], "internlm2/stage": spec["name"][:63]}
    job_labels = {**labels, **({KUEUE_LABEL: pod.kueueQueue} if pod.kueueQueue else {})}
    meta = k8s.V1ObjectMeta(name=name, namespace=pod.namespace, labels=labels, annotations=pod.annotations or None)
    config_map = k8s.V1ConfigMap(api_version="v1", kind="ConfigMap", metadata=meta,
                                 data={"run.json": json.dumps(spec)})
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
    env = _redis_env(pod)
    env += [k8s.V1EnvVar(name=k, value=v) for k, v in sorted(launch.get("env", {}).items())]
    env.append(k8s.V1EnvVar(name="JOB_COMPLETION_INDEX", value_from=k8s.V1EnvVarSource(
        field_ref=k8s.V1ObjectFieldSelector(
            field_path="metadata.annotations['batch.kubernetes.io/job-completion-index']"))))
    volumes = [k8s.V1Volume(name="run-spec", config_map=k8s.V1ConfigMapVolumeSource(name=name))]
    mounts = [k8s.V1VolumeMount(name="run-spec", mount_path=SPEC_DIR, read_only=True)]
    for vol_name, claim in (("artifacts", pod.artifacts), ("models", pod.models), ("data", pod.data)):
        if claim:
            volume, mount = _claim_volume(vol_name, claim)
            volumes.append(volume)
            mounts.append(mount)
    for vol_name, path in SCRATCH_DIRS.items():
        volumes.append(k8s.V1Volume(name=vol_name, empty_dir=k8s.V1EmptyDirVolumeSource()))
        mounts.append(k8s.V1VolumeMount(name=vol_name, mount_path=path))
    # /dev/shm for NCCL and dataloaders: the container default (64 MiB) is too small.
    volumes.append(k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(
        medium="Memory", size_limit=pod.shmSize)))
    mounts.append(k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"))
    resources = {k: dict(v) for k, v in (pod.resources or {}).items()}
    if gpus:
        for part in ("requests", "limits"):
            resources.setdefault(part, {})["nvidia.com/gpu"] = str(gpus)
    # Hardening and scheduling come as the chart's own dicts (camelCase); the client serialises
    # dicts as they are, so they pass through unchanged.
    container = k8s.V1Container(
        name="stage", image=launch.get("image") or pod.image, image_pull_policy=pod.imagePullPolicy,
        command=command, env=env, volume_mounts=mounts, resources=resources or None,
        security_context=pod.securityContext or None,
        ports=[k8s.V1ContainerPort(container_port=RENDEZVOUS_PORT, name="rendezvous")],
    )
    pod_spec = k8s.V1PodSpec(
        restart_policy="Never", subdomain=name, containers=[container], volumes=volumes,
        service_account_name=pod.serviceAccountName, automount_service_account_token=False,
        image_pull_secrets=pod.imagePullSecrets or None, node_selector=pod.nodeSelector or None,
        runtime_class_name=pod.runtimeClassName, priority_class_name=pod.priorityClassName,
        security_context=pod.podSecurityContext or None, tolerations=pod.tolerations or None,
        affinity=pod.affinity or None,
    )
    job = k8s.V1Job(
        api_version="batch/v1", kind="Job",
        metadata=k8s.V1ObjectMeta(name=name, namespace=pod.namespace, labels=job_labels,
                                  annotations=pod.annotations or None),
        spec=k8s.V1JobSpec(
            completion_mode="Indexed", completions=nodes, parallelism=nodes, backoff_limit=0,
            ttl_seconds_after_finished=3600, suspend=True if pod.kueueQueue else None,
            template=k8s.V1PodTemplateSpec(
                metadata=k8s.V1ObjectMeta(labels=labels, annotations=pod.annotations or None), spec=pod_spec),
        ),
    )
    return [config_map, service, job]


def to_dicts(objects: list[Any]) -> list[dict[str, Any]]:
    """Plain manifests (camelCase keys, as ``kubectl apply -f`` takes them)."""
    api = k8s.ApiClient()
    return [api.sanitize_for_serialization(o) for o in objects]


class KubernetesRun:
    def __init__(self, store: RedisStore, events_key: str, name: str, namespace: str, nodes: int, attempt: int):
        self.store, self.events_key, self.name, self.namespace = store, events_key, name, namespace
        self.nodes, self.attempt = nodes, attempt
        self.core, self.batch = k8s.CoreV1Api(), k8s.BatchV1Api()
        self._deleted = False

    def poll(self) -> int | None:
        try:
            status = self.batch.read_namespaced_job_status(self.name, self.namespace).status
        except k8s.ApiException as exc:
            if exc.status == 404:  # deleted behind our back: the run is gone
                return 1
            logger.warning("kubernetes job %s: status unavailable (%s); retrying", self.name, exc.reason)
            return None
        except (OSError, urllib3.exceptions.HTTPError) as exc:  # API server unreachable: lease and watchdog hold
            logger.warning("kubernetes job %s: API server unreachable (%s); retrying", self.name, exc)
            return None
        if (status.failed or 0) > 0:
            return 1
        if (status.succeeded or 0) >= self.nodes:
            return 0
        return None

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self.store.pop_list(self.events_key, 256)]

    def request_cancel(self) -> None:
        """Pods see the job's cancel key themselves."""

    def signal(self, sig: int) -> None:
        grace = 0 if sig == signal.SIGKILL else None
        with contextlib.suppress(Exception):  # already gone
            self.batch.delete_namespaced_job(self.name, self.namespace, propagation_policy="Foreground",
                                             grace_period_seconds=grace)

    def wait(self, timeout: float) -> bool:
        return True  # the API server deletes the pods; nothing of ours to reap

    def close(self) -> list[dict[str, Any]]:
        if not self._deleted:
            self._deleted = True
            self.signal(signal.SIGTERM)
            for delete in (self.core.delete_namespaced_service, self.core.delete_namespaced_config_map):
                with contextlib.suppress(Exception):
                    delete(self.name, self.namespace)
        return []

    def failure(self, rc: int) -> str:
        return f"kubernetes job {self.name} failed (see its pods' logs)"

    def keepalive(self, renewed_at: float) -> None:
        """Pods check their fence in Redis when they commit; nothing local to feed."""


class KubernetesLauncher:
    """``lease_ttl_s`` / ``watchdog_s``: the pods stop themselves when the stage's fence key (renewed
    with the lease) has not been renewed for ``watchdog_s`` — a lost or partitioned worker cannot
    delete its Job, and another worker may start the stage once the lease expires."""

    def __init__(self, pod: StagePodSettings, store: RedisStore, lease_ttl_s: float = 30.0,
                 watchdog_s: float = 21.0):
        self.pod, self.store = pod, store
        self.lease_ttl_s, self.watchdog_s = lease_ttl_s, watchdog_s

    @classmethod
    def from_settings(cls, settings: RuntimeSettings) -> KubernetesLauncher:
        return cls(StagePodSettings.load(settings.k8s_stage_pod), RedisStore(settings.redis_url),
                   settings.lease_ttl_s, settings.kill_after_s)

    def start(self, job: Job, index: int, attempt: int) -> KubernetesRun:
        from kubernetes import config as k8s_config

        try:
            k8s_config.load_incluster_config()
        except k8s_config.ConfigException:
            k8s_config.load_kube_config()
        st = job.stages[index]
        launch = st.config.get("launch", {})
        name = resource_name(job.job_id, index, attempt)
        events_key = self.store.stage_events_key(job.job_id, index, attempt)
        channel = {"type": "redis", "url": "", "events": events_key, "cancel": self.store.cancel_key(job.job_id),
                   "fence": self.store.fence_key(job.job_id, index), "attempt": attempt}
        spec = run_spec(job, index, attempt, channel)
        spec["watchdog"] = {"fence_key": channel["fence"], "lease_ttl_s": self.lease_ttl_s,
                            "deadline_s": self.watchdog_s}
        cm, svc, kjob = build_manifests(name, spec, launch, self.pod)
        run = KubernetesRun(self.store, events_key, name, self.pod.namespace, int(launch.get("num_nodes", 1)),
                            attempt)
        run.core.create_namespaced_config_map(self.pod.namespace, cm)
        run.core.create_namespaced_service(self.pod.namespace, svc)
        run.batch.create_namespaced_job(self.pod.namespace, kjob)
        return run
