"""asyncio clients: the same API as the blocking ones, with `await` and `async for`.

async with aio.InferenceClient("127.0.0.1:50052") as client:
    async with client.generate_stream("Hello", max_new_tokens=32) as stream:
        async for delta in stream:
            print(delta.text, end="")
    result = await stream.result()

The methods are declared once in `internlm2_client._api` (see `_base` for how to add one); this
module is the asyncio transport: unary calls are coroutines, server streams are started without
`await` and iterated with `async for`, page loops are async generators.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

import grpc

from internlm2_client import _foreign, errors
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

__all__ = [
    "GenerationStream",
    "InferenceClient",
    "RewardClient",
    "ServerStream",
    "TokenizerClient",
    "TrainingClient",
    "check_health",
]

T = TypeVar("T")


class ServerStream(Generic[T]):
    """Async iterator over a server stream's converted messages; `cancel()` ends it."""

    def __init__(self, call, convert: Callable[[Any], T | None]):
        self._call = call
        self._convert = convert
        self._iter = call.__aiter__()
        self._done = False

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        while True:
            try:
                message = await self._iter.__anext__()
            except StopAsyncIteration:
                self._done = True
                raise
            except grpc.RpcError as e:
                self._done = True
                raise from_rpc_error(e) from e
            except asyncio.CancelledError:
                # The call was cancelled locally (grpc.aio raises asyncio's error then).
                if self._call.cancelled():
                    self._done = True
                    raise errors.CancelledError("the call was cancelled") from None
                raise
            item = self._convert(message)
            if item is not None:
                return item

    def cancel(self) -> None:
        """Cancels the call; a later iteration raises CancelledError (ours)."""
        if not self._done:
            self._call.cancel()

    close = cancel

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        self.cancel()


class GenerationStream(ServerStream[t.GenerateDelta], GenerationFold):
    """Yields GenerateDelta; `await result()` gives the whole GenerateResult."""

    def __init__(self, call, request_id: str = ""):
        super().__init__(call, self._on_message)
        self._start_fold(request_id)

    async def result(self) -> t.GenerateResult:
        """Drains the stream (if not yet done) and returns the folded result."""
        async for _ in self:
            pass
        return self._folded()


class AioClient(ClientBase):
    """The asyncio transport: owns one grpc.aio channel; `async with` or `await close()`."""

    STREAM_TYPES = (ServerStream, GenerationStream)  # this transport's stream wrappers (ClientBase)

    CLIENT_KIND = "asyncio client"

    def _new_channel(self, config):
        return config.aio_channel()

    async def _call(self, method: Callable, request, timeout: float | None = UNSET):
        try:
            return await method(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    @classmethod
    def _unary_method(cls, name: str, rpc: Rpc) -> Callable:
        async def method(self, *args, timeout=UNSET, **kwargs):
            return rpc.convert(await self._call(self._rpc(rpc.method), rpc.build(*args, **kwargs), timeout))

        return finish_method(method, name, cls, rpc.build.__doc__, method_signature(rpc.build))

    @classmethod
    def _stream_method(cls, name: str, rpc: Rpc) -> Callable:
        def method(self, *args, timeout=UNSET, **kwargs):
            return self._open_stream(rpc, rpc.build(*args, **kwargs), timeout)

        return finish_method(method, name, cls, rpc.build.__doc__, method_signature(rpc.build))

    @classmethod
    def _pager_method(cls, name: str, pager: Pager) -> Callable:
        async def method(self, *args, timeout=UNSET, **kwargs):
            list_page = getattr(self, pager.list_method)
            token = ""
            while True:
                page = await list_page(*args, page_token=token, timeout=timeout, **kwargs)
                for item in pager.items(page):
                    yield item
                token = page.next_page_token
                if not token:
                    return

        return finish_method(method, name, cls, pager.doc, method_signature(pager.signature, "AsyncIterator"))

    async def health(self, service: str | None = None, *, timeout: float | None = UNSET) -> str:
        """grpc.health.v1 status: "SERVING", "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN"."""
        name = self.SERVICE_NAME if service is None else service
        try:
            resp = await self._call(health_method(self.channel), _foreign.HealthCheckRequest(service=name), timeout)
        except InternLM2Error as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise
        return _foreign.HEALTH_STATUS_NAMES.get(resp.status, "UNKNOWN")

    async def wait_until_ready(self, timeout: float | None = None) -> None:
        """Waits until the service's health check (grpc.health.v1, this client's service name) says
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
                        async for resp in call:
                            if wait.saw(resp.status):
                                return
                    finally:
                        call.cancel()
                else:
                    resp = await health_method(self.channel)(
                        request, timeout=wait.remaining(), metadata=self._metadata, wait_for_ready=True
                    )
                    if wait.saw(resp.status):
                        return
            except grpc.RpcError as e:
                wait.failed(e)
            await asyncio.sleep(wait.pause())

    async def close(self) -> None:
        if self._owns_channel:
            await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


# Methods and docstrings are generated from the API declarations (ClientBase.__init_subclass__).
class TokenizerClient(TokenizerAPI, AioClient):
    pass


class InferenceClient(InferenceAPI, AioClient):
    pass


class RewardClient(RewardAPI, AioClient):
    pass


class TrainingClient(TrainingAPI, AioClient):
    pass


class _HealthOnly(AioClient):
    """No service: only the health check of `check_health` (callers always pass an address)."""


async def check_health(address: str, service: str = "", *, timeout: float = 5.0, **channel_kwargs) -> str:
    """grpc.health.v1 status of `service` at `address` ("" = the whole server)."""
    async with _HealthOnly(address, **channel_kwargs) as client:
        return await client.health(service, timeout=timeout)
