"""`internlm2 serve|up|demo`: flags defined here, work done by the platform distribution.

The SDK must stay light (no torch), so these commands import `internlm2.services`
only when run, never for `--help`. The functions called are the platform's contract
(docs/HELPERS.md): `internlm2.services.cli_entry:serve(args)`,
`internlm2.services.local_stack:up(args)`, `internlm2.services.demo:run(args)`; each gets
the parsed argparse.Namespace and returns an exit code (None = 0).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from internlm2_client.cli._engine_flags import add_engine_options

NOT_INSTALLED = "internlm2-platform is not installed"
MODEL_ENV = "INTERNLM2_MODEL"
REDIS_ENV = "REDIS_URL"

# service -> (gRPC port, Prometheus metrics port)
SERVE_PORTS = {
    "tokenizer": (50051, 9101),
    "inference": (50052, 9102),
    "reward": (50053, 9103),
    "training": (50054, 9104),
}
WORKER_METRICS_PORT = 9105


def _add_server_options(p: argparse.ArgumentParser, port: int, metrics_port: int) -> None:
    p.add_argument("--host", default="0.0.0.0", help="interface to bind (default: 0.0.0.0)")
    p.add_argument("--port", type=int, default=port, help=f"gRPC port (default: {port})")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=metrics_port,
        help=f"Prometheus metrics HTTP port (default: {metrics_port}; 0 = off)",
    )
    p.add_argument(
        "--auth-token-env",
        default="INTERNLM2_AUTH_TOKEN",
        metavar="VAR",
        help="environment variable holding the bearer token; unset variable = auth off (default: INTERNLM2_AUTH_TOKEN)",
    )
    p.add_argument("--tls-cert", metavar="FILE", help="server certificate chain (PEM); enables TLS")
    p.add_argument("--tls-key", metavar="FILE", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", metavar="FILE", help="CA (PEM) that client certificates must chain to: mTLS")
    # Tuning; unset = the server's own defaults (internlm2.services.common.config.ServerConfig).
    t = p.add_argument_group("tuning (unset = server defaults)")
    t.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ... (default: INFO)")
    t.add_argument("--max-message-mb", type=float, default=None, metavar="MB", help="largest message accepted")
    t.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=None,
        metavar="N",
        help="calls in flight beyond N get RESOURCE_EXHAUSTED",
    )
    t.add_argument(
        "--max-connection-age",
        type=float,
        default=None,
        metavar="S",
        help="close connections after S seconds so clients rebalance",
    )
    t.add_argument(
        "--drain",
        type=float,
        default=None,
        metavar="S",
        help="on SIGTERM, report NOT_SERVING for S seconds before stopping",
    )
    t.add_argument(
        "--grace", type=float, default=None, metavar="S", help="on SIGTERM, let in-flight calls finish for S seconds"
    )


def _add_model_options(p: argparse.ArgumentParser, *, device: bool) -> None:
    p.add_argument(
        "--model",
        default=os.environ.get(MODEL_ENV),
        metavar="PATH",
        help=f"checkpoint folder (default: ${MODEL_ENV})",
    )
    if device:
        p.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1, cpu (default: auto)")
        p.add_argument("--dtype", default=None, help="weight dtype: bfloat16, float16, float32 (default: auto)")


def register(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run one platform server (needs internlm2-platform)",
        description="Run one gRPC server of the platform, or a training worker.",
    )
    sub = serve.add_subparsers(dest="service", metavar="SERVICE", required=True)
    for name, (port, metrics_port) in SERVE_PORTS.items():
        p = sub.add_parser(name, help=f"the {name} service (port {port})")
        if name != "training":
            _add_model_options(p, device=name in ("inference", "reward"))
        if name == "inference":
            p.add_argument("--model-name", default=None, help="name reported by GetModelInfo and in metrics")
            add_engine_options(p)  # one flag per EngineConfig field (cli/_engine_flags.py)
        else:
            p.add_argument(
                "--redis-url",
                default=os.environ.get(REDIS_ENV),
                metavar="URL",
                help=f"Redis for job records and the Celery broker (default: ${REDIS_ENV})",
            )
            p.add_argument("--work-dir", default=None, metavar="DIR", help="where jobs write their artifacts")
        _add_server_options(p, port, metrics_port)
        p.set_defaults(func=_lazy("internlm2.services.cli_entry", "serve"))
    w = sub.add_parser("worker", help="a Celery worker running training stages")
    w.add_argument(
        "--redis-url",
        default=os.environ.get(REDIS_ENV),
        metavar="URL",
        help=f"Celery broker (default: ${REDIS_ENV})",
    )
    w.add_argument("--queues", default="gpu", help="comma-separated Celery queues to consume (default: gpu)")
    w.add_argument("--concurrency", type=int, default=1, help="worker processes (default: 1)")
    w.add_argument(
        "--metrics-port",
        type=int,
        default=WORKER_METRICS_PORT,
        help=f"Prometheus metrics HTTP port (default: {WORKER_METRICS_PORT}; 0 = off)",
    )
    w.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ... (default: INFO)")
    w.add_argument("--work-dir", default=None, metavar="DIR", help="where stages write their artifacts")
    w.set_defaults(func=_lazy("internlm2.services.cli_entry", "serve"))
    _add_gateway(sub)

    up = subparsers.add_parser(
        "up",
        help="the whole platform on this machine (needs internlm2-platform)",
        description="Start Redis (embedded unless $REDIS_URL is set), the four services and one worker; "
        "print the endpoints; Ctrl-C stops everything. Without --model a tiny random model is made.",
    )
    _add_stack_options(up)
    up.add_argument(
        "--tokenizer", default=None, metavar="PATH", help="tokenizer.model for the tiny models (default: train one)"
    )
    up.add_argument(
        "--work-dir", default=None, metavar="DIR", help="keep logs, models and jobs here (default: a temp dir)"
    )
    up.set_defaults(func=_lazy("internlm2.services.local_stack", "up"))

    demo = subparsers.add_parser(
        "demo",
        help="the full chain on this machine: pretrain -> SFT -> reward model -> PPO -> eval -> serve",
        description="Start the local stack, make a synthetic task and a tokenizer, train a tiny InternLM2 through "
        "one training job (pretrain, SFT, conditional reward model, COOL RLHF PPO, eval), serve every stage's "
        "checkpoint and print what each stage gained. Everything lands in --output.",
    )
    _add_stack_options(demo)
    demo.add_argument("--output", default="demo-output", metavar="DIR", help="output folder (default: demo-output)")
    demo.add_argument(
        "--size",
        default="small",
        choices=("smoke", "small"),
        help="model size and step counts: smoke (about 3 min, for tests) or small (default, about 10 min on 2 cores)",
    )
    demo.add_argument(
        "--tokenizer", default=None, metavar="PATH", help="a tokenizer.model to use instead of training one"
    )
    demo.add_argument("--questions", type=int, default=None, help="held-out questions asked of every stage")
    demo.set_defaults(func=_lazy("internlm2.services.demo", "run"))


def _add_stack_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="PATH", help="policy checkpoint (default: a tiny random one)")
    p.add_argument(
        "--reward-model", default=None, metavar="PATH", help="reward checkpoint (default: a tiny random one)"
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    p.add_argument("--device", default=None, help="torch device (default: auto)")
    p.add_argument("--dtype", default=None, help="weight dtype (default: auto)")
    p.add_argument(
        "--redis-url",
        default=os.environ.get(REDIS_ENV),
        metavar="URL",
        help=f"use this Redis instead of an embedded one (default: ${REDIS_ENV})",
    )


def _lazy(module: str, function: str):
    """A command handler importing module.function only when the command runs."""

    def handler(args: argparse.Namespace) -> int:
        try:
            target = getattr(importlib.import_module(module), function)
        except ImportError as e:
            print(f"{NOT_INSTALLED} ({e}); install it with `pip install internlm2-platform`", file=sys.stderr)
            return 2
        code = target(args)
        return 0 if code is None else int(code)

    handler.__qualname__ = f"{module}:{function}"
    return handler


GATEWAY_PORTS = (8000, 9106)  # HTTP, Prometheus metrics


def _add_gateway(sub) -> None:
    """`internlm2 serve gateway`: the OpenAI-compatible HTTP gateway in front of the gRPC services."""
    port, metrics_port = GATEWAY_PORTS
    g = sub.add_parser(
        "gateway",
        help=f"the OpenAI-compatible HTTP gateway and playground (port {port})",
        description="Serve OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models), vLLM's /tokenize, "
        "/detokenize, /score and /pooling, training jobs as JSON and the browser playground at /, in front of "
        "the gRPC services. GET /health is liveness, GET /ready readiness (every configured backend SERVING).",
    )
    for service, default_port in SERVE_PORTS.items():
        g.add_argument(f"--{service}", default=None, metavar="HOST:PORT",
                       help=f"the {service} service (e.g. 127.0.0.1:{default_port[0]}); unset: not offered")
    g.add_argument("--host", default="0.0.0.0", help="interface to bind (default: 0.0.0.0)")
    g.add_argument("--port", type=int, default=port, help=f"HTTP port (default: {port})")
    g.add_argument("--metrics-port", type=int, default=metrics_port,
                   help=f"Prometheus metrics HTTP port (default: {metrics_port}; 0 = off)")
    g.add_argument("--auth-token-env", default="INTERNLM2_AUTH_TOKEN", metavar="VAR",
                   help="environment variable holding the bearer token clients must send, also sent to the "
                   "services; unset variable = auth off (default: INTERNLM2_AUTH_TOKEN)")
    g.add_argument("--tls-cert", metavar="FILE", help="server certificate chain (PEM); enables HTTPS")
    g.add_argument("--tls-key", metavar="FILE", help="server private key (PEM)")
    g.add_argument("--tls-client-ca", metavar="FILE", help="CA (PEM) that client certificates must chain to: mTLS")
    g.add_argument("--backend-ca-cert", metavar="FILE", help="CA (PEM) of the services' certificates; enables TLS")
    g.add_argument("--backend-client-cert", metavar="FILE", help="client certificate (PEM) for the services' mTLS")
    g.add_argument("--backend-client-key", metavar="FILE", help="client private key (PEM) for the services' mTLS")
    g.add_argument("--backend-server-name", metavar="NAME", help="expected name in the services' certificates")
    g.add_argument("--reward-model-name", default=None, metavar="NAME",
                   help="model id of the reward model in /v1/models, /score, /pooling (default: internlm2-reward)")
    g.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ... (default: INFO)")
    g.add_argument("--drain", type=float, default=None, metavar="S",
                   help="on SIGTERM, answer /ready with 503 for S seconds before closing the port")
    g.add_argument("--grace", type=float, default=None, metavar="S",
                   help="on SIGTERM, let in-flight requests (streams too) finish for S seconds")
    g.set_defaults(func=_lazy("internlm2.services.gateway.server", "serve"))
