"""Shared by tests/deploy/test_deploy_*.py: render the Helm chart, load docker-compose.yml, read Dockerfiles.

Everything here is offline: the chart renders through helm-python-sdk (Helm's Go SDK in a bundled shared
library, no helm binary, no cluster), compose variables are interpolated the way Compose does for the
`${VAR}` / `${VAR:-default}` forms used in our file, and Dockerfiles are parsed line by line.
"""

from __future__ import annotations

import json
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "deploy" / "helm" / "internlm2"
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILES = {"cpu": REPO / "deploy" / "docker" / "Dockerfile.cpu",
               "cuda": REPO / "deploy" / "docker" / "Dockerfile.cuda"}

# The shared contract (docs/HELPERS.md): gRPC and metrics ports, health service names.
GRPC_SERVICES = ("tokenizer", "inference", "reward", "training")
PORTS = {"tokenizer": 50051, "inference": 50052, "reward": 50053, "training": 50054}
METRICS_PORTS = {"tokenizer": 9101, "inference": 9102, "reward": 9103, "training": 9104, "worker": 9105,
                 "gateway": 9106}
# The OpenAI-compatible HTTP gateway (CONTRACTS.md): its HTTP port, liveness and readiness paths.
GATEWAY_PORT, GATEWAY_HEALTH, GATEWAY_READY = 8000, "/health", "/ready"
COMPONENTS = (*GRPC_SERVICES, "gateway", "worker")
HEALTH_SERVICE = {"tokenizer": "internlm2.v1.TokenizerService", "inference": "internlm2.v1.InferenceService",
                  "reward": "internlm2.v1.RewardService", "training": "internlm2.v1.TrainingService"}

RELEASE, NAMESPACE = "demo", "llm"

# Every engine setting of `internlm2 serve inference` (vLLM's flag names, CONTRACTS.md) as a chart
# `inference.engine` map; tests/deploy/test_deploy_cli.py renders it and has the real CLI parse the result.
ENGINE_EXAMPLE = {
    "maxNumSeqs": 128, "maxNumBatchedTokens": 8192, "blockSize": 16, "numGpuBlocksOverride": 4096,
    "gpuMemoryUtilization": 0.9, "kvCacheMemoryBytes": 34359738368, "maxQueueSize": 2048, "maxModelLen": 8192,
    "enforceEager": True, "cudaGraphSizes": [1, 2, 4, 8, 16], "enablePrefixCaching": False,
    "enableChunkedPrefill": True,
}
# The same settings as compose takes them (INTERNLM2_ENGINE_ARGS).
ENGINE_ARGS_EXAMPLE = ("--max-num-seqs 32 --max-num-batched-tokens 4096 --block-size 16 --max-model-len 4096 "
                       "--gpu-memory-utilization 0.85 --max-queue-size 256 --no-enable-prefix-caching")

TOKEN = "t0ken-for-the-deploy-tests-4f1c9a"

# Values sets the chart is rendered with (tests/deploy/test_deploy_helm.py, tests/deploy/test_deploy_cli.py).
CHART_VALUES = {
    "default": {},
    # A GPU cluster set up by the NVIDIA GPU operator: runtime class, GFD node labels, 4-GPU workers,
    # stage pods admitted by Kueue.
    "gpu": {
        "gpu": {"runtimeClassName": "nvidia", "nodeSelector": {"nvidia.com/gpu.present": "true"},
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [
                        {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3"]}]}]}}}},
        "inference": {"gpu": 1, "dtype": "bfloat16",
                      "engine": {"maxNumSeqs": 128, "maxNumBatchedTokens": 8192, "gpuMemoryUtilization": 0.9,
                                 "enablePrefixCaching": True}},
        "reward": {"gpu": 1},
        "worker": {"gpu": 4},
        "stagePods": {"kueueQueue": "team-a", "priorityClassName": "training",
                      "nodeSelector": {"node.kubernetes.io/instance-type": "p5.48xlarge"},
                      "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "training",
                                       "effect": "NoSchedule"}]},
    },
    # The same chart on a cluster without GPUs.
    "cpu": {"inference": {"gpu": 0}, "reward": {"gpu": 0}, "worker": {"gpu": 0}, "stagePods": {"gpu": False}},
    "external-redis": {
        "redis": {"internal": {"enabled": False}, "externalUrl": "rediss://redis.example.internal:6380/2",
                  "auth": {"existingSecret": "platform-redis", "existingSecretPasswordKey": "password"}},
    },
    # Every switch on: auth token and TLS from Secrets, HPA/PDB, ServiceMonitor, gateway Ingress, a data claim.
    "full": {
        "auth": {"enabled": True, "token": TOKEN},
        "tls": {"enabled": True, "existingSecret": "internlm2-tls", "clientAuth": True},
        "inference": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 8},
                      "pdb": {"enabled": True, "minAvailable": 1}},
        "reward": {"autoscaling": {"enabled": True, "metric": "cpu", "maxReplicas": 3}, "pdb": {"enabled": True}},
        "tokenizer": {"pdb": {"enabled": True, "maxUnavailable": "50%"}},
        "gateway": {"pdb": {"enabled": True}, "autoscaling": {"enabled": True, "maxReplicas": 6},
                    "ingress": {"enabled": True, "className": "nginx",
                                "hosts": [{"host": "llm.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}],
                                "tls": [{"secretName": "llm-example-com", "hosts": ["llm.example.com"]}]}},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
                    "grafanaDashboard": {"enabled": True}, "prometheusRule": {"enabled": True}},
        "data": {"persistence": {"enabled": True, "existingClaim": "team-datasets"}},
        "model": {"persistence": {"existingClaim": "team-models"}},
    },
    # Serve what a training job wrote: inference and reward read their checkpoints from the artifacts claim.
    "serve-trained": {
        "inference": {"modelSource": "artifacts", "modelPath": "/artifacts/jobs/0a1b2c3d4e5f6a7b/01-sft/final"},
        "reward": {"modelSource": "artifacts",
                   "modelPath": "/artifacts/jobs/0a1b2c3d4e5f6a7b/02-reward_model/final"},
        "artifacts": {"persistence": {"existingClaim": "team-artifacts"}},
    },
    # Single-node training only: no stage pods, no API rights, artifacts in an emptyDir.
    "no-stage-pods": {"stagePods": {"enabled": False}, "artifacts": {"persistence": {"enabled": False}}},
}


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """All manifests the chart renders for `values` (NOTES.txt left out), as dicts."""
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def render_notes(values: dict[str, Any] | None = None) -> str:
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    return next(text for path, text in out.items() if path.endswith("NOTES.txt"))


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def component_of(doc: dict) -> str | None:
    return doc["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def workloads(docs: list[dict]) -> list[tuple[dict, dict]]:
    """(object, pod spec) for every Deployment, StatefulSet and Pod."""
    out = []
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            out.append((d, d["spec"]["template"]["spec"]))
        elif d["kind"] == "Pod":
            out.append((d, d["spec"]))
    return out


def deployment(docs: list[dict], component: str) -> dict:
    found = [d for d in docs if d["kind"] == "Deployment" and component_of(d) == component]
    assert len(found) == 1, f"expected one {component} Deployment, got {len(found)}"
    return found[0]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def stage_pod_settings(docs: list[dict]) -> dict[str, Any]:
    """The stage-pod settings file (stage-pod.yaml) as the worker reads it, parsed out of the rendered ConfigMap."""
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and "stage-pod.yaml" in d.get("data", {})]
    return yaml.safe_load(cm["data"]["stage-pod.yaml"])


# ---- docker-compose.yml -------------------------------------------------------------------------

_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}|\$\$")


def interpolate(node: Any, env: dict[str, str] | None = None) -> Any:
    """Compose-style interpolation of `${VAR}`, `${VAR:-default}`, `${VAR-default}` and `$$`."""
    env = env or {}
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if isinstance(node, str):
        def sub(m: re.Match) -> str:
            if m.group(0) == "$$":
                return "$"
            return env.get(m.group("name")) or (m.group("default") or "")
        return _VAR.sub(sub, node)
    return node


@cache
def compose_raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml with YAML anchors merged, variables substituted (`env`, else their defaults) and
    string commands split into words, as Compose does (substitution first, so a variable can add flags)."""
    doc = interpolate(compose_raw(), env)
    for svc in doc["services"].values():
        if isinstance(svc.get("command"), str):
            svc["command"] = shlex.split(svc["command"])
    return doc


@cache
def compose_schema() -> dict[str, Any]:
    return json.loads((REPO / "tests" / "data" / "compose-spec" / "compose-spec.json").read_text())


# ---- Dockerfiles --------------------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    lines, buf = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        lines.append(buf + stripped)
        buf = ""
    out = []
    for line in lines:
        instr, _, args = line.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    """Instructions of the last build stage (what the image runs)."""
    instrs = dockerfile_instructions(path)
    last_from = max(i for i, (k, _) in enumerate(instrs) if k == "FROM")
    return instrs[last_from:]


def exec_form(path: Path, instruction: str) -> list[str]:
    """The JSON (exec) form of the final stage's ENTRYPOINT or CMD."""
    args = [a for k, a in final_stage(path) if k == instruction]
    assert args, f"{path.name} has no {instruction}"
    return json.loads(args[-1])
