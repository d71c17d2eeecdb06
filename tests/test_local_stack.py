"""`internlm2 up` in a subprocess: it makes a tiny model, starts Redis, the four services and a worker,
prints the endpoints, answers through the SDK, and stops everything cleanly on SIGINT (Ctrl-C)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from internlm2_client import InferenceClient, RewardClient, TokenizerClient, TrainingClient

pytestmark = pytest.mark.timeout(240)

CLI = "import sys; from internlm2_client.cli import main; sys.exit(main(sys.argv[1:]))"


def read_json_line(proc, deadline: float) -> dict:
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"`internlm2 up` exited with {proc.wait()}")
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError("`internlm2 up` printed no endpoints in time")


def test_up_starts_everything_and_sigint_stops_it_cleanly():
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "INTERNLM2_AUTH_TOKEN")}
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, "--json", "up"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        up = read_json_line(proc, time.monotonic() + 180)
        assert up["status"] == "up" and up["redis"]["embedded"]
        with TokenizerClient(up["tokenizer"]["address"], timeout=30) as tok:
            ids = tok.tokenize(["Hello world"])[0].token_ids
            assert ids[0] == 1
        with InferenceClient(up["inference"]["address"], timeout=60) as inference:
            result = inference.generate(messages=[{"role": "user", "content": "Hi"}], max_new_tokens=8)
            assert result.usage.completion_tokens >= 1
            assert inference.model_info().vocab_size == tok_vocab(up)
        with RewardClient(up["reward"]["address"], timeout=30) as reward:
            assert (
                len(reward.score([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]])) == 1
            )
        with TrainingClient(up["training"]["address"], timeout=30) as training:
            assert "prepare_data" in {s.name for s in training.list_stages()}
        pids = [up[name]["pid"] for name in ("tokenizer", "inference", "reward", "training", "worker")]
        assert all(psutil.pid_exists(pid) for pid in pids)

        proc.send_signal(signal.SIGINT)
        stopped = read_json_line(proc, time.monotonic() + 60)
        assert stopped == {"status": "stopped", "clean": True}
        assert proc.wait(30) == 0
        assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
        assert not Path(up["work_dir"]).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr = proc.stderr.read()
        assert "Traceback" not in stderr, stderr


def tok_vocab(up) -> int:
    from internlm2.core.tokenizer import InternLM2Tokenizer

    return InternLM2Tokenizer.from_pretrained(up["models"]["policy"]).vocab_size
