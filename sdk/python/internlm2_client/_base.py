"""What the sync and asyncio clients share: RPC declarations, the client base, health waiting.

One definition, two transports
------------------------------
Every client method is declared ONCE, in `internlm2_client._api`, as a request builder with a
decorator saying which RPC it calls and how the response becomes an SDK type:

    @unary("GetJob", returns=lambda resp: cv.job_from_pb(resp.job))
    def get_job(job_id: str):
        "One job (NotFoundError if unknown)."
        return training_pb2.GetJobRequest(job_id=job_id)

`unary` / `server_stream` / `paged` turn the builder into a declaration (`Rpc`, `Pager`); the
transport classes (`_sync.SyncClient`, `aio.AioClient`) turn every declaration of the API classes
they are mixed with into a real method when the client class is created (`ClientBase.
__init_subclass__`): a blocking `def get_job(self, job_id, *, timeout=...)` and an
`async def get_job(...)`, both with the builder's docstring and signature plus `timeout=`, both
sending the client's metadata and raising `internlm2_client.errors` exceptions. A server stream
gives the transport's `ServerStream` (or `GenerationStream`: `stream="generation"`), which is
started without an `await`.

To add a method: add the RPC to the .proto and regenerate, write its converters in `_convert.py`,
and add one decorated builder to the service's API class in `_api.py`. Nothing in `_sync.py` or
`aio.py` changes; the builder must not declare `timeout` (the transport adds it).
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from internlm2_client import _convert as cv
from internlm2_client import _foreign
from internlm2_client import types as t
from internlm2_client._channel import DEFAULT_PORTS, DEFAULT_RETRY, ChannelConfig, RetryPolicy, default_address
from internlm2_client.errors import DeadlineExceededError, InternLM2Error


class _Unset:
    """``timeout=`` not given: the call uses the client's default deadline."""

    def __repr__(self) -> str:
        return "<client default>"


UNSET: Any = _Unset()


# ---- declarations ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Rpc:
    """One RPC method of a client: ``build(*args, **kwargs) -> request``, ``returns(response) -> result``.

    ``stream`` is None for a unary call, else the kind of stream object a server stream returns:
    "events" (each message converted by ``returns``) or "generation" (deltas folded into a result).
    """

    method: str
    build: Callable[..., Any]
    returns: Callable[[Any], Any] | None = None
    stream: str | None = None

    def convert(self, response):
        return response if self.returns is None else self.returns(response)


def unary(method: str, *, returns: Callable[[Any], Any] | None = None) -> Callable[[Callable], Rpc]:
    """Declares a unary-unary method calling RPC ``method``; ``returns`` converts its response."""
    return lambda build: Rpc(method, build, returns)


def server_stream(
    method: str, *, each: Callable[[Any], Any] | None = None, stream: str = "events"
) -> Callable[[Callable], Rpc]:
    """Declares a server-streaming method: ``each`` converts every message ("events"), or
    ``stream="generation"`` folds GenerateStreamResponse messages into a GenerationStream."""
    return lambda build: Rpc(method, build, each, stream)


@dataclasses.dataclass(frozen=True)
class Pager:
    """Iterate every item of a paged list method (``page_token`` in, ``next_page_token`` out)."""

    list_method: str
    items: Callable[[Any], Sequence]
    doc: str
    signature: inspect.Signature


def paged(list_rpc: Rpc, *, items: Callable[[Any], Sequence], doc: str) -> Pager:
    """A generator over all pages of ``list_rpc`` (same keywords, minus ``page_token``)."""
    sig = inspect.signature(list_rpc.build)
    sig = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "page_token"])
    return Pager(list_rpc.build.__name__, items, doc, sig)


def declarations(cls: type) -> dict[str, Rpc | Pager]:
    """The Rpc / Pager declarations visible on ``cls`` (its API mixins included), by attribute name."""
    found: dict[str, Rpc | Pager] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, (Rpc, Pager)):
                found[name] = value
            elif name in found:
                del found[name]  # overridden by a plain attribute further down
    return found


def method_signature(build: Callable | inspect.Signature, returns: Any = UNSET) -> inspect.Signature:
    """``self`` + the builder's parameters + a keyword-only ``timeout`` (before any ``**kwargs``);
    the builder's return annotation unless ``returns`` is given."""
    sig = build if isinstance(build, inspect.Signature) else inspect.signature(build)
    params = list(sig.parameters.values())
    if any(p.name == "timeout" for p in params):
        raise TypeError("a request builder must not declare timeout=; the transport adds it")
    timeout = inspect.Parameter("timeout", inspect.Parameter.KEYWORD_ONLY, default=UNSET, annotation="float | None")
    tail = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    head = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    annotation = sig.return_annotation if returns is UNSET else returns
    return sig.replace(parameters=[self_param, *head, timeout, *tail], return_annotation=annotation)


def finish_method(fn: Callable, name: str, owner: type, doc: str | None, sig: inspect.Signature) -> Callable:
    fn.__name__ = name
    fn.__qualname__ = f"{owner.__qualname__}.{name}"
    fn.__module__ = owner.__module__
    fn.__doc__ = doc
    fn.__signature__ = sig
    return fn


# ---- the client base both transports extend ---------------------------------------------------------------------
class ClientBase:
    """Owns one channel to one service (or uses the caller's). Subclasses: a transport
    (SyncClient / AioClient) mixed with a service's API class (``SERVICE``, ``SERVICE_NAME``,
    ``STUB`` and its declarations)."""

    SERVICE: str = ""
    SERVICE_NAME: str = ""
    STUB: Callable | None = None
    CLIENT_KIND = "Client"  # first words of the generated class docstring
    STREAM_TYPES: tuple = ()  # (plain, generation) stream wrappers of the transport

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name, declaration in declarations(cls).items():
            if isinstance(declaration, Pager):
                setattr(cls, name, cls._pager_method(name, declaration))
            elif declaration.stream is None:
                setattr(cls, name, cls._unary_method(name, declaration))
            else:
                setattr(cls, name, cls._stream_method(name, declaration))
        if cls.SERVICE_NAME and vars(cls).get("__doc__") is None:
            port = DEFAULT_PORTS.get(cls.SERVICE)
            cls.__doc__ = f"{cls.CLIENT_KIND} of {cls.SERVICE_NAME} (default port {port})." + CLIENT_ARGS_DOC

    # a transport turns declarations into methods
    @classmethod
    def _unary_method(cls, name: str, rpc: Rpc) -> Callable:
        raise NotImplementedError

    @classmethod
    def _stream_method(cls, name: str, rpc: Rpc) -> Callable:
        raise NotImplementedError

    @classmethod
    def _pager_method(cls, name: str, pager: Pager) -> Callable:
        raise NotImplementedError

    def _new_channel(self, config: ChannelConfig):
        raise NotImplementedError

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        channel=None,
        **channel_kwargs,
    ):
        self.config = make_config(self.SERVICE or "tokenizer", address, **channel_kwargs)
        self._owns_channel = channel is None
        self.channel = channel if channel is not None else self._new_channel(self.config)
        self._timeout = timeout
        self._metadata = self.config.metadata(metadata)
        self._stub = self.STUB(self.channel) if self.STUB is not None else None

    def _deadline(self, timeout):
        return self._timeout if timeout is UNSET else timeout

    def _open_stream(self, rpc: Rpc, request, timeout):
        """A server-streaming call wrapped in this transport's stream type (``STREAM_TYPES``: plain,
        generation)."""
        plain, generation = self.STREAM_TYPES
        call = self._rpc(rpc.method)(request, timeout=self._deadline(timeout), metadata=self._metadata)
        if rpc.stream == "generation":
            return generation(call, request.request_id)
        return plain(call, rpc.convert)

    def _rpc(self, method: str):
        return getattr(self._stub, method)


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


# ---- streams: what both transports' GenerationStream fold ----------------------------------------------------
class GenerationFold:
    """Collects a GenerateStream's deltas and final message; ``_on_message`` is the stream's converter."""

    def _start_fold(self, request_id: str) -> None:
        self.request_id = request_id
        self.deltas: list[t.GenerateDelta] = []
        self.final = None

    def _on_message(self, msg) -> t.GenerateDelta | None:
        self.request_id = msg.request_id or self.request_id
        if msg.HasField("final"):
            self.final = msg.final
            return None
        delta = cv.delta_from_pb(msg.delta)
        self.deltas.append(delta)
        return delta

    def _folded(self) -> t.GenerateResult:
        if self.final is None:
            raise InternLM2Error("the stream ended without a final message", code=grpc.StatusCode.INTERNAL)
        return cv.result_from_stream(self.request_id, self.deltas, self.final)


# ---- health ------------------------------------------------------------------------------------------------
def health_method(channel):
    """The grpc.health.v1.Health/Check callable on a (sync or aio) channel."""
    return channel.unary_unary(
        _foreign.HEALTH_CHECK_METHOD,
        request_serializer=_foreign.HealthCheckRequest.SerializeToString,
        response_deserializer=_foreign.HealthCheckResponse.FromString,
    )


HEALTH_WATCH_METHOD = "/grpc.health.v1.Health/Watch"  # same messages as Check (_foreign)


def health_watch_method(channel):
    """The grpc.health.v1.Health/Watch callable (a server stream of status changes)."""
    return channel.unary_stream(
        HEALTH_WATCH_METHOD,
        request_serializer=_foreign.HealthCheckRequest.SerializeToString,
        response_deserializer=_foreign.HealthCheckResponse.FromString,
    )


SERVING = "SERVING"


class ReadinessWait:
    """The bookkeeping of ``wait_until_ready``: the deadline, the last status seen, the pause between
    attempts (a Watch that ended, a server not up yet), and the error when time runs out.

    The loop itself lives in each transport: Watch the service's health (waiting for the channel to
    connect) until it says SERVING; a server without Watch is polled with Check instead.
    """

    FIRST_PAUSE_S = 0.05
    MAX_PAUSE_S = 1.0

    def __init__(self, service: str, address: str, timeout: float | None):
        self.service = service or "the server"
        self.address = address
        self.timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self.last = "no answer (is the server running?)"
        self.use_watch = True
        self._pause = self.FIRST_PAUSE_S

    def remaining(self) -> float | None:
        """Seconds left (None: no deadline); raises the timeout error once none are left."""
        if self._deadline is None:
            return None
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise self.timed_out()
        return left

    def saw(self, status: int) -> bool:
        """Records a health answer; True when it is SERVING."""
        self.last = _foreign.HEALTH_STATUS_NAMES.get(status, f"status {status}")
        return self.last == SERVING

    def failed(self, error: grpc.RpcError) -> None:
        """A health call failed: remember why, switch to Check if Watch is not implemented,
        or give up if the deadline passed."""
        code = error.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise self.timed_out() from None
        if code == grpc.StatusCode.UNIMPLEMENTED and self.use_watch:
            self.use_watch = False
            return
        if code == grpc.StatusCode.NOT_FOUND:
            self.last = "SERVICE_UNKNOWN (the server does not host this service)"
        else:
            self.last = f"{code.name}: {error.details()}"

    def pause(self) -> float:
        """Seconds to wait before the next attempt (growing, never past the deadline)."""
        pause, self._pause = self._pause, min(self._pause * 2, self.MAX_PAUSE_S)
        remaining = self.remaining()
        return pause if remaining is None else min(pause, remaining)

    def timed_out(self) -> DeadlineExceededError:
        return DeadlineExceededError(
            f"{self.service} at {self.address} was not SERVING within {self.timeout}s (last health status: {self.last})"
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
