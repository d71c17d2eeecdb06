"""Every command the deployment files run is one the `internlm2` CLI really accepts.

Commands are collected from docker-compose.yml (service commands and healthchecks), from the Helm chart
rendered with every values set (container args after the image's ENTRYPOINT, exec probes, the helm-test
pod, the commands NOTES.txt shows) and from the Dockerfiles' ENTRYPOINT + CMD. Each is checked twice
against the real CLI:
- the installed console script runs `internlm2 <subcommand path> --help`, which must exit 0 and list
  every flag the command uses;
- the CLI's own parser (`internlm2_client.cli.build_parser`) parses the full argument list, so unknown
  flags, bad values and missing arguments fail as they would in the container (nothing is executed).
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from deploy_support import (
    CHART_VALUES,
    DOCKERFILES,
    ENGINE_ARGS_EXAMPLE,
    ENGINE_EXAMPLE,
    REPO,
    compose,
    exec_form,
    render,
    render_notes,
    workloads,
)

pytestmark = pytest.mark.timeout(120)

ENTRYPOINT = "internlm2"


def _cli() -> list[str]:
    script = Path(sys.executable).parent / ENTRYPOINT
    assert script.exists(), f"{script} missing: pip install -e sdk/python"
    return [str(script)]


def _path(argv: list[str]) -> tuple[str, ...]:
    """The subcommand path: `serve <service>`, or the command alone (e.g. health, generate)."""
    return tuple(argv[:2]) if argv[0] == "serve" else (argv[0],)


@cache
def _help(path: tuple[str, ...]) -> str:
    proc = subprocess.run([*_cli(), *path, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"`internlm2 {' '.join(path)} --help` failed: {proc.stderr[-2000:]}"
    return proc.stdout


def check(argv: list[str]) -> None:
    """Fails (AssertionError) unless the CLI accepts `internlm2 <argv>`."""
    from internlm2_client.cli import build_parser

    help_text = _help(_path(argv))
    for arg in argv:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            assert re.search(rf"(^|[\s\[,]){re.escape(flag)}\b", help_text, re.M), (
                f"`internlm2 {' '.join(_path(argv))} --help` does not list {flag}")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = build_parser().parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"internlm2 rejects {argv}: {err.getvalue().strip()}") from e
    assert args.command == argv[0]
    if argv[0] == "serve":
        assert args.service == argv[1]


def compose_commands() -> dict[str, list[str]]:
    out = {}
    for name, svc in compose()["services"].items():
        if name == "redis":
            continue
        out[f"compose {name}"] = svc["command"]
        test = svc.get("healthcheck", {}).get("test")
        if test and test[:2] == ["CMD", ENTRYPOINT]:
            out[f"compose {name} healthcheck"] = test[2:]
    # Engine flags passed the documented way.
    for name, svc in compose({"INTERNLM2_ENGINE_ARGS": ENGINE_ARGS_EXAMPLE})["services"].items():
        if name.startswith("inference"):
            out[f"compose {name} with INTERNLM2_ENGINE_ARGS"] = svc["command"]
    return out


def chart_commands() -> dict[str, list[str]]:
    out = {}
    cases = {**CHART_VALUES, "every engine flag": {"inference": {"engine": ENGINE_EXAMPLE}}}
    for case, values in cases.items():
        for obj, pod in workloads(render(values)):
            for c in pod["containers"]:
                if not c["image"].startswith("internlm2:"):
                    continue  # redis
                where = f"chart[{case}] {obj['kind']}/{obj['metadata']['name']}/{c['name']}"
                assert "command" not in c, f"{where} must run the image's ENTRYPOINT"
                out[where] = c["args"]
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    cmd = c.get(probe, {}).get("exec", {}).get("command")
                    if cmd:
                        assert cmd[0] == ENTRYPOINT
                        out[f"{where} {probe}"] = cmd[1:]
        # The commands NOTES.txt tells the user to type.
        for i, line in enumerate(render_notes(values).splitlines()):
            if line.strip().startswith(f"{ENTRYPOINT} "):
                out[f"chart[{case}] NOTES.txt line {i + 1}"] = shlex.split(line)[1:]
    return out


def image_commands() -> dict[str, list[str]]:
    out = {}
    for flavor, path in DOCKERFILES.items():
        assert exec_form(path, "ENTRYPOINT") == [ENTRYPOINT]
        out[f"Dockerfile.{flavor} CMD"] = exec_form(path, "CMD")
    return out


def readme_commands() -> dict[str, list[str]]:
    """The `internlm2 ...` lines of deploy/README.md's examples."""
    out = {}
    for i, line in enumerate((REPO / "deploy" / "README.md").read_text().splitlines()):
        if line.startswith(f"{ENTRYPOINT} "):
            out[f"deploy/README.md line {i + 1}"] = shlex.split(line.split(" #")[0])[1:]
    return out


SOURCES = {"compose": compose_commands, "chart": chart_commands, "images": image_commands,
           "readme": readme_commands}


def test_every_kind_of_command_is_collected():
    commands = [argv for source in SOURCES.values() for argv in source().values()]
    paths = {_path(argv) for argv in commands}
    serve = {("serve", s) for s in ("tokenizer", "inference", "reward", "training", "worker", "gateway")}
    assert paths == serve | {("health",), ("generate",)}


@pytest.mark.parametrize("source", list(SOURCES))
def test_the_cli_accepts_every_command(source):
    commands = SOURCES[source]()
    assert commands
    rejected = []
    for where, argv in sorted(commands.items()):
        try:
            check(argv)
        except AssertionError as e:
            rejected.append(f"{where}: {e}")
    assert rejected == []


@pytest.mark.parametrize("argv", [
    ["serve", "inference", "--model", "/models/x", "--no-such-flag", "1"],
    ["serve", "inferense", "--model", "/models/x"],
    ["serve", "tokenizer", "--port", "grpc"],
    ["health", "--address"],
])
def test_the_check_rejects_what_the_cli_rejects(argv):
    """Guard for the test above: a wrong flag, subcommand or value is caught."""
    with pytest.raises(AssertionError):
        check(argv)
