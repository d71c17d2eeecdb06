"""The Celery app of the training runtime: Redis as broker and result store, one queue per kind of
worker (stages go to ``gpu`` unless their plugin says otherwise).

Settings that matter for hour-long stages (research notes: Celery docs, celery#5935):
    task_acks_late + task_reject_on_worker_lost   a stage lost with its worker is delivered again
    worker_prefetch_multiplier = 1                 a GPU worker never reserves a second stage
    visibility_timeout (all three places)          long (default 7 days): Redis would otherwise
                                                   redeliver a still-running stage after 1 h
    + a lease per running stage (jobs.JobStore.claim_stage / heartbeat): a redelivered copy whose
      lease is alive does nothing, and each worker's recovery thread requeues a stage whose lease
      expired (its worker died), so recovery does not wait for the visibility timeout.
    + a dispatch intent per transition that makes a stage due (submit, stage succeeded, requeue),
      committed with it: the same thread sends intents left unsent longer than dispatch_timeout_s
      (the process that committed died before sending), so neither does that wait.

Workers: ``celery -A internlm2.plugins.runtime.celery_app worker -Q gpu -c 1 -P solo`` (or
``internlm2 serve worker``). The module-level ``app`` reads REDIS_URL and INTERNLM2_* from the
environment at that edge only; everything else gets settings passed to :func:`make_app`.
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

DAY = 24 * 3600


@dataclass(frozen=True)
class RuntimeSettings:
    lease_ttl_s: float = 30.0  # a stage whose worker is silent this long is presumed lost
    cancel_grace_s: float = 30.0  # cooperative cancel, then SIGTERM; SIGKILL after as long again
    max_attempts: int = 3  # restarts after lost workers before the stage fails
    dispatch_timeout_s: float = 30.0  # a dispatch intent unsent this long is presumed lost with its sender
    poll_s: float = 0.25  # supervisor loop period (events, cancel, heartbeat)
    work_dir: str = ""  # default output root of jobs submitted through this app ("" = default)
    failpoint: str = ""  # tests only: tasks.EXIT_BEFORE_DISPATCH makes the worker die after a commit

    @classmethod
    def from_env(cls) -> RuntimeSettings:
        env = os.environ
        return cls(
            lease_ttl_s=float(env.get("INTERNLM2_LEASE_TTL_S", cls.lease_ttl_s)),
            cancel_grace_s=float(env.get("INTERNLM2_CANCEL_GRACE_S", cls.cancel_grace_s)),
            max_attempts=int(env.get("INTERNLM2_MAX_ATTEMPTS", cls.max_attempts)),
            dispatch_timeout_s=float(env.get("INTERNLM2_DISPATCH_TIMEOUT_S", cls.dispatch_timeout_s)),
            work_dir=env.get("INTERNLM2_WORK_DIR", ""),
            failpoint=env.get("INTERNLM2_FAILPOINT", ""),
        )


def make_app(redis_url: str, settings: RuntimeSettings | None = None,
             visibility_timeout_s: float = 7 * DAY, restore_interval_s: float | None = None) -> Celery:
    """A configured app with the stage task registered. ``restore_interval_s``: how often idle
    workers sweep unacked messages older than the visibility timeout back into the queue (kombu's
    default is ~100 s; tests that exercise redelivery lower both)."""
    settings = settings or RuntimeSettings()
    app = Celery("internlm2", broker=redis_url, backend=redis_url, set_as_current=False)
    transport = {"visibility_timeout": visibility_timeout_s}
    if restore_interval_s is not None:
        transport.update(unacked_restore_interval=restore_interval_s, unacked_restore_throttle=1)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport,
        result_backend_transport_options={"visibility_timeout": visibility_timeout_s},
        visibility_timeout=visibility_timeout_s,
        task_default_queue="gpu",
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_track_started=True,
        result_expires=30 * DAY,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        internlm2=asdict(settings),
        internlm2_redis_url=redis_url,
    )
    from .tasks import register

    register(app)
    _recovery_on_worker_start(app)
    return app


def settings_of(app: Celery) -> RuntimeSettings:
    return RuntimeSettings(**app.conf.internlm2)


def _recovery_on_worker_start(app: Celery) -> None:
    """Each worker runs a thread that requeues stages whose lease expired (their worker died) and
    sends dispatch intents that their sender left unsent (it died between commit and send)."""
    stop = threading.Event()

    def loop() -> None:
        from .jobs import JobStore

        settings = settings_of(app)
        store = JobStore(app.conf.internlm2_redis_url, dispatcher=lambda j, i: dispatch(app, j, i))
        period = max(0.5, min(settings.lease_ttl_s, settings.dispatch_timeout_s) / 3)
        while not stop.wait(period):
            try:
                store.recover_lost_stages(settings.max_attempts)
                store.resend_stale_dispatches(settings.dispatch_timeout_s)
            except Exception:  # Redis blips must not kill the thread
                import logging

                logging.getLogger(__name__).exception("recovering lost stages failed")

    def on_ready(sender=None, **_):
        if getattr(sender, "app", None) is app:
            threading.Thread(target=loop, name="internlm2-recovery", daemon=True).start()

    def on_shutdown(sender=None, **_):
        stop.set()

    worker_ready.connect(on_ready, weak=False)
    worker_shutdown.connect(on_shutdown, weak=False)


def dispatch(app: Celery, job_id: str, index: int) -> None:
    """Send one message for stage ``index`` of a job (to its stage's queue)."""
    from .tasks import dispatch as _dispatch

    _dispatch(app, job_id, index)


_apps: dict[str, Celery] = {}
_apps_lock = threading.Lock()


def app_for(redis_url: str) -> Celery:
    """One app per Redis URL in this process (the service side uses it to send chains)."""
    with _apps_lock:
        if redis_url not in _apps:
            _apps[redis_url] = make_app(redis_url, RuntimeSettings.from_env())
        return _apps[redis_url]


def _env_app() -> Celery:
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    vt = float(os.environ.get("INTERNLM2_VISIBILITY_TIMEOUT_S", 7 * DAY))
    ri = os.environ.get("INTERNLM2_RESTORE_INTERVAL_S")
    return make_app(url, RuntimeSettings.from_env(), vt, float(ri) if ri else None)


_env_apps: dict[str, Celery] = {}


def __getattr__(name: str) -> Celery:
    # ``celery -A internlm2.plugins.runtime.celery_app worker ...`` reads ``app``; built on first
    # access so that importing this module (the service does) configures nothing.
    if name in ("app", "celery"):
        if "app" not in _env_apps:
            _env_apps["app"] = _env_app()
        return _env_apps["app"]
    raise AttributeError(name)
