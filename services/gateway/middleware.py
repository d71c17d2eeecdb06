"""What every HTTP request goes through, as one pure-ASGI middleware (no per-chunk overhead on streams):

    request id   the client's ``X-Request-Id`` (printable, at most 128 characters) or a new one; set as the
                 call's contextvar (JSON logs carry it, backend calls send it as ``x-request-id``) and
                 returned as the ``X-Request-Id`` response header
    auth         ``Authorization: Bearer <token>`` compared in constant time, as the gRPC services do;
                 the probes and the playground's static page are exempt (they hold no data)
    metrics      requests by route template, method and status; latency until the response ended
    access log   one JSON line per request
"""

from __future__ import annotations

import hmac
import logging
import time

from ..common import context as request_context
from .errors import ApiError

log = logging.getLogger("internlm2.services.gateway.http")

# Paths served without a token: probes, metrics-free static playground files.
OPEN_PATHS = ("/health", "/ready", "/", "/favicon.ico")
OPEN_PREFIXES = ("/static/",)


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class GatewayMiddleware:
    def __init__(self, app, token: str | None, metrics):
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None
        self.metrics = metrics

    def _authorized(self, scope) -> ApiError | None:
        if self.expected is None:
            return None
        path = scope.get("path", "")
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return None
        given = _header(scope, b"authorization")
        if not given:
            return ApiError(401, "missing bearer token (header 'Authorization: Bearer <token>')",
                            code="missing_api_key")
        if not hmac.compare_digest(given.encode("latin-1"), self.expected):
            return ApiError(401, "invalid bearer token", code="invalid_api_key")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = request_context.request_id_from_metadata([("x-request-id", _header(scope, b"x-request-id"))])
        request_id = given or request_context.new_request_id()
        token = request_context.set_request_id(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.monotonic()
        status = 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            refusal = self._authorized(scope)
            if refusal is not None:
                response = refusal.response()
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.monotonic() - start
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(template, scope["method"], status, elapsed)
            level = logging.DEBUG if template in ("/health", "/ready") else logging.INFO
            log.log(level, "http %s %s %d", scope["method"], scope.get("path"), status, extra={
                "fields": {"method": scope["method"], "path": scope.get("path"), "route": template, "status": status,
                           "duration_ms": round(elapsed * 1000, 2)}})
            request_context.reset_request_id(token)
