"""``internlm2 serve training [--redis-url URL]``: the training service alone."""

from __future__ import annotations

import os

from ..common.app import GrpcApp, run_app
from ..common.config import ConfigError, ServerConfig
from ..common.logs import configure_logging
from .servicer import TrainingService

DEFAULT_PORT = 50054
DEFAULT_METRICS_PORT = 9104
REDIS_ENV = "REDIS_URL"


def redis_url_from_args(args) -> str:
    url = getattr(args, "redis_url", None) or os.environ.get(REDIS_ENV)
    if not url:
        raise ConfigError(f"give --redis-url URL or set {REDIS_ENV} (job records live in Redis)")
    return url


def build_app(args) -> GrpcApp:
    config = ServerConfig.from_args(args, "training", DEFAULT_PORT, DEFAULT_METRICS_PORT)
    service = TrainingService(redis_url_from_args(args), work_dir=getattr(args, "work_dir", None))
    app = GrpcApp(config, [service])
    service.health = app.health  # NOT_SERVING while Redis is unreachable
    return app


def serve(args) -> int:
    app = build_app(args)  # usage errors surface here, before logging is taken over
    configure_logging("training", getattr(args, "log_level", None) or "INFO")
    return run_app(app)
