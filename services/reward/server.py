"""``internlm2 serve reward --model PATH``: the reward server alone."""

from __future__ import annotations

from ..common.app import GrpcApp, run_app
from ..common.config import ServerConfig
from ..common.logs import configure_logging
from ..common.model_path import resolve_device, resolve_dtype, resolve_model_path
from .servicer import RewardService

DEFAULT_PORT = 50053
DEFAULT_METRICS_PORT = 9103


def build_app(args) -> GrpcApp:
    config = ServerConfig.from_args(args, "reward", DEFAULT_PORT, DEFAULT_METRICS_PORT)
    service = RewardService(resolve_model_path(args, "reward"), resolve_device(args), resolve_dtype(args))
    return GrpcApp(config, [service])


def serve(args) -> int:
    app = build_app(args)  # usage errors surface here, before logging is taken over
    configure_logging("reward", getattr(args, "log_level", None) or "INFO")
    return run_app(app)
