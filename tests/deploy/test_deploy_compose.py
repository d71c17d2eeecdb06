"""docker-compose.yml: valid against the Compose Specification's JSON schema, and wired the way local
development needs (profiles, GPU reservations, health-gated start order, read-only models).

No Docker engine runs here; the schema is vendored in tests/data/compose-spec (see SOURCE.md there).
The commands themselves are checked against the real CLI in tests/deploy/test_deploy_cli.py.
"""

from __future__ import annotations

import copy

import jsonschema
import pytest
from deploy_support import (
    GATEWAY_PORT,
    GATEWAY_READY,
    HEALTH_SERVICE,
    METRICS_PORTS,
    PORTS,
    compose,
    compose_raw,
    compose_schema,
)

pytestmark = pytest.mark.timeout(30)

CPU_ONLY = {"redis", "tokenizer", "training", "gateway"}
VARIANTS = {"inference", "reward", "worker"}


def _validator() -> jsonschema.protocols.Validator:
    schema = compose_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.mark.parametrize("stage", ["as written", "interpolated"])
def test_compose_file_validates_against_the_compose_spec(stage):
    doc = compose_raw() if stage == "as written" else compose()
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator().iter_errors(doc)]
    assert errors == []


@pytest.mark.parametrize(("mutate", "path"), [
    (lambda d: d["services"]["tokenizer"].update(healthcheck={"test": ["CMD"], "intervall": "5s"}),
     "services/tokenizer/healthcheck"),
    (lambda d: d["services"]["inference-gpu"]["deploy"]["resources"]["reservations"]["devices"][0].pop(
        "capabilities"), "services/inference-gpu/deploy/resources/reservations/devices/0"),
    (lambda d: d["services"]["worker-cpu"].update(depends_on={"redis": {"condition": "healthy"}}),
     "services/worker-cpu/depends_on"),
])
def test_the_schema_catches_mistakes(mutate, path):
    """Guard for the test above: typical mistakes in this file are schema errors."""
    doc = copy.deepcopy(compose())
    mutate(doc)
    errors = ["/".join(map(str, e.absolute_path)) for e in _validator().iter_errors(doc)]
    assert any(e.startswith(path) for e in errors), errors


def test_services_and_profiles():
    services = compose()["services"]
    expected = CPU_ONLY | {f"{v}-{p}" for v in VARIANTS for p in ("cpu", "gpu")}
    assert set(services) == expected
    for name in CPU_ONLY:
        assert "profiles" not in services[name], f"{name} must always start"
    for v in VARIANTS:
        assert services[f"{v}-cpu"]["profiles"] == ["cpu"]
        assert services[f"{v}-gpu"]["profiles"] == ["gpu"]


def test_gpu_only_through_device_reservations_in_the_gpu_profile():
    services = compose()["services"]
    for name, svc in services.items():
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        if name.endswith("-gpu"):
            assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], name
            assert svc["build"]["dockerfile"] == "deploy/docker/Dockerfile.cuda", name
            assert svc["image"].endswith("-cuda")
        else:
            assert devices is None and "gpus" not in svc and "runtime" not in svc, name
            if name != "redis":
                assert svc["build"]["dockerfile"] == "deploy/docker/Dockerfile.cpu", name
                assert svc["image"].endswith("-cpu")
    for v in ("inference", "reward"):
        assert _flag(services[f"{v}-gpu"]["command"], "--device") == "cuda"
        assert _flag(services[f"{v}-cpu"]["command"], "--device") == "cpu"
    assert services["worker-cpu"]["environment"]["DS_ACCELERATOR"] == "cpu"


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def _grpc_services() -> dict[str, tuple[str, dict]]:
    """{compose service: (platform service, definition)} for the four gRPC services and their variants."""
    out = {}
    for name, svc in compose()["services"].items():
        base = name.rsplit("-", 1)[0] if name.endswith(("-cpu", "-gpu")) else name
        if base in PORTS:
            out[name] = (base, svc)
    return out


def test_grpc_services_listen_publish_and_report_health_on_the_contract_ports():
    for name, (base, svc) in _grpc_services().items():
        cmd = svc["command"]
        assert cmd[:2] == ["serve", base], name
        assert _flag(cmd, "--port") == str(PORTS[base])
        assert _flag(cmd, "--metrics-port") == str(METRICS_PORTS[base])
        assert _flag(cmd, "--host") == "0.0.0.0"
        published = {p.rsplit(":", 2)[-1] for p in svc["ports"]}
        assert published == {str(PORTS[base]), str(METRICS_PORTS[base])}
        assert all(p.startswith("127.0.0.1:") for p in svc["ports"]), "dev ports bind to loopback by default"
        test = svc["healthcheck"]["test"]
        assert test[:3] == ["CMD", "internlm2", "health"], name
        assert _flag(test, "--address") == f"127.0.0.1:{PORTS[base]}"
        assert _flag(test, "--service") == HEALTH_SERVICE[base]
        assert svc["healthcheck"]["start_period"] in ("2m", "30m")
        if base in ("inference", "reward"):
            assert svc["healthcheck"]["start_period"] == "30m", "loading a large model takes minutes"
            assert svc["networks"]["default"]["aliases"] == [base], "cpu and gpu variants answer to one name"


def test_start_order_waits_for_healthy_dependencies():
    services = compose()["services"]
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name in ("training", "worker-cpu", "worker-gpu"):
        deps = services[name]["depends_on"]
        assert deps == {"redis": {"condition": "service_healthy"}}, name
    for svc in services.values():
        for dep, cond in svc.get("depends_on", {}).items():
            assert cond["condition"] == "service_healthy"
            assert "healthcheck" in services[dep], f"{dep} is waited on but has no healthcheck"
    for name in ("worker-cpu", "worker-gpu"):
        worker = services[name]
        assert _flag(worker["command"], "--metrics-port") == str(METRICS_PORTS["worker"])
        assert f"http://127.0.0.1:{METRICS_PORTS['worker']}/metrics" in " ".join(worker["healthcheck"]["test"])
    redis_url = "redis://redis:6379/0"
    assert _flag(services["training"]["command"], "--redis-url") == redis_url
    assert services["worker-gpu"]["environment"]["REDIS_URL"] == redis_url


def test_models_are_mounted_read_only_and_outputs_go_to_the_artifacts_volume():
    doc = compose()
    for name, svc in doc["services"].items():
        if name == "redis":
            continue
        mounts = {m.split(":")[1]: m for m in svc.get("volumes", [])}
        if name not in ("training", "gateway"):
            assert mounts["/models"] == "./models:/models:ro", name
        if "--model" in svc["command"]:
            assert _flag(svc["command"], "--model").startswith("/models/")
        if name.startswith("worker"):
            assert mounts["/artifacts"] == "artifacts:/artifacts"
            assert svc["shm_size"] == "8gb"
        elif "/artifacts" in mounts:
            assert mounts["/artifacts"].endswith(":ro")
    assert set(doc["volumes"]) == {"redis-data", "artifacts"}


def test_containers_are_hardened_like_the_chart():
    for name, svc in compose()["services"].items():
        if name == "redis":
            continue
        assert svc["read_only"] is True, name
        assert svc["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in svc["security_opt"], name
        assert {t.split(":")[0] for t in svc["tmpfs"]} == {"/tmp", "/home/internlm2"}, name
        assert "user" not in svc, f"{name}: the image's non-root user must not be overridden"
        # The token is passed through from the shell, never written in the file.
        assert svc["environment"]["INTERNLM2_AUTH_TOKEN"] is None, name


def test_the_gateway_fronts_the_grpc_services_by_their_compose_names():
    services = compose()["services"]
    gw = services["gateway"]
    cmd = gw["command"]
    assert cmd[:2] == ["serve", "gateway"]
    assert (_flag(cmd, "--port"), _flag(cmd, "--metrics-port")) == (str(GATEWAY_PORT), str(METRICS_PORTS["gateway"]))
    # Each backend by the name both profile variants answer to, on its contract port.
    names = {n for svc_name, svc in services.items()
             for n in [svc_name, *svc.get("networks", {}).get("default", {}).get("aliases", [])]}
    for backend, port in PORTS.items():
        host, _, backend_port = _flag(cmd, f"--{backend}").rpartition(":")
        assert host in names and backend_port == str(port), backend
    assert {p.rsplit(":", 2)[-1] for p in gw["ports"]} == {str(GATEWAY_PORT), str(METRICS_PORTS["gateway"])}
    health = " ".join(gw["healthcheck"]["test"])
    assert f"http://127.0.0.1:{GATEWAY_PORT}{GATEWAY_READY}" in health
    assert gw["healthcheck"]["start_period"] == "30m", "ready only once the models behind it are loaded"


def test_engine_flags_come_from_one_variable():
    """INTERNLM2_ENGINE_ARGS adds any engine flag to both inference variants (and nothing when unset)."""
    plain = compose()["services"]
    tuned = compose({"INTERNLM2_ENGINE_ARGS": "--max-num-seqs 32 --enforce-eager"})["services"]
    for name in ("inference-cpu", "inference-gpu"):
        assert tuned[name]["command"] == [*plain[name]["command"], "--max-num-seqs", "32", "--enforce-eager"]
        assert plain[name]["command"][-2:] in (["--dtype", "float32"], ["--dtype", "bfloat16"])
    assert tuned["reward-cpu"]["command"] == plain["reward-cpu"]["command"]
