"""Blocking clients, one per service. The asyncio twins live in `internlm2_client.aio`.

The methods themselves are declared once in `internlm2_client._api` (see `_base` for how to add
one); this module is the blocking transport: how a unary call, a server stream and a page loop
run on a `grpc.Channel`. Every method takes `timeout=` (seconds, the call's deadline) and raises
only `internlm2_client.errors.InternLM2Error` subclasses.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import grpc

from internlm2_client import _foreign
from internlm2_client import types as t
from internlm2_client._api import InferenceAPI, RewardAPI, TokenizerAPI, TrainingAPI
from internlm2_client._base import (
    UNSET,
    ClientBase,
    GenerationFold,
    Pager,
    ReadinessWait,
    Rpc,
    finish_method,
    health_method,
    health_watch_method,
    method_signature,
)
from internlm2_client.errors import InternLM2Error, from_rpc_error

T = TypeVar("T")


class ServerStream(Generic[T]):
    """Iterator over a server stream's converted messages; `cancel()` ends it early
    (the server sees CANCELLED and frees what the call held). Context manager."""

    def __init__(self, call, convert: Callable[[Any], T | None]):
        self._call = call
        self._convert = convert
        self._done = False

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        while True:
            try:
                message = next(self._call)
            except StopIteration:
                self._done = True
                raise
            except grpc.RpcError as e:
                self._done = True
                raise from_rpc_error(e) from e
            item = self._convert(message)
            if item is not None:
                return item

    def cancel(self) -> None:
        """Cancels the call; a later `next()` raises CancelledError."""
        if not self._done:
            self._call.cancel()

    close = cancel

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()


class GenerationStream(ServerStream[t.GenerateDelta], GenerationFold):
    """Yields GenerateDelta objects; after the last one `result()` returns the whole
    GenerateResult (finish reason, usage, tool calls). `request_id` is known once the
    first message arrived (or given by the caller)."""

    def __init__(self, call, request_id: str = ""):
        super().__init__(call, self._on_message)
        self._start_fold(request_id)

    def result(self) -> t.GenerateResult:
        """Drains the stream (if not yet done) and returns the folded result."""
        for _ in self:
            pass
        return self._folded()


class SyncClient(ClientBase):
    """The blocking transport: owns one grpc.Channel; context manager; `close()` releases it."""

    STREAM_TYPES = (ServerStream, GenerationStream)  # this transport's stream wrappers (ClientBase)

    def _new_channel(self, config):
        return config.sync_channel()

    def _call(self, method: Callable, request, timeout: float | None = UNSET):
        try:
            return method(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    @classmethod
    def _unary_method(cls, name: str, rpc: Rpc) -> Callable:
        def method(self, *args, timeout=UNSET, **kwargs):
            return rpc.convert(self._call(self._rpc(rpc.method), rpc.build(*args, **kwargs), timeout))

        return finish_method(method, name, cls, rpc.build.__doc__, method_signature(rpc.build))

    @classmethod
    def _stream_method(cls, name: str, rpc: Rpc) -> Callable:
        def method(self, *args, timeout=UNSET, **kwargs):
            return self._open_stream(rpc, rpc.build(*args, **kwargs), timeout)

        return finish_method(method, name, cls, rpc.build.__doc__, method_signature(rpc.build))

    @classmethod
    def _pager_method(cls, name: str, pager: Pager) -> Callable:
        def method(self, *args, timeout=UNSET, **kwargs):
            list_page = getattr(self, pager.list_method)
            token = ""
            while True:
                page = list_page(*args, page_token=token, timeout=timeout, **kwargs)
                yield from pager.items(page)
                token = page.next_page_token
                if not token:
                    return

        return finish_method(method, name, cls, pager.doc, method_signature(pager.signature, "Iterator"))

    def health(self, service: str | None = None, *, timeout: float | None = UNSET) -> str:
        """grpc.health.v1 status of `service` (default: this client's service):
        "SERVING", "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN"."""
        name = self.SERVICE_NAME if service is None else service
        try:
            resp = self._call(health_method(self.channel), _foreign.HealthCheckRequest(service=name), timeout)
        except InternLM2Error as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise
        return _foreign.HEALTH_STATUS_NAMES.get(resp.status, "UNKNOWN")

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """Blocks until the service's health check (grpc.health.v1, this client's service name) says
        SERVING: the server is up AND its model is loaded. Raises DeadlineExceededError naming the
        service and its last status after `timeout` seconds (None: wait as long as it takes)."""
        wait = ReadinessWait(self.SERVICE_NAME, self.config.address, timeout)
        request = _foreign.HealthCheckRequest(service=self.SERVICE_NAME)
        while True:
            try:
                if wait.use_watch:
                    call = health_watch_method(self.channel)(
                        request, timeout=wait.remaining(), metadata=self._metadata, wait_for_ready=True
                    )
                    try:
                        if any(wait.saw(resp.status) for resp in call):
                            return
                    finally:
                        call.cancel()
                else:
                    resp = health_method(self.channel)(
                        request, timeout=wait.remaining(), metadata=self._metadata, wait_for_ready=True
                    )
                    if wait.saw(resp.status):
                        return
            except grpc.RpcError as e:
                wait.failed(e)
            time.sleep(wait.pause())

    def close(self) -> None:
        if self._owns_channel:
            self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Methods and docstrings are generated from the API declarations (ClientBase.__init_subclass__).
class TokenizerClient(TokenizerAPI, SyncClient):
    pass


class InferenceClient(InferenceAPI, SyncClient):
    pass


class RewardClient(RewardAPI, SyncClient):
    pass


class TrainingClient(TrainingAPI, SyncClient):
    pass


class _HealthOnly(SyncClient):
    """No service: only the health check of `check_health` (callers always pass an address)."""


def check_health(address: str, service: str = "", *, timeout: float = 5.0, **channel_kwargs) -> str:
    """grpc.health.v1 status of `service` at `address` ("" = the whole server)."""
    with _HealthOnly(address, **channel_kwargs) as client:
        return client.health(service, timeout=timeout)
