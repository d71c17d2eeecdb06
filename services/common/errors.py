"""Application errors and their wire form: a gRPC status plus a google.rpc.Status in the trailer.

Servicers raise ``ServiceError``; ``ErrorInterceptor`` turns it into the status code, the message
and the ``grpc-status-details-bin`` trailer (grpc guides/error.md). A bad request carries a
``google.rpc.BadRequest`` whose field violations name the field by its proto path
("sampling.top_p", "messages[2].role"); overload carries ``RetryInfo``; every error carries an
``ErrorInfo`` whose reason is a stable upper-case token clients may switch on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

ERROR_DOMAIN = "internlm2.v1"
STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class Violation:
    """One bad field of a request: ``field`` is its proto path."""

    field: str
    description: str
    reason: str = ""


@dataclass
class ServiceError(Exception):
    """A call failed for a reason the client should see (never a server bug)."""

    code: grpc.StatusCode
    message: str
    violations: list[Violation] = field(default_factory=list)
    reason: str = ""
    retry_after_s: float | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    # ---- constructors for the codes the platform uses -------------------------------------
    @classmethod
    def invalid_argument(cls, field_path: str, description: str, reason: str = "INVALID_FIELD") -> ServiceError:
        return cls(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{field_path}: {description}",
            [Violation(field_path, description, reason)],
            reason="INVALID_ARGUMENT",
        )

    @classmethod
    def invalid_fields(cls, violations: list[Violation]) -> ServiceError:
        message = "; ".join(f"{v.field}: {v.description}" for v in violations)
        return cls(grpc.StatusCode.INVALID_ARGUMENT, message, list(violations), reason="INVALID_ARGUMENT")

    @classmethod
    def not_found(cls, what: str, reason: str = "NOT_FOUND") -> ServiceError:
        return cls(grpc.StatusCode.NOT_FOUND, what, reason=reason)

    @classmethod
    def failed_precondition(cls, message: str, reason: str = "FAILED_PRECONDITION") -> ServiceError:
        return cls(grpc.StatusCode.FAILED_PRECONDITION, message, reason=reason)

    @classmethod
    def resource_exhausted(cls, message: str, retry_after_s: float = 1.0) -> ServiceError:
        return cls(grpc.StatusCode.RESOURCE_EXHAUSTED, message, reason="OVERLOADED", retry_after_s=retry_after_s)

    @classmethod
    def unavailable(cls, message: str, reason: str = "UNAVAILABLE") -> ServiceError:
        return cls(grpc.StatusCode.UNAVAILABLE, message, reason=reason)

    @classmethod
    def unauthenticated(cls, message: str) -> ServiceError:
        return cls(grpc.StatusCode.UNAUTHENTICATED, message, reason="UNAUTHENTICATED")

    # ---- wire form ----------------------------------------------------------------------
    def to_status_proto(self, request_id: str | None = None) -> status_pb2.Status:
        details = []
        info = error_details_pb2.ErrorInfo(reason=self.reason or self.code.name, domain=ERROR_DOMAIN)
        if request_id:
            info.metadata["request_id"] = request_id
        details.append(info)
        if self.violations:
            details.append(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description, reason=v.reason
                        )
                        for v in self.violations
                    ]
                )
            )
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        packed = []
        for detail in details:
            any_msg = any_pb2.Any()
            any_msg.Pack(detail)
            packed.append(any_msg)
        return status_pb2.Status(code=_CODE_NUMBERS[self.code], message=self.message, details=packed)

    def trailing_metadata(self, request_id: str | None = None) -> tuple[tuple[str, bytes], ...]:
        return ((STATUS_DETAILS_KEY, self.to_status_proto(request_id).SerializeToString()),)


_CODE_NUMBERS = {code: code.value[0] for code in grpc.StatusCode}
assert _CODE_NUMBERS[grpc.StatusCode.INVALID_ARGUMENT] == code_pb2.INVALID_ARGUMENT
