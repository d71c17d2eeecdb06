"""The Helm chart (deploy/helm/internlm2) rendered offline with helm-python-sdk and checked for real.

Each values set below is rendered once; every manifest is validated against the Kubernetes OpenAPI schema
(kubernetes-validate, strict: unknown fields fail) for the oldest supported and a current Kubernetes, and
the properties that matter for running LLM services on GPU nodes are asserted on the parsed objects.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from deploy_support import (
    CHART,
    CHART_VALUES,
    COMPONENTS,
    GATEWAY_HEALTH,
    GATEWAY_PORT,
    GATEWAY_READY,
    GRPC_SERVICES,
    HEALTH_SERVICE,
    METRICS_PORTS,
    PORTS,
    TOKEN,
    by_kind,
    component_of,
    deployment,
    env_of,
    render,
    render_notes,
    workloads,
)

pytestmark = pytest.mark.timeout(60)

GPU_RESOURCE = "nvidia.com/gpu"


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {case: render(values) for case, values in CHART_VALUES.items()}


def merged_component(case: str, name: str) -> dict:
    with helm.Chart.load(CHART) as chart:
        return chart.merge_values(CHART_VALUES[case])[name]


# ---- Kubernetes schema --------------------------------------------------------------------------

@pytest.mark.parametrize("kube_version", ["1.27.0", "1.36.0"])
@pytest.mark.parametrize("case", list(CHART_VALUES))
def test_every_manifest_validates_against_the_kubernetes_schema(rendered, case, kube_version):
    docs = rendered[case]
    assert docs
    unknown = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unknown.append(doc["kind"])
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{case}: {doc['kind']}/{doc['metadata']['name']} invalid for {kube_version}: {e.message}")
    # Only the prometheus-operator CRDs have no built-in schema; they are checked in test_deploy_monitoring.py.
    assert set(unknown) <= {"ServiceMonitor", "PrometheusRule"}


def test_the_validator_rejects_a_broken_manifest(rendered):
    """Guard for the test above: a gRPC probe on a named port is invalid (kubelet needs a number)."""
    dep = json.loads(json.dumps(deployment(rendered["default"], "inference")))
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, "1.30.0", strict=True)


# ---- GPU scheduling -----------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["default", "gpu", "cpu"])
def test_gpu_resources_and_scheduling_only_where_gpus_are_requested(rendered, case):
    docs = rendered[case]
    for obj, pod in workloads(docs):
        comp = component_of(obj)
        wanted = int(merged_component(case, comp).get("gpu", 0)) if comp in COMPONENTS else 0
        container = pod["containers"][0]
        res = container.get("resources", {})
        where = f"{case}: {obj['kind']}/{obj['metadata']['name']}"
        if wanted:
            assert res["requests"][GPU_RESOURCE] == wanted, where
            assert res["limits"][GPU_RESOURCE] == wanted, where
            assert container["image"].endswith("-cuda"), where
            assert {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"], where
        else:
            assert GPU_RESOURCE not in res.get("requests", {}) and GPU_RESOURCE not in res.get("limits", {}), where
            assert "runtimeClassName" not in pod and "tolerations" not in pod, where
            if comp in COMPONENTS:
                assert container["image"].endswith("-cpu"), where
        if case == "gpu" and wanted:
            assert pod["runtimeClassName"] == "nvidia"
            assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert pod["affinity"] == CHART_VALUES["gpu"]["gpu"]["affinity"]
            # Rolling a GPU deployment must not need a spare GPU.
            if obj["kind"] == "Deployment" and comp != "worker":
                assert obj["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


def test_cpu_values_give_a_deployment_without_any_gpu(rendered):
    docs = rendered["cpu"]
    assert GPU_RESOURCE not in json.dumps(docs)
    for comp in ("inference", "reward"):
        args = deployment(docs, comp)["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--device") + 1] == "cpu"
    worker = deployment(docs, "worker")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(worker)["DS_ACCELERATOR"]["value"] == "cpu"


def test_gpu_values_pass_device_and_dtype(rendered):
    args = deployment(rendered["gpu"], "inference")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--device") + 1] == "cuda"
    assert args[args.index("--dtype") + 1] == "bfloat16"


def _args(docs, component: str) -> list[str]:
    return deployment(docs, component)["spec"]["template"]["spec"]["containers"][0]["args"]


def test_engine_map_becomes_cli_flags():
    """inference.engine renders generically: camelCase -> --kebab-case, booleans as --x / --no-x, lists
    as the flag and its items, null left out, whole numbers without an exponent."""
    engine = {"maxNumSeqs": 128, "gpuMemoryUtilization": 0.85, "kvCacheMemoryBytes": 34359738368,
              "enablePrefixCaching": False, "enforceEager": True, "cudaGraphSizes": [1, 2, 4, 8],
              "maxModelLen": None}
    args = _args(render({"inference": {"engine": engine}}), "inference")
    tail = args[args.index("--device") + 2:]
    pairs = {}
    i = 0
    while i < len(tail):
        flag, values = tail[i], []
        i += 1
        while i < len(tail) and not tail[i].startswith("--"):
            values.append(tail[i])
            i += 1
        pairs[flag] = values
    assert pairs == {"--max-num-seqs": ["128"], "--gpu-memory-utilization": ["0.85"],
                     "--kv-cache-memory-bytes": ["34359738368"], "--no-enable-prefix-caching": [],
                     "--enforce-eager": [], "--cuda-graph-sizes": ["1", "2", "4", "8"]}
    # Only the inference server takes engine flags.
    assert "--max-num-seqs" not in _args(render({"inference": {"engine": engine}}), "reward")


# ---- probes, ports, services --------------------------------------------------------------------

@pytest.mark.parametrize("case", ["default", "cpu", "external-redis"])
def test_probes_are_native_grpc_health_checks_on_each_service_port(rendered, case):
    docs = rendered[case]
    services = by_kind(docs, "Service")
    for name in GRPC_SERVICES:
        dep = deployment(docs, name)
        container = dep["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": PORTS[name], "metrics": METRICS_PORTS[name]}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[kind]
            assert set(probe) - {"periodSeconds", "timeoutSeconds", "failureThreshold", "successThreshold",
                                 "initialDelaySeconds"} == {"grpc"}, f"{name} {kind} is not a gRPC probe"
            assert probe["grpc"] == {"port": PORTS[name], "service": HEALTH_SERVICE[name]}
        startup = container["startupProbe"]
        # Long enough to load a 20B checkpoint before liveness takes over.
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60
        svc = next(s for s in services.values() if component_of(s) == name)
        assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
            "grpc": (PORTS[name], "grpc"), "metrics": (METRICS_PORTS[name], "metrics")}
        assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


def test_with_tls_the_probes_run_the_cli_health_check_over_tls(rendered):
    """Kubelet's gRPC probe speaks plaintext only; with TLS on, the container checks itself over TLS."""
    docs = rendered["full"]
    for name in GRPC_SERVICES:
        container = deployment(docs, name)["spec"]["template"]["spec"]["containers"][0]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            cmd = container[kind]["exec"]["command"]
            assert "grpc" not in container[kind]
            assert cmd[:6] == ["internlm2", "health", "--address", f"127.0.0.1:{PORTS[name]}",
                               "--service", HEALTH_SERVICE[name]]
            flags = dict(zip(cmd[6::2], cmd[7::2], strict=True))
            assert flags["--ca-cert"] == "/etc/internlm2/tls/ca.crt"
            assert flags["--server-name"] == f"demo-internlm2-{name}.llm.svc"
            assert (flags["--client-cert"], flags["--client-key"]) == (
                "/etc/internlm2/tls/tls.crt", "/etc/internlm2/tls/tls.key")
            assert int(flags["--timeout"]) < container[kind]["timeoutSeconds"]


def test_probe_timing_can_be_overridden_per_component():
    docs = render({"inference": {"probes": {"startup": {"failureThreshold": 360}}}})
    container = deployment(docs, "inference")["spec"]["template"]["spec"]["containers"][0]
    assert container["startupProbe"]["failureThreshold"] == 360
    assert container["startupProbe"]["periodSeconds"] == 10
    tokenizer = deployment(docs, "tokenizer")["spec"]["template"]["spec"]["containers"][0]
    assert tokenizer["startupProbe"]["failureThreshold"] == 180


# ---- secrets ------------------------------------------------------------------------------------

def _secret_values(docs: list[dict]) -> list[str]:
    return [base64.b64decode(v).decode() for d in docs if d["kind"] == "Secret" for v in d.get("data", {}).values()]


@pytest.mark.parametrize("case", list(CHART_VALUES))
def test_secret_values_appear_only_inside_secret_objects(rendered, case):
    docs = rendered[case]
    secrets = _secret_values(docs)
    if case == "full":
        assert TOKEN in secrets
    elsewhere = json.dumps([d for d in docs if d["kind"] != "Secret"])
    for value in secrets:
        assert len(value) >= 16
        assert value not in elsewhere
        assert base64.b64encode(value.encode()).decode() not in elsewhere


def test_auth_token_reaches_every_service_through_a_secret_ref(rendered):
    docs = rendered["full"]
    assert TOKEN not in json.dumps([d for d in docs if d["kind"] != "Secret"])
    for name in GRPC_SERVICES:
        env = env_of(deployment(docs, name)["spec"]["template"]["spec"]["containers"][0])
        ref = env["INTERNLM2_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        secret = by_kind(docs, "Secret")[ref["name"]]
        assert base64.b64decode(secret["data"][ref["key"]]).decode() == TOKEN


def test_existing_secrets_are_referenced_and_not_created():
    docs = render({"auth": {"enabled": True, "existingSecret": "my-token", "existingSecretKey": "bearer"},
                   "redis": {"auth": {"existingSecret": "my-redis"}}})
    assert by_kind(docs, "Secret") == {}
    training = env_of(deployment(docs, "training")["spec"]["template"]["spec"]["containers"][0])
    assert training["INTERNLM2_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "my-token", "key": "bearer"}
    assert training["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "my-redis", "key": "redis-password"}


def test_tls_certificates_are_mounted_from_the_secret(rendered):
    docs = rendered["full"]
    for name in GRPC_SERVICES:
        pod = deployment(docs, name)["spec"]["template"]["spec"]
        args = pod["containers"][0]["args"]
        files = {args[args.index(f) + 1] for f in ("--tls-cert", "--tls-key", "--tls-client-ca")}
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "tls")
        assert mount["readOnly"] is True
        assert all(f.startswith(mount["mountPath"] + "/") for f in files)
        volume = next(v for v in pod["volumes"] if v["name"] == "tls")
        sources = volume["projected"]["sources"]
        assert {s["secret"]["name"] for s in sources} == {"internlm2-tls"}
        projected = {i["path"] for s in sources for i in s["secret"]["items"]}
        # The server's files plus ca.crt, the CA the probes verify the server with.
        assert {f.rsplit("/", 1)[1] for f in files} | {"ca.crt"} == projected


# ---- gateway ------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["default", "full"])
def test_gateway_fronts_the_services_with_http_probes(rendered, case):
    docs = rendered[case]
    dep = deployment(docs, "gateway")
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args[:2] == ["serve", "gateway"]
    assert args[args.index("--port") + 1] == str(GATEWAY_PORT)
    assert args[args.index("--metrics-port") + 1] == str(METRICS_PORTS["gateway"])
    for name in GRPC_SERVICES:
        assert args[args.index(f"--{name}") + 1] == f"demo-internlm2-{name}.llm.svc:{PORTS[name]}"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "http": GATEWAY_PORT, "metrics": METRICS_PORTS["gateway"]}
    assert container["startupProbe"]["httpGet"] == {"path": GATEWAY_HEALTH, "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": GATEWAY_HEALTH, "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": GATEWAY_READY, "port": "http"}
    assert container["image"].endswith("-cpu") and "tolerations" not in pod
    svc = next(s for s in by_kind(docs, "Service").values() if component_of(s) == "gateway")
    assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        "http": (GATEWAY_PORT, "http"), "metrics": (METRICS_PORTS["gateway"], "metrics")}
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    # `helm test` checks the gateway's readiness through that Service, with the CLI.
    probe = next(c for c in helm_test_pod(docs)["spec"]["containers"] if c["name"] == "gateway")
    assert probe["args"] == ["health", "--url", f"http://{svc['metadata']['name']}.llm.svc:{GATEWAY_PORT}{GATEWAY_READY}",
                             "--timeout", "10"]
    env = env_of(container)
    if case == "full":
        # The same token Secret as the gRPC services; their CA (and, for mTLS, a client certificate).
        inference_env = env_of(deployment(docs, "inference")["spec"]["template"]["spec"]["containers"][0])
        assert env["INTERNLM2_AUTH_TOKEN"] == inference_env["INTERNLM2_AUTH_TOKEN"]
        tls_dir = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "tls")
        assert args[args.index("--backend-ca-cert") + 1] == f"{tls_dir}/ca.crt"
        assert args[args.index("--backend-client-cert") + 1] == f"{tls_dir}/tls.crt"
        assert args[args.index("--backend-client-key") + 1] == f"{tls_dir}/tls.key"
    else:
        assert "INTERNLM2_AUTH_TOKEN" not in env and "--backend-ca-cert" not in args
        assert not by_kind(docs, "Ingress")


def helm_test_pod(docs: list[dict]) -> dict:
    (pod,) = [d for d in by_kind(docs, "Pod").values()
              if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    return pod


def test_helm_test_skips_the_gateway_when_it_is_disabled():
    containers = helm_test_pod(render({"gateway": {"enabled": False}}))["spec"]["containers"]
    assert [c["name"] for c in containers] == list(GRPC_SERVICES)


def test_gateway_ingress_with_tls(rendered):
    (ingress,) = by_kind(rendered["full"], "Ingress").values()
    spec = ingress["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == [{"secretName": "llm-example-com", "hosts": ["llm.example.com"]}]
    (rule,) = spec["rules"]
    assert rule["host"] == "llm.example.com"
    (path,) = rule["http"]["paths"]
    assert path["backend"] == {"service": {"name": "demo-internlm2-gateway", "port": {"name": "http"}}}
    assert path["path"] == "/" and path["pathType"] == "Prefix"


# ---- redis --------------------------------------------------------------------------------------

def test_internal_redis_statefulset_and_url(rendered):
    docs = rendered["default"]
    sts = by_kind(docs, "StatefulSet")["demo-internlm2-redis"]
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "8Gi"
    for name in ("training", "worker"):
        env = env_of(deployment(docs, name)["spec"]["template"]["spec"]["containers"][0])
        assert env["REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@demo-internlm2-redis:6379/0"
        # Kubernetes only expands $(REDIS_PASSWORD) when that variable is defined before REDIS_URL.
        names = [e["name"] for e in deployment(docs, name)["spec"]["template"]["spec"]["containers"][0]["env"]]
        assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL")
    redis_env = env_of(sts["spec"]["template"]["spec"]["containers"][0])
    assert redis_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "demo-internlm2-redis"


def test_external_redis_replaces_the_statefulset(rendered):
    docs = rendered["external-redis"]
    assert by_kind(docs, "StatefulSet") == {}
    assert not [d for d in docs if component_of(d) == "redis"]
    for name in ("training", "worker"):
        env = env_of(deployment(docs, name)["spec"]["template"]["spec"]["containers"][0])
        assert env["REDIS_URL"]["value"] == "rediss://:$(REDIS_PASSWORD)@redis.example.internal:6380/2"
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "platform-redis", "key": "password"}
    for name in ("tokenizer", "inference", "reward"):
        assert "REDIS_URL" not in env_of(deployment(docs, name)["spec"]["template"]["spec"]["containers"][0])


# ---- PDB, HPA, ServiceMonitor, NetworkPolicy ----------------------------------------------------

def test_pdb_and_hpa_only_when_enabled(rendered):
    for case in ("default", "gpu", "cpu", "external-redis"):
        kinds = {d["kind"] for d in rendered[case]}
        assert not kinds & {"PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor"}, case
    docs = rendered["full"]
    pdbs = {component_of(d): d["spec"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert pdbs.keys() == {"inference", "reward", "tokenizer", "gateway"}
    assert pdbs["inference"]["minAvailable"] == 1 and "maxUnavailable" not in pdbs["inference"]
    assert pdbs["tokenizer"]["maxUnavailable"] == "50%"
    for comp, spec in pdbs.items():
        assert spec["selector"]["matchLabels"] == deployment(docs, comp)["spec"]["selector"]["matchLabels"]


def test_inference_hpa_scales_on_waiting_requests(rendered):
    docs = rendered["full"]
    hpas = {component_of(d): d["spec"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"}
    assert hpas.keys() == {"inference", "reward", "gateway"}
    assert hpas["gateway"]["maxReplicas"] == 6 and hpas["gateway"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in deployment(docs, "gateway")["spec"]
    inf = hpas["inference"]
    assert inf["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment(docs, "inference")["metadata"]["name"]}
    assert (inf["minReplicas"], inf["maxReplicas"]) == (2, 8)
    assert inf["metrics"] == [{"type": "Pods", "pods": {
        "metric": {"name": "internlm2:num_requests_waiting"},
        "target": {"type": "AverageValue", "averageValue": "5"}}}]
    assert hpas["reward"]["metrics"][0]["resource"]["name"] == "cpu"
    # The HPA owns the replica count.
    assert "replicas" not in deployment(docs, "inference")["spec"]
    assert deployment(docs, "tokenizer")["spec"]["replicas"] == 1


def test_service_monitor_scrapes_every_component_metrics_port(rendered):
    docs = rendered["full"]
    (sm,) = by_kind(docs, "ServiceMonitor").values()
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = sm["spec"]["selector"]["matchLabels"]
    selected = [s for s in by_kind(docs, "Service").values()
                if selector.items() <= s["metadata"]["labels"].items()]
    assert {component_of(s) for s in selected} == set(COMPONENTS)
    for svc in selected:
        assert "metrics" in {p["name"] for p in svc["spec"]["ports"]}
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]


def test_network_policy_keeps_redis_to_training_and_workers(rendered):
    docs = rendered["default"]
    policies = {component_of(d): d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert policies.keys() == {*COMPONENTS, "redis"}
    (rule,) = policies["redis"]["ingress"]
    services_peer, stage_peer = rule["from"]
    assert services_peer["podSelector"]["matchExpressions"] == [
        {"key": "app.kubernetes.io/component", "operator": "In", "values": ["training", "worker"]}]
    # Multi-node stage pods of this release (the labels come from the worker and stage-pod.yaml; that the
    # generated pods carry them is checked in test_deploy_stage_pods.py).
    assert stage_peer == {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "internlm2-stage",
                                                          "app.kubernetes.io/instance": "demo"}}}
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    for name in GRPC_SERVICES:
        open_ports = {p["port"] for r in policies[name]["ingress"] for p in r["ports"]}
        assert open_ports == {PORTS[name], METRICS_PORTS[name]}
    assert {p["port"] for r in policies["gateway"]["ingress"] for p in r["ports"]} == {
        GATEWAY_PORT, METRICS_PORTS["gateway"]}
    assert not any(d["kind"] == "NetworkPolicy" for d in render({"networkPolicy": {"enabled": False}}))
    # Without stage pods Redis admits the training service and the workers only.
    no_stage = {component_of(d): d["spec"] for d in rendered["no-stage-pods"] if d["kind"] == "NetworkPolicy"}
    assert len(no_stage["redis"]["ingress"][0]["from"]) == 1


def test_restricted_grpc_sources_still_admit_the_gateway():
    docs = render({"networkPolicy": {"grpcFrom": [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}],
                                     "httpFrom": [{"namespaceSelector": {"matchLabels": {"name": "ingress"}}}]}})
    policies = {component_of(d): d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    gateway_pods = deployment(docs, "gateway")["spec"]["template"]["metadata"]["labels"]
    for name in GRPC_SERVICES:
        grpc_rule = next(r for r in policies[name]["ingress"] if r["ports"][0]["port"] == PORTS[name])
        selectors = [p["podSelector"]["matchLabels"] for p in grpc_rule["from"] if "podSelector" in p]
        assert any(sel.items() <= gateway_pods.items() for sel in selectors), name
    gw_rule = next(r for r in policies["gateway"]["ingress"] if r["ports"][0]["port"] == GATEWAY_PORT)
    assert gw_rule["from"] == [{"namespaceSelector": {"matchLabels": {"name": "ingress"}}}]


# ---- volumes and security -----------------------------------------------------------------------

@pytest.mark.parametrize("case", ["default", "full"])
def test_model_volume_is_mounted_read_only(rendered, case):
    docs = rendered[case]
    claim = "team-models" if case == "full" else "demo-internlm2-models"
    pvcs = by_kind(docs, "PersistentVolumeClaim")
    assert (claim in pvcs) == (case == "default")
    if case == "default":
        # Read-only by many nodes: five Deployments mount it and need not share a node.
        assert pvcs[claim]["spec"]["accessModes"] == ["ReadOnlyMany"]
    mounted = set()
    for obj, pod in workloads(docs):
        for vol in pod.get("volumes", []):
            if vol["name"] == "models":
                assert vol["persistentVolumeClaim"] == {"claimName": claim, "readOnly": True}
        for m in pod["containers"][0].get("volumeMounts", []):
            if m["name"] == "models":
                assert m["readOnly"] is True and m["mountPath"] == "/models"
                mounted.add(component_of(obj))
    # The training service checks at submit that model paths in stage configs exist.
    assert mounted == {"tokenizer", "inference", "reward", "training", "worker"}
    for name in ("tokenizer", "inference", "reward"):
        args = deployment(docs, name)["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--model") + 1].startswith("/models/")


def test_a_new_read_only_many_claim_can_start_from_a_snapshot():
    snapshot = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "checkpoints-2026-12"}
    pvcs = by_kind(render({"model": {"persistence": {"dataSource": snapshot}}}), "PersistentVolumeClaim")
    assert pvcs["demo-internlm2-models"]["spec"]["dataSource"] == snapshot


def test_inference_and_reward_can_serve_a_trained_checkpoint_from_the_artifacts_claim(rendered):
    docs = rendered["serve-trained"]
    for name in ("inference", "reward"):
        pod = deployment(docs, name)["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["artifacts"]["persistentVolumeClaim"] == {"claimName": "team-artifacts", "readOnly": True}
        assert "models" not in volumes, "only the claim the checkpoint comes from is mounted"
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["artifacts"] == {"name": "artifacts", "mountPath": "/artifacts", "readOnly": True}
        model = _args(docs, name)[_args(docs, name).index("--model") + 1]
        assert model == CHART_VALUES["serve-trained"][name]["modelPath"]
    # The tokenizer still reads the models claim; the worker writes to the same artifacts claim.
    assert "models" in {v["name"] for v in deployment(docs, "tokenizer")["spec"]["template"]["spec"]["volumes"]}
    worker = {v["name"]: v for v in deployment(docs, "worker")["spec"]["template"]["spec"]["volumes"]}
    assert worker["artifacts"]["persistentVolumeClaim"] == {"claimName": "team-artifacts"}


@pytest.mark.parametrize(("values", "message"), [
    ({"inference": {"modelSource": "artifacts"}},
     "inference.modelPath /models/internlm2-chat-7b is not under artifacts.mountPath /artifacts"),
    ({"reward": {"modelPath": "/artifacts/jobs/1/reward_model"}},
     "reward.modelPath /artifacts/jobs/1/reward_model is not under model.mountPath /models"),
    ({"tokenizer": {"modelSource": "artifacts", "modelPath": "/artifacts/x"},
      "artifacts": {"persistence": {"enabled": False}}, "stagePods": {"enabled": False}},
     "tokenizer.modelSource is artifacts but artifacts.persistence.enabled is false"),
])
def test_a_model_path_outside_its_source_is_refused_at_render(values, message):
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(values)


def test_workers_get_shared_memory_and_a_writable_artifacts_volume(rendered):
    pod = deployment(rendered["full"], "worker")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert volumes["artifacts"]["persistentVolumeClaim"] == {"claimName": "demo-internlm2-artifacts"}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "team-datasets", "readOnly": True}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["dshm"]["mountPath"] == "/dev/shm"
    assert not mounts["artifacts"].get("readOnly", False)
    assert mounts["data"] == {"name": "data", "mountPath": "/data", "readOnly": True}
    # Artifacts persist by default, on a claim the workers and the stage pods of every node share.
    pvc = by_kind(rendered["default"], "PersistentVolumeClaim")["demo-internlm2-artifacts"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # Only without persistence (and so without stage pods) do they live in an emptyDir.
    no_pvc = deployment(rendered["no-stage-pods"], "worker")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in no_pvc["volumes"]}["artifacts"] == {"name": "artifacts", "emptyDir": {}}


@pytest.mark.parametrize("case", list(CHART_VALUES))
def test_every_pod_runs_non_root_with_a_hardened_container(rendered, case):
    for obj, pod in workloads(rendered[case]):
        where = f"{case}: {obj['kind']}/{obj['metadata']['name']}"
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0, where
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        writable = set()
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert "privileged" not in sc, where
            writable |= {m["mountPath"] for m in c.get("volumeMounts", []) if not m.get("readOnly")}
        assert "/tmp" in writable, where
        if component_of(obj) != "worker":
            assert pod.get("automountServiceAccountToken") is False, where


def test_worker_is_probed_on_its_metrics_endpoint(rendered):
    container = deployment(rendered["default"], "worker")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:2] == ["serve", "worker"]
    assert container["ports"] == [{"name": "metrics", "containerPort": METRICS_PORTS["worker"], "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert "readinessProbe" not in container


def test_only_the_worker_gets_kubernetes_api_rights(rendered):
    docs = rendered["default"]
    (role,) = by_kind(docs, "Role").values()
    (binding,) = by_kind(docs, "RoleBinding").values()
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    worker_pod = deployment(docs, "worker")["spec"]["template"]["spec"]
    assert binding["subjects"][0]["name"] == worker_pod["serviceAccountName"]
    assert worker_pod["automountServiceAccountToken"] is True
    for name in (*GRPC_SERVICES, "gateway"):
        assert deployment(docs, name)["spec"]["template"]["spec"]["serviceAccountName"] != worker_pod[
            "serviceAccountName"]
    # Namespaced, and never Secrets: stage pods get the Redis password by secretKeyRef, not from the worker.
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    assert not {r for rule in role["rules"] for r in rule["resources"]} & {"secrets", "*"}
    # Without multi-node stages the worker gets no API token at all.
    no_stage = rendered["no-stage-pods"]
    assert not by_kind(no_stage, "Role") and not by_kind(no_stage, "RoleBinding")
    assert deployment(no_stage, "worker")["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_long_release_names_stay_within_kubernetes_name_limits():
    docs = render({"fullnameOverride": "a-very-long-release-name-" * 3})
    for doc in docs:
        name = doc["metadata"]["name"]
        # StatefulSet pods get a controller-revision-hash label of <name>-<10 characters>.
        assert len(name) <= (52 if doc["kind"] == "StatefulSet" else 63), name
        assert not name.startswith("-") and "--" not in name, name
    redis_host = by_kind(docs, "StatefulSet").popitem()[0]
    url = env_of(deployment(docs, "training")["spec"]["template"]["spec"]["containers"][0])["REDIS_URL"]["value"]
    assert f"@{redis_host}:6379/" in url


@pytest.mark.parametrize("component", COMPONENTS)
def test_each_component_can_be_switched_off(component):
    docs = render({component: {"enabled": False}})
    assert not [d for d in docs if component_of(d) == component]
    others = {component_of(d) for d in docs if d["kind"] == "Deployment"}
    assert others == set(COMPONENTS) - {component}
    if component in GRPC_SERVICES:
        assert f"--{component}" not in _args(docs, "gateway"), "the gateway only calls services that run"


# ---- values.schema.json -------------------------------------------------------------------------

BAD_VALUES = [
    ({"inference": {"gpu": -1}}, "at '/inference/gpu': minimum"),
    # The engine drives one device: a second GPU would sit idle.
    ({"inference": {"gpu": 2}}, "at '/inference/gpu': maximum: got 2, want 1"),
    ({"reward": {"gpu": 4}}, "at '/reward/gpu': maximum: got 4, want 1"),
    ({"inference": {"modelSource": "s3"}}, "at '/inference/modelSource'"),
    ({"inference": {"engine": {"max-num-seqs": 8}}}, "at '/inference/engine': additional properties 'max-num-seqs'"),
    ({"inference": {"engine": {"maxNumSeqs": {"value": 8}}}}, "at '/inference/engine/maxNumSeqs'"),
    ({"stagePods": {"kueueQueue": "Team A"}}, "at '/stagePods/kueueQueue'"),
    ({"stagePods": {"shmSize": "lots"}}, "at '/stagePods/shmSize'"),
    ({"gateway": {"ingress": {"hosts": [{"paths": [{"path": "/"}]}]}}}, "at '/gateway/ingress/hosts/0'"),
    ({"inference": {"gpus": 1}}, "additional properties 'gpus' not allowed"),
    ({"infernce": {"enabled": True}}, "additional properties 'infernce' not allowed"),
    ({"tokenizer": {"port": 70000}}, "at '/tokenizer/port': maximum"),
    ({"training": {"port": "grpc"}}, "at '/training/port': got string, want integer"),
    ({"inference": {"autoscaling": {"metric": "gpu"}}}, "value must be one of 'cpu', 'waitingRequests'"),
    ({"inference": {"resources": {"limits": {"memory": "lots"}}}}, "at '/inference/resources/limits/memory'"),
    ({"reward": {"modelPath": "models/reward"}}, "at '/reward/modelPath'"),
    ({"tls": {"enabled": True}}, "at '/tls/existingSecret': minLength"),
    ({"auth": {"enabled": True}}, "at '/auth/token': minLength"),
    ({"auth": {"enabled": True, "token": "short"}}, "at '/auth/token': minLength: got 5, want 16"),
    ({"redis": {"internal": {"enabled": False}}}, "at '/redis/externalUrl': minLength"),
    ({"redis": {"internal": {"enabled": False}, "externalUrl": "redis://:hunter2@redis:6379/0",
                "auth": {"existingSecret": "r"}}}, "at '/redis/externalUrl'"),
    ({"redis": {"internal": {"enabled": False}, "externalUrl": "redis://redis:6379/0"}},
     "at '/redis/auth/existingSecret': minLength"),
    ({"worker": {"queues": []}}, "at '/worker/queues': minItems"),
    ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy'"),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES, ids=[m for _, m in BAD_VALUES])
def test_schema_rejects_bad_values_with_a_message_naming_the_value(values, message):
    with pytest.raises(helm.HelmValuesError) as err:
        render(values)
    assert message in str(err.value)


def test_templates_reject_what_the_schema_cannot_express():
    with pytest.raises(helm.HelmRenderError, match="minReplicas \\(5\\) must not exceed maxReplicas \\(2\\)"):
        render({"inference": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}})
    # Without the CA the gateway would call TLS services in plaintext.
    with pytest.raises(helm.HelmRenderError, match=r"needs tls\.serverCaKey"):
        render({"tls": {"enabled": True, "existingSecret": "t", "serverCaKey": ""}})


# ---- lint and NOTES -----------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CHART_VALUES))
def test_chart_lints_clean_in_strict_mode(case):
    report = helm.lint(CHART, CHART_VALUES[case], strict=True, kube_version="v1.30.0")
    assert report["errors"] == []
    # severity 1 = info (only "icon is recommended"); 2 = warning, 3 = error.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_the_readme_values_example_renders_and_validates():
    """The production values file shown in deploy/README.md is a working one."""
    readme = (CHART.parents[1] / "README.md").read_text()
    values = yaml.safe_load(re.search(r"```yaml\n(.*?)```", readme, re.S).group(1))
    docs = render(values)
    for doc in docs:
        with contextlib.suppress(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(doc, "1.30.0", strict=True)
    assert deployment(docs, "inference")["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        GPU_RESOURCE] == 1
    assert not by_kind(docs, "StatefulSet")


def test_notes_tell_how_to_reach_the_services():
    notes = render_notes(CHART_VALUES["full"])
    for name in GRPC_SERVICES:
        assert f"demo-internlm2-{name}.llm.svc:{PORTS[name]}" in notes
    assert "kubectl -n llm port-forward svc/demo-internlm2-inference 50052:50052" in notes
    assert "http://demo-internlm2-gateway.llm.svc:8000/v1  and  https://llm.example.com/v1" in notes
    assert "helm test demo" in notes
    assert TOKEN not in notes
