"""What the sync and asyncio clients share: constructor arguments and the channel config."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from internlm2_client import _foreign
from internlm2_client._channel import DEFAULT_RETRY, ChannelConfig, RetryPolicy, default_address


def make_config(
    service: str,
    address: str | None,
    *,
    tls: bool = False,
    root_certificates: bytes | str | Path | None = None,
    client_certificate: bytes | str | Path | None = None,
    client_key: bytes | str | Path | None = None,
    server_name: str | None = None,
    token: str | None = None,
    retry: RetryPolicy | None = DEFAULT_RETRY,
    max_message_bytes: int | None = None,
    keepalive_time_ms: int | None = None,
    options: Sequence[tuple[str, object]] = (),
) -> ChannelConfig:
    kwargs = {} if max_message_bytes is None else {"max_message_bytes": max_message_bytes}
    return ChannelConfig(
        address=address or default_address(service),
        tls=tls,
        root_certificates=root_certificates,
        client_certificate=client_certificate,
        client_key=client_key,
        server_name=server_name,
        token=token,
        retry=retry,
        keepalive_time_ms=keepalive_time_ms,
        options=tuple(options),
        **kwargs,
    )


def health_method(channel):
    """The grpc.health.v1.Health/Check callable on a (sync or aio) channel."""
    return channel.unary_unary(
        _foreign.HEALTH_CHECK_METHOD,
        request_serializer=_foreign.HealthCheckRequest.SerializeToString,
        response_deserializer=_foreign.HealthCheckResponse.FromString,
    )


CLIENT_ARGS_DOC = """
    Connection keywords (all optional):
      address: "host:port" (default 127.0.0.1 and the service's default port).
      timeout: default deadline in seconds of every call (None: no deadline); each
        method's own `timeout=` overrides it.
      tls, root_certificates, client_certificate, client_key, server_name: TLS / mTLS
        (PEM bytes or file paths).
      token: bearer token (`authorization: Bearer ...`).
      retry: RetryPolicy for UNAVAILABLE, None to disable.
      metadata: extra headers sent with every call.
      channel: an existing channel to use instead (then the other keywords only
        supply token/metadata; the caller owns the channel).
"""
