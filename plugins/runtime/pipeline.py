"""Validation of a submitted pipeline, before anything runs.

Every problem is collected and reported at once in a :class:`StageConfigError` whose fields name the
place in the request: ``stages[1].stage`` (unknown plugin), ``stages[0].config.lr`` (schema),
``stages[2].config.model`` (a ``stage:`` reference to a stage that does not run earlier),
``stages[1].name`` (duplicate label), ``inputs.checkpoints.base``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..contract import Stage, StageConfig, StageConfigError, format_loc
from ..registry import UnknownStageError, get_stage

STEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ITEM_KEYS = {"stage", "config", "name"}


@dataclass(frozen=True)
class PlannedStage:
    name: str
    stage: Stage
    config: StageConfig


def validate_pipeline(pipeline: Sequence[Mapping[str, Any]],
                      inputs: Mapping[str, Any] | None = None) -> list[PlannedStage]:
    """Parse ``[{"stage": name, "config": {...}, "name": label?}, ...]``; raises StageConfigError."""
    errors: list[tuple[str, str]] = []
    errors.extend(_check_inputs(inputs))
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
                raise UnknownStageError(str(stage_name), [])
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
        names.append(name)
        planned.append(PlannedStage(name, stage, config))
    if errors:
        raise StageConfigError(errors)
    return planned


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


def _check_inputs(inputs: Mapping[str, Any] | None) -> list[tuple[str, str]]:
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
    return errors
