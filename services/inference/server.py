"""``internlm2 serve inference --model PATH``: the inference server alone."""

from __future__ import annotations

from ..common.app import GrpcApp, run_app
from ..common.config import ServerConfig
from ..common.logs import configure_logging
from ..common.model_path import resolve_device, resolve_dtype, resolve_model_path
from .servicer import InferenceService

DEFAULT_PORT = 50052
DEFAULT_METRICS_PORT = 9102

# Optional engine flags (argparse attribute -> EngineConfig field); absent flags keep the defaults.
ENGINE_FLAGS = (
    "max_num_seqs",
    "max_num_batched_tokens",
    "block_size",
    "num_gpu_blocks",
    "kv_cache_memory_fraction",
    "kv_cache_bytes",
    "max_queue_size",
    "max_model_len",
)


def engine_config_from_args(args):
    from internlm2.core.engine import EngineConfig

    overrides = {name: getattr(args, name) for name in ENGINE_FLAGS if getattr(args, name, None) is not None}
    if getattr(args, "no_prefix_caching", False):
        overrides["enable_prefix_caching"] = False
    return EngineConfig(**overrides).validate()


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
