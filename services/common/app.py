"""GrpcApp: one grpc.aio server hosting one or more services, with its whole lifecycle.

    start()           build the server (interceptors, limits, keepalive, TLS), add health (every
                      service NOT_SERVING), reflection and the services; listen; start /metrics
    load()            each service loads its model; then health flips to SERVING
    drain_and_stop()  health NOT_SERVING and new calls UNAVAILABLE for ``drain_s`` (load balancers
                      notice), then ``server.stop(grace_s)``: in-flight calls may finish within the
                      grace period and are cancelled after it; then services close (engine shutdown)

``run_app`` drives it from a process's main thread: SIGTERM / SIGINT start the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from .config import ServerConfig
from .interceptors import (
    AuthInterceptor,
    DecodeInterceptor,
    ErrorInterceptor,
    ReadinessInterceptor,
    RequestIdInterceptor,
)
from .metrics import MetricsServer, RpcMetrics, new_registry
from .tls import server_credentials

log = logging.getLogger("internlm2.services.app")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Service:
    """What a GrpcApp hosts: one gRPC service and the model behind it.

    ``add_to_server`` is called before the server starts (gRPC cannot add services later), so the
    servicer must exist before its model: ``load`` fills it in while health says NOT_SERVING and
    ReadinessInterceptor answers UNAVAILABLE.
    """

    service_name: str = ""

    def add_to_server(self, server: grpc.aio.Server) -> None:
        raise NotImplementedError

    def register_metrics(self, registry) -> None:
        """Add this service's collectors to the server's Prometheus registry."""

    async def load(self) -> None:
        """Load the model (blocking work belongs in a thread: the server is already answering)."""

    async def close(self) -> None:
        """Release what ``load`` acquired; called after the server stopped."""


class State(enum.Enum):
    CREATED = "created"
    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


class GrpcApp:
    def __init__(self, config: ServerConfig, services: list[Service]):
        self.config = config
        self.services = list(services)
        self.state = State.CREATED
        self.health = HealthServicer()
        self.registry = new_registry()
        self.rpc_metrics = RpcMetrics(self.registry, config.service)
        for service in self.services:
            service.register_metrics(self.registry)
        self.server: grpc.aio.Server | None = None
        self.metrics_server: MetricsServer | None = None
        self.port: int | None = None
        self._stopped = asyncio.Event()

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_server.port if self.metrics_server else None

    def is_ready(self) -> bool:
        return self.state is State.SERVING

    def _why_not_ready(self) -> str:
        if self.state is State.DRAINING or self.state is State.STOPPED:
            return "server is shutting down; retry on another replica"
        return "model is loading; retry shortly"

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        chain: list[grpc.aio.ServerInterceptor] = [RequestIdInterceptor(self.rpc_metrics), ErrorInterceptor()]
        if self.config.auth_token:
            chain.append(AuthInterceptor(self.config.auth_token))
        chain.append(ReadinessInterceptor(self.is_ready, self._why_not_ready))
        chain.append(DecodeInterceptor())
        return chain

    async def start(self) -> int:
        """Listen and answer health/reflection; returns the bound port."""
        config = self.config
        self.server = grpc.aio.server(
            interceptors=self._interceptors(),
            options=config.grpc_options(),
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self.health.set("", NOT_SERVING)
        for service in self.services:
            service.add_to_server(self.server)
            await self.health.set(service.service_name, NOT_SERVING)
        reflection.enable_server_reflection(
            [s.service_name for s in self.services] + ["grpc.health.v1.Health", reflection.SERVICE_NAME],
            self.server,
        )
        if config.tls:
            creds = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
            port = self.server.add_secure_port(config.address, creds)
        else:
            port = self.server.add_insecure_port(config.address)
        if not port:
            raise RuntimeError(f"could not bind {config.address}")
        self.port = port
        await self.server.start()
        if config.metrics_port is not None:
            self.metrics_server = MetricsServer(self.registry, config.host, config.metrics_port)
        self.state = State.LOADING
        log.info(
            "listening",
            extra={
                "fields": {
                    "address": f"{config.host}:{port}",
                    "tls": config.tls,
                    "mtls": bool(config.tls_client_ca),
                    "auth": bool(config.auth_token),
                    "metrics_port": self.metrics_port,
                    "services": [s.service_name for s in self.services],
                }
            },
        )
        return port

    async def load(self) -> None:
        for service in self.services:
            await service.load()
        if self.state is not State.LOADING:  # a stop arrived while loading
            return
        self.state = State.SERVING
        for service in self.services:
            await self.health.set(service.service_name, SERVING)
        await self.health.set("", SERVING)
        log.info("serving", extra={"fields": {"services": [s.service_name for s in self.services]}})

    async def drain_and_stop(self, drain_s: float | None = None, grace_s: float | None = None) -> None:
        if self.state in (State.DRAINING, State.STOPPED):
            await self._stopped.wait()
            return
        drain_s = self.config.drain_s if drain_s is None else drain_s
        grace_s = self.config.grace_s if grace_s is None else grace_s
        self.state = State.DRAINING
        await self.health.enter_graceful_shutdown()
        log.info("draining", extra={"fields": {"drain_s": drain_s, "grace_s": grace_s}})
        if drain_s > 0:
            await asyncio.sleep(drain_s)
        if self.server is not None:
            await self.server.stop(grace_s)
        for service in reversed(self.services):
            try:
                await service.close()
            except Exception:
                log.exception("closing %s failed", service.service_name)
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.state = State.STOPPED
        self._stopped.set()
        log.info("stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def _serve_until_signal(app: GrpcApp) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await app.start()
    loader = asyncio.create_task(app.load())
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({loader, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if loader in done and loader.exception() is not None:
        stopper.cancel()
        await app.drain_and_stop(drain_s=0, grace_s=0)
        raise loader.exception()
    await stopper
    if not loader.done():
        loader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await loader
    log.info("signal received; shutting down")
    await app.drain_and_stop()


def run_app(app: GrpcApp) -> int:
    """Serve until SIGTERM / SIGINT, then drain; returns the process exit code."""
    try:
        asyncio.run(_serve_until_signal(app))
    except Exception:
        log.exception("server failed")
        return 1
    return 0
