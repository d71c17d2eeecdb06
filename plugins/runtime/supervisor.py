"""Launch a stage's training process and follow it until it ends (runs inside the Celery task).

One loop, every ``poll_s``: forward the process's events into the JobStore (fenced by the lease
token), renew the lease, pass a cancel request on (cancel file; SIGTERM to the process group after
``cancel_grace_s``; SIGKILL after as long again) and notice if this worker's own parent died.
Training never happens in the worker: on one node the process is ``python -m
internlm2.plugins.runtime.launch`` (one rank) or ``torchrun``/``deepspeed`` (several); on several
nodes a Kubernetes indexed Job (``k8s.py``).
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
import time
from pathlib import Path
from typing import Any

from .celery_app import RuntimeSettings
from .channels import FileChannel, FileTail
from .jobs import Claim, JobStore
from .launch import write_run_spec
from .records import JobState

logger = logging.getLogger(__name__)

LAUNCH_MODULE = "internlm2.plugins.runtime.launch"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_launcher(launch: dict[str, Any]) -> str:
    launcher = launch.get("launcher", "auto")
    if launcher != "auto":
        return launcher
    if launch.get("num_nodes", 1) > 1:
        return "kubernetes"
    return "python" if launch.get("nproc_per_node", 1) == 1 else "torchrun"


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


def _preexec() -> None:
    # Runs in the child between fork and exec: die with this supervising thread's process.
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def supervise(store: JobStore, job_id: str, index: int, claim: Claim,
              settings: RuntimeSettings) -> JobState | None:
    """Run stage ``index`` to its end; returns its final state, or None when the lease was lost
    (another worker owns the stage now, or this worker is going away)."""
    job = store.get(job_id)
    st = job.stages[index]
    launch = st.config.get("launch", {})
    if resolve_launcher(launch) == "kubernetes":
        from .k8s import supervise_kubernetes

        return supervise_kubernetes(store, job, index, claim, settings)

    out = Path(st.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    attempt = claim.attempt
    channel = FileChannel(out / f".events-{attempt}.jsonl", out / ".cancel")
    channel.cancel_path.unlink(missing_ok=True)
    channel.events_path.unlink(missing_ok=True)
    spec_path = write_run_spec(
        out / f".run-{attempt}.json", job_id=job_id, name=st.name, stage=st.stage, index=index,
        attempt=attempt, config=st.config, output_dir=str(out), inputs=store.stage_inputs(job, index),
        channel=channel.spec(),
    )
    cmd, extra_env = build_command(launch, spec_path, free_port())
    env = {**os.environ, **extra_env, **launch.get("env", {})}
    log_path = out / f"stage-{attempt}.log"
    logger.info("job %s stage %s attempt %d: %s", job_id, st.name, attempt, " ".join(cmd))
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out,
                                start_new_session=True, preexec_fn=_preexec)
    return _follow(store, job_id, index, claim.token, proc, channel, log_path, settings, attempt)


def _follow(store: JobStore, job_id: str, index: int, token: str, proc: subprocess.Popen,
            channel: FileChannel, log_path: Path, settings: RuntimeSettings, attempt: int) -> JobState | None:
    tail = FileTail(channel.events_path)
    parent = os.getppid()
    result: dict[str, Any] | None = None
    cancel_at = term_at = None
    last_beat = time.monotonic()

    def lost(why: str) -> None:
        logger.warning("job %s stage %d: %s; stopping the training process", job_id, index, why)
        _signal_group(proc, signal.SIGKILL)
        proc.wait()

    while True:
        rc = proc.poll()
        events = tail.read()
        result = next((e for e in events if e["type"] == "result"), result)
        if not store.record(job_id, index, token, [e for e in events if e["type"] != "result"]):
            lost("lease lost")
            return None
        if rc is not None:
            break
        now = time.monotonic()
        if now - last_beat >= settings.lease_ttl_s / 3:
            if not store.heartbeat(job_id, index, token, settings.lease_ttl_s):
                lost("lease expired")
                return None
            last_beat = now
        if cancel_at is None and store.cancel_requested(job_id):
            channel.cancel_path.touch()
            cancel_at = now
            store.record(job_id, index, token, [{"type": "log", "level": "INFO", "message": "cancel requested"}])
        if cancel_at is not None and term_at is None and now - cancel_at > settings.cancel_grace_s:
            _signal_group(proc, signal.SIGTERM)
            term_at = now
        if term_at is not None and now - term_at > settings.cancel_grace_s:
            _signal_group(proc, signal.SIGKILL)
        if os.getppid() != parent:  # a prefork child whose worker died: let the lease expire
            lost("worker process gone")
            return None
        time.sleep(settings.poll_s)

    _signal_group(proc, signal.SIGKILL)  # stray ranks of a launcher that exited
    store.record(job_id, index, token, [{"type": "artifact", "name": f"log-{attempt}", "kind": "LOG",
                                         "path": str(log_path), "size_bytes": log_path.stat().st_size}])
    if result is not None:
        state, error, metrics = JobState(result["state"]), result["error"], result["metrics"]
    elif cancel_at is not None:
        state, error, metrics = JobState.CANCELLED, "stopped by signal after cancel", {}
    else:
        state, error, metrics = JobState.FAILED, f"training process exited with {rc}: {_tail(log_path)}", {}
    if not store.finish_stage(job_id, index, token, state, error, metrics):
        return None
    return state


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
