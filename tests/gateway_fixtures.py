"""Helpers for the gateway tests: the real gRPC services and the real HTTP gateway on loopback.

``BackgroundGateway`` runs a ``GatewayServer`` (uvicorn) in its own thread and event loop, the way
``services_fixtures.BackgroundApp`` runs a GrpcApp, so tests talk to it with the official ``openai``
client, httpx or a browser exactly as a user would.
"""

from __future__ import annotations

import asyncio
import threading

from services_fixtures import BackgroundApp, tiny_checkpoints

from internlm2.core.engine import EngineConfig
from internlm2.services.common import GrpcApp, ServerConfig
from internlm2.services.gateway import GatewayConfig, GatewayServer
from internlm2.services.inference import InferenceService
from internlm2.services.reward import RewardService
from internlm2.services.tokenizer import TokenizerService

# Debian's chromium, driven by playwright (which never downloads a browser of its own here), and the flags that
# keep it headless and off the network.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Small enough for two loaded CPU cores, large enough for n=3 x a few concurrent requests.
TEST_ENGINE = dict(max_num_seqs=16, max_num_batched_tokens=1024, num_gpu_blocks=256, max_model_len=512)


class BackgroundGateway:
    def __init__(self, config: GatewayConfig):
        self.server = GatewayServer(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway", daemon=True)

    def start(self) -> BackgroundGateway:
        self.thread.start()
        port = self.run(self.server.start())
        self.url = f"http://127.0.0.1:{port}"
        return self

    def run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, drain_s: float = 0.0, grace_s: float = 1.0) -> None:
        try:
            self.run(self.server.drain_and_stop(drain_s=drain_s, grace_s=grace_s), timeout=drain_s + grace_s + 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def start_model_services(model_dir, engine: dict | None = None, auth_token: str | None = None,
                         policy=None, reward=None) -> BackgroundApp:
    """Tokenizer, inference and reward services on one loopback port (one GrpcApp hosts all three)."""
    if policy is None or reward is None:
        policy, reward = tiny_checkpoints(model_dir)
    services = [
        TokenizerService(policy),
        InferenceService(policy, engine_config=EngineConfig(**(engine or TEST_ENGINE)), model_name="tiny-chat"),
        RewardService(reward),
    ]
    config = ServerConfig("models", host="127.0.0.1", port=0, auth_token=auth_token)
    return BackgroundApp(GrpcApp(config, services)).start()


def gateway_config(backends: dict[str, str], auth_token: str | None = None, metrics: bool = True,
                   **server) -> GatewayConfig:
    return GatewayConfig(
        server=ServerConfig("gateway", host="127.0.0.1", port=0, metrics_port=0 if metrics else None,
                            auth_token=auth_token, **server),
        backends=backends,
    )
