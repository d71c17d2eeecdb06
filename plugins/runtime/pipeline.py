"""Validation of a submitted pipeline, before anything runs.

Every problem is collected and reported at once in a :class:`StageConfigError` whose fields name the
place in the request: ``stages[1].stage`` (unknown plugin), ``stages[0].config.lr`` (schema),
``stages[2].config.model`` (a ``stage:`` reference to a stage that does not run earlier),
``stages[1].name`` (duplicate label), ``inputs.checkpoints.base``.

Trust boundaries (checked here, once, at submit):
    paths        a config string that is a path (absolute, ``~``, or with a ``..`` part) and every job
                 input must exist and lie under one of the configured roots (``RuntimeSettings.path_roots``)
    launch.env   only the variables in :data:`LAUNCH_ENV_ALLOWED` / :data:`LAUNCH_ENV_PREFIXES`
    launch.num_nodes > 1 (or launcher kubernetes)   only where Kubernetes is configured
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..contract import Stage, StageConfig, StageConfigError, format_loc
from ..registry import UnknownStageError, get_stage, load_stages

STEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ITEM_KEYS = {"stage", "config", "name"}

# launch.env may tune the training process, never change what runs (LD_PRELOAD, PYTHONPATH, PATH ...).
LAUNCH_ENV_ALLOWED = frozenset({
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_LAUNCH_BLOCKING", "PYTORCH_CUDA_ALLOC_CONF",
    "TORCH_DISTRIBUTED_DEBUG", "TORCH_SHOW_CPP_STACKTRACES", "TOKENIZERS_PARALLELISM",
})
LAUNCH_ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_")


@dataclass(frozen=True)
class Boundaries:
    """What a submitted job may reach: path roots (None = no path check), multi-node support, and the
    workers' GPU size (0 = memory not checked)."""

    roots: tuple[Path, ...] | None = None
    kubernetes: bool = False
    gpu_memory_gib: float = 0.0


@dataclass(frozen=True)
class PlannedStage:
    name: str
    stage: Stage
    config: StageConfig


def validate_pipeline(pipeline: Sequence[Mapping[str, Any]],
                      inputs: Mapping[str, Any] | None = None,
                      boundaries: Boundaries | None = None) -> list[PlannedStage]:
    """Parse ``[{"stage": name, "config": {...}, "name": label?}, ...]``; raises StageConfigError."""
    boundaries = boundaries or Boundaries()
    errors: list[tuple[str, str]] = []
    errors.extend(_check_inputs(inputs, boundaries.roots))
    if isinstance(pipeline, (str, bytes, Mapping)) or not isinstance(pipeline, Sequence):
        raise StageConfigError([("stages", "must be a list of {stage, config, name}")])
    if not pipeline:
        raise StageConfigError([("stages", "a job needs at least one stage")])
    planned: list[PlannedStage] = []
    names: list[str] = []
    for i, item in enumerate(pipeline):
        where = f"stages[{i}]"
        if not isinstance(item, Mapping):
            errors.append((where, "must be an object {stage, config, name}"))
            continue
        for extra in sorted(set(item) - _ITEM_KEYS):
            errors.append((f"{where}.{extra}", "unknown key (expected stage, config, name)"))
        stage_name = item.get("stage")
        try:
            if not isinstance(stage_name, str) or not stage_name:
                raise UnknownStageError(str(stage_name), sorted(load_stages()))  # the list helps fix it
            stage = get_stage(stage_name)
        except UnknownStageError as exc:
            errors.append((f"{where}.stage", str(exc)))
            continue
        name = item.get("name") or _default_name(stage_name, names)
        if not isinstance(name, str) or not STEP_NAME.match(name):
            errors.append((f"{where}.name", f"must match {STEP_NAME.pattern}, got {name!r}"))
            continue
        if name in names:
            errors.append((f"{where}.name", f"duplicate stage name {name!r}"))
            continue
        raw = item.get("config") or {}
        try:
            config = stage.parse_config(raw, prefix=f"{where}.config")
        except StageConfigError as exc:
            errors.extend(exc.errors)
            names.append(name)
            continue
        errors.extend(_check_references(raw, f"{where}.config", names))
        errors.extend(_check_launch(config, f"{where}.config.launch", boundaries))
        if boundaries.roots is not None:
            errors.extend(_check_paths({k: v for k, v in raw.items() if k != "launch"} if isinstance(raw, Mapping)
                                       else raw, f"{where}.config", boundaries.roots))
        names.append(name)
        planned.append(PlannedStage(name, stage, config))
    if errors:
        raise StageConfigError(errors)
    if boundaries.gpu_memory_gib > 0:  # admission: the same estimate PlanJob shows
        _planned_memory(pipeline, 1, boundaries.gpu_memory_gib, None, refuse=True)
    return planned


def plan_memory(pipeline: Sequence[Mapping[str, Any]], num_gpus: int, gpu_memory_gib: float, model: str | None = None,
                inputs: Mapping[str, Any] | None = None, boundaries: Boundaries | None = None):
    """PlanJob: the pipeline validated like a submission (field errors first), then the planner's
    per-stage, per-GPU memory (``internlm2.plugins.planner.Plan``). Raises StageConfigError."""
    boundaries = Boundaries(boundaries.roots, boundaries.kubernetes) if boundaries else None  # plan, not refuse
    validate_pipeline(pipeline, inputs, boundaries)
    return _planned_memory(pipeline, num_gpus, gpu_memory_gib, model, refuse=False)


def _planned_memory(pipeline, num_gpus: int, gpu_memory_gib: float, model: str | None, refuse: bool):
    from ..planner import check_fits, plan_pipeline

    specs = [dict(item) for item in pipeline]
    try:
        return (check_fits if refuse else plan_pipeline)(specs, num_gpus, gpu_memory_gib, model)
    except ValueError as exc:  # the planner names the field first: "stages[0].config.zero_stage: needs ..."
        field, sep, message = str(exc).partition(": ")
        if not (sep and (field.startswith("stages[") or field in ("num_gpus", "gpu_memory_gib"))):
            field, message = "model", str(exc)  # the model's shapes: an unknown preset, a bad config.json
        raise StageConfigError([(field, message)]) from None


def _default_name(stage: str, taken: list[str]) -> str:
    if stage not in taken:
        return stage
    n = 2
    while f"{stage}-{n}" in taken:
        n += 1
    return f"{stage}-{n}"


def _check_references(value: Any, path: str, earlier: list[str]) -> list[tuple[str, str]]:
    """``stage:NAME`` strings anywhere in the config must name an earlier stage of this job."""
    if isinstance(value, str) and value.startswith("stage:"):
        target = value[len("stage:"):].partition("/")[0]
        if target not in earlier:
            return [(path, f"{value!r} does not name an earlier stage (earlier: {earlier or 'none'})")]
        return []
    if isinstance(value, Mapping):
        return [e for k, v in value.items() for e in _check_references(v, format_loc(path, (k,)), earlier)]
    if isinstance(value, list):
        return [e for i, v in enumerate(value) for e in _check_references(v, format_loc(path, (i,)), earlier)]
    return []


def _check_inputs(inputs: Mapping[str, Any] | None, roots: tuple[Path, ...] | None) -> list[tuple[str, str]]:
    if inputs is None:
        return []
    if not isinstance(inputs, Mapping):
        return [("inputs", "must be an object {datasets: {...}, checkpoints: {...}}")]
    errors = []
    for key, table in inputs.items():
        if key not in ("datasets", "checkpoints"):
            errors.append((f"inputs.{key}", "unknown key (expected datasets, checkpoints)"))
        elif not isinstance(table, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in table.items()
        ):
            errors.append((f"inputs.{key}", "must map names to paths (strings)"))
        elif roots is not None:
            for name, path in table.items():
                problem = path_problem(path, roots)
                if problem:
                    errors.append((f"inputs.{key}.{name}", problem))
    return errors


def _check_launch(config: StageConfig, where: str, boundaries: Boundaries) -> list[tuple[str, str]]:
    launch = config.launch
    errors = []
    if (launch.num_nodes > 1 or launch.launcher == "kubernetes") and not boundaries.kubernetes:
        field = f"{where}.num_nodes" if launch.num_nodes > 1 else f"{where}.launcher"
        errors.append((field, f"num_nodes={launch.num_nodes} needs Kubernetes, and these workers have none "
                              "(INTERNLM2_K8S_STAGE_POD is not set); run on one node (num_nodes: 1)"))
    for name in sorted(launch.env):
        if name not in LAUNCH_ENV_ALLOWED and not name.startswith(LAUNCH_ENV_PREFIXES):
            errors.append((f"{where}.env.{name}", "not an allowed variable (allowed: "
                           f"{', '.join(sorted(LAUNCH_ENV_ALLOWED))} and {'*, '.join(LAUNCH_ENV_PREFIXES)}*)"))
    return errors


def is_path_like(value: str) -> bool:
    """Config strings treated as filesystem paths: absolute, home-relative, or climbing with ``..``."""
    if value.startswith(("stage:", "input:")):
        return False
    return value.startswith(("/", "~")) or ".." in Path(value).parts


def path_problem(value: str, roots: tuple[Path, ...]) -> str:
    """Why ``value`` may not be used as an input path ("" when it may)."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        return f"{value!r}: must be an absolute path under {_names(roots)}"
    real = Path(os.path.realpath(path))
    if not any(real == root or real.is_relative_to(root) for root in roots):
        return f"{value!r}: not under an allowed root ({_names(roots)})"
    if not real.exists():
        return f"{value!r}: does not exist"
    return ""


def _names(roots: tuple[Path, ...]) -> str:
    return ", ".join(str(r) for r in roots)


def _check_paths(value: Any, path: str, roots: tuple[Path, ...]) -> list[tuple[str, str]]:
    if isinstance(value, str):
        problem = path_problem(value, roots) if is_path_like(value) else ""
        return [(path, problem)] if problem else []
    if isinstance(value, Mapping):
        return [e for k, v in value.items() for e in _check_paths(v, format_loc(path, (k,)), roots)]
    if isinstance(value, list):
        return [e for i, v in enumerate(value) for e in _check_paths(v, format_loc(path, (i,)), roots)]
    return []
