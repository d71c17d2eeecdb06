"""The training-stage plugin contract: everything a stage may rely on, and everything it must provide.

A stage is one step of a training job (``prepare_data``, ``pretrain``, ``sft``, ``reward_model``, ...).
A plugin exposes a :class:`Stage` object under the entry-point group ``internlm2.stages``; built-in stages
register exactly like third-party ones (root ``pyproject.toml``)::

    [project.entry-points."internlm2.stages"]
    my_stage = "my_package.stage:STAGE"      # the entry-point name must equal STAGE.name

Lifecycle of one stage run
    1. ``JobStore.submit`` (``internlm2.plugins.runtime.jobs``) parses every stage's config with
       :meth:`Stage.parse_config` before anything runs; errors name the field
       (``stages[2].config.lr``).
    2. A Celery worker claims the stage and launches a training process (``python -m
       internlm2.plugins.runtime.launch``, ``torchrun`` for several ranks, or a Kubernetes Job for several
       nodes). The worker never trains in its own process.
    3. In that process, on EVERY rank, ``stage.run(ctx)`` is called with a :class:`StageContext`.
       Reporting methods are no-ops on ranks other than 0, so stages call them unconditionally.
    4. ``run`` returns a mapping of summary metrics (or ``None``); they become the stage's final metrics.
       Raising :class:`StageCancelled` (what ``ctx.raise_if_cancelled()`` does) ends the stage as
       CANCELLED; any other exception ends it (and the job) as FAILED with the exception's message.
    5. If the worker dies mid-run, the stage is started again elsewhere (same ``output_dir``) and must
       continue from ``ctx.latest_checkpoint()`` — ``run_deepspeed_training`` does this for you.

What a stage provides (:class:`Stage`): ``name``, ``description`` (docs shown by ``internlm2 train stages``),
``config_model`` (a :class:`StageConfig` subclass: pydantic, ``extra="forbid"``, every field with a
``description``; its JSON Schema is what ListStages returns) and ``run(ctx)``.

What a stage gets (:class:`StageContext`): the validated config, its inputs (job-level datasets and
checkpoints plus the outputs of earlier stages, resolvable through references, see :meth:`StageContext.resolve`),
an ``output_dir``, progress/metric/log/artifact reporting, a cooperative cancel check, and its own last
resumable checkpoint.

Conventions every built-in stage follows, and later stages rely on
    - A stage that produces a model writes it in the official layout (``config.json``, safetensors,
      tokenizer files) to ``ctx.output_dir / "final"`` and registers it as the CHECKPOINT artifact
      named ``"final"``, plus a ``metrics.json`` beside it.
    - A stage that produces a dataset registers it as the artifact named ``"dataset"``.
    - Resumable checkpoints live under ``ctx.checkpoint_dir``; the file ``checkpoint_dir / "latest"``
      holds the tag (sub-folder name) of the newest complete one (DeepSpeed's own convention).

References (string values of config fields that name inputs)
    ``"stage:NAME"``            the default artifact of the earlier stage run NAME ("final" for
                                checkpoints, "dataset" for datasets); ``"stage:NAME/ARTIFACT"`` picks one.
    ``"input:NAME"``            a job-level input given at submit (``inputs={"checkpoints": {...},
                                "datasets": {...}}``).
    anything else               a filesystem path.
    ``JobStore.submit`` checks that ``stage:`` references name an EARLIER stage of the same job.

This file imports no torch, Celery or Redis: the training service imports it to validate configs.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import pydantic
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ArtifactKind",
    "ArtifactRef",
    "LaunchConfig",
    "MemoryChannel",
    "Stage",
    "StageCancelled",
    "StageChannel",
    "StageConfig",
    "StageConfigError",
    "StageContext",
    "StageFenced",
    "StageInputs",
    "StageOutput",
    "format_loc",
    "local_context",
]

STAGE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


# ---------------------------------------------------------------------------------------------------
# Errors


class StageConfigError(ValueError):
    """A stage config (or a pipeline) is invalid.

    ``field`` names the first offending field as a path (``stages[1].config.lr``); ``errors`` lists
    every ``(field, message)`` found. The training service maps it to INVALID_ARGUMENT.
    """

    def __init__(self, errors: list[tuple[str, str]]):
        if not errors:
            raise ValueError("StageConfigError needs at least one error")
        self.errors = list(errors)
        self.field = errors[0][0]
        super().__init__("; ".join(f"{f}: {m}" for f, m in errors))


class StageCancelled(Exception):
    """Raised inside a stage when its job was cancelled; the stage ends as CANCELLED, not FAILED."""


class StageFenced(RuntimeError):
    """Raised by a channel's ``fence()`` when this run of a stage is stale (a newer run of the same
    stage owns it): the run must not commit and should stop."""


def format_loc(prefix: str, loc: tuple[Any, ...]) -> str:
    """``("layers", 0, "lr")`` under ``"config"`` -> ``"config.layers[0].lr"``."""
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ---------------------------------------------------------------------------------------------------
# Config


class LaunchConfig(BaseModel):
    """How the runtime launches the stage's training process (read by the runtime, never by ``run``)."""

    model_config = ConfigDict(extra="forbid")

    launcher: Literal["auto", "python", "torchrun", "deepspeed", "kubernetes"] = Field(
        "auto",
        description="auto: python for one process, torchrun for several on one node, kubernetes for "
        "several nodes.",
    )
    nproc_per_node: int = Field(1, ge=1, le=64, description="Training processes (ranks) per node.")
    num_nodes: int = Field(1, ge=1, le=1024, description="Nodes; > 1 runs as a Kubernetes indexed Job (refused at "
                           "submit where no stage-pod settings, INTERNLM2_K8S_STAGE_POD, are configured).")
    image: str | None = Field(None, description="Container image of the Kubernetes pods (multi-node only).")
    gpus_per_node: int = Field(0, ge=0, le=64, description="nvidia.com/gpu requested per pod (Kubernetes).")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment of the process: only NCCL_*, "
                                "TORCH_NCCL_* and a few tuning variables (OMP_NUM_THREADS, PYTORCH_CUDA_ALLOC_CONF, "
                                "...; internlm2.plugins.runtime.pipeline.LAUNCH_ENV_ALLOWED), checked at submit.")


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors, values are validated on assignment.

    Subclasses give every field a ``description`` (the docs test enforces it). ``launch`` is reserved
    for the runtime.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    launch: LaunchConfig = Field(default_factory=LaunchConfig, description="Process launch settings.")


# ---------------------------------------------------------------------------------------------------
# Inputs and outputs


class ArtifactKind(enum.StrEnum):
    """What an artifact is (mirrors ``internlm2.v1.ArtifactKind``)."""

    CHECKPOINT = "CHECKPOINT"  # a folder loadable with from_pretrained
    EVAL_REPORT = "EVAL_REPORT"  # a JSON report (plots beside it are OTHER)
    LOG = "LOG"
    OTHER = "OTHER"  # datasets, metrics dumps, plots


@dataclass(frozen=True)
class ArtifactRef:
    name: str
    kind: ArtifactKind
    path: Path


@dataclass(frozen=True)
class StageOutput:
    """What an earlier stage of the same job produced."""

    name: str  # the step label (unique within the job)
    stage: str  # the plugin name
    output_dir: Path
    artifacts: Mapping[str, ArtifactRef] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def checkpoint(self) -> Path | None:
        """The stage's final model checkpoint, if it produced one."""
        ref = self.artifacts.get("final")
        return ref.path if ref is not None and ref.kind is ArtifactKind.CHECKPOINT else None


@dataclass(frozen=True)
class StageInputs:
    """Job-level inputs and the outputs of the stages that ran before this one (in order)."""

    datasets: Mapping[str, Path] = field(default_factory=dict)
    checkpoints: Mapping[str, Path] = field(default_factory=dict)
    previous: tuple[StageOutput, ...] = ()

    def output_of(self, name: str) -> StageOutput:
        for out in self.previous:
            if out.name == name:
                return out
        raise KeyError(f"no earlier stage named {name!r} (earlier: {[o.name for o in self.previous]})")


# ---------------------------------------------------------------------------------------------------
# The channel between a running stage and the runtime


class StageChannel(Protocol):
    """Transport of a context's events and of the cancel request (the runtime supplies one).

    ``emit`` receives JSON-safe dicts with a ``"type"`` of ``progress``, ``metrics``, ``log``,
    ``artifact`` or ``checkpoint``; ``cancel_requested`` is polled, so it must be cheap.
    Optional: ``fence()``, a context manager held while a checkpoint is committed that raises
    :class:`StageFenced` when this run no longer owns the stage (the runtime's channels have one).
    """

    def emit(self, event: dict[str, Any]) -> None: ...

    def cancel_requested(self) -> bool: ...


class MemoryChannel:
    """Keeps events in a list and cancels on ``cancel()``: for running a stage in-process (tests)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._cancel = threading.Event()
        self._lock = threading.Lock()

    def emit(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.events.append(event)

    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        self._cancel.set()

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["type"] == kind]


# ---------------------------------------------------------------------------------------------------
# The context


class StageContext:
    """What ``Stage.run`` gets. Built by the runtime (or :func:`local_context` in tests).

    Attributes: ``job_id``, ``name`` (step label), ``stage`` (plugin name), ``index`` (position in the
    pipeline), ``config`` (the validated :class:`StageConfig` subclass instance), ``inputs``
    (:class:`StageInputs`), ``output_dir`` (exists; the same folder on every attempt), ``checkpoint_dir``
    (``output_dir / "checkpoints"``), ``attempt`` (0 on the first run, +1 per restart after a lost
    worker), ``rank`` / ``local_rank`` / ``world_size`` (of the launched process group).
    """

    def __init__(
        self,
        *,
        job_id: str,
        name: str,
        stage: str,
        index: int,
        config: StageConfig,
        inputs: StageInputs,
        output_dir: str | os.PathLike,
        channel: StageChannel,
        attempt: int = 0,
        rank: int | None = None,
        local_rank: int | None = None,
        world_size: int | None = None,
    ):
        self.job_id = job_id
        self.name = name
        self.stage = stage
        self.index = index
        self.config = config
        self.inputs = inputs
        self.output_dir = Path(output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.channel = channel
        self.attempt = attempt
        # Rank info comes from the launcher's environment (torchrun / deepspeed / the k8s Job).
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
        self.world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._cancelled = False

    # ---- identity -----------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank whose reports are sent."""
        return self.rank == 0

    # ---- reporting ----------------------------------------------------------------------------
    def report_progress(self, step: int, total: int, message: str = "", **metrics: float) -> None:
        """Progress of this stage (``step`` of ``total``; ``total=0`` when unknown). Keyword metrics are
        reported as with :meth:`log_metrics` at the same step. Call once per optimizer step."""
        if not self.is_main:
            return
        fraction = min(1.0, step / total) if total else 0.0
        self.channel.emit({"type": "progress", "step": int(step), "total": int(total),
                           "fraction": fraction, "message": message})
        if metrics:
            self.log_metrics(step, **metrics)

    def log_metrics(self, step: int, **metrics: float) -> None:
        """Scalar metrics (``loss=…``, ``lr=…``) at ``step``; non-finite values are sent as they are."""
        if not self.is_main or not metrics:
            return
        self.channel.emit({"type": "metrics", "step": int(step),
                           "values": {k: float(v) for k, v in metrics.items()}})

    def log(self, message: str, level: str = "INFO") -> None:
        """A human-readable line shown in the job's event stream."""
        if self.is_main:
            self.channel.emit({"type": "log", "level": level, "message": str(message)})

    def add_artifact(self, name: str, path: str | os.PathLike,
                     kind: ArtifactKind | str = ArtifactKind.OTHER) -> None:
        """Register a file or folder this stage produced (after it is completely written)."""
        if not self.is_main:
            return
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact {name!r}: {path} does not exist")
        size = path.stat().st_size if path.is_file() else sum(
            p.stat().st_size for p in path.rglob("*") if p.is_file())
        self.channel.emit({"type": "artifact", "name": name, "kind": ArtifactKind(kind).value,
                           "path": str(path.resolve()), "size_bytes": int(size)})

    # ---- cancellation -------------------------------------------------------------------------
    def should_cancel(self) -> bool:
        """True once the job was cancelled (sticky). Asks the channel on every call — channels keep
        this cheap (a file check; the Redis channel caches for half a second); check once per step.

        In a multi-rank run each rank sees the request on its own; ``run_deepspeed_training`` agrees
        on it across ranks so that all stop at the same step.
        """
        if not self._cancelled:
            self._cancelled = bool(self.channel.cancel_requested())
        return self._cancelled

    def raise_if_cancelled(self) -> None:
        """Raise :class:`StageCancelled` if the job was cancelled."""
        if self.should_cancel():
            raise StageCancelled(f"stage {self.name!r} of job {self.job_id} cancelled")

    # ---- resume -------------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        """This stage's newest complete resumable checkpoint (from an earlier attempt), or None."""
        latest = self.checkpoint_dir / "latest"
        if not latest.is_file():
            return None
        path = self.checkpoint_dir / latest.read_text().strip()
        return path if path.is_dir() else None

    @property
    def resume_dir(self) -> Path | None:
        """Alias of :meth:`latest_checkpoint`."""
        return self.latest_checkpoint()

    def commit_checkpoint(self, tag: str) -> None:
        """Mark ``checkpoint_dir / tag`` (fully written) as the newest checkpoint. Stages that save
        through DeepSpeed (``engine.save_checkpoint(ctx.checkpoint_dir, tag)``) get this for free."""
        if not self.is_main:
            return
        if not (self.checkpoint_dir / tag).is_dir():
            raise FileNotFoundError(f"checkpoint {tag!r} not found in {self.checkpoint_dir}")
        fence = getattr(self.channel, "fence", None)
        with fence() if fence is not None else contextlib.nullcontext():  # a stale run never commits
            tmp = self.checkpoint_dir / ".latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.checkpoint_dir / "latest")
        self.channel.emit({"type": "checkpoint", "tag": tag, "path": str(self.checkpoint_dir / tag)})

    # ---- inputs -------------------------------------------------------------------------------
    def resolve(self, ref: str, kind: Literal["checkpoint", "dataset"] = "checkpoint") -> Path:
        """Path of a reference (``stage:NAME[/ARTIFACT]``, ``input:NAME`` or a path); must exist."""
        if ref.startswith("stage:"):
            stage_name, _, artifact = ref[len("stage:"):].partition("/")
            out = self.inputs.output_of(stage_name)
            artifact = artifact or ("final" if kind == "checkpoint" else "dataset")
            if artifact not in out.artifacts:
                raise FileNotFoundError(f"{ref}: stage {stage_name!r} has no artifact {artifact!r} "
                                        f"(has {sorted(out.artifacts)})")
            path = out.artifacts[artifact].path
        elif ref.startswith("input:"):
            table = self.inputs.checkpoints if kind == "checkpoint" else self.inputs.datasets
            key = ref[len("input:"):]
            if key not in table:
                raise FileNotFoundError(f"{ref}: no job input {kind} named {key!r} (have {sorted(table)})")
            path = Path(table[key])
        else:
            path = Path(ref).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{ref}: {path} does not exist")
        return path

    def previous_checkpoint(self) -> Path | None:
        """The final checkpoint of the latest earlier stage that produced one, else the job input
        checkpoint ``"base"``, else None. The default model of a stage whose config names none."""
        for out in reversed(self.inputs.previous):
            if out.checkpoint is not None:
                return out.checkpoint
        base = self.inputs.checkpoints.get("base")
        return Path(base) if base is not None else None

    def resolve_model(self, ref: str | None) -> Path:
        """``resolve(ref)`` when given, else :meth:`previous_checkpoint`; an error if neither exists."""
        if ref:
            return self.resolve(ref, "checkpoint")
        path = self.previous_checkpoint()
        if path is None:
            raise FileNotFoundError("no model given: set the config's model, run after a stage that "
                                    "writes a checkpoint, or pass inputs={'checkpoints': {'base': ...}}")
        return path

    @property
    def device(self) -> str:
        """``cuda:<local_rank>`` when CUDA is usable, else ``cpu``."""
        import torch  # deferred: this module must stay importable without torch

        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------------
# The stage


@dataclass(frozen=True)
class Stage:
    """A training stage plugin. Expose one instance (conventionally ``STAGE``) as an entry point.

    ``run(ctx)`` is called on every rank of the launched process group and returns summary metrics or
    None. ``queue`` is the Celery queue its task goes to. ``version`` is filled in by the registry
    from the plugin's distribution.
    """

    name: str
    description: str
    config_model: type[StageConfig]
    run: Callable[[StageContext], Mapping[str, float] | None]
    queue: str = "gpu"
    version: str = ""

    def __post_init__(self) -> None:
        if not STAGE_NAME.match(self.name):
            raise ValueError(f"stage name {self.name!r} must match {STAGE_NAME.pattern}")
        if not (isinstance(self.config_model, type) and issubclass(self.config_model, StageConfig)):
            raise TypeError(f"stage {self.name!r}: config_model must subclass StageConfig")
        if not callable(self.run):
            raise TypeError(f"stage {self.name!r}: run must be callable")

    def parse_config(self, raw: Mapping[str, Any] | None, prefix: str = "config") -> StageConfig:
        """Validate a JSON config; :class:`StageConfigError` names every bad field under ``prefix``."""
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise StageConfigError([(prefix, f"must be an object, got {type(raw).__name__}")])
        try:
            return self.config_model.model_validate(dict(raw))
        except pydantic.ValidationError as exc:
            raise StageConfigError(
                [(format_loc(prefix, tuple(e["loc"])), e["msg"]) for e in exc.errors()]
            ) from None

    def config_schema(self) -> dict[str, Any]:
        """JSON Schema (draft 2020-12) of the config, as ListStages publishes it."""
        return self.config_model.model_json_schema()

    def default_config(self) -> dict[str, Any]:
        """Every field that has a default, with it (JSON-safe); required fields are left out."""
        from pydantic_core import to_jsonable_python

        return {name: to_jsonable_python(f.get_default(call_default_factory=True))
                for name, f in self.config_model.model_fields.items() if not f.is_required()}

    def documentation_problems(self) -> list[str]:
        """What is missing from this stage's docs: a description, a run docstring, field descriptions.
        The plugin test suite fails on any; the registry logs them."""
        problems = []
        if len(self.description.strip()) < 10:
            problems.append(f"{self.name}: description is missing or too short")
        if not (getattr(self.run, "__doc__", None) or "").strip():
            problems.append(f"{self.name}: run() has no docstring")
        if not (self.config_model.__doc__ or "").strip() or self.config_model.__doc__ == StageConfig.__doc__:
            problems.append(f"{self.name}: {self.config_model.__name__} has no docstring")
        problems.extend(_undocumented_fields(self.config_model, f"{self.name}.config"))
        try:
            json.dumps(self.config_schema())
        except Exception as exc:  # a schema that cannot be exported is a documentation defect too
            problems.append(f"{self.name}: config schema cannot be exported: {exc}")
        return problems


def _undocumented_fields(model: type[BaseModel], prefix: str) -> list[str]:
    out = []
    for fname, info in model.model_fields.items():
        if not (info.description or "").strip():
            out.append(f"{prefix}.{fname}: no description")
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(_undocumented_fields(ann, f"{prefix}.{fname}"))
    return out


def local_context(
    stage: Stage,
    config: Mapping[str, Any] | StageConfig | None,
    output_dir: str | os.PathLike,
    *,
    inputs: StageInputs | None = None,
    job_id: str = "local",
    name: str | None = None,
    index: int = 0,
    channel: StageChannel | None = None,
) -> StageContext:
    """A context for running ``stage.run(ctx)`` in this process (tests, notebooks): the config is
    validated, events go to a :class:`MemoryChannel` (``ctx.channel.events``) unless given."""
    parsed = config if isinstance(config, StageConfig) else stage.parse_config(config)
    return StageContext(
        job_id=job_id, name=name or stage.name, stage=stage.name, index=index, config=parsed,
        inputs=inputs or StageInputs(), output_dir=output_dir, channel=channel or MemoryChannel(),
    )
