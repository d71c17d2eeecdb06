"""ServerConfig: everything about how a server listens, validated once.

Built from the ``internlm2 serve`` argparse namespace by ``ServerConfig.from_args`` (missing flags
take the defaults below, so other front ends can pass a partial namespace) or directly in tests.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

DEFAULT_AUTH_TOKEN_ENV = "INTERNLM2_AUTH_TOKEN"
MiB = 1 << 20


class ConfigError(ValueError):
    """A server option is invalid; the message names the flag."""


@dataclass(frozen=True)
class ServerConfig:
    service: str
    host: str = "0.0.0.0"
    port: int = 0
    # None: no metrics endpoint; 0: any free port (tests). (On the command line 0 means off.)
    metrics_port: int | None = None
    # Bearer token clients must send (``authorization: Bearer <token>``); None: auth off.
    auth_token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # With a client CA the server requires client certificates (mTLS).
    tls_client_ca: str | None = None
    # gRPC's default receive limit is 4 MiB; batches of conversations or logprobs need more.
    max_receive_message_bytes: int = 32 * MiB
    max_send_message_bytes: int = 64 * MiB
    # Server pings idle connections; clients may ping every 10 s even without calls, because a long
    # unary Generate sends no DATA frames (vLLM's gRPC server allows the same).
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    min_client_ping_interval_s: float = 10.0
    # Close connections after this age so clients re-resolve behind a Kubernetes Service; None: never.
    max_connection_age_s: float | None = None
    max_connection_age_grace_s: float = 30.0
    # Calls beyond this many in flight get RESOURCE_EXHAUSTED from gRPC itself; None: no cap.
    max_concurrent_rpcs: int | None = None
    # Shutdown: health reports NOT_SERVING and new calls get UNAVAILABLE for drain_s (load balancers
    # notice), then in-flight calls get grace_s to finish before they are cancelled.
    drain_s: float = 1.0
    grace_s: float = 10.0

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key must be given together")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port must be in [0, 65535], got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"--metrics-port must be in [0, 65535], got {self.metrics_port}")
        if self.max_receive_message_bytes <= 0 or self.max_send_message_bytes <= 0:
            raise ConfigError("message size limits must be positive")
        if self.drain_s < 0 or self.grace_s < 0:
            raise ConfigError("drain and grace periods must be >= 0")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def replace(self, **changes) -> ServerConfig:
        return dataclasses.replace(self, **changes)

    def grpc_options(self) -> list[tuple[str, int]]:
        options = [
            ("grpc.max_receive_message_length", self.max_receive_message_bytes),
            ("grpc.max_send_message_length", self.max_send_message_bytes),
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            (
                "grpc.http2.min_recv_ping_interval_without_data_ms",
                int(self.min_client_ping_interval_s * 1000),
            ),
            ("grpc.http2.min_ping_interval_without_data_ms", int(self.min_client_ping_interval_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # A second server on a taken port must fail, not silently share it.
            ("grpc.so_reuseport", 0),
        ]
        if self.max_connection_age_s is not None:
            options += [
                ("grpc.max_connection_age_ms", int(self.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(self.max_connection_age_grace_s * 1000)),
            ]
        return options

    @classmethod
    def from_args(
        cls,
        args,
        service: str,
        default_port: int,
        default_metrics_port: int | None,
        default_host: str = "0.0.0.0",
    ) -> ServerConfig:
        """The ``internlm2 serve`` flags -> a config. The token is read from the environment variable
        named by ``--auth-token-env`` (default INTERNLM2_AUTH_TOKEN); unset or empty means auth off."""

        def arg(name, default=None):
            value = getattr(args, name, None)
            return default if value is None else value

        token_env = arg("auth_token_env", DEFAULT_AUTH_TOKEN_ENV)
        metrics_port = arg("metrics_port", default_metrics_port)
        if metrics_port is not None and metrics_port <= 0:  # the CLI's "0 = off"
            metrics_port = None
        fields = {
            "service": service,
            "host": arg("host", default_host),
            "port": arg("port", default_port),
            "metrics_port": metrics_port,
            "auth_token": os.environ.get(token_env) or None,
            "tls_cert": arg("tls_cert"),
            "tls_key": arg("tls_key"),
            "tls_client_ca": arg("tls_client_ca"),
        }
        optional = {
            "max_message_mb": "max_receive_message_bytes",
            "grace": "grace_s",
            "drain": "drain_s",
            "max_connection_age": "max_connection_age_s",
            "max_concurrent_rpcs": "max_concurrent_rpcs",
        }
        for flag, name in optional.items():
            value = getattr(args, flag, None)
            if value is not None:
                fields[name] = int(value * MiB) if flag == "max_message_mb" else value
        return cls(**fields)
