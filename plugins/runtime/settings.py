"""Settings of the training runtime: plain data, declared once, read from the environment in one place.

Every process of the runtime (training service, ``internlm2 serve worker``, ``internlm2 up``, tests)
builds one :class:`RuntimeSettings` — from :meth:`RuntimeSettings.from_env` or by hand — and passes
it down; no other module reads ``INTERNLM2_*`` for the runtime.

Environment (all optional):
    REDIS_URL                          job records, leases and the Celery broker
    INTERNLM2_WORK_DIR                 where jobs write their outputs (default ~/.cache/internlm2/jobs)
    INTERNLM2_DATA_ROOTS / _MODELS_ROOTS / _ARTIFACTS_ROOTS
                                       os.pathsep-separated folders that paths in stage configs and job
                                       inputs must lie under (see :attr:`RuntimeSettings.path_roots`;
                                       unset: /data, /models, /artifacts, the temp dir, ~/.cache/internlm2)
    INTERNLM2_LEASE_TTL_S              a stage whose supervisor is silent this long is presumed lost
    INTERNLM2_CANCEL_GRACE_S           cooperative cancel, then SIGTERM; SIGKILL after as long again
    INTERNLM2_MAX_ATTEMPTS             lost workers a stage survives before it fails
    INTERNLM2_DISPATCH_TIMEOUT_S       a dispatch intent unsent this long is sent by a recovery thread
    INTERNLM2_VISIBILITY_TIMEOUT_S     Redis transport: unacked messages come back after this long
    INTERNLM2_RESTORE_INTERVAL_S       how often idle workers sweep unacked messages (tests lower it)
    INTERNLM2_K8S_STAGE_POD            the stage-pod settings file (multi-node stages on Kubernetes)
    INTERNLM2_GPU_MEMORY_GIB           memory of the workers' GPUs; set, SubmitJob refuses a pipeline the
                                       memory planner says cannot fit them (unset/0: no memory check)
    INTERNLM2_FAILPOINT                tests only (see ``tasks.EXIT_BEFORE_DISPATCH``)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

DAY = 24 * 3600.0
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_ROOTS = ("/data", "/models", "/artifacts")  # the mounts of compose, Helm and stage pods


def default_work_dir() -> str:
    return str(Path.home() / ".cache" / "internlm2" / "jobs")


def _roots(value: str | None) -> tuple[str, ...]:
    return tuple(p for p in (value or "").split(os.pathsep) if p)


@dataclass(frozen=True)
class RuntimeSettings:
    redis_url: str = DEFAULT_REDIS_URL
    work_dir: str = field(default_factory=default_work_dir)
    # Folders that stage-config paths and job inputs must lie under. All empty = DEFAULT_ROOTS (the
    # images' /data, /models, /artifacts mounts, the temp dir, ~/.cache/internlm2) plus the work dir.
    data_roots: tuple[str, ...] = ()
    models_roots: tuple[str, ...] = ()
    artifacts_roots: tuple[str, ...] = ()
    lease_ttl_s: float = 30.0
    cancel_grace_s: float = 30.0
    max_attempts: int = 3
    dispatch_timeout_s: float = 30.0
    poll_s: float = 0.25  # supervision loop period (events, cancel, heartbeat)
    visibility_timeout_s: float = 7 * DAY  # Redis would otherwise redeliver a running stage after 1 h
    restore_interval_s: float | None = None  # None: kombu's default sweep period
    k8s_stage_pod: str = ""  # path of the stage-pod settings file; "" = no Kubernetes
    gpu_memory_gib: float = 0.0  # the workers' GPU size for admission (plugins/planner.py); 0 = unchecked
    failpoint: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> RuntimeSettings:
        env = os.environ if env is None else env
        restore = env.get("INTERNLM2_RESTORE_INTERVAL_S")
        values: dict[str, Any] = dict(
            redis_url=env.get("REDIS_URL", DEFAULT_REDIS_URL),
            work_dir=env.get("INTERNLM2_WORK_DIR") or default_work_dir(),
            data_roots=_roots(env.get("INTERNLM2_DATA_ROOTS")),
            models_roots=_roots(env.get("INTERNLM2_MODELS_ROOTS")),
            artifacts_roots=_roots(env.get("INTERNLM2_ARTIFACTS_ROOTS")),
            lease_ttl_s=float(env.get("INTERNLM2_LEASE_TTL_S", cls.lease_ttl_s)),
            cancel_grace_s=float(env.get("INTERNLM2_CANCEL_GRACE_S", cls.cancel_grace_s)),
            max_attempts=int(env.get("INTERNLM2_MAX_ATTEMPTS", cls.max_attempts)),
            dispatch_timeout_s=float(env.get("INTERNLM2_DISPATCH_TIMEOUT_S", cls.dispatch_timeout_s)),
            visibility_timeout_s=float(env.get("INTERNLM2_VISIBILITY_TIMEOUT_S", cls.visibility_timeout_s)),
            restore_interval_s=float(restore) if restore else None,
            k8s_stage_pod=env.get("INTERNLM2_K8S_STAGE_POD", ""),
            gpu_memory_gib=float(env.get("INTERNLM2_GPU_MEMORY_GIB") or 0.0),
            failpoint=env.get("INTERNLM2_FAILPOINT", ""),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_(self, **changes: Any) -> RuntimeSettings:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RuntimeSettings:
        d = dict(d)
        for key in ("data_roots", "models_roots", "artifacts_roots"):
            d[key] = tuple(d.get(key, ()))
        return cls(**d)

    # ---- derived ------------------------------------------------------------------------------
    @property
    def path_roots(self) -> tuple[Path, ...]:
        """Every folder a submitted path may lie under (resolved)."""
        roots = (*self.data_roots, *self.models_roots, *self.artifacts_roots)
        if not roots:
            roots = (*DEFAULT_ROOTS, tempfile.gettempdir(), str(Path.home() / ".cache" / "internlm2"))
        return tuple(Path(os.path.realpath(p)) for p in (*roots, self.work_dir))

    @property
    def renew_every_s(self) -> float:
        """Lease renewal period: a Redis outage up to ``stop_after_s - renew_every_s`` (a third of
        the lease) goes unnoticed by the stage."""
        return self.lease_ttl_s / 6

    @property
    def stop_after_s(self) -> float:
        """Without a successful renewal for this long (counted from the last renewal's send), the
        supervisor SIGTERMs its training process; SIGKILL follows ``kill_after_s``; both before the
        lease (``lease_ttl_s``) can expire and let another worker start the stage."""
        return self.lease_ttl_s / 2

    @property
    def kill_after_s(self) -> float:
        """Also the training process's own watchdog: it kills its process group when its supervisor
        has not confirmed a renewal for this long (a frozen or partitioned supervisor)."""
        return self.lease_ttl_s * 0.7

    @property
    def kubernetes(self) -> bool:
        return bool(self.k8s_stage_pod)
