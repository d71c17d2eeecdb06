"""Pieces every InternLM2 gRPC server shares.

config        ServerConfig: address, TLS, auth, limits, keepalive, shutdown timings (from CLI args)
errors        ServiceError and its google.rpc.Status encoding (BadRequest field violations, ...)
context       the per-call request id (a contextvar) and its metadata key
logs          JSON log lines carrying the service name and the request id
interceptors  request id + access log, error mapping, bearer auth, readiness gate
metrics       Prometheus registry per server, RPC metrics, the metrics HTTP server
tls           server credentials for TLS and mTLS
app           GrpcApp: builds the grpc.aio server, health, reflection; start, drain, stop
"""

from .app import GrpcApp, run_app
from .config import ServerConfig
from .context import REQUEST_ID_KEY, current_request_id
from .errors import ServiceError, Violation

__all__ = [
    "REQUEST_ID_KEY",
    "GrpcApp",
    "ServerConfig",
    "ServiceError",
    "Violation",
    "current_request_id",
    "run_app",
]
