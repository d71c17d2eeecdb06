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


def make_certificates(directory) -> dict[str, str]:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate (openssl).
    Returns paths: ca, server_cert, server_key, client_cert, client_key."""
    import shutil
    import subprocess
    from pathlib import Path

    import pytest

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed; TLS tests need it to make certificates")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def run(*argv):
        subprocess.run(["openssl", *argv], check=True, capture_output=True, cwd=d)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=internlm2-test-ca",
    )
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN=internlm2-test-{name}",
        )
        (d / f"{name}.ext").write_text(ext + "\n")
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
        )
    return {
        "ca": str(d / "ca.pem"),
        "server_cert": str(d / "server.pem"),
        "server_key": str(d / "server.key"),
        "client_cert": str(d / "client.pem"),
        "client_key": str(d / "client.key"),
    }


def tiny_checkpoints(directory, tokenizer=None):
    """(policy, reward) tiny random checkpoints sharing a tokenizer, made the way `internlm2 up` makes them."""
    from internlm2.services.local_stack import make_tiny_models

    return make_tiny_models(directory, tokenizer)
