"""The launcher port — how one run of a stage is started and controlled — and the local-process launcher.

A :class:`Launcher` starts a run and returns a :class:`Run` that the one supervision loop
(``supervisor``) drives: poll for the exit status, read new events, ask for a cooperative cancel,
send SIGTERM / SIGKILL to the whole run, reap it, clean up. Implementations:

    LocalLauncher        one node: ``python -m internlm2.plugins.runtime.launch`` (one rank),
                         ``torchrun`` or ``deepspeed`` (several), in a new process group that dies
                         with the supervising thread (PR_SET_PDEATHSIG)
    KubernetesLauncher   several nodes: an indexed Job (``k8s.py``)
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Protocol

from .channels import FileChannel, FileTail, write_fence
from .records import Job
from .runspec import run_spec, write_run_spec

logger = logging.getLogger(__name__)

LAUNCH_MODULE = "internlm2.plugins.runtime.launch"
RUN_MARKER = ".run-"  # in every training process's command line (RUN spec file name): tests count copies


class Run(Protocol):
    attempt: int

    def poll(self) -> int | None:
        """Exit status once the run ended (0 = success), else None."""

    def events(self) -> list[dict[str, Any]]:
        """Events emitted since the last call."""

    def request_cancel(self) -> None:
        """Ask the stage to stop at its next step (StageCancelled)."""

    def signal(self, sig: int) -> None:
        """SIGTERM / SIGKILL to every process of the run."""

    def wait(self, timeout: float) -> bool:
        """Reap the run's processes; True when they are gone."""

    def close(self) -> list[dict[str, Any]]:
        """Release what the run holds; returns final events (e.g. the log artifact)."""

    def failure(self, rc: int) -> str:
        """A message for a run that ended with ``rc`` and no result."""

    def keepalive(self, renewed_at: float) -> None:
        """The lease was renewed with a call sent at ``renewed_at`` (Unix time): feed the run's
        watchdog, which stops it when this stops happening."""


class Launcher(Protocol):
    def start(self, job: Job, index: int, attempt: int) -> Run: ...


def resolve_launcher(launch: dict[str, Any]) -> str:
    launcher = launch.get("launcher", "auto")
    if launcher != "auto":
        return launcher
    if launch.get("num_nodes", 1) > 1:
        return "kubernetes"
    return "python" if launch.get("nproc_per_node", 1) == 1 else "torchrun"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_command(launch: dict[str, Any], spec_path: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """The single-node command line and the environment it adds."""
    launcher = resolve_launcher(launch)
    n = int(launch.get("nproc_per_node", 1))
    if launcher == "python":
        if n != 1:
            raise ValueError("launch.launcher=python runs one process; use torchrun for nproc_per_node > 1")
        env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        return [sys.executable, "-m", LAUNCH_MODULE, str(spec_path)], env
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "--nnodes=1",
                "--master-addr=127.0.0.1", f"--master-port={port}", "-m", LAUNCH_MODULE, str(spec_path)], {}
    if launcher == "deepspeed":
        exe = shutil.which("deepspeed") or "deepspeed"
        return [exe, f"--num_gpus={n}", f"--master_port={port}", "--no_local_rank", "--module",
                LAUNCH_MODULE, str(spec_path)], {}
    raise ValueError(f"launcher {launcher!r} is not a single-node launcher")


def _prctl_deathsig():
    """prctl resolved before fork, so the child only makes one system call (preexec_fn runs
    between fork and exec, where little is safe)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the supervising thread

    return preexec


_PREEXEC = _prctl_deathsig()


class LocalRun:
    def __init__(self, proc: subprocess.Popen, channel: FileChannel, log_path: Path, attempt: int, alive: Path):
        self.proc, self.channel, self.log_path, self.attempt = proc, channel, log_path, attempt
        self.alive = alive
        self._tail = FileTail(channel.events_path)

    def keepalive(self, renewed_at: float) -> None:
        with contextlib.suppress(OSError):
            os.utime(self.alive, (renewed_at, renewed_at))

    def poll(self) -> int | None:
        return self.proc.poll()

    def events(self) -> list[dict[str, Any]]:
        return self._tail.read()

    def request_cancel(self) -> None:
        self.channel.cancel_path.touch()

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def close(self) -> list[dict[str, Any]]:
        self.signal(signal.SIGKILL)  # stray ranks of a launcher that exited
        self.proc.wait()  # reaped: no zombie
        size = self.log_path.stat().st_size if self.log_path.exists() else 0
        return [{"type": "artifact", "name": f"log-{self.attempt}", "kind": "LOG", "path": str(self.log_path),
                 "size_bytes": size}]

    def failure(self, rc: int) -> str:
        try:
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
        except OSError:
            tail = ""
        return f"training process exited with {rc}: {tail}"


class LocalLauncher:
    """Runs a stage on this machine; files of run ``attempt`` live in the stage's output folder.
    ``watchdog_s``: the run kills itself when its keepalive file is older than this."""

    def __init__(self, watchdog_s: float):
        self.watchdog_s = watchdog_s

    def start(self, job: Job, index: int, attempt: int) -> LocalRun:
        st = job.stages[index]
        launch = st.config.get("launch", {})
        out = Path(st.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        # Only this attempt may commit checkpoints from now on (waits for a stale run's commit).
        write_fence(out / ".fence", attempt)
        channel = FileChannel(out / f".events-{attempt}.jsonl", out / ".cancel", out / ".fence", attempt)
        channel.cancel_path.unlink(missing_ok=True)
        channel.events_path.unlink(missing_ok=True)
        alive = out / f".alive-{attempt}"
        alive.touch()  # the claim just took the lease
        spec = run_spec(job, index, attempt, channel.spec())
        spec["watchdog"] = {"path": str(alive), "deadline_s": self.watchdog_s}
        spec = write_run_spec(out / f"{RUN_MARKER}{attempt}.json", spec)
        cmd, extra_env = build_command(launch, spec, free_port())
        env = {**os.environ, **extra_env, **launch.get("env", {})}
        log_path = out / f"stage-{attempt}.log"
        logger.info("job %s stage %s attempt %d: %s", job.job_id, st.name, attempt, " ".join(cmd))
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    cwd=out, start_new_session=True, preexec_fn=_PREEXEC)
        return LocalRun(proc, channel, log_path, attempt, alive)
