"""The gRPC services behind the gateway: one grpc.aio channel each, their stubs and their health.

Channels come from the SDK's ``ChannelConfig`` (TLS, bearer token, retry of UNAVAILABLE before any
response header), so the gateway reaches the services exactly as any SDK user does. Each call carries
the HTTP request's id as ``x-request-id`` metadata: one id in the gateway's and the backend's logs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from internlm2.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    reward_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
    training_pb2_grpc,
)
from internlm2_client import ChannelConfig, RetryPolicy
from internlm2_client.errors import from_rpc_error

from .errors import ApiError, from_backend

log = logging.getLogger("internlm2.services.gateway")

SERVICE_NAMES = {
    "inference": "internlm2.v1.InferenceService",
    "tokenizer": "internlm2.v1.TokenizerService",
    "reward": "internlm2.v1.RewardService",
    "training": "internlm2.v1.TrainingService",
}
_STUBS = {
    "inference": inference_pb2_grpc.InferenceServiceStub,
    "tokenizer": tokenizer_pb2_grpc.TokenizerServiceStub,
    "reward": reward_pb2_grpc.RewardServiceStub,
    "training": training_pb2_grpc.TrainingServiceStub,
}
# A backend restarting or draining is retried briefly (before any response header, so never a stream
# halfway); a model still loading answers 503 with Retry-After within about a second.
BACKEND_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.1, max_backoff_s=0.5)
# How long a fetched model description is trusted before it is asked for again.
INFO_TTL_S = 30.0


@dataclass(frozen=True)
class BackendTls:
    """How the gateway reaches TLS backends: their CA, and a client certificate for mTLS."""

    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    server_name: str | None = None

    @property
    def enabled(self) -> bool:
        return self.ca_cert is not None or self.client_cert is not None


class Backends:
    """Channels to the configured services (``addresses``: name -> host:port; a missing name is a
    service this gateway does not offer, and its routes answer 503 saying so)."""

    def __init__(self, addresses: dict[str, str], token: str | None = None, tls: BackendTls | None = None):
        unknown = set(addresses) - set(SERVICE_NAMES)
        if unknown:
            raise ValueError(f"unknown backend(s): {', '.join(sorted(unknown))}")
        self.addresses = {k: v for k, v in addresses.items() if v}
        self.token = token
        self.tls = tls or BackendTls()
        self.configs: dict[str, ChannelConfig] = {}
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.stubs: dict[str, object] = {}
        self._model_info: tuple[float, inference_pb2.GetModelInfoResponse] | None = None
        self._tokenizer_info: tokenizer_pb2.GetTokenizerInfoResponse | None = None

    def open(self) -> None:
        """Create the channels (on the running event loop, which grpc.aio binds them to)."""
        for name, address in self.addresses.items():
            config = ChannelConfig(
                address=address,
                tls=self.tls.enabled,
                root_certificates=self.tls.ca_cert,
                client_certificate=self.tls.client_cert,
                client_key=self.tls.client_key,
                server_name=self.tls.server_name,
                token=self.token,
                retry=BACKEND_RETRY,
            )
            self.configs[name] = config
            self.channels[name] = config.aio_channel()
            self.stubs[name] = _STUBS[name](self.channels[name])

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()

    def stub(self, name: str):
        if name not in self.stubs:
            raise ApiError(
                503, f"this gateway has no {name} service configured (start it with --{name} HOST:PORT)",
                code="backend_not_configured",
            )
        return self.stubs[name]

    def metadata(self, name: str, request_id: str | None) -> tuple[tuple[str, str], ...]:
        extra = (("x-request-id", request_id),) if request_id else ()
        return self.configs[name].metadata(extra)

    async def call(self, name: str, method: str, request, request_id: str | None, *, param_of=None,
                   timeout: float | None = None):
        """A unary call; a failure becomes an ApiError (400 naming the client's parameter via ``param_of``)."""
        rpc = getattr(self.stub(name), method)
        try:
            return await rpc(request, metadata=self.metadata(name, request_id), timeout=timeout)
        except grpc.RpcError as exc:
            raise from_backend(from_rpc_error(exc), param_of) from None

    def stream(self, name: str, method: str, request, request_id: str | None, timeout: float | None = None):
        """A server-streaming call object (the caller iterates it, maps errors and cancels it)."""
        rpc = getattr(self.stub(name), method)
        return rpc(request, metadata=self.metadata(name, request_id), timeout=timeout)

    # ---- what the routes need to know about the backends ------------------------------------------
    async def model_info(self, request_id: str | None = None, refresh: bool = False):
        """The inference service's GetModelInfo, cached for INFO_TTL_S (model names for /v1/models)."""
        now = time.monotonic()
        if self._model_info is not None and not refresh and now - self._model_info[0] < INFO_TTL_S:
            return self._model_info[1]
        info = await self.call("inference", "GetModelInfo", inference_pb2.GetModelInfoRequest(), request_id,
                               timeout=10)
        self._model_info = (now, info)
        return info

    async def tokenizer_info(self, request_id: str | None = None):
        """GetTokenizerInfo (special token ids), fetched once; None without a tokenizer service."""
        if self._tokenizer_info is None and "tokenizer" in self.stubs:
            self._tokenizer_info = await self.call(
                "tokenizer", "GetTokenizerInfo", tokenizer_pb2.GetTokenizerInfoRequest(), request_id, timeout=10
            )
        return self._tokenizer_info

    async def health(self, timeout: float = 2.0) -> dict[str, str]:
        """grpc.health.v1 status of every configured service, by name ("UNREACHABLE" when not answering)."""

        async def one(name: str) -> str:
            stub = health_pb2_grpc.HealthStub(self.channels[name])
            try:
                response = await stub.Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAMES[name]),
                    metadata=self.metadata(name, None),
                    timeout=timeout,
                    wait_for_ready=False,
                )
            except grpc.RpcError as exc:  # not listening yet, draining, TLS refused
                log.debug("health of %s failed: %s", name, exc.code())
                return "UNREACHABLE"
            return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

        names = list(self.channels)
        statuses = await asyncio.gather(*(one(n) for n in names))
        return dict(zip(names, statuses))
