"""``internlm2 serve inference --model PATH``: the inference server alone."""

from __future__ import annotations

from ..common.app import GrpcApp, run_app
from ..common.config import ServerConfig
from ..common.logs import configure_logging
from ..common.model_path import resolve_device, resolve_dtype, resolve_model_path
from .servicer import InferenceService

DEFAULT_PORT = 50052
DEFAULT_METRICS_PORT = 9102

def engine_config_from_args(args):
    """EngineConfig from the `serve inference` engine flags (the SDK's table: one flag per field)."""
    from internlm2.core.engine import EngineConfig
    from internlm2_client.cli._engine_flags import engine_overrides

    return EngineConfig(**engine_overrides(args)).validate()


def build_app(args) -> GrpcApp:
    config = ServerConfig.from_args(args, "inference", DEFAULT_PORT, DEFAULT_METRICS_PORT)
    service = InferenceService(
        resolve_model_path(args, "inference"),
        resolve_device(args),
        resolve_dtype(args),
        engine_config=engine_config_from_args(args),
        model_name=getattr(args, "model_name", None),
    )
    return GrpcApp(config, [service])


def serve(args) -> int:
    app = build_app(args)  # usage errors surface here, before logging is taken over
    configure_logging("inference", getattr(args, "log_level", None) or "INFO")
    return run_app(app)
