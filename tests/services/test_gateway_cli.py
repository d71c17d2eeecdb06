"""``internlm2 serve gateway`` as a process, with the flags of the shared contract (CONTRACTS.md): it serves the
OpenAI API in front of real services, reports readiness and metrics on its own ports, refuses bad flags
with exit code 2, and stops cleanly (exit 0) on SIGTERM after its drain."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest
from gateway_fixtures import start_model_services
from services_fixtures import wait_for

from internlm2_client import cli

pytestmark = pytest.mark.timeout(180)

CLI = "import sys; from internlm2_client.cli import main; sys.exit(main(sys.argv[1:]))"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flags_match_the_shared_contract():
    args = cli.build_parser().parse_args(
        ["serve", "gateway", "--inference", "i:1", "--tokenizer", "t:2", "--reward", "r:3", "--training", "x:4"]
    )
    assert (args.port, args.metrics_port, args.host) == (8000, 9106, "0.0.0.0")
    assert (args.inference, args.tokenizer, args.reward, args.training) == ("i:1", "t:2", "r:3", "x:4")
    assert args.auth_token_env == "INTERNLM2_AUTH_TOKEN" and args.tls_cert is None


def test_no_backend_is_a_usage_error():
    done = subprocess.run([sys.executable, "-c", CLI, "serve", "gateway", "--port", "0"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "at least one backend" in done.stderr


def test_serves_then_drains_on_sigterm(tmp_path):
    models = start_model_services(tmp_path)
    port, metrics_port = _free_port(), _free_port()
    env = {**os.environ, "INTERNLM2_AUTH_TOKEN": "cli-token", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "gateway.log", "w")  # noqa: SIM115 - held for the process's lifetime
    process = subprocess.Popen(
        [sys.executable, "-c", CLI, "serve", "gateway", "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", str(metrics_port), "--inference", models.address, "--tokenizer", models.address,
         "--drain", "0.2", "--grace", "5"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            try:
                return httpx.get(url + "/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(ready, timeout=90, interval=0.2), (tmp_path / "gateway.log").read_text()[-2000:]
        headers = {"Authorization": "Bearer cli-token"}
        answer = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=60, json={
            "model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
        assert httpx.post(url + "/v1/chat/completions", json={}).status_code == 401
        assert "internlm2:gateway_requests_total" in httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
        models.stop()
    # One JSON line per request, carrying its request id.
    lines = [json.loads(line) for line in (tmp_path / "gateway.log").read_text().splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("route") == "/v1/chat/completions"]
    assert access and all(line.get("request_id") for line in access)
    assert any(line["msg"] == "stopped" for line in lines)
