"""Errors in OpenAI's JSON shape, and the gRPC statuses of the backends mapped onto HTTP.

Every failure the gateway answers is ``{"error": {"message", "type", "param", "code"}}`` with the HTTP
status OpenAI clients act on: 400 naming the request parameter, 401, 404 for an unknown model or job,
409 for a job in the wrong state, 429 with ``Retry-After`` when the engine is overloaded, 503 while a
backend loads or drains, 504 past a deadline. A backend's INVALID_ARGUMENT names a proto path
(``sampling.top_p``, ``chat.messages[2].role``); ``ProtoPaths`` turns it back into the name the
client sent (``top_p``, ``messages[2].role``), so the client can point at its own field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

import grpc
from fastapi.responses import JSONResponse

from internlm2_client.errors import InternLM2Error

# HTTP status -> OpenAI error type (the `type` clients switch on).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}

# gRPC status of a backend -> HTTP status of the gateway's answer.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499,
    # The gateway's own credentials were refused by a backend: a deployment fault, not the client's.
    grpc.StatusCode.UNAUTHENTICATED: 502,
    grpc.StatusCode.PERMISSION_DENIED: 502,
}


class ApiError(Exception):
    """A request failed for a reason the client should see."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    @classmethod
    def bad_param(cls, param: str, message: str, code: str = "invalid_parameter") -> ApiError:
        return cls(400, f"{param}: {message}", param=param, code=code)

    @classmethod
    def unsupported(cls, param: str, message: str = "is not supported by this server") -> ApiError:
        return cls(400, f"{param}: {message}", param=param, code="unsupported_parameter")

    @classmethod
    def model_not_found(cls, model: str, served: list[str]) -> ApiError:
        names = ", ".join(repr(s) for s in served) or "none (the backend is not reachable)"
        return cls(
            404, f"the model {model!r} does not exist; served: {names}", param="model", code="model_not_found"
        )

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}

    def response(self) -> JSONResponse:
        # 499 (client went away) is never sent: nobody is listening. Report it as a 500 if it escapes.
        return JSONResponse(self.body(), status_code=self.status if self.status != 499 else 500, headers=self.headers())


_INDEX = re.compile(r"\[(\d+)\]")


class ProtoPaths:
    """Maps a backend's proto field path onto the request parameter the client sent.

    ``rules`` maps a proto path prefix to the client's name for it; the longest matching prefix wins and
    what follows it (``[2].role``) is kept. Indices of list fields line up because the gateway sends one
    proto element per client element, in order.
    """

    def __init__(self, rules: Mapping[str, str], default: str | None = None):
        self.rules = sorted(rules.items(), key=lambda kv: -len(kv[0]))
        self.default = default

    def __call__(self, path: str) -> str | None:
        for prefix, name in self.rules:
            if path == prefix or path.startswith(prefix + ".") or path.startswith(prefix + "["):
                return name + path[len(prefix) :]
        return self.default


def from_backend(error: InternLM2Error, param_of: Callable[[str], str | None] | None = None) -> ApiError:
    """A backend's failure (the SDK's exception, with the google.rpc details parsed) -> ApiError."""
    status = HTTP_STATUS.get(error.code, 500)
    code = error.reason.lower() if error.reason else error.code.name.lower()
    if status == 400:
        violation = error.violations[0] if error.violations else None
        param = param_of(violation.field) if (violation and param_of) else None
        message = error.message
        if violation and param and violation.field != param:
            # The backend's text names its proto path; say it with the client's parameter name.
            message = f"{param}: {violation.description}"
        return ApiError(400, message, param=param, code=code)
    if status == 429:
        return ApiError(429, error.message, code=code, retry_after_s=error.retry_delay or 1.0)
    if status == 503:
        return ApiError(503, error.message, code=code, retry_after_s=error.retry_delay or 1.0)
    if status == 502:
        return ApiError(502, f"a backend refused the gateway's credentials: {error.message}", code=code)
    return ApiError(status, error.message, code=code)


def from_rpc_error(error: grpc.RpcError, param_of: Callable[[str], str | None] | None = None) -> ApiError:
    from internlm2_client.errors import from_rpc_error as parse

    return from_backend(parse(error), param_of)
