"""The job records kept in Redis: Job, StageRun, Artifact, JobEvent (JSON-safe, versioned by shape).

These mirror ``internlm2.v1`` (training.proto) field for field so the training service converts them
without logic: states are the proto names without the ``JOB_STATE_`` prefix, artifact kinds without
``ARTIFACT_KIND_``, times are Unix seconds (float) and 0.0 / None when unset.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any


class JobState(enum.StrEnum):
    QUEUED = "QUEUED"  # accepted, waiting for a worker (stages: waiting for earlier stages)
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"  # cancel requested; the running stage is being stopped
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass
class Artifact:
    name: str  # unique within its stage ("final", "dataset", "metrics", "report")
    kind: str  # CHECKPOINT | EVAL_REPORT | LOG | OTHER
    uri: str  # a local path (the workers and the service share a filesystem) or a URI
    stage: str  # the step label of the stage run that produced it
    size_bytes: int = 0
    create_time: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Artifact:
        return cls(**d)


@dataclass
class StageRun:
    name: str  # step label, unique within the job
    stage: str  # plugin name
    config: dict[str, Any]  # validated, defaults filled in
    output_dir: str
    queue: str = "gpu"  # Celery queue of its task
    state: JobState = JobState.QUEUED
    progress: float = 0.0
    step: int = 0
    total_steps: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # latest value of each metric
    artifacts: list[Artifact] = field(default_factory=list)
    start_time: float | None = None
    end_time: float | None = None
    error: str = ""
    attempt: int = 0  # launch number of the current/last run: the lease's fencing token
    launches: int = 0  # runs started so far (attempt = launches - 1 once started)
    losses: int = 0  # runs lost with their worker; max_attempts of them fail the stage
    worker: str = ""  # who holds (or last held) the lease

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageRun:
        d = dict(d)
        d["state"] = JobState(d["state"])
        d["artifacts"] = [Artifact.from_dict(a) for a in d.get("artifacts", [])]
        return cls(**d)


@dataclass
class Job:
    job_id: str
    name: str
    state: JobState
    stages: list[StageRun]
    current_stage: int = 0
    progress: float = 0.0
    labels: dict[str, str] = field(default_factory=dict)
    idempotency_key: str = ""
    inputs: dict[str, dict[str, str]] = field(default_factory=dict)  # {"datasets": {...}, "checkpoints": {...}}
    work_dir: str = ""
    create_time: float = 0.0
    start_time: float | None = None
    end_time: float | None = None
    error: str = ""
    cancel_reason: str = ""
    # Not stored: False when submit returned an earlier job with the same idempotency key.
    created: bool = field(default=True, compare=False)

    @property
    def artifacts(self) -> list[Artifact]:
        """All artifacts of all stages, in creation order."""
        return sorted((a for s in self.stages for a in s.artifacts), key=lambda a: a.create_time)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("created")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Job:
        d = dict(d)
        d["state"] = JobState(d["state"])
        d["stages"] = [StageRun.from_dict(s) for s in d["stages"]]
        return cls(**d)


@dataclass(frozen=True)
class JobEvent:
    """One event of a job's stream. ``kind`` and ``data``:

    - ``state``:    {"state": JobState name, "message": str} — the job's (stage == "") or a stage's
    - ``progress``: {"fraction": float, "step": int, "total_steps": int, "message": str}
    - ``metrics``:  {"step": int, "values": {name: float}}
    - ``artifact``: Artifact fields {"name", "kind", "uri", "stage", "size_bytes", "create_time"}
    - ``log``:      {"level": str, "message": str}
    """

    job_id: str
    sequence: int  # 1, 2, 3, ... within the job
    time: float
    stage: str  # step label, "" for job-level events
    kind: str
    data: dict[str, Any]

    @property
    def is_terminal(self) -> bool:
        """True for the event that puts the job into a terminal state (the last one of the stream)."""
        return self.kind == "state" and not self.stage and JobState(self.data["state"]).terminal
