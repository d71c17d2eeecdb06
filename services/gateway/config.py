"""GatewayConfig: how the gateway listens (the services' ServerConfig) and which backends it fronts.

One bearer token for the platform: the token clients must send to the gateway (``--auth-token-env``,
default INTERNLM2_AUTH_TOKEN) is also the one the gateway sends to the gRPC services, as every service
of one deployment shares it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..common.config import ConfigError, ServerConfig
from .backends import SERVICE_NAMES, BackendTls

DEFAULT_PORT = 8000
DEFAULT_METRICS_PORT = 9106
DEFAULT_REWARD_MODEL_NAME = "internlm2-reward"


@dataclass(frozen=True)
class GatewayConfig:
    server: ServerConfig
    # service name (inference, tokenizer, reward, training) -> host:port; absent: not offered.
    backends: dict[str, str] = field(default_factory=dict)
    backend_tls: BackendTls = field(default_factory=BackendTls)
    # The id /v1/models lists for the reward model, and that /score and /pooling accept.
    reward_model_name: str = DEFAULT_REWARD_MODEL_NAME

    def __post_init__(self) -> None:
        if not self.backends:
            raise ConfigError("the gateway needs at least one backend: --inference, --tokenizer, --reward, --training")
        unknown = set(self.backends) - set(SERVICE_NAMES)
        if unknown:
            raise ConfigError(f"unknown backend(s): {', '.join(sorted(unknown))}")
        tls = self.backend_tls
        if (tls.client_cert is None) != (tls.client_key is None):
            raise ConfigError("--backend-client-cert and --backend-client-key must be given together")

    @classmethod
    def from_args(cls, args) -> GatewayConfig:
        server = ServerConfig.from_args(args, "gateway", DEFAULT_PORT, DEFAULT_METRICS_PORT)
        backends = {name: getattr(args, name) for name in SERVICE_NAMES if getattr(args, name, None)}
        tls = BackendTls(
            ca_cert=getattr(args, "backend_ca_cert", None),
            client_cert=getattr(args, "backend_client_cert", None),
            client_key=getattr(args, "backend_client_key", None),
            server_name=getattr(args, "backend_server_name", None),
        )
        reward_name = getattr(args, "reward_model_name", None) or DEFAULT_REWARD_MODEL_NAME
        return cls(server=server, backends=backends, backend_tls=tls, reward_model_name=reward_name)
