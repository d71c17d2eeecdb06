"""Every error the gateway answers, over raw HTTP (httpx): OpenAI's JSON shape
``{"error": {"message", "type", "param", "code"}}`` with the right status, from the real services on
loopback. Also bearer auth, request ids reaching the engine, metrics, readiness and the drain."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading

import httpx
import pytest
from gateway_fixtures import BackgroundGateway, gateway_config, start_model_services
from services_fixtures import BackgroundApp, tiny_checkpoints, wait_for

from internlm2.core.engine import EngineConfig
from internlm2.services.common import GrpcApp, ServerConfig
from internlm2.services.inference import InferenceService
from internlm2_client import InferenceClient

pytestmark = pytest.mark.timeout(240)

MODEL = "tiny-chat"
TOKEN = "s3cret-token"
USER = [{"role": "user", "content": "hello"}]
CLI = "import sys; from internlm2_client.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tiny_checkpoints(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def models(tmp_path_factory, checkpoints):
    policy, reward = checkpoints
    server = start_model_services(tmp_path_factory.mktemp("unused"), auth_token=TOKEN, policy=policy, reward=reward)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(models):
    backends = {"inference": models.address, "tokenizer": models.address, "reward": models.address}
    server = BackgroundGateway(gateway_config(backends, auth_token=TOKEN)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(gateway):
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
        yield client


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


def _chat(**fields) -> dict:
    return {"model": MODEL, "messages": USER, "max_tokens": 4, **fields}


# ---- 400: the parameter is named --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        # Ranges are the engine's rules; its field violation comes back under the client's name.
        (_chat(temperature=-1), "temperature"),
        (_chat(top_p=0), "top_p"),
        (_chat(presence_penalty=9), "presence_penalty"),
        (_chat(max_tokens=0), "max_tokens"),
        (_chat(max_completion_tokens=100000), "max_completion_tokens"),
        (_chat(logprobs=True, top_logprobs=99), "top_logprobs"),
        (_chat(stop=["x"] * 40), "stop"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"model": MODEL, "messages": []}, "messages"),
        (_chat(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools[0].function.name"),
        (_chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "wrong"}}}]),
         "tools[0].function.parameters"),
        ({"model": MODEL, "messages": [*USER, {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{bad"}}]}]},
         "messages[1].tool_calls[0].function.arguments"),
        # Shape problems are the gateway's own (pydantic), named by their JSON path.
        ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": USER}, "model"),
        (_chat(temperature="hot"), "temperature"),
        # Unknown and unsupported parameters are refused, never ignored.
        (_chat(frobnicate=True), "frobnicate"),
        (_chat(logit_bias={"5": 1.0}), "logit_bias"),
        (_chat(tool_choice="required", tools=[{"type": "function", "function": {"name": "f"}}]), "tool_choice"),
        (_chat(top_logprobs=2), "top_logprobs"),
        (_chat(stream_options={"include_usage": True}), "stream_options"),
        (_chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
         "messages[0].content[0].type"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_chat_parameters_are_400_naming_the_parameter(http, body, param):
    error = _error(http.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    assert param.split("[")[0].split(".")[0] in error["message"] or error["param"] in error["message"]


def test_a_bad_streaming_request_is_refused_before_the_stream_starts(http):
    response = http.post("/v1/chat/completions", json=_chat(stream=True, top_p=5))
    assert _error(response, 400)["param"] == "top_p"
    assert response.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": MODEL, "prompt": "x", "echo": True}, "echo"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "suffix": "y"}, "suffix"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "best_of": 3}, "best_of"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -2}, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": [10**9]}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": ""}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": USER}, "prompt"),
        ("/detokenize", {"tokens": [10**9]}, "tokens"),
        ("/score", {"text_1": "q", "text_2": []}, "text_2"),
        ("/pooling", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ],
)
def test_other_endpoints_name_the_parameter(http, path, body, param):
    assert _error(http.post(path, json=body), 400)["param"] == param


def test_body_that_is_not_json_is_400(http):
    error = _error(http.post("/v1/chat/completions", content=b"{not json",
                             headers={"content-type": "application/json"}), 400)
    assert error["code"] == "invalid_json"


# ---- 401, 404 --------------------------------------------------------------------------------------


def test_bearer_auth(gateway):
    url = gateway.url + "/v1/models"
    missing = _error(httpx.get(url), 401)
    assert missing["type"] == "authentication_error" and missing["code"] == "missing_api_key"
    wrong = httpx.get(url, headers={"Authorization": "Bearer not-it"})
    assert _error(wrong, 401)["code"] == "invalid_api_key"
    assert wrong.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    # Probes and the playground page need no token (they hold no data).
    assert httpx.get(gateway.url + "/health").status_code == 200
    assert httpx.get(gateway.url + "/").status_code == 200


def test_unknown_model_and_route_are_404(http):
    error = _error(http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER}), 404)
    assert error["param"] == "model" and error["code"] == "model_not_found" and MODEL in error["message"]
    assert _error(http.post("/score", json={"model": "other", "text_1": "q", "text_2": "a"}), 404)["param"] == "model"
    assert _error(http.get("/v1/nothing-here"), 404)["code"] == "not_found"
    # No training service behind this gateway: its routes say so.
    assert _error(http.get("/v1/internlm2/jobs"), 503)["code"] == "backend_not_configured"


# ---- request ids, metrics, readiness ----------------------------------------------------------------


def test_request_id_travels_to_the_engine(http, models):
    """The client's X-Request-Id is the engine's request id: Abort by that id through gRPC ends the stream."""
    request_id = "gateway-test-abort-1"
    body = _chat(max_tokens=400, ignore_eos=True, stream=True, temperature=0)
    with http.stream("POST", "/v1/chat/completions", json=body, headers={"X-Request-Id": request_id}) as response:
        assert response.headers["x-request-id"] == request_id
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert f"chatcmpl-{request_id}" in first
        with InferenceClient(models.address, token=TOKEN, timeout=30) as grpc_client:
            assert grpc_client.abort(request_id)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    assert any('"finish_reason":"abort"' in line for line in rest)
    # Without one, the gateway makes one and returns it.
    assert len(http.get("/v1/models").headers["x-request-id"]) == 32


def test_metrics_count_requests_by_route(http, gateway):
    http.post("/v1/chat/completions", json=_chat())
    text = httpx.get(f"http://127.0.0.1:{gateway.server.metrics_port}/metrics").text
    assert 'internlm2:gateway_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in text
    assert "internlm2:gateway_time_to_first_token_seconds" in text


def test_ready_reports_each_backend(gateway):
    body = httpx.get(gateway.url + "/ready").json()
    assert body == {"status": "ready", "backends": {"inference": "SERVING", "tokenizer": "SERVING",
                                                    "reward": "SERVING"}}
    # What `helm test` runs against the gateway: the CLI's HTTP readiness check.
    assert _cli("health", "--url", gateway.url + "/ready").returncode == 0


# ---- 503 while loading, 429 on overload, drain ------------------------------------------------------


def test_loading_backend_is_503_with_retry_after(checkpoints):
    policy, _ = checkpoints
    app = GrpcApp(ServerConfig("inference", host="127.0.0.1", port=0), [InferenceService(policy)])
    backend = BackgroundApp(app).start(load=False)  # listening, model not loaded: NOT_SERVING
    gateway = BackgroundGateway(gateway_config({"inference": backend.address})).start()
    try:
        ready = httpx.get(gateway.url + "/ready")
        assert ready.status_code == 503 and ready.json()["backends"] == {"inference": "NOT_SERVING"}
        response = httpx.get(gateway.url + "/v1/models", timeout=30)
        error = _error(response, 503)
        assert error["type"] == "service_unavailable_error" and "loading" in error["message"]
        assert int(response.headers["retry-after"]) >= 1
    finally:
        gateway.stop()
        backend.stop()


def test_overloaded_engine_is_429_with_retry_after(checkpoints):
    policy, _ = checkpoints
    engine = EngineConfig(max_num_seqs=1, max_queue_size=1, num_gpu_blocks=64, max_model_len=512)
    app = GrpcApp(ServerConfig("inference", host="127.0.0.1", port=0),
                  [InferenceService(policy, engine_config=engine, model_name=MODEL)])
    backend = BackgroundApp(app).start()
    gateway = BackgroundGateway(gateway_config({"inference": backend.address})).start()

    async def burst():
        body = _chat(max_tokens=400, ignore_eos=True, temperature=0)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(5)))

    try:
        responses = asyncio.run(burst())
        refused = [r for r in responses if r.status_code == 429]
        assert refused and any(r.status_code == 200 for r in responses), [r.status_code for r in responses]
        error = _error(refused[0], 429)
        assert error["type"] == "rate_limit_error" and int(refused[0].headers["retry-after"]) >= 1
    finally:
        gateway.stop()
        backend.stop()


def test_drain_keeps_serving_in_flight_streams_and_reports_not_ready(models):
    backends = {"inference": models.address}
    gateway = BackgroundGateway(gateway_config(backends, auth_token=TOKEN))
    gateway.start()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = _chat(max_tokens=60, ignore_eos=True, stream=True, temperature=0)
    stopper = None
    try:
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, headers=headers,
                          timeout=60) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            stopper = threading.Thread(target=gateway.stop, kwargs={"drain_s": 1.5, "grace_s": 30})
            stopper.start()
            assert wait_for(lambda: httpx.get(gateway.url + "/ready").status_code == 503, timeout=10)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert any('"finish_reason":"length"' in line for line in rest)
    finally:
        if stopper is not None:
            stopper.join(60)
        else:
            gateway.stop()


def test_health_url_of_nothing_listening_is_unreachable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/ready"
    check = _cli("health", "--url", url, "--timeout", "2")
    assert check.returncode == 1 and f"{url} (server): UNREACHABLE" in check.stderr


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *argv], capture_output=True, text=True, timeout=60)


def test_unreachable_backend_is_503_and_not_ready():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    gateway = BackgroundGateway(gateway_config({"inference": dead, "tokenizer": dead})).start()
    try:
        ready = httpx.get(gateway.url + "/ready", timeout=30)
        assert ready.status_code == 503
        assert ready.json() == {"status": "not ready", "backends": {"inference": "UNREACHABLE",
                                                                    "tokenizer": "UNREACHABLE"}}
        response = httpx.post(gateway.url + "/v1/chat/completions", json=_chat(), timeout=30)
        assert _error(response, 503)["type"] == "service_unavailable_error"
        assert int(response.headers["retry-after"]) >= 1
        assert _error(httpx.post(gateway.url + "/tokenize", json={"prompt": "x"}, timeout=30), 503)
        assert httpx.get(gateway.url + "/health").status_code == 200  # alive, just not ready
        check = _cli("health", "--url", gateway.url + "/ready", "--timeout", "30")
        assert check.returncode == 1 and "NOT_SERVING (HTTP 503" in check.stderr and "UNREACHABLE" in check.stderr
    finally:
        gateway.stop()
