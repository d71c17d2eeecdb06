"""The chart's Grafana dashboard and PrometheusRule alerts, checked against what the services really export.

Every metric name used in a dashboard query, an alert expression or the inference HPA must be one that a
live service exposes: a tiny inference server runs on loopback (real engine, real gRPC, one generation so
its histograms and counters have samples) and its /metrics is scraped; the gateway's and the worker's
registries are built in-process from their own metrics classes. The PrometheusRule is validated against
the shape of the prometheus-operator CRD (written out below: kubernetes-validate has no CRD schemas).
"""

from __future__ import annotations

import json
import re
import urllib.request

import jsonschema
import pytest
from deploy_support import by_kind, deployment, render
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from services_fixtures import BackgroundApp, tiny_checkpoints

pytestmark = pytest.mark.timeout(180)

MONITORING = {"metrics": {"grafanaDashboard": {"enabled": True},
                          "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
              "inference": {"autoscaling": {"enabled": True}}}
# Names in the platform's namespace; Prometheus' own functions and labels never contain a colon.
METRIC_NAME = re.compile(r"internlm2:[A-Za-z0-9_:]+")

# Sample names each metric type exposes (OpenMetrics/Prometheus text format).
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",),
            "unknown": ("",), "untyped": ("",)}


def exposed_names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {s.name for s in family.samples}
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names


@pytest.fixture(scope="module")
def live_metric_names(tmp_path_factory) -> set[str]:
    """What the services' /metrics endpoints expose: a live inference server, the gateway's and the
    worker's registries."""
    from internlm2.services.common import GrpcApp, ServerConfig
    from internlm2.services.gateway.metrics import GatewayMetrics
    from internlm2.services.inference import InferenceService
    from internlm2.services.worker import WorkerMetrics
    from internlm2_client import InferenceClient

    policy, _ = tiny_checkpoints(tmp_path_factory.mktemp("tiny"))
    app = GrpcApp(ServerConfig("inference", host="127.0.0.1", port=0, metrics_port=0), [InferenceService(policy)])
    server = BackgroundApp(app).start()
    try:
        with InferenceClient(server.address, timeout=60) as client:
            client.generate("metrics, please", max_new_tokens=4, temperature=0.0, ignore_eos=True)
        url = f"http://127.0.0.1:{server.app.metrics_port}/metrics"
        names = exposed_names(urllib.request.urlopen(url, timeout=10).read().decode())
    finally:
        server.stop()
    gateway = GatewayMetrics()
    gateway.observe("/v1/chat/completions", "POST", 200, 0.5)
    names |= exposed_names(generate_latest(gateway.registry).decode())
    registry = CollectorRegistry()
    worker = WorkerMetrics(registry)
    worker.finished.labels("internlm2.run_stage", "FAILURE").inc()
    names |= exposed_names(generate_latest(registry).decode())
    return names


@pytest.fixture(scope="module")
def monitoring_docs() -> list[dict]:
    return render(MONITORING)


def dashboard(docs: list[dict]) -> dict:
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and "internlm2.json" in d.get("data", {})]
    return json.loads(cm["data"]["internlm2.json"])


def dashboard_queries(dash: dict) -> dict[str, str]:
    out = {f"panel {p['title']!r} {t['refId']}": t["expr"] for p in dash["panels"] for t in p.get("targets", [])}
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            out[f"variable {var['name']}"] = var["query"]["query"]
    return out


def alert_expressions(docs: list[dict]) -> dict[str, str]:
    (rule,) = by_kind(docs, "PrometheusRule").values()
    return {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}


def unknown_names(expressions: dict[str, str], known: set[str]) -> dict[str, set[str]]:
    out = {}
    for where, expr in expressions.items():
        missing = set(METRIC_NAME.findall(expr)) - known
        if missing:
            out[where] = missing
    return out


# ---- every name exists in a live registry -------------------------------------------------------

def test_dashboard_queries_use_metrics_the_services_export(monitoring_docs, live_metric_names):
    queries = dashboard_queries(dashboard(monitoring_docs))
    assert len(queries) >= 20
    assert unknown_names(queries, live_metric_names) == {}


def test_alerts_use_metrics_the_services_export(monitoring_docs, live_metric_names):
    alerts = alert_expressions(monitoring_docs)
    assert len(alerts) >= 6
    assert unknown_names(alerts, live_metric_names) == {}


def test_the_inference_hpa_scales_on_an_exported_gauge(monitoring_docs, live_metric_names):
    (hpa,) = [d for d in by_kind(monitoring_docs, "HorizontalPodAutoscaler").values()
              if d["spec"]["scaleTargetRef"]["name"] == deployment(monitoring_docs, "inference")["metadata"]["name"]]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] in live_metric_names


def test_the_dashboard_shows_the_vllm_parity_metrics(monitoring_docs):
    """Prefix cache, preemptions, prefill/decode time, iteration tokens and cache config (vLLM's names)."""
    used = {n for expr in dashboard_queries(dashboard(monitoring_docs)).values() for n in METRIC_NAME.findall(expr)}
    for name in ("prefix_cache_queries_total", "prefix_cache_hits_total", "num_preemptions_total",
                 "request_prefill_time_seconds_bucket", "request_decode_time_seconds_bucket",
                 "iteration_tokens_total_bucket", "cache_config_info", "gateway_requests_total"):
        assert f"internlm2:{name}" in used, name


def test_the_name_check_catches_a_misspelled_metric(live_metric_names):
    """Guard for the tests above: a name no service exports is reported, with where it is used."""
    exprs = {"panel x": "rate(internlm2:prompt_token_total[5m])", "panel y": "internlm2:kv_cache_usage_perc"}
    assert unknown_names(exprs, live_metric_names) == {"panel x": {"internlm2:prompt_token_total"}}


# ---- the dashboard and the PrometheusRule as objects ----------------------------------------------

def test_the_dashboard_configmap_is_picked_up_by_grafana(monitoring_docs):
    (cm,) = [d for d in monitoring_docs if d["kind"] == "ConfigMap" and "internlm2.json" in d.get("data", {})]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = dashboard(monitoring_docs)
    assert dash["uid"] and dash["title"] == "InternLM2"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            refs = [t["refId"] for t in panel["targets"]]
            assert refs and len(refs) == len(set(refs)), panel["title"]
    for where, expr in dashboard_queries(dash).items():
        assert _balanced(expr), where
    # Off by default: no dashboard, no rule.
    default = render({})
    assert not by_kind(default, "PrometheusRule")
    assert not [d for d in default if d["kind"] == "ConfigMap" and "internlm2.json" in d.get("data", {})]


def _balanced(expr: str) -> bool:
    stack, pairs = [], {")": "(", "]": "[", "}": "{"}
    for ch in re.sub(r'"[^"]*"', "", expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack


# The spec of monitoring.coreos.com/v1 PrometheusRule (prometheus-operator's CRD, its fields and
# constraints), strict about unknown fields.
DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {"type": "object", "additionalProperties": False, "properties": {"groups": {
            "type": "array",
            "items": {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
                "name": {"type": "string", "minLength": 1},
                "interval": {"type": "string", "pattern": DURATION},
                "query_offset": {"type": "string", "pattern": DURATION},
                "limit": {"type": "integer"},
                "labels": STRING_MAP,
                "partial_response_strategy": {"type": "string"},
                "rules": {"type": "array", "items": {
                    "type": "object", "required": ["expr"], "additionalProperties": False,
                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                    "properties": {
                        "alert": {"type": "string"}, "record": {"type": "string"},
                        "expr": {"type": ["string", "integer"]},
                        "for": {"type": "string", "pattern": DURATION},
                        "keep_firing_for": {"type": "string", "minLength": 1, "pattern": DURATION},
                        "labels": STRING_MAP, "annotations": STRING_MAP}}}}}}}},
    },
}


def test_the_prometheus_rule_has_the_crd_shape(monitoring_docs):
    (rule,) = by_kind(monitoring_docs, "PrometheusRule").values()
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft202012Validator(PROMETHEUS_RULE_SCHEMA).iter_errors(rule)]
    assert errors == []
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    names = [g["name"] for g in rule["spec"]["groups"]]
    assert len(names) == len(set(names)), "group names are the CRD's list-map key"
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            assert r["labels"]["severity"] in ("warning", "critical")
            assert r["annotations"]["summary"] and _balanced(r["expr"]), r["alert"]
            # Scoped to this release's namespace, so two releases do not alert on each other.
            assert 'namespace="llm"' in r["expr"], r["alert"]


@pytest.mark.parametrize("mutate", [
    lambda r: r["spec"]["groups"][0]["rules"][0].pop("expr"),
    lambda r: r["spec"]["groups"][0]["rules"][0].update({"for": "10 minutes"}),
    lambda r: r["spec"]["groups"][0]["rules"][0].update({"record": "x"}),
    lambda r: r["spec"]["groups"][0].update({"evaluation": "1m"}),
])
def test_the_crd_shape_check_rejects_broken_rules(monitoring_docs, mutate):
    """Guard for the test above."""
    rule = json.loads(json.dumps(next(iter(by_kind(monitoring_docs, "PrometheusRule").values()))))
    mutate(rule)
    assert list(jsonschema.Draft202012Validator(PROMETHEUS_RULE_SCHEMA).iter_errors(rule))


def test_thresholds_come_from_the_values():
    docs = render({"metrics": {"prometheusRule": {"enabled": True, "thresholds": {"waitingRequests": 3,
                                                                                  "errorRatio": 0.01}}}})
    alerts = alert_expressions(docs)
    assert alerts["InternLM2InferenceBacklog"].endswith("> 3")
    assert alerts["InternLM2GrpcErrors"].rstrip().endswith("> 0.01")
