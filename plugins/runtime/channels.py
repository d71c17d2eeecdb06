"""StageChannel implementations between a training process and its supervising worker.

``FileChannel``  (one node): events are JSON lines appended to a file the supervisor tails; cancel is
                 the existence of a file the supervisor creates. No network, survives nothing.
``RedisChannel`` (Kubernetes pods): events are pushed to a Redis list the supervisor drains; cancel
                 is the job's cancel key.
Both are described by a JSON-safe spec so the supervisor can hand one to a process it launches.

Fencing: each run knows its ``attempt`` (the launch number the lease was taken with). Before it
moves the ``latest`` checkpoint pointer, ``StageContext.commit_checkpoint`` holds ``channel.fence()``,
which raises :class:`~internlm2.plugins.contract.StageFenced` unless this run is still the newest:
``FileChannel`` compares with the token file its supervisor wrote under an exclusive ``flock`` (the
supervisor of a newer run rewrites it under the same lock before starting it); ``RedisChannel``
compares with the stage's fence key in Redis. A stale copy can therefore never commit.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..contract import StageFenced


def write_fence(path: str | os.PathLike, attempt: int) -> None:
    """Make ``attempt`` the only run of a stage allowed to commit (the supervisor, before launch)."""
    with open(path, "a+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(str(attempt))
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def file_fence(path: str | os.PathLike, attempt: int) -> Iterator[None]:
    """Held while a run commits: the token file names this attempt, and no newer run can take over
    until the commit is done (``write_fence`` waits for the lock)."""
    with open(path, "a+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        current = f.read().strip()
        if current != str(attempt):
            raise StageFenced(f"attempt {attempt} is stale (the stage's fence names attempt {current or '?'})")
        yield


class FileChannel:
    def __init__(self, events: str | os.PathLike, cancel: str | os.PathLike,
                 fence: str | os.PathLike | None = None, attempt: int = 0):
        self.events_path = Path(events)
        self.cancel_path = Path(cancel)
        self.fence_path = Path(fence) if fence else None
        self.attempt = attempt
        self._lock = threading.Lock()

    def fence(self) -> contextlib.AbstractContextManager[None]:
        if self.fence_path is None:
            return contextlib.nullcontext()
        return file_fence(self.fence_path, self.attempt)

    def emit(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, allow_nan=True) + "\n"
        with self._lock, open(self.events_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()

    def cancel_requested(self) -> bool:
        return self.cancel_path.exists()

    def spec(self) -> dict[str, Any]:
        return {"type": "file", "events": str(self.events_path), "cancel": str(self.cancel_path),
                "fence": str(self.fence_path) if self.fence_path else "", "attempt": self.attempt}


class FileTail:
    """Reads complete new lines of a FileChannel's events file (the supervisor side)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._offset = 0
        self._partial = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]


class RedisChannel:
    def __init__(self, url: str, events_key: str, cancel_key: str, fence_key: str = "", attempt: int = 0):
        import redis

        self.r = redis.Redis.from_url(url, decode_responses=True)
        self.url, self.events_key, self.cancel_key = url, events_key, cancel_key
        self.fence_key, self.attempt = fence_key, attempt
        self._checked_at, self._cancelled = 0.0, False

    @contextlib.contextmanager
    def fence(self) -> Iterator[None]:
        if self.fence_key:
            current = self.r.get(self.fence_key)
            if current != str(self.attempt):
                raise StageFenced(f"attempt {self.attempt} is stale (the stage's fence names attempt {current})")
        yield

    def emit(self, event: dict[str, Any]) -> None:
        self.r.rpush(self.events_key, json.dumps(event, allow_nan=True))

    def cancel_requested(self) -> bool:
        # Asked once per training step on every rank: at most one round trip per 0.5 s.
        now = time.monotonic()
        if not self._cancelled and now - self._checked_at >= 0.5:
            self._checked_at = now
            self._cancelled = bool(self.r.exists(self.cancel_key))
        return self._cancelled

    def spec(self) -> dict[str, Any]:
        return {"type": "redis", "url": self.url, "events": self.events_key, "cancel": self.cancel_key,
                "fence": self.fence_key, "attempt": self.attempt}


def channel_from_spec(spec: dict[str, Any]) -> FileChannel | RedisChannel:
    if spec["type"] == "file":
        return FileChannel(spec["events"], spec["cancel"], spec.get("fence") or None, spec.get("attempt", 0))
    if spec["type"] == "redis":
        # Pods get the URL (with a password from a Secret) from their environment, never from the spec.
        url = spec.get("url") or os.environ["REDIS_URL"]
        return RedisChannel(url, spec["events"], spec["cancel"], spec.get("fence", ""), spec.get("attempt", 0))
    raise ValueError(f"unknown channel type {spec['type']!r}")
