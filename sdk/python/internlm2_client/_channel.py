"""Channel construction shared by the sync and asyncio clients: TLS, token, retries, limits.

Retries are gRPC's own (the `grpc.service_config` channel option, grpc guides/retry.md):
only UNAVAILABLE is retried, with exponential backoff, and only before the server has
sent response headers, so a stream is never replayed halfway.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

SERVICE_NAMES = (
    "internlm2.v1.TokenizerService",
    "internlm2.v1.InferenceService",
    "internlm2.v1.RewardService",
    "internlm2.v1.TrainingService",
)
DEFAULT_PORTS = {"tokenizer": 50051, "inference": 50052, "reward": 50053, "training": 50054}
DEFAULT_HOST = "127.0.0.1"
# Generous but bounded: reward batches and logprob payloads exceed gRPC's 4 MiB default.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class RetryPolicy:
    """Retry of UNAVAILABLE calls (server down, restarting or draining)."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    backoff_multiplier: float = 2.0

    def service_config(self, services: Sequence[str] = SERVICE_NAMES) -> str:
        """The JSON of the `grpc.service_config` channel option applying this policy."""
        policy = {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff_s}s",
            "maxBackoff": f"{self.max_backoff_s}s",
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
        return json.dumps({"methodConfig": [{"name": [{"service": s} for s in services], "retryPolicy": policy}]})


DEFAULT_RETRY = RetryPolicy()


def _read(value: bytes | str | Path | None) -> bytes | None:
    """PEM given as bytes, or as a path to a file."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


@dataclass(frozen=True)
class ChannelConfig:
    """How to reach one service. Build it through the clients' keyword arguments.

    - `tls`: use TLS (implied by any certificate option). `root_certificates`: CA bundle
      (PEM bytes or path; None = system roots). `client_certificate` + `client_key`: mTLS.
      `server_name`: override the name checked against the server certificate.
    - `token`: bearer token sent as `authorization: Bearer <token>` on every call.
    - `retry`: RetryPolicy, or None to disable retries.
    """

    address: str
    tls: bool = False
    root_certificates: bytes | str | Path | None = None
    client_certificate: bytes | str | Path | None = None
    client_key: bytes | str | Path | None = None
    server_name: str | None = None
    token: str | None = None
    retry: RetryPolicy | None = DEFAULT_RETRY
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    keepalive_time_ms: int | None = None
    options: tuple[tuple[str, object], ...] = ()

    @property
    def secure(self) -> bool:
        return self.tls or any(
            v is not None for v in (self.root_certificates, self.client_certificate, self.client_key)
        )

    def channel_options(self) -> list[tuple[str, object]]:
        opts: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]
        if self.retry is not None:
            opts += [("grpc.enable_retries", 1), ("grpc.service_config", self.retry.service_config())]
        else:
            opts.append(("grpc.enable_retries", 0))
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        if self.keepalive_time_ms:
            opts.append(("grpc.keepalive_time_ms", self.keepalive_time_ms))
        return opts + list(self.options)

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.client_certificate is None) != (self.client_key is None):
            raise ValueError("mTLS needs both client_certificate and client_key")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.root_certificates),
            private_key=_read(self.client_key),
            certificate_chain=_read(self.client_certificate),
        )

    def metadata(self, extra: Sequence[tuple[str, str]] | None = None) -> tuple[tuple[str, str], ...]:
        """Per-call metadata: the bearer token (if any) plus `extra`.

        Sent as metadata rather than call credentials so it also works on plaintext
        loopback channels in development; on the wire both are the same header.
        """
        md = [("authorization", f"Bearer {self.token}")] if self.token else []
        return tuple(md + list(extra or ()))

    def sync_channel(self) -> grpc.Channel:
        if self.secure:
            return grpc.secure_channel(self.address, self.credentials(), options=self.channel_options())
        return grpc.insecure_channel(self.address, options=self.channel_options())

    def aio_channel(self) -> grpc.aio.Channel:
        if self.secure:
            return grpc.aio.secure_channel(self.address, self.credentials(), options=self.channel_options())
        return grpc.aio.insecure_channel(self.address, options=self.channel_options())


def default_address(service: str) -> str:
    """HOST:PORT of a service on this machine with the platform's default ports."""
    return f"{DEFAULT_HOST}:{DEFAULT_PORTS[service]}"
