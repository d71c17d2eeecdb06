"""StageChannel implementations between a training process and its supervising worker.

``FileChannel``  (one node): events are JSON lines appended to a file the supervisor tails; cancel is
                 the existence of a file the supervisor creates. No network, survives nothing.
``RedisChannel`` (Kubernetes pods): events are pushed to a Redis list the supervisor drains; cancel
                 is the job's cancel key.
Both are described by a JSON-safe spec so the supervisor can hand one to a process it launches.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any


class FileChannel:
    def __init__(self, events: str | os.PathLike, cancel: str | os.PathLike):
        self.events_path = Path(events)
        self.cancel_path = Path(cancel)
        self._lock = threading.Lock()

    def emit(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, allow_nan=True) + "\n"
        with self._lock, open(self.events_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()

    def cancel_requested(self) -> bool:
        return self.cancel_path.exists()

    def spec(self) -> dict[str, Any]:
        return {"type": "file", "events": str(self.events_path), "cancel": str(self.cancel_path)}


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
    def __init__(self, url: str, events_key: str, cancel_key: str):
        import redis

        self.r = redis.Redis.from_url(url, decode_responses=True)
        self.url, self.events_key, self.cancel_key = url, events_key, cancel_key
        self._checked_at, self._cancelled = 0.0, False

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
        return {"type": "redis", "url": self.url, "events": self.events_key, "cancel": self.cancel_key}


def channel_from_spec(spec: dict[str, Any]) -> FileChannel | RedisChannel:
    if spec["type"] == "file":
        return FileChannel(spec["events"], spec["cancel"])
    if spec["type"] == "redis":
        return RedisChannel(spec["url"], spec["events"], spec["cancel"])
    raise ValueError(f"unknown channel type {spec['type']!r}")
