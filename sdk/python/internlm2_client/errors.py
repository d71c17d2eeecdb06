"""One exception hierarchy for every failed call: `InternLM2Error` and a subclass per status code.

Every SDK method raises these instead of `grpc.RpcError` (the original error is kept as
`__cause__`). Rich details the server sent (google.rpc.Status in the trailer) are parsed:
`InvalidArgumentError.field` / `.violations` from BadRequest, `.retry_delay` from
RetryInfo, `.reason` from ErrorInfo.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from internlm2_client import _foreign

REQUEST_ID_HEADER = "x-request-id"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request (google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str
    reason: str = ""


class InternLM2Error(Exception):
    """A call failed. `code` is the grpc.StatusCode, `message` the server's text.

    `details` holds the decoded google.rpc detail messages; `request_id` the id the
    server logged the call under (its `x-request-id` header/trailer), when it sent one.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        details: list | None = None,
        request_id: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = list(details or [])
        self.request_id = request_id
        self.reason = ""
        self.retry_delay: float | None = None
        self.violations: list[FieldViolation] = []
        for d in self.details:
            if isinstance(d, _foreign.ErrorInfo):
                self.reason = d.reason
            elif isinstance(d, _foreign.RetryInfo):
                self.retry_delay = d.retry_delay.seconds + d.retry_delay.nanos / 1e9
            elif isinstance(d, _foreign.BadRequest):
                self.violations += [FieldViolation(v.field, v.description, v.reason) for v in d.field_violations]

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.violations:
            text += " (" + "; ".join(f"{v.field}: {v.description}" for v in self.violations) + ")"
        return text


class CancelledError(InternLM2Error):
    """The call was cancelled (by the client, e.g. `stream.cancel()`, or the server)."""

    code = grpc.StatusCode.CANCELLED


class UnknownError(InternLM2Error):
    """The server failed in an unexpected way (status UNKNOWN)."""

    code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(InternLM2Error, ValueError):
    """The request was rejected; `field` names the first bad field (e.g. "sampling.top_p")."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    @property
    def field(self) -> str | None:
        return self.violations[0].field if self.violations else None


class DeadlineExceededError(InternLM2Error, TimeoutError):
    """The call's deadline (`timeout=`) passed before it completed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(InternLM2Error, LookupError):
    """An id (job, request) or name (stage) is unknown."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(InternLM2Error):
    """The thing to create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(InternLM2Error):
    """Authenticated, but not allowed."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(InternLM2Error):
    """The server is overloaded (engine queue full) or a message is too large; retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(InternLM2Error):
    """The target is in the wrong state (e.g. cancelling a finished job)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(InternLM2Error):
    """The operation was aborted (concurrency conflict)."""

    code = grpc.StatusCode.ABORTED


class OutOfRangeError(InternLM2Error):
    """A value is past the valid range (e.g. a page token)."""

    code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(InternLM2Error):
    """The server does not implement this RPC."""

    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(InternLM2Error):
    """The server hit a bug."""

    code = grpc.StatusCode.INTERNAL


class UnavailableError(InternLM2Error, ConnectionError):
    """The server cannot be reached or is shutting down (retried automatically first)."""

    code = grpc.StatusCode.UNAVAILABLE


class DataLossError(InternLM2Error):
    """Unrecoverable data loss."""

    code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(InternLM2Error, PermissionError):
    """The bearer token is missing or wrong."""

    code = grpc.StatusCode.UNAUTHENTICATED


ERROR_CLASSES: dict[grpc.StatusCode, type[InternLM2Error]] = {
    cls.code: cls
    for cls in (
        CancelledError,
        UnknownError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
}


def _metadata_value(metadata, key: str) -> str | None:
    for k, v in metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("utf-8", "replace")
    return None


def from_rpc_error(error: grpc.RpcError) -> InternLM2Error:
    """Maps a grpc.RpcError (sync or aio) onto the hierarchy; parses its rich details."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = error.details() if hasattr(error, "details") else str(error)
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    initial = error.initial_metadata() if hasattr(error, "initial_metadata") else None
    status, details = _foreign.parse_status_details(trailing)
    if status is not None and status.message and not message:
        message = status.message
    request_id = _metadata_value(trailing, REQUEST_ID_HEADER) or _metadata_value(initial, REQUEST_ID_HEADER)
    cls = ERROR_CLASSES.get(code, InternLM2Error)
    return cls(message or code.name, code=code, details=details, request_id=request_id)
