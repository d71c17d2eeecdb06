"""What every server shares, on a real tokenizer server on loopback: health transitions (loading,
serving, draining), readiness, reflection, bearer auth (health exempt), TLS and mTLS, message size
limits, request ids in headers, error details and JSON logs, the metrics endpoint."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from services_fixtures import BackgroundApp, make_certificates, tiny_checkpoints, wait_for

from internlm2.services.common import GrpcApp, ServerConfig
from internlm2.services.common.app import Service
from internlm2.services.common.interceptors import final_code
from internlm2.services.common.logs import JsonFormatter
from internlm2.services.tokenizer import TokenizerService
from internlm2.v1 import inference_pb2, inference_pb2_grpc
from internlm2_client import (
    InvalidArgumentError,
    ResourceExhaustedError,
    TokenizerClient,
    UnauthenticatedError,
    UnavailableError,
    errors,
)

pytestmark = pytest.mark.timeout(120)

TOKENIZER = "internlm2.v1.TokenizerService"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    policy, _ = tiny_checkpoints(tmp_path_factory.mktemp("tiny"))
    return policy


def _config(**kw) -> ServerConfig:
    return ServerConfig("tokenizer", host="127.0.0.1", port=0, **kw)


class GatedTokenizerService(TokenizerService):
    """Loads only once the test opens the gate, so the loading phase can be observed."""

    def __init__(self, path):
        super().__init__(path)
        self.gate = threading.Event()

    async def load(self) -> None:
        await asyncio.to_thread(self.gate.wait, 30)
        await super().load()


def _health(channel, service=""):
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_transitions_loading_serving_draining(tokenizer_dir):
    service = GatedTokenizerService(tokenizer_dir)
    server = BackgroundApp(GrpcApp(_config(drain_s=1.5), [service])).start(load=False)
    channel = grpc.insecure_channel(server.address)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=TOKENIZER), timeout=30)
    seen = [next(watch).status]
    try:
        # Listening but loading: NOT_SERVING, and calls are refused with a retryable UNAVAILABLE.
        assert _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _health(channel, TOKENIZER) == health_pb2.HealthCheckResponse.NOT_SERVING
        with TokenizerClient(server.address, retry=None) as client, pytest.raises(UnavailableError, match="loading"):
            client.tokenize(["hi"])
        loader = asyncio.run_coroutine_threadsafe(server.app.load(), server.loop)
        service.gate.set()
        loader.result(30)
        seen.append(next(watch).status)
        assert _health(channel) == _health(channel, TOKENIZER) == health_pb2.HealthCheckResponse.SERVING
        with TokenizerClient(server.address, retry=None) as client:
            assert client.tokenize(["hi"])[0].token_ids
        # Draining: NOT_SERVING at once, new calls UNAVAILABLE, then the server stops.
        stopper = asyncio.run_coroutine_threadsafe(server.app.drain_and_stop(grace_s=1.0), server.loop)
        assert wait_for(lambda: _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING, 5)
        seen.append(next(watch).status)
        with TokenizerClient(server.address, retry=None) as client, pytest.raises(UnavailableError, match="shutting"):
            client.tokenize(["hi"])
        stopper.result(30)
    finally:
        channel.close()
        server.close()
    S = health_pb2.HealthCheckResponse
    assert seen == [S.NOT_SERVING, S.SERVING, S.NOT_SERVING]


def test_wait_until_ready_returns_once_the_model_is_loaded(tokenizer_dir):
    """The SDK's wait_until_ready waits for the service's SERVING, not for the connection: while the
    model loads it keeps waiting, and the first call after it returns succeeds."""
    service = GatedTokenizerService(tokenizer_dir)
    server = BackgroundApp(GrpcApp(_config(), [service])).start(load=False)
    done, failure = threading.Event(), []
    client = TokenizerClient(server.address, retry=None)

    def waiter():
        try:
            client.wait_until_ready(timeout=60)
        except Exception as exc:
            failure.append(exc)
        done.set()

    # grpc's own HealthServicer counts the Watch calls it is answering: proof the waiter is waiting.
    watchers = lambda: server.call(lambda: server.app.health._watcher_count_by_service.get(TOKENIZER, 0))
    try:
        threading.Thread(target=waiter, daemon=True).start()
        assert wait_for(lambda: watchers() > 0, 30), "wait_until_ready never watched the service's health"
        assert not done.is_set(), "wait_until_ready returned while the model was loading"
        loader = asyncio.run_coroutine_threadsafe(server.app.load(), server.loop)
        service.gate.set()
        loader.result(30)
        assert done.wait(30) and not failure, failure
        assert client.tokenize(["hi"])[0].token_ids
    finally:
        service.gate.set()
        client.close()
        server.stop()


def test_unknown_health_service_is_not_found(tokenizer_dir):
    server = BackgroundApp(GrpcApp(_config(), [TokenizerService(tokenizer_dir)])).start()
    try:
        with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as info:
            _health(channel, "no.such.Service")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop()


def test_reflection_lists_the_services(tokenizer_dir):
    server = BackgroundApp(GrpcApp(_config(), [TokenizerService(tokenizer_dir)])).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = list(
                stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
            )
            names = {s.name for s in responses[0].list_services_response.service}
            assert {TOKENIZER, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
            # The descriptors are served too (what grpcurl needs to build requests).
            request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=TOKENIZER)
            files = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
            assert files[0].file_descriptor_response.file_descriptor_proto
    finally:
        server.stop()


@pytest.fixture(scope="module")
def auth_server(tokenizer_dir):
    server = BackgroundApp(GrpcApp(_config(auth_token="s3cret-token"), [TokenizerService(tokenizer_dir)])).start()
    yield server
    server.stop()


def test_no_token_is_unauthenticated(auth_server):
    with TokenizerClient(auth_server.address, retry=None) as client, pytest.raises(UnauthenticatedError) as info:
        client.tokenize(["hi"])
    assert "missing bearer token" in info.value.message


def test_wrong_token_is_unauthenticated(auth_server):
    with (
        TokenizerClient(auth_server.address, token="wrong", retry=None) as client,
        pytest.raises(UnauthenticatedError, match="invalid bearer token"),
    ):
        client.tokenize(["hi"])


def test_right_token_passes_and_health_needs_none(auth_server):
    with TokenizerClient(auth_server.address, token="s3cret-token") as client:
        assert client.tokenize(["hi"], add_bos=False)[0].token_ids
    with TokenizerClient(auth_server.address) as client:
        assert client.health() == "SERVING"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


def test_tls(tokenizer_dir, certs):
    config = _config(tls_cert=certs["server_cert"], tls_key=certs["server_key"])
    server = BackgroundApp(GrpcApp(config, [TokenizerService(tokenizer_dir)])).start()
    try:
        with TokenizerClient(server.address, tls=True, root_certificates=certs["ca"]) as client:
            assert client.tokenize(["hi"])[0].token_ids
        with TokenizerClient(server.address, retry=None) as plaintext, pytest.raises(UnavailableError):
            plaintext.tokenize(["hi"], timeout=5)
    finally:
        server.stop()


def test_mtls_requires_a_client_certificate(tokenizer_dir, certs):
    config = _config(tls_cert=certs["server_cert"], tls_key=certs["server_key"], tls_client_ca=certs["ca"])
    server = BackgroundApp(GrpcApp(config, [TokenizerService(tokenizer_dir)])).start()
    try:
        with TokenizerClient(
            server.address,
            tls=True,
            root_certificates=certs["ca"],
            client_certificate=certs["client_cert"],
            client_key=certs["client_key"],
        ) as client:
            assert client.tokenize(["hi"])[0].token_ids
        with (
            TokenizerClient(server.address, tls=True, root_certificates=certs["ca"], retry=None) as anonymous,
            pytest.raises(UnavailableError),
        ):
            anonymous.tokenize(["hi"], timeout=5)
    finally:
        server.stop()


def test_tls_config_is_validated():
    from internlm2.services.common.config import ConfigError

    with pytest.raises(ConfigError, match="together"):
        ServerConfig("x", tls_cert="a.pem")
    with pytest.raises(ConfigError, match="mTLS"):
        ServerConfig("x", tls_client_ca="ca.pem")


@pytest.fixture(scope="module")
def plain_server(tokenizer_dir):
    config = _config(metrics_port=0, max_receive_message_bytes=64 * 1024)
    server = BackgroundApp(GrpcApp(config, [TokenizerService(tokenizer_dir)])).start()
    yield server
    server.stop()


def test_large_requests_are_parsed_off_the_loop_and_checked_the_same(tokenizer_dir):
    """Requests of 1 MiB or more are parsed in a worker thread: they work, and bad bytes in them get
    the same INVALID_ARGUMENT naming the field as small ones."""
    from internlm2.services.common.decoding import PARSE_OFF_LOOP_BYTES
    from internlm2.v1 import tokenizer_pb2

    server = BackgroundApp(GrpcApp(_config(), [TokenizerService(tokenizer_dir)])).start()
    big = "hello " * (PARSE_OFF_LOOP_BYTES // 6 + 1)
    try:
        with TokenizerClient(server.address, retry=None) as client:
            assert len(client.tokenize([big, "hi"])) == 2
        data = tokenizer_pb2.TokenizeRequest(texts=[big, "\x01MARK"]).SerializeToString()
        data = data.replace(b"\x01MARK", b"\xff\xfeARK")
        assert len(data) > PARSE_OFF_LOOP_BYTES
        with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as info:
            rpc = channel.unary_unary("/internlm2.v1.TokenizerService/Tokenize", lambda b: b, lambda b: b)
            rpc(data, timeout=30)
        error = errors.from_rpc_error(info.value)
        assert isinstance(error, InvalidArgumentError) and error.field == "texts[1]", str(error)
    finally:
        server.stop()


def test_oversized_message_is_resource_exhausted_and_nothing_is_lost(plain_server):
    with TokenizerClient(plain_server.address, retry=None) as client:
        with pytest.raises(ResourceExhaustedError):
            client.tokenize(["x" * (100 * 1024)])
        assert client.tokenize(["still fine"])[0].token_ids


def test_request_id_is_echoed_in_headers_error_details_and_logs(plain_server):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("tokenizer"))
    rpc_log = logging.getLogger("internlm2.services.rpc")
    rpc_log.addHandler(handler)
    old_level = rpc_log.level
    rpc_log.setLevel(logging.INFO)
    try:
        with grpc.insecure_channel(plain_server.address) as channel:
            from internlm2.v1 import tokenizer_pb2, tokenizer_pb2_grpc

            stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
            _, call = stub.Tokenize.with_call(
                tokenizer_pb2.TokenizeRequest(texts=["a"]), metadata=(("x-request-id", "req-ok-1"),), timeout=5
            )
            assert ("x-request-id", "req-ok-1") in tuple(call.initial_metadata())
            _, call = stub.Tokenize.with_call(tokenizer_pb2.TokenizeRequest(texts=["a"]), timeout=5)
            generated = dict(call.initial_metadata())["x-request-id"]
            assert len(generated) == 32
        with (
            TokenizerClient(plain_server.address, metadata=(("x-request-id", "req-bad-2"),)) as client,
            pytest.raises(InvalidArgumentError) as info,
        ):
            client.tokenize([])
        assert info.value.field == "texts"
        assert info.value.request_id == "req-bad-2"
        assert info.value.reason == "INVALID_ARGUMENT"
        # The access line is written when the server-side call ends, which may be just after the client saw it.
        assert wait_for(lambda: "req-bad-2" in stream.getvalue(), 5)
    finally:
        rpc_log.removeHandler(handler)
        rpc_log.setLevel(old_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    by_id = {line.get("request_id"): line for line in lines}
    assert by_id["req-ok-1"]["code"] == "OK" and by_id["req-ok-1"]["service"] == "tokenizer"
    assert by_id["req-bad-2"]["code"] == "INVALID_ARGUMENT"
    assert by_id["req-ok-1"]["method"] == "/internlm2.v1.TokenizerService/Tokenize"


def test_metrics_endpoint_counts_calls_by_code(plain_server):
    with TokenizerClient(plain_server.address) as client:
        client.tokenize(["metrics"])
        with pytest.raises(errors.InvalidArgumentError):
            client.detokenize([])
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{plain_server.app.metrics_port}/metrics", timeout=5).read().decode()
    )
    assert (
        'internlm2:grpc_server_handled_total{grpc_code="OK",grpc_method="/internlm2.v1.TokenizerService/Tokenize",'
        'service="tokenizer"}'
    ) in text
    assert 'grpc_code="INVALID_ARGUMENT",grpc_method="/internlm2.v1.TokenizerService/Detokenize"' in text
    assert "internlm2:grpc_server_handling_seconds_bucket" in text


def test_unhandled_exception_is_internal_without_leaking_text(tokenizer_dir):
    service = TokenizerService(tokenizer_dir)
    server = BackgroundApp(GrpcApp(_config(), [service])).start()

    def boom(*args, **kwargs):
        raise RuntimeError("secret internals")

    server.call(lambda: setattr(service.servicer.tok, "encode", boom))
    try:
        with TokenizerClient(server.address, retry=None) as client, pytest.raises(errors.InternalError) as info:
            client.tokenize(["x"])
        assert "secret" not in info.value.message and "request id" in info.value.message
    finally:
        server.stop()


class EndlessStream(inference_pb2_grpc.InferenceServiceServicer):
    """A GenerateStream that never ends by itself: every call ends by its deadline or a cancel."""

    async def GenerateStream(self, request, context):
        while True:
            yield inference_pb2.GenerateStreamResponse(request_id=request.request_id)
            await asyncio.sleep(0.005)


class EndlessService(Service):
    service_name = "internlm2.v1.InferenceService"

    def add_to_server(self, server) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(EndlessStream(), server)


def test_a_large_request_reaches_a_streaming_servicer_parsed():
    """The off-loop parse of large requests hands streaming servicers the parsed message too."""
    from internlm2.services.common.decoding import PARSE_OFF_LOOP_BYTES

    server = BackgroundApp(GrpcApp(_config(), [EndlessService()])).start()
    request_id = "r" * (PARSE_OFF_LOOP_BYTES + 1)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stream = inference_pb2_grpc.InferenceServiceStub(channel).GenerateStream(
                inference_pb2.GenerateStreamRequest(request_id=request_id), timeout=60
            )
            assert next(stream).request_id == request_id
            stream.cancel()
    finally:
        server.stop()


class _Context:
    """What final_code reads of a finished call."""

    def __init__(self, remaining, code=None):
        self._remaining, self._code = remaining, code

    def time_remaining(self):
        return self._remaining

    def code(self):
        return self._code


@pytest.mark.parametrize(
    "error,remaining,expected",
    [
        # gRPC's deadline timer fired a hair before Python's clock reached the deadline (seen: 0.1-3 ms).
        (asyncio.CancelledError(), 0.0004, grpc.StatusCode.DEADLINE_EXCEEDED),
        (GeneratorExit(), 0.0, grpc.StatusCode.DEADLINE_EXCEEDED),
        (asyncio.CancelledError(), 5.0, grpc.StatusCode.CANCELLED),
        (asyncio.CancelledError(), None, grpc.StatusCode.CANCELLED),
        # the servicer noticed the deadline and returned: the client got DEADLINE_EXCEEDED all the same
        (None, 0.0, grpc.StatusCode.DEADLINE_EXCEEDED),
        (None, 3.0, grpc.StatusCode.OK),
        (None, None, grpc.StatusCode.OK),
    ],
)
def test_final_code_tells_a_deadline_from_a_cancel(error, remaining, expected):
    assert final_code(_Context(remaining), error) == expected


def test_streams_that_hit_their_deadline_are_recorded_as_deadline_exceeded(caplog):
    server = BackgroundApp(GrpcApp(_config(), [EndlessService()])).start()
    method = "/internlm2.v1.InferenceService/GenerateStream"
    registry = server.app.registry

    def handled(code: str) -> float:
        labels = {"service": "tokenizer", "grpc_method": method, "grpc_code": code}
        return registry.get_sample_value("internlm2:grpc_server_handled_total", labels) or 0.0

    runs = 12
    try:
        with caplog.at_level(logging.INFO, logger="internlm2.services.rpc"):
            with grpc.insecure_channel(server.address) as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                for i in range(runs):
                    with pytest.raises(grpc.RpcError) as info:
                        for _ in stub.GenerateStream(
                            inference_pb2.GenerateStreamRequest(request_id=f"d{i}"), timeout=0.2
                        ):
                            pass
                    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                cancelled = stub.GenerateStream(inference_pb2.GenerateStreamRequest(request_id="c"), timeout=60)
                next(cancelled)
                cancelled.cancel()
            assert wait_for(
                lambda: server.call(lambda: handled("DEADLINE_EXCEEDED") + handled("CANCELLED")) == runs + 1
            )
        assert server.call(lambda: (handled("DEADLINE_EXCEEDED"), handled("CANCELLED"))) == (runs, 1)
        logged = [r.fields["code"] for r in caplog.records if getattr(r, "fields", {}).get("method") == method]
        assert sorted(logged) == ["CANCELLED"] + ["DEADLINE_EXCEEDED"] * runs
    finally:
        server.stop()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["serve", "tokenizer"], "give --model PATH or set INTERNLM2_MODEL"),
        (["serve", "inference", "--model", "/no/such/checkpoint"], "does not exist"),
        (["serve", "training"], "--redis-url"),
        (["serve", "worker"], "--redis-url"),
        (["serve", "tokenizer", "--model", ".", "--tls-cert", "cert.pem"], "--tls-key"),
    ],
    ids=["no model", "missing model path", "training without redis", "worker without redis", "half TLS"],
)
def test_serve_usage_errors_exit_2_before_listening(monkeypatch, capsys, argv, message):
    from internlm2_client.cli import main

    for var in ("INTERNLM2_MODEL", "REDIS_URL"):
        monkeypatch.delenv(var, raising=False)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
