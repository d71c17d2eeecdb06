"""The OpenAI-compatible HTTP gateway in front of the gRPC services (``internlm2 serve gateway``).

    config        GatewayConfig: listening (the services' ServerConfig), backends, backend TLS
    backends      grpc.aio channels to inference / tokenizer / reward / training, their health
    schemas       the request bodies (pydantic): the one place a request's shape is checked
    translate     OpenAI <-> InferenceService messages, and the parameter <-> proto field tables
    streams       GenerateStream calls -> server-sent events (chat and text completion chunks)
    errors        OpenAI's error shape; gRPC statuses -> HTTP statuses; proto paths -> parameters
    middleware    request ids, bearer auth, metrics, access log
    routes_*      OpenAI (chat, completions, models), vLLM extras (tokenize, score, pooling), jobs
    app           the FastAPI app: error handlers, /health, /ready, the playground at /
    server        uvicorn lifecycle: start, drain on SIGTERM, stop
    static/       the browser playground (plain HTML/JS/CSS)
"""

from .app import Gateway, create_app
from .config import GatewayConfig
from .server import GatewayServer, serve

__all__ = ["Gateway", "GatewayConfig", "GatewayServer", "create_app", "serve"]
