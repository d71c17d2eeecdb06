"""``internlm2 serve tokenizer --model PATH``: the tokenizer server alone."""

from __future__ import annotations

from ..common.app import GrpcApp, run_app
from ..common.config import ServerConfig
from ..common.logs import configure_logging
from ..common.model_path import resolve_model_path
from .servicer import TokenizerService

DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9101


def build_app(args) -> GrpcApp:
    config = ServerConfig.from_args(args, "tokenizer", DEFAULT_PORT, DEFAULT_METRICS_PORT)
    return GrpcApp(config, [TokenizerService(resolve_model_path(args, "tokenizer"))])


def serve(args) -> int:
    app = build_app(args)  # usage errors surface here, before logging is taken over
    configure_logging("tokenizer", getattr(args, "log_level", None) or "INFO")
    return run_app(app)
