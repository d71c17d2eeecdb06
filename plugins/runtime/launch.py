"""Entry point of a stage's training process: ``python -m internlm2.plugins.runtime.launch RUN.json``.

The supervisor writes RUN.json (see :func:`write_run_spec`) and starts this module directly (one
rank), under ``torchrun`` (several ranks on one node) or in the pods of a Kubernetes Job. On every
rank it rebuilds the StageContext, calls ``stage.run(ctx)`` and, on rank 0, emits a final
``{"type": "result", "state": SUCCEEDED|CANCELLED|FAILED, "error": str, "metrics": {...}}`` event.
Exit status: 0 succeeded, 1 failed, 3 cancelled.

The process dies with its parent (PR_SET_PDEATHSIG): a worker killed with SIGKILL takes its
training processes with it, so a stage resumed elsewhere never races a leftover copy.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from ..contract import ArtifactKind, ArtifactRef, StageCancelled, StageContext, StageInputs, StageOutput
from .channels import channel_from_spec

EXIT_FAILED = 1
EXIT_CANCELLED = 3


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(EXIT_FAILED)


def run_spec(*, job_id: str, name: str, stage: str, index: int, attempt: int, config: dict[str, Any],
             output_dir: str, inputs: StageInputs, channel: dict[str, Any]) -> dict[str, Any]:
    """The JSON this module runs from (``main``): identity, config, inputs, channel."""
    return {
        "job_id": job_id, "name": name, "stage": stage, "index": index, "attempt": attempt,
        "config": config, "output_dir": output_dir, "channel": channel,
        "inputs": {
            "datasets": {k: str(v) for k, v in inputs.datasets.items()},
            "checkpoints": {k: str(v) for k, v in inputs.checkpoints.items()},
            "previous": [
                {"name": o.name, "stage": o.stage, "output_dir": str(o.output_dir), "metrics": dict(o.metrics),
                 "artifacts": [{"name": a.name, "kind": a.kind.value, "path": str(a.path)}
                               for a in o.artifacts.values()]}
                for o in inputs.previous
            ],
        },
    }


def write_run_spec(path: Path, **fields: Any) -> Path:
    path.write_text(json.dumps(run_spec(**fields), indent=1))
    return path


def _inputs(d: dict[str, Any]) -> StageInputs:
    return StageInputs(
        datasets={k: Path(v) for k, v in d["datasets"].items()},
        checkpoints={k: Path(v) for k, v in d["checkpoints"].items()},
        previous=tuple(
            StageOutput(
                name=o["name"], stage=o["stage"], output_dir=Path(o["output_dir"]), metrics=o["metrics"],
                artifacts={a["name"]: ArtifactRef(a["name"], ArtifactKind(a["kind"]), Path(a["path"]))
                           for a in o["artifacts"]},
            )
            for o in d["previous"]
        ),
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m internlm2.plugins.runtime.launch RUN.json", file=sys.stderr)
        return 2
    die_with_parent()
    spec = json.loads(Path(argv[0]).read_text())
    import torch  # decide the DeepSpeed accelerator before any stage imports deepspeed

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from ..registry import get_stage

    channel = channel_from_spec(spec["channel"])
    stage = get_stage(spec["stage"])
    ctx = StageContext(
        job_id=spec["job_id"], name=spec["name"], stage=spec["stage"], index=spec["index"],
        config=stage.parse_config(spec["config"]), inputs=_inputs(spec["inputs"]),
        output_dir=spec["output_dir"], channel=channel, attempt=spec["attempt"],
    )
    state, error, metrics, code = "SUCCEEDED", "", {}, 0
    try:
        metrics = {k: float(v) for k, v in (stage.run(ctx) or {}).items()}
    except StageCancelled as exc:
        state, error, code = "CANCELLED", str(exc), EXIT_CANCELLED
    except Exception as exc:
        traceback.print_exc()
        state, error, code = "FAILED", f"{type(exc).__name__}: {exc}", EXIT_FAILED
    if ctx.is_main:
        channel.emit({"type": "result", "state": state, "error": error, "metrics": metrics})
    sys.stdout.flush()
    sys.stderr.flush()
    return code


if __name__ == "__main__":
    # os._exit: skip interpreter teardown (DeepSpeed/gloo atexit hooks can hang a finished rank).
    rc = main()
    os._exit(rc)
