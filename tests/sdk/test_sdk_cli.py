"""The `internlm2` CLI: --help of every subcommand, platform commands without the platform,
and the client commands against real gRPC servers on loopback."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys

import pytest
from sdk_fakes import FakePlatform

from internlm2_client import cli
from internlm2_client.cli import _platform
from internlm2_client.cli._training import parse_stage, render_event
from internlm2_client.types import JobEvent, JobEventKind, JobState

pytestmark = pytest.mark.timeout(60)


def _subcommand_paths(parser: argparse.ArgumentParser, prefix=()) -> list[tuple[str, ...]]:
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append((*prefix, name))
                paths += _subcommand_paths(sub, (*prefix, name))
    return paths


EXPECTED = {
    ("generate",),
    ("chat",),
    ("tokenize",),
    ("score",),
    ("health",),
    ("up",),
    ("demo",),
    ("train",),
    ("train", "stages"),
    ("train", "submit"),
    ("train", "status"),
    ("train", "watch"),
    ("train", "cancel"),
    ("train", "retry"),
    ("train", "plan"),
    ("serve",),
    ("serve", "tokenizer"),
    ("serve", "inference"),
    ("serve", "reward"),
    ("serve", "training"),
    ("serve", "worker"),
    ("serve", "gateway"),
}


def test_help_of_every_subcommand(capsys):
    paths = _subcommand_paths(cli.build_parser())
    assert set(paths) == EXPECTED
    for path in [(), *paths]:
        with pytest.raises(SystemExit) as done:
            cli.main([*path, "--help"])
        assert done.value.code == 0, path
        out = capsys.readouterr().out
        assert out.startswith("usage: internlm2" + "".join(f" {p}" for p in path)), (path, out[:80])


def test_serve_flags_match_the_shared_contract(monkeypatch):
    monkeypatch.delenv("INTERNLM2_MODEL", raising=False)  # defaults read the environment
    monkeypatch.delenv("REDIS_URL", raising=False)
    parser = cli.build_parser()
    a = parser.parse_args(["serve", "inference", "--model", "/m", "--device", "cpu", "--dtype", "float32"])
    assert (a.service, a.model, a.host, a.port, a.metrics_port) == ("inference", "/m", "0.0.0.0", 50052, 9102)
    assert a.auth_token_env == "INTERNLM2_AUTH_TOKEN" and a.tls_cert is None and a.tls_client_ca is None
    ports = {s: parser.parse_args(["serve", s]).port for s in ("tokenizer", "inference", "reward", "training")}
    assert ports == {"tokenizer": 50051, "inference": 50052, "reward": 50053, "training": 50054}
    metrics = {s: parser.parse_args(["serve", s]).metrics_port for s in ports}
    assert metrics == {"tokenizer": 9101, "inference": 9102, "reward": 9103, "training": 9104}
    t = parser.parse_args(["serve", "training", "--redis-url", "redis://r", "--tls-cert", "c", "--tls-key", "k"])
    assert t.redis_url == "redis://r" and not hasattr(t, "model")
    assert not hasattr(parser.parse_args(["serve", "tokenizer"]), "device")
    w = parser.parse_args(["serve", "worker"])
    assert (w.service, w.queues, w.concurrency, w.redis_url) == ("worker", "gpu", 1, None)
    up = parser.parse_args(["up", "--model", "a", "--reward-model", "b"])
    assert (up.model, up.reward_model, up.host) == ("a", "b", "127.0.0.1")

    monkeypatch.setenv("INTERNLM2_MODEL", "/env/model")
    assert cli.build_parser().parse_args(["serve", "reward"]).model == "/env/model"


def test_platform_commands_fail_cleanly_without_the_platform():
    code = (
        "import sys; sys.modules['internlm2.services'] = None\n"  # makes the import fail
        "from internlm2_client.cli import main\n"
        "sys.exit(main(sys.argv[1:]))"
    )
    for argv in (["serve", "tokenizer", "--model", "/x"], ["serve", "worker"], ["up"], ["demo"]):
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=30)
        assert out.returncode == 2, (argv, out.stderr)
        assert _platform.NOT_INSTALLED in out.stderr


def test_platform_dispatch_calls_the_contract_functions(monkeypatch):
    """serve/up/demo call internlm2.services.<module>:<function>(args) and return its code."""
    import types as pytypes

    seen = []
    for module, function in (("cli_entry", "serve"), ("local_stack", "up"), ("demo", "run")):
        mod = pytypes.ModuleType(f"internlm2.services.{module}")
        setattr(mod, function, lambda args, _f=function: seen.append((_f, args.command)) or 7)
        monkeypatch.setitem(sys.modules, f"internlm2.services.{module}", mod)
    assert cli.main(["serve", "worker"]) == 7
    assert cli.main(["up"]) == 7
    assert cli.main(["demo"]) == 7
    assert seen == [("serve", "serve"), ("up", "up"), ("run", "demo")]


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "internlm2")
    out = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("internlm2 ")


# ------------------------------------------------------------------ against servers


@pytest.fixture(scope="module")
def platform():
    p = FakePlatform().start()
    yield p
    p.stop()


def _run(capsys, *argv, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_health_command_against_a_real_health_server(platform, capsys):
    code, out, _ = _run(capsys, "health", "--address", platform.address)
    assert code == 0 and "SERVING" in out
    code, _, err = _run(capsys, "health", "--address", platform.address, "--service", "internlm2.v1.InferenceService")
    assert code == 0
    platform.set_health("internlm2.v1.RewardService", serving=False)
    code, _, err = _run(capsys, "health", "--address", platform.address, "--service", "internlm2.v1.RewardService")
    assert code == 1 and "NOT_SERVING" in err
    code, out, _ = _run(capsys, "--json", "health", "--address", platform.address, "--service", "nope")
    assert code == 1 and json.loads(out)["status"] == "SERVICE_UNKNOWN"
    code, _, err = _run(capsys, "health", "--address", "127.0.0.1:1", "--timeout", "1")
    assert code == 1 and "UNREACHABLE" in err


def test_generate_command_streams_and_prints_json(platform, capsys, monkeypatch):
    addr = ("--address", platform.address)
    code, out, err = _run(capsys, "generate", "a b", "--max-new-tokens", "4", "--temperature", "0", *addr)
    assert code == 0 and out == "echo: a b\n" and "[stop;" in err
    sent = platform.inference.requests[-1].sampling
    assert sent.max_new_tokens == 4 and sent.HasField("temperature") and not sent.HasField("top_p")
    code, out, _ = _run(capsys, "generate", "--json", "--chat", "--system", "be brief", "hi", *addr)
    data = json.loads(out)
    assert data["text"] == "echo: hi" and data["finish_reason"] == "eos"
    msgs = platform.inference.requests[-1].chat.messages
    assert [m.role for m in msgs] == ["system", "user"]
    code, out, _ = _run(capsys, "generate", *addr, stdin="from stdin", monkeypatch=monkeypatch)
    assert out == "echo: from stdin\n"
    code, _, err = _run(capsys, "generate", "status:INVALID_ARGUMENT", "--no-stream", *addr)
    assert code == 1 and "INVALID_ARGUMENT" in err and "sampling.top_p" in err


def test_chat_keeps_history(platform, capsys, monkeypatch):
    platform.inference.requests.clear()
    code, out, _ = _run(
        capsys,
        "chat",
        "--address",
        platform.address,
        "--system",
        "sys",
        stdin="first\n\nsecond\n/exit\nnever sent\n",
        monkeypatch=monkeypatch,
    )
    assert code == 0 and out.splitlines() == ["echo: first", "echo: second"]
    first, second = platform.inference.requests
    assert [m.content for m in first.chat.messages] == ["sys", "first"]
    assert [(m.role, m.content) for m in second.chat.messages] == [
        ("system", "sys"),
        ("user", "first"),
        ("assistant", "echo: first"),
        ("user", "second"),
    ]


def test_tokenize_and_score_commands(platform, capsys, monkeypatch):
    addr = ("--address", platform.address)
    assert _run(capsys, "tokenize", "ab", *addr)[1] == "1 97 98\n"
    assert _run(capsys, "tokenize", "ab", "--no-bos", "--pieces", *addr)[1] == "97 98\na b\n"
    assert _run(capsys, "tokenize", "--decode", "104,105", *addr)[1] == "hi\n"
    assert json.loads(_run(capsys, "--json", "tokenize", "--count", "abc", *addr)[1])["text_counts"] == [4]
    assert json.loads(_run(capsys, "tokenize", "--info", "--json", *addr)[1])["vocab_size"] == 92544

    assert _run(capsys, "score", "--prompt", "q", "--response", "abcd", *addr)[1] == "4.000000\n"
    _, out, _ = _run(capsys, "score", "--json", "--prompt", "q", "--response", "a", "--response", "abc", *addr)
    assert json.loads(out) == {"order": [1, 0], "scores": [1.0, 3.0]}


def test_train_commands(platform, capsys, tmp_path):
    addr = ("--address", platform.address)
    code, out, _ = _run(capsys, "train", "stages", *addr)
    assert code == 0 and out.split()[0] == "sft"
    assert json.loads(_run(capsys, "train", "stages", "sft", *addr)[1])["type"] == "object"
    cfg = tmp_path / "sft.json"
    cfg.write_text('{"lr": 0.001}')
    code, out, _ = _run(
        capsys,
        "--json",
        "train",
        "submit",
        "--stage",
        f"sft=@{cfg}",
        "--stage",
        "eval",
        "--label",
        "team=x",
        "--idempotency-key",
        "cli-1",
        *addr,
    )
    sub = json.loads(out)
    job_id = sub["job"]["job_id"]
    assert code == 0 and sub["created"] and sub["job"]["stages"][0]["config"] == {"lr": 0.001}
    assert sub["job"]["labels"] == {"team": "x"}
    code, out, _ = _run(capsys, "train", "watch", job_id, *addr)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "job: running" and "[###############---------------]  50.0% step 5/10" in lines[1]
    assert "loss=1.25" in out and "artifact checkpoint /ckpt/final" in out and "job: succeeded" in out
    code, out, _ = _run(capsys, "train", "status", job_id, *addr)
    assert out.startswith(f"{job_id}  succeeded") and "artifact checkpoint: /ckpt/final" in out
    code, out, _ = _run(capsys, "train", "status", "--json", *addr)
    assert job_id in [j["job_id"] for j in json.loads(out)]
    code, _, err = _run(capsys, "train", "cancel", job_id, *addr)
    assert code == 1 and "FAILED_PRECONDITION" in err
    code, _, err = _run(capsys, "train", "submit", "--stage", "nope", *addr)
    assert code == 1 and "stages[0].stage" in err


def test_progress_rendering_and_stage_parsing():
    ev = JobEvent("j", 1, JobEventKind.PROGRESS, stage="sft", fraction=0.25, step=1, total_steps=4)
    assert render_event(ev, width=8) == "sft [##------]  25.0% step 1/4"
    assert render_event(JobEvent("j", 2, JobEventKind.STATE, state=JobState.FAILED, message="oom")) == "job: failed oom"
    assert parse_stage("sft").config == {} and parse_stage('sft={"a": 1}').config == {"a": 1}
