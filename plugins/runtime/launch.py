"""Entry point of a stage's training process: ``python -m internlm2.plugins.runtime.launch RUN.json``.

The supervisor writes RUN.json (see ``runspec``) and starts this module directly (one
rank), under ``torchrun`` (several ranks on one node) or in the pods of a Kubernetes Job. On every
rank it rebuilds the StageContext, calls ``stage.run(ctx)`` and, on rank 0, emits a final
``{"type": "result", "state": SUCCEEDED|CANCELLED|FAILED, "error": str, "metrics": {...}}`` event.
Exit status: 0 succeeded, 1 failed, 3 cancelled, 4 fenced (a newer run owns the stage).

The process dies with its parent (PR_SET_PDEATHSIG): a worker killed with SIGKILL takes its
training processes with it, so a stage resumed elsewhere never races a leftover copy. A watchdog
thread kills the run's process group when its supervisor stops confirming lease renewals (the
spec's ``watchdog`` file), so a frozen or partitioned supervisor cannot leave a copy running past
its lease either; and commits are fenced (``channels``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from ..contract import StageCancelled, StageContext, StageFenced
from .channels import channel_from_spec
from .runspec import inputs_from_spec

EXIT_FAILED = 1
EXIT_CANCELLED = 3
EXIT_FENCED = 4


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(EXIT_FAILED)


def file_lease_age(path: str):
    """One node: the supervisor sets the file's mtime to each renewal's send time."""

    def age() -> float:
        try:
            return time.time() - os.stat(path).st_mtime
        except FileNotFoundError:
            return float("inf")

    return age


def redis_lease_age(url: str, fence_key: str, attempt: int, lease_ttl_s: float):
    """Kubernetes pods: the stage's fence key carries the lease's TTL, so its age is TTL minus what is
    left (infinite once it names another attempt or is gone); Redis unreachable counts from the
    last answer."""
    import redis

    client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=2, socket_connect_timeout=2)
    state = {"at": time.monotonic(), "age": 0.0}

    def age() -> float:
        try:
            with client.pipeline() as pipe:
                value, pttl = pipe.get(fence_key).pttl(fence_key).execute()
        except redis.RedisError:
            return state["age"] + time.monotonic() - state["at"]
        state["at"] = time.monotonic()
        state["age"] = lease_ttl_s - pttl / 1000 if value == str(attempt) and pttl > 0 else float("inf")
        return state["age"]

    return age


def start_watchdog(lease_age, deadline_s: float) -> None:
    """Kill this run's whole process group once its lease has not been renewed for ``deadline_s``
    (``lease_age()``): a frozen or partitioned supervisor cannot stop it, and the lease is about to
    expire, after which another worker may start the stage."""

    def loop() -> None:
        while True:
            time.sleep(min(0.5, deadline_s / 4))
            age = lease_age()
            if age > deadline_s:
                print(f"watchdog: no lease renewal for {age:.1f} s; stopping this run", file=sys.stderr, flush=True)
                os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=loop, name="internlm2-watchdog", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m internlm2.plugins.runtime.launch RUN.json", file=sys.stderr)
        return 2
    die_with_parent()
    spec = json.loads(Path(argv[0]).read_text())
    watchdog = spec.get("watchdog")
    if watchdog and watchdog.get("path"):
        start_watchdog(file_lease_age(watchdog["path"]), float(watchdog["deadline_s"]))
    elif watchdog and watchdog.get("fence_key"):
        start_watchdog(redis_lease_age(watchdog.get("url") or os.environ["REDIS_URL"], watchdog["fence_key"],
                                       spec["attempt"], float(watchdog["lease_ttl_s"])), float(watchdog["deadline_s"]))
    import torch  # decide the DeepSpeed accelerator before any stage imports deepspeed

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from ..registry import get_stage

    channel = channel_from_spec(spec["channel"])
    stage = get_stage(spec["stage"])
    ctx = StageContext(
        job_id=spec["job_id"], name=spec["name"], stage=spec["stage"], index=spec["index"],
        config=stage.parse_config(spec["config"]), inputs=inputs_from_spec(spec["inputs"]),
        output_dir=spec["output_dir"], channel=channel, attempt=spec["attempt"],
    )
    state, error, metrics, code = "SUCCEEDED", "", {}, 0
    try:
        metrics = {k: float(v) for k, v in (stage.run(ctx) or {}).items()}
    except StageCancelled as exc:
        state, error, code = "CANCELLED", str(exc), EXIT_CANCELLED
    except StageFenced as exc:  # a newer run owns the stage: this one must not report or commit
        print(f"stopping: {exc}", file=sys.stderr)
        return EXIT_FENCED
    except Exception as exc:
        traceback.print_exc()
        state, error, code = "FAILED", f"{type(exc).__name__}: {exc}", EXIT_FAILED
    if ctx.is_main:
        channel.emit({"type": "result", "state": state, "error": error, "metrics": metrics})
    sys.stdout.flush()
    sys.stderr.flush()
    return code


if __name__ == "__main__":
    # os._exit: skip interpreter teardown (DeepSpeed/gloo atexit hooks can hang a finished rank).
    rc = main()
    os._exit(rc)
