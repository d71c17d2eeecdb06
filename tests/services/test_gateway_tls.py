"""TLS on both sides of the gateway, with throwaway certificates (openssl): HTTPS and mTLS towards clients
(the same --tls-cert / --tls-key / --tls-client-ca options as the gRPC services), and TLS towards a gRPC
backend that serves only TLS (--backend-ca-cert)."""

from __future__ import annotations

import ssl

import httpx
import pytest
from gateway_fixtures import BackgroundGateway
from services_fixtures import BackgroundApp, make_certificates, tiny_checkpoints

from internlm2.services.common import GrpcApp, ServerConfig
from internlm2.services.gateway import GatewayConfig
from internlm2.services.gateway.backends import BackendTls
from internlm2.services.tokenizer import TokenizerService

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_backend(tmp_path_factory, certs):
    """A tokenizer service that accepts TLS connections only."""
    policy, _ = tiny_checkpoints(tmp_path_factory.mktemp("models"))
    config = ServerConfig("tokenizer", host="127.0.0.1", port=0, tls_cert=certs["server_cert"],
                          tls_key=certs["server_key"])
    server = BackgroundApp(GrpcApp(config, [TokenizerService(policy)])).start()
    yield server
    server.stop()


def _gateway(backend, certs, **tls) -> BackgroundGateway:
    server = ServerConfig("gateway", host="127.0.0.1", port=0, tls_cert=certs["server_cert"],
                          tls_key=certs["server_key"], **tls)
    config = GatewayConfig(server=server, backends={"tokenizer": backend.address},
                           backend_tls=BackendTls(ca_cert=certs["ca"]))
    gateway = BackgroundGateway(config).start()
    gateway.url = gateway.url.replace("http://", "https://")
    return gateway


def test_https_to_clients_and_tls_to_the_backend(tls_backend, certs):
    gateway = _gateway(tls_backend, certs)
    try:
        with httpx.Client(base_url=gateway.url, verify=ssl.create_default_context(cafile=certs["ca"])) as client:
            assert client.get("/ready").json()["backends"] == {"tokenizer": "SERVING"}
            tokens = client.post("/tokenize", json={"prompt": "hello"}).json()
            assert tokens["count"] == len(tokens["tokens"]) > 1
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not spoken on an HTTPS port
            httpx.get(gateway.url.replace("https://", "http://") + "/health")
    finally:
        gateway.stop()


def test_mtls_requires_a_client_certificate(tls_backend, certs):
    gateway = _gateway(tls_backend, certs, tls_client_ca=certs["ca"])
    try:
        context = ssl.create_default_context(cafile=certs["ca"])
        with pytest.raises(httpx.HTTPError):
            httpx.get(gateway.url + "/health", verify=context)
        context.load_cert_chain(certs["client_cert"], certs["client_key"])
        assert httpx.get(gateway.url + "/health", verify=context).json() == {"status": "ok"}
    finally:
        gateway.stop()
