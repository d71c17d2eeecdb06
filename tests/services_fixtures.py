"""Helpers for the services tests: a real GrpcApp on loopback, run in a background event loop.

The server runs in its own thread and asyncio loop, so tests talk to it through the real
synchronous SDK exactly as a user would, and can still reach into the server (its engine's block
counts) to check that cancelled work was freed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from certificates import make_certificates  # noqa: F401  (re-exported for the service tests)

from internlm2.services.common.app import GrpcApp


class BackgroundApp:
    """Start with ``BackgroundApp(app).start()``; ``.address`` is host:port; ``.stop()`` drains."""

    def __init__(self, app: GrpcApp):
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"server-{app.config.service}", daemon=True)

    def start(self, load: bool = True, timeout: float = 60.0) -> BackgroundApp:
        self.thread.start()
        port = self.run(self.app.start(), timeout)
        self.address = f"127.0.0.1:{port}"
        if load:
            self.run(self.app.load(), timeout)
        return self

    def run(self, coro, timeout: float = 60.0):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable, timeout: float = 30.0):
        """Run a plain function on the server's loop thread (to read loop-owned state safely)."""

        async def wrapper():
            return fn()

        return self.run(wrapper(), timeout)

    def stop(self, drain_s: float = 0.0, grace_s: float = 1.0) -> None:
        """Drain and stop the app, then end the loop thread."""
        try:
            self.run(self.app.drain_and_stop(drain_s=drain_s, grace_s=grace_s), timeout=grace_s + drain_s + 30)
        finally:
            self.close()

    def close(self) -> None:
        """End the loop thread (the app must be stopped already)."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def tiny_checkpoints(directory, tokenizer=None):
    """(policy, reward) tiny random checkpoints sharing a tokenizer, made the way `internlm2 up` makes them."""
    from internlm2.services.local_stack import make_tiny_models

    return make_tiny_models(directory, tokenizer)
