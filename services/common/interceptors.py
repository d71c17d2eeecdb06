"""Cross-cutting concerns of every call, as grpc.aio server interceptors.

Each interceptor wraps the method's behaviour in an async context manager (``around``) that runs
in the call's own task, around the servicer code, for every handler kind (unary and streaming,
coroutine or async-generator servicers alike). Order on the server, outermost first:

    RequestIdInterceptor   request id contextvar, ``x-request-id`` header, access log, RPC metrics
    ErrorInterceptor       ServiceError -> status + google.rpc.Status trailer; bugs -> INTERNAL
    AuthInterceptor        ``authorization: Bearer <token>`` (health exempt) -> UNAUTHENTICATED
    ReadinessInterceptor   UNAVAILABLE while the model loads and while draining (health exempt)
    DecodeInterceptor      a request protobuf cannot parse -> INVALID_ARGUMENT naming the bad field
                           (after auth: an unauthenticated caller learns nothing about its input);
                           large requests parsed in a worker thread
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import logging
import time
from collections.abc import Callable

import grpc

from . import context as request_context
from .decoding import PendingRequest, UndecodableRequest, tolerant_deserializer
from .errors import ServiceError

log = logging.getLogger("internlm2.services.rpc")

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")


def _wrap(behavior: Callable, around: Callable, response_streaming: bool) -> Callable:
    """``behavior`` run inside ``around(request, context)``, keeping its kind (grpc.aio dispatches on
    whether a streaming behaviour is an async-generator function or a coroutine function). An
    ``around`` that yields a value hands the behaviour that request instead (DecodeInterceptor)."""
    if response_streaming and inspect.isasyncgenfunction(behavior):

        async def stream_wrapper(request, context):
            async with around(request, context) as replaced:
                request = request if replaced is None else replaced
                # aclosing: a cancelled call must run the servicer's cleanup (engine abort) now, not at GC.
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response

        return stream_wrapper

    async def wrapper(request, context):
        async with around(request, context) as replaced:
            request = request if replaced is None else replaced
            result = behavior(request, context)
            if inspect.isawaitable(result):
                result = await result
            return result

    return wrapper


def wrap_handler(
    handler: grpc.RpcMethodHandler | None, around: Callable, request_deserializer: Callable | None = None
) -> grpc.RpcMethodHandler | None:
    """``handler`` with its behaviour run inside ``around(request, context)`` (and, if given, another
    request deserializer)."""
    if handler is None:
        return None
    if handler.unary_unary:
        kind, behavior = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    elif handler.unary_stream:
        kind, behavior = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    elif handler.stream_unary:
        kind, behavior = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    else:
        kind, behavior = grpc.stream_stream_rpc_method_handler, handler.stream_stream
    return kind(
        _wrap(behavior, around, handler.response_streaming),
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Base: subclasses implement ``around(method, context)`` (an async context manager) and may
    exempt methods with ``applies_to``."""

    def applies_to(self, method: str) -> bool:
        return True

    def around(self, method: str, context: grpc.aio.ServicerContext) -> contextlib.AbstractAsyncContextManager:
        raise NotImplementedError

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if not self.applies_to(method):
            return handler
        return wrap_handler(handler, lambda request, context: self.around(method, context))


# A server learns only THAT a call was cancelled, not why. gRPC's deadline timer (its own clock) can
# fire a fraction of a millisecond before ``time_remaining()`` (Python's clock) reaches zero, so a
# call cancelled this close to its deadline is counted as having hit it; a client's own cancellation
# that close to its deadline is indistinguishable from it anyway.
DEADLINE_SLACK_S = 0.05


def final_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status a finished call ended with, as far as the server can tell."""
    remaining = context.time_remaining()
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        if remaining is not None and remaining <= DEADLINE_SLACK_S:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if error is not None and not isinstance(error, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN
    if remaining is not None and remaining <= 0:
        # The servicer returned (say, after noticing context.done()) once the deadline had passed:
        # gRPC had already ended the call with DEADLINE_EXCEEDED, whatever the servicer did after.
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.OK


class RequestIdInterceptor(CallInterceptor):
    """Gives every call a request id (the client's ``x-request-id`` or a new one), visible through
    ``current_request_id()`` and in every log line of the call, sent back as the ``x-request-id``
    header; logs one access line per call and records RPC metrics."""

    def __init__(self, rpc_metrics=None):
        self.rpc_metrics = rpc_metrics

    @contextlib.asynccontextmanager
    async def around(self, method, context):
        request_id = (
            request_context.request_id_from_metadata(context.invocation_metadata()) or request_context.new_request_id()
        )
        token = request_context.set_request_id(request_id)
        # Read the peer now: after the call ends (a cancelled stream finalised later) grpc.aio's
        # context.peer() reads the freed C-core call and can crash the process (seen in CI).
        peer = context.peer()
        start = time.monotonic()
        error: BaseException | None = None
        try:
            await context.send_initial_metadata(((request_context.REQUEST_ID_KEY, request_id),))
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            elapsed = time.monotonic() - start
            code = final_code(context, error)
            if self.rpc_metrics is not None:
                self.rpc_metrics.observe(method, code, elapsed)
            level = logging.DEBUG if method.startswith(HEALTH_PREFIX) else logging.INFO
            log.log(
                level,
                "rpc %s %s",
                method,
                code.name,
                extra={
                    "fields": {
                        "method": method,
                        "code": code.name,
                        "duration_ms": round(elapsed * 1000, 2),
                        "peer": peer,
                    }
                },
            )
            with contextlib.suppress(ValueError):  # finalised outside the call's context (GC of a stream)
                request_context.reset_request_id(token)


class ErrorInterceptor(CallInterceptor):
    """Turns ``ServiceError`` into its status code, message and google.rpc.Status details, and any
    other exception (a bug) into INTERNAL without leaking its text; cancellation passes through."""

    @contextlib.asynccontextmanager
    async def around(self, method, context):
        try:
            yield
        except ServiceError as exc:
            await _abort(context, exc)
        except (asyncio.CancelledError, grpc.aio.AbortError, GeneratorExit):
            raise
        except Exception:
            request_id = request_context.current_request_id()
            log.exception("unhandled error in %s", method)
            await _abort(
                context,
                ServiceError(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})", reason="INTERNAL"),
            )


async def _abort(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
    request_id = request_context.current_request_id()
    metadata = error.trailing_metadata(request_id)
    if request_id:
        metadata += ((request_context.REQUEST_ID_KEY, request_id),)
    await context.abort(error.code, error.message, trailing_metadata=metadata)


class AuthInterceptor(CallInterceptor):
    """Requires ``authorization: Bearer <token>`` on every call except health checks (kubelet probes
    carry no credentials)."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("AuthInterceptor needs a non-empty token")
        self._expected = f"Bearer {token}".encode()

    def applies_to(self, method: str) -> bool:
        return not method.startswith(HEALTH_PREFIX)

    @contextlib.asynccontextmanager
    async def around(self, method, context):
        values = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
        if not values:
            raise ServiceError.unauthenticated("missing bearer token (metadata 'authorization: Bearer <token>')")
        if not hmac.compare_digest(str(values[0]).encode(), self._expected):
            raise ServiceError.unauthenticated("invalid bearer token")
        yield


class ReadinessInterceptor(CallInterceptor):
    """Refuses calls with UNAVAILABLE (retryable) until the service is ready and once it drains.
    Health and reflection stay reachable."""

    def __init__(self, is_ready: Callable[[], bool], why_not: Callable[[], str]):
        self.is_ready = is_ready
        self.why_not = why_not

    def applies_to(self, method: str) -> bool:
        return not method.startswith(HEALTH_PREFIX) and not method.startswith(REFLECTION_PREFIXES)

    @contextlib.asynccontextmanager
    async def around(self, method, context):
        if not self.is_ready():
            raise ServiceError.unavailable(self.why_not(), reason="NOT_READY")
        yield


class DecodeInterceptor(grpc.aio.ServerInterceptor):
    """Requests protobuf cannot parse (bad UTF-8 in a string, truncated or corrupt bytes) are refused
    with INVALID_ARGUMENT naming the field, instead of the UNKNOWN gRPC answers when a deserializer
    raises; large requests are parsed in a worker thread, not on the event loop. Innermost, so auth
    and readiness are answered first; streamed requests (none in this API) keep gRPC's handling."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        return wrap_handler(handler, _decoded, tolerant_deserializer(handler.request_deserializer))


@contextlib.asynccontextmanager
async def _decoded(request, context):
    if isinstance(request, PendingRequest):
        request = await asyncio.to_thread(request.parse)
    if isinstance(request, UndecodableRequest):
        raise request.error()
    yield request
