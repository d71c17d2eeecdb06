"""The README's "Use it" example, as a test: `internlm2 up` starts the gateway with the services, and the
official `openai` client talks to it (models, chat, streaming); the playground page is served; Ctrl-C stops
the gateway with everything else."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import psutil
import pytest

pytestmark = pytest.mark.timeout(300)

CLI = "import sys; from internlm2_client.cli import main; sys.exit(main(sys.argv[1:]))"


def read_json_line(proc, deadline: float) -> dict:
    """The next JSON line `internlm2 --json up` prints (its endpoints, then its stop report)."""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"`internlm2 up` exited with {proc.wait()}")
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError("`internlm2 up` printed nothing in time")


def test_up_serves_the_openai_api_and_the_playground():
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "INTERNLM2_AUTH_TOKEN")}
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, "--json", "up"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        up = read_json_line(proc, time.monotonic() + 240)
        assert up["status"] == "up"
        url = up["gateway"]["url"]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=8)
        assert answer.usage.completion_tokens >= 1 and answer.choices[0].message.role == "assistant"
        streamed = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=8, stream=True)
        assert sum(1 for chunk in streamed if chunk.choices and chunk.choices[0].delta.content) >= 1
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "InternLM2 playground" in page.text
        assert httpx.get(url + "/ready").json()["status"] == "ready"
        gateway_pid = up["gateway"]["pid"]

        proc.send_signal(signal.SIGINT)
        assert read_json_line(proc, time.monotonic() + 60) == {"status": "stopped", "clean": True}
        assert proc.wait(30) == 0
        assert not (psutil.pid_exists(gateway_pid) and psutil.Process(gateway_pid).status() != psutil.STATUS_ZOMBIE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr = proc.stderr.read()
        assert "Traceback" not in stderr, stderr
