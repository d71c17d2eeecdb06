"""SIGTERM while streams run: `internlm2 serve inference` in a subprocess reports NOT_SERVING, refuses new
calls with UNAVAILABLE, lets the running streams finish whole, and exits 0."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from services_fixtures import tiny_checkpoints, wait_for

from internlm2_client import FinishReason, InferenceClient, UnavailableError, check_health

pytestmark = pytest.mark.timeout(120)

CLI = "import sys; from internlm2_client.cli import main; sys.exit(main(sys.argv[1:]))"
TOKENS = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(address: str) -> str:
    try:
        return check_health(address, "internlm2.v1.InferenceService", timeout=2)
    except Exception:
        return "UNREACHABLE"


def test_sigterm_during_streams_drains_cleanly(tmp_path):
    policy, _ = tiny_checkpoints(tmp_path / "models")
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("INTERNLM2_AUTH_TOKEN", None)
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CLI,
            "serve",
            "inference",
            "--model",
            str(policy),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            "0",
            "--device",
            "cpu",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        assert wait_for(lambda: health(address) == "SERVING", 60), (tmp_path / "server.log").read_text()
        client = InferenceClient(address, timeout=60, retry=None)
        streams = [
            client.generate_stream(f"drain {i}", max_new_tokens=TOKENS, temperature=0.0, ignore_eos=True)
            for i in range(4)
        ]
        for stream in streams:
            next(stream)  # each is running in the engine
        proc.send_signal(signal.SIGTERM)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            pending = [pool.submit(stream.result) for stream in streams]
            # While draining: health NOT_SERVING and new calls refused (retryable), streams still flowing.
            assert wait_for(lambda: health(address) == "NOT_SERVING", 5)
            with pytest.raises(UnavailableError):
                client.generate("too late", max_new_tokens=2)
            results = [f.result(60) for f in pending]
        for result in results:
            assert result.finish_reason == FinishReason.LENGTH and len(result.token_ids) == TOKENS
        assert proc.wait(30) == 0
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    lines = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines() if line.startswith("{")]
    messages = [line["msg"] for line in lines if line.get("service") == "inference"]
    assert "draining" in messages and messages[-1] == "stopped"
