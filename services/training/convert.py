"""Job records of the plugins' runtime (``internlm2.plugins.runtime.records``) <-> training.proto.

The records mirror the proto field for field (states without ``JOB_STATE_``, kinds without
``ARTIFACT_KIND_``, times as Unix seconds), so this is mechanical.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from internlm2.v1 import training_pb2


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    """Struct -> plain JSON. Struct numbers are doubles; integral ones become ints again so integer
    config fields (steps, batch sizes) validate as the client wrote them."""
    return _integral(json_format.MessageToDict(value))


def non_finite_path(value: struct_pb2.Struct | struct_pb2.ListValue, path: str) -> str | None:
    """Path of the first NaN or infinite number in a Struct (JSON has no such numbers, so
    ``struct_to_dict`` cannot convert it), or None."""
    items = value.fields.items() if isinstance(value, struct_pb2.Struct) else enumerate(value.values)
    for key, item in items:
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}"
        kind = item.WhichOneof("kind")
        if kind == "number_value" and not math.isfinite(item.number_value):
            return where
        if kind in ("struct_value", "list_value"):
            found = non_finite_path(getattr(item, kind), where)
            if found:
                return found
    return None


def _integral(value):
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def dict_to_struct(value: dict[str, Any] | None) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    if value:
        out.update(_json_safe(value))
    return out


def _json_safe(value):
    """Struct holds only JSON values; non-finite floats (a diverged loss) become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if not seconds:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def state_to_proto(state) -> int:
    name = getattr(state, "value", state)
    return training_pb2.JobState.Value(f"JOB_STATE_{name}")


def state_from_proto(value: int) -> str:
    return training_pb2.JobState.Name(value).removeprefix("JOB_STATE_")


def artifact_to_proto(a) -> training_pb2.Artifact:
    return training_pb2.Artifact(
        name=a.name,
        kind=training_pb2.ArtifactKind.Value(f"ARTIFACT_KIND_{a.kind}"),
        uri=a.uri,
        stage=a.stage,
        size_bytes=a.size_bytes,
        create_time=timestamp(a.create_time),
    )


def stage_run_to_proto(s) -> training_pb2.StageRun:
    return training_pb2.StageRun(
        name=s.name,
        stage=s.stage,
        config=dict_to_struct(s.config),
        state=state_to_proto(s.state),
        progress=s.progress,
        metrics={k: float(v) for k, v in s.metrics.items()},
        artifacts=[artifact_to_proto(a) for a in s.artifacts],
        start_time=timestamp(s.start_time),
        end_time=timestamp(s.end_time),
        error=s.error,
    )


def job_to_proto(job) -> training_pb2.Job:
    return training_pb2.Job(
        job_id=job.job_id,
        name=job.name,
        state=state_to_proto(job.state),
        stages=[stage_run_to_proto(s) for s in job.stages],
        current_stage=job.current_stage,
        progress=job.progress,
        artifacts=[artifact_to_proto(a) for a in job.artifacts],
        labels=dict(job.labels),
        idempotency_key=job.idempotency_key,
        create_time=timestamp(job.create_time),
        start_time=timestamp(job.start_time),
        end_time=timestamp(job.end_time),
        error=job.error,
        inputs=training_pb2.JobInputs(
            checkpoints=job.inputs.get("checkpoints", {}), datasets=job.inputs.get("datasets", {})
        ),
    )


def event_to_proto(event) -> training_pb2.WatchJobResponse:
    msg = training_pb2.WatchJobResponse(
        job_id=event.job_id, sequence=event.sequence, time=timestamp(event.time), stage=event.stage
    )
    data = event.data
    if event.kind == "state":
        msg.state_changed.CopyFrom(
            training_pb2.StateChanged(state=state_to_proto(data["state"]), message=data.get("message", ""))
        )
    elif event.kind == "progress":
        msg.progress.CopyFrom(
            training_pb2.ProgressUpdate(
                fraction=data.get("fraction", 0.0),
                step=data.get("step", 0),
                total_steps=data.get("total_steps", 0),
                message=data.get("message", ""),
            )
        )
    elif event.kind == "metrics":
        msg.metrics.CopyFrom(
            training_pb2.MetricsUpdate(
                step=data.get("step", 0), values={k: float(v) for k, v in data["values"].items()}
            )
        )
    elif event.kind == "artifact":
        from internlm2.plugins.runtime.records import Artifact

        msg.artifact.CopyFrom(artifact_to_proto(Artifact.from_dict(data)))
    elif event.kind == "log":
        msg.log.CopyFrom(training_pb2.LogMessage(level=data.get("level", "INFO"), message=data.get("message", "")))
    return msg
