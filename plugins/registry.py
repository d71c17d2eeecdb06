"""Discovery of stage plugins through the ``internlm2.stages`` entry-point group.

Built-in stages and third-party ones load the same way. Loading is idempotent and cached per process
(the first call scans the installed distributions); a plugin that fails to import or is malformed is
skipped, logged and reported by :func:`load_errors`, so one broken plugin cannot hide the others.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from importlib.metadata import entry_points
from typing import Any

from .contract import Stage

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "internlm2.stages"

_lock = threading.Lock()
_stages: dict[str, Stage] | None = None
_errors: dict[str, str] = {}


class UnknownStageError(KeyError):
    """No installed stage has this name."""

    def __init__(self, name: str, known: list[str]):
        super().__init__(name)
        self.name = name
        self.known = known

    def __str__(self) -> str:
        return f"unknown stage {self.name!r}; installed: {', '.join(self.known) or 'none'}"


def load_stages(reload: bool = False) -> dict[str, Stage]:
    """Name -> Stage for every installed plugin (cached; ``reload=True`` scans again)."""
    global _stages
    with _lock:
        if _stages is not None and not reload:
            return dict(_stages)
        found: dict[str, Stage] = {}
        errors: dict[str, str] = {}
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            try:
                stage = ep.load()
                if not isinstance(stage, Stage):
                    raise TypeError(f"{ep.value} is a {type(stage).__name__}, not an internlm2 Stage")
                if stage.name != ep.name:
                    raise ValueError(f"entry point {ep.name!r} exposes a stage named {stage.name!r}")
                if ep.name in found:
                    raise ValueError(f"stage {ep.name!r} is registered twice")
                version = ep.dist.version if ep.dist is not None else ""
                found[ep.name] = dataclasses.replace(stage, version=stage.version or version)
                for problem in stage.documentation_problems():
                    logger.warning("stage plugin %s: %s", ep.name, problem)
            except Exception as exc:
                errors[ep.name] = f"{type(exc).__name__}: {exc}"
                logger.error("stage plugin %s (%s) failed to load: %s", ep.name, ep.value, exc)
        _stages = found
        _errors.clear()
        _errors.update(errors)
        return dict(found)


def load_errors() -> dict[str, str]:
    """Entry-point name -> why it failed to load, for the last scan."""
    load_stages()
    return dict(_errors)


def get_stage(name: str) -> Stage:
    """The stage called ``name``; :class:`UnknownStageError` when none is installed."""
    stages = load_stages()
    if name not in stages:
        raise UnknownStageError(name, sorted(stages))
    return stages[name]


def stage_infos() -> list[dict[str, Any]]:
    """What ListStages returns: name, description, config_schema (JSON Schema), version, queue."""
    return [
        {"name": s.name, "description": s.description, "config_schema": s.config_schema(),
         "version": s.version, "queue": s.queue}
        for s in load_stages().values()
    ]
