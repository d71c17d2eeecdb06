"""The gateway's ASGI application: routes, error shapes, probes and the playground.

``Gateway`` is the state every route shares (backends, metrics, what is known about the served
models); ``create_app`` wires it into FastAPI. Errors of every kind leave in OpenAI's shape: a
refused request body (pydantic) as 400 naming the parameter by its JSON path (``messages[0].role``),
an unknown route as 404, anything unexpected as 500 carrying the request id (logged with its trace).
"""

from __future__ import annotations

import logging
import time
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .backends import Backends
from .config import GatewayConfig
from .errors import ApiError
from .metrics import GatewayMetrics
from .middleware import GatewayMiddleware

log = logging.getLogger("internlm2.services.gateway")

STATIC_DIR = resources.files("internlm2.services.gateway") / "static"
ACTION_START = "<|action_start|>"
# pydantic's names for union members and scalar types, which are not parameter names.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-plain"}


class Gateway:
    def __init__(self, config: GatewayConfig, backends: Backends | None = None, metrics: GatewayMetrics | None = None):
        self.config = config
        self.backends = backends or Backends(config.backends, config.server.auth_token, config.backend_tls)
        self.metrics = metrics or GatewayMetrics()
        self.started = int(time.time())
        self.draining = False
        self._action_start: int | None = None

    async def models(self, request_id: str | None) -> list[dict]:
        """The models served: the inference model (GetModelInfo) and, with a reward backend, the reward model."""
        out = []
        if "inference" in self.backends.addresses:
            info = await self.backends.model_info(request_id)
            out.append(
                {
                    "id": info.model_name,
                    "object": "model",
                    "created": self.started,
                    "owned_by": "internlm2",
                    "root": info.model_path,
                    "max_model_len": info.max_model_len,
                }
            )
        if "reward" in self.backends.addresses:
            out.append({"id": self.config.reward_model_name, "object": "model", "created": self.started,
                        "owned_by": "internlm2", "root": self.config.reward_model_name, "task": "reward"})
        return out

    async def resolve_model(self, name: str, request_id: str | None) -> str:
        """``name`` if it is the served chat/completion model, else 404 model_not_found."""
        info = await self.backends.model_info(request_id)
        if name != info.model_name:
            info = await self.backends.model_info(request_id, refresh=True)  # a redeployed backend
        if name != info.model_name:
            raise ApiError.model_not_found(name, [info.model_name])
        return name

    def check_reward_model(self, name: str | None) -> None:
        if name is not None and name != self.config.reward_model_name:
            raise ApiError.model_not_found(name, [self.config.reward_model_name])

    async def action_start_id(self, request_id: str | None) -> int | None:
        """The id of ``<|action_start|>`` (where a tool call begins in the token stream); None when
        no tokenizer service is configured (then streamed text is held until the end)."""
        if self._action_start is None:
            info = await self.backends.tokenizer_info(request_id)
            if info is not None:
                self._action_start = next((t.id for t in info.special_tokens if t.content == ACTION_START), None)
        return self._action_start


def _param(loc) -> str | None:
    """pydantic's error location ("body", "messages", 0, "role") -> "messages[0].role"."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part not in _TYPE_TAGS and not any(c in part for c in "[]'(),"):
            out += f".{part}" if out else part
    return out or None


def _validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    if not errors:
        return ApiError(400, "invalid request body", code="invalid_request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {first.get('msg')}", code="invalid_json")
    param = _param(first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        return ApiError.unsupported(param or "request", "is not a parameter this server knows")
    if param is None:
        return ApiError(400, f"invalid request body: {first.get('msg')}", code="invalid_request")
    return ApiError.bad_param(param, first.get("msg", "invalid value"))


def create_app(gateway: Gateway) -> FastAPI:
    from . import routes_extras, routes_jobs, routes_openai

    app = FastAPI(title="InternLM2 gateway", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.gateway = gateway

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        request_id = getattr(request.state, "request_id", None)
        log.exception("unhandled error")
        return ApiError(500, f"internal error (request id {request_id})", code="internal_error").response()

    @app.get("/health")
    async def health():
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """Readiness: every configured backend is SERVING (and the gateway is not draining)."""
        statuses = await gateway.backends.health()
        ok = not gateway.draining and all(s == "SERVING" for s in statuses.values())
        body = {"status": "ready" if ok else ("draining" if gateway.draining else "not ready"), "backends": statuses}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(str(STATIC_DIR / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    app.include_router(routes_openai.router)
    app.include_router(routes_extras.router)
    app.include_router(routes_jobs.router)
    app.add_middleware(GatewayMiddleware, token=gateway.config.server.auth_token, metrics=gateway.metrics)
    return app
