"""The run spec: everything a stage's training process needs, as JSON (``RUN.json``), and the
:class:`~internlm2.plugins.contract.StageInputs` a stage sees of its job.

The supervisor writes it (one node: a file in the stage's output folder; Kubernetes: a ConfigMap
key) and ``launch`` reads it back on every rank.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..contract import ArtifactKind, ArtifactRef, StageInputs, StageOutput
from .records import Job


def stage_inputs(job: Job, index: int) -> StageInputs:
    """What stage ``index`` sees of the job inputs and the earlier stages' outputs."""
    previous = tuple(
        StageOutput(
            name=s.name, stage=s.stage, output_dir=Path(s.output_dir),
            artifacts={a.name: ArtifactRef(a.name, ArtifactKind(a.kind), Path(a.uri)) for a in s.artifacts},
            metrics=dict(s.metrics),
        )
        for s in job.stages[:index]
    )
    return StageInputs(
        datasets={k: Path(v) for k, v in job.inputs.get("datasets", {}).items()},
        checkpoints={k: Path(v) for k, v in job.inputs.get("checkpoints", {}).items()},
        previous=previous,
    )


def run_spec(job: Job, index: int, attempt: int, channel: dict[str, Any]) -> dict[str, Any]:
    """Identity, config, inputs and event channel of one run (``attempt``) of stage ``index``."""
    st = job.stages[index]
    inputs = stage_inputs(job, index)
    return {
        "job_id": job.job_id, "name": st.name, "stage": st.stage, "index": index, "attempt": attempt,
        "config": st.config, "output_dir": st.output_dir, "channel": channel,
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


def inputs_from_spec(d: dict[str, Any]) -> StageInputs:
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


def write_run_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(json.dumps(spec, indent=1))
    return path
