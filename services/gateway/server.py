"""``internlm2 serve gateway``: the OpenAI-compatible HTTP gateway (uvicorn) and its lifecycle.

    start()           bind the port (TLS / mTLS from the same flags as the gRPC services), open the
                      backend channels, serve HTTP, start /metrics
    drain_and_stop()  /ready answers 503 for ``drain_s`` (load balancers notice) while requests are
                      still served; then the listener closes and in-flight requests (streams included)
                      get ``grace_s`` to finish before they are cancelled, which cancels their gRPC calls
                      and so frees their engine work; then the channels close

``serve`` runs it from a process's main thread: SIGTERM / SIGINT start the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import sys

import uvicorn

from ..common.logs import configure_logging
from ..common.metrics import MetricsServer
from .app import Gateway, create_app
from .config import GatewayConfig

log = logging.getLogger("internlm2.services.gateway")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the gateway drains first, then tells it to exit."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class GatewayServer:
    def __init__(self, config: GatewayConfig, gateway: Gateway | None = None):
        self.config = config
        self.gateway = gateway or Gateway(config)
        self.app = create_app(self.gateway)
        self.port: int | None = None
        self.metrics_server: MetricsServer | None = None
        self._uvicorn: _Server | None = None
        self._task: asyncio.Task | None = None
        self._socket: socket.socket | None = None

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_server.port if self.metrics_server else None

    def _uvicorn_config(self) -> uvicorn.Config:
        server = self.config.server
        tls = {}
        if server.tls:
            tls = {"ssl_certfile": server.tls_cert, "ssl_keyfile": server.tls_key}
            if server.tls_client_ca:
                tls.update(ssl_ca_certs=server.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        return uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,  # the middleware writes one JSON line per request
            lifespan="off",
            timeout_graceful_shutdown=server.grace_s,
            timeout_keep_alive=30,
            **tls,
        )

    async def start(self) -> int:
        server = self.config.server
        self._socket = _bind(server.host, server.port)
        self.port = self._socket.getsockname()[1]
        self.gateway.backends.open()
        self._uvicorn = _Server(self._uvicorn_config())
        self._task = asyncio.create_task(self._uvicorn.serve(sockets=[self._socket]))
        while not self._uvicorn.started:
            if self._task.done():
                await self._task  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        if server.metrics_port is not None:
            self.metrics_server = MetricsServer(self.gateway.metrics.registry, server.host, server.metrics_port)
        log.info("listening", extra={"fields": {
            "address": f"{server.host}:{self.port}", "tls": server.tls, "mtls": bool(server.tls_client_ca),
            "auth": bool(server.auth_token), "metrics_port": self.metrics_port,
            "backends": self.config.backends}})
        return self.port

    async def drain_and_stop(self, drain_s: float | None = None, grace_s: float | None = None) -> None:
        server = self.config.server
        drain_s = server.drain_s if drain_s is None else drain_s
        if grace_s is not None and self._uvicorn is not None:
            self._uvicorn.config.timeout_graceful_shutdown = grace_s
        self.gateway.draining = True
        log.info("draining", extra={"fields": {"drain_s": drain_s}})
        if drain_s > 0:
            await asyncio.sleep(drain_s)
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            await self._task
        await self.gateway.backends.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        log.info("stopped")


async def _serve_until_signal(server: GatewayServer) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    await stop.wait()
    log.info("signal received; shutting down")
    await server.drain_and_stop()


def _loop_factory():
    """uvloop when installed (uvicorn[standard]): the gateway's work is per-chunk event-loop traffic."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def serve(args) -> int:
    try:
        config = GatewayConfig.from_args(args)  # usage errors (exit 2) surface before logging is taken over
    except ValueError as exc:
        print(f"internlm2 serve gateway: {exc}", file=sys.stderr)
        return 2
    configure_logging("gateway", getattr(args, "log_level", None) or "INFO")
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_serve_until_signal(GatewayServer(config)))
    except Exception:
        log.exception("gateway failed")
        return 1
    return 0
