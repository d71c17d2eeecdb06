"""TrainingServicer: the plugins' ``JobStore`` over gRPC.

The store is synchronous Redis; every call runs on this service's own thread pool (sized for many
concurrent WatchJob streams, each of which blocks a thread for at most ``WATCH_BLOCK_S`` at a time)
so the event loop stays free. Job records and event streams live in Redis, so a restarted service
sees every job, and WatchJob resumes from ``after_sequence``.

Redis unreachable: calls answer UNAVAILABLE (retryable) and a monitor pings Redis every
``REDIS_PROBE_S``, turning the service's health NOT_SERVING until Redis answers again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading

from internlm2.v1 import training_pb2, training_pb2_grpc

from ..common.app import Service
from ..common.errors import ServiceError, Violation
from .convert import (
    dict_to_struct,
    event_to_proto,
    job_to_proto,
    non_finite_path,
    state_from_proto,
    struct_to_dict,
)

log = logging.getLogger("internlm2.services.training")

SERVICE_NAME = training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name
WATCH_BLOCK_S = 0.5
DEFAULT_PAGE_SIZE = 50
REDIS_PROBE_S = 1.0
UNAVAILABLE_MESSAGE = "job store (Redis) unreachable; retry shortly"


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    """``store`` is set once Redis answers; until then ReadinessInterceptor keeps calls away."""

    def __init__(self, max_threads: int = 64):
        self.store = None
        self.redis_ok = True  # the monitor's last probe
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="job-store")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn, *args, **kwargs):
        """Run a blocking store call on the pool, mapping the store's errors to status codes."""
        from internlm2.plugins.contract import StageConfigError
        from internlm2.plugins.runtime.jobs import JobFinishedError, JobNotFoundError, JobNotRetryableError
        from internlm2.plugins.runtime.store import UNREACHABLE

        if not self.redis_ok:
            raise ServiceError.unavailable(UNAVAILABLE_MESSAGE, reason="JOB_STORE_UNAVAILABLE")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))
        except UNREACHABLE:
            raise ServiceError.unavailable(UNAVAILABLE_MESSAGE, reason="JOB_STORE_UNAVAILABLE") from None
        except JobNotFoundError as exc:
            raise ServiceError.not_found(str(exc), reason="JOB_NOT_FOUND") from None
        except JobFinishedError as exc:
            raise ServiceError.failed_precondition(str(exc), reason="JOB_ENDED") from None
        except JobNotRetryableError as exc:
            raise ServiceError.failed_precondition(str(exc), reason="JOB_NOT_RETRYABLE") from None
        except StageConfigError as exc:
            raise ServiceError.invalid_fields([Violation(f, m) for f, m in exc.errors]) from None

    @staticmethod
    def _job_id(request) -> str:
        if not request.job_id:
            raise ServiceError.invalid_argument("job_id", "must not be empty")
        return request.job_id

    async def ListStages(self, request, context):
        from internlm2.plugins.registry import stage_infos

        infos = await self._run(stage_infos)
        return training_pb2.ListStagesResponse(
            stages=[
                training_pb2.StageInfo(
                    name=i["name"],
                    description=i["description"],
                    config_schema=dict_to_struct(i["config_schema"]),
                    version=i["version"],
                    queue=i["queue"],
                )
                for i in infos
            ]
        )

    @staticmethod
    def _pipeline(request) -> list[dict]:
        """The request's stages as the store takes them (finite numbers only: JSON has no NaN)."""
        pipeline = []
        for i, spec in enumerate(request.stages):
            bad = non_finite_path(spec.config, f"stages[{i}].config")
            if bad:
                raise ServiceError.invalid_argument(bad, "must be a finite number (JSON has no NaN or Infinity)")
            item = {"stage": spec.stage, "config": struct_to_dict(spec.config)}
            if spec.name:
                item["name"] = spec.name
            pipeline.append(item)
        return pipeline

    async def PlanJob(self, request, context):
        from internlm2.plugins.runtime.pipeline import plan_memory

        pipeline = self._pipeline(request)  # empty stages, counts and sizes: refused by validation/planner
        plan = await self._run(plan_memory, pipeline, request.num_gpus, request.gpu_memory_gib,
                               request.model or None, None, self.store.boundaries)
        stages = []
        for s in plan.stages:
            stages.append(training_pb2.StagePlan(
                name=s.name, stage=s.stage, num_gpus=s.num_gpus, weights_gib=s.weights, grads_gib=s.grads,
                optimizer_gib=s.optimizer, activations_gib=s.activations, kv_gib=s.kv, frozen_gib=s.frozen,
                other_gib=s.buffers + s.overhead, total_gib=s.total, fits=plan.stage_fits(s), notes=s.notes))
        return training_pb2.PlanJobResponse(stages=stages, fits=plan.fits, gpu_memory_gib=plan.gpu_memory_gib)

    async def SubmitJob(self, request, context):
        if not request.stages:
            raise ServiceError.invalid_argument("stages", "a job needs at least one stage")
        pipeline = self._pipeline(request)
        inputs = {
            kind: dict(getattr(request.inputs, kind))
            for kind in ("checkpoints", "datasets")
            if getattr(request.inputs, kind)
        }
        job = await self._run(
            self.store.submit,
            pipeline,
            idempotency_key=request.idempotency_key or None,
            name=request.name,
            labels=dict(request.labels),
            inputs=inputs or None,
        )
        log.info(
            "job submitted",
            extra={"fields": {"job_id": job.job_id, "created": job.created, "stages": [s.stage for s in job.stages]}},
        )
        return training_pb2.SubmitJobResponse(job=job_to_proto(job), created=job.created)

    async def GetJob(self, request, context):
        job = await self._run(self.store.get, self._job_id(request))
        return training_pb2.GetJobResponse(job=job_to_proto(job))

    async def ListJobs(self, request, context):
        page_size = request.page_size or DEFAULT_PAGE_SIZE
        if not 1 <= page_size <= 1000:
            raise ServiceError.invalid_argument("page_size", f"must be in 1..1000 (0 = {DEFAULT_PAGE_SIZE})")
        states = []
        for i, value in enumerate(request.states):
            if value == training_pb2.JOB_STATE_UNSPECIFIED or value not in training_pb2.JobState.values():
                raise ServiceError.invalid_argument(f"states[{i}]", f"not a job state: {value}")
            states.append(state_from_proto(value))
        try:
            jobs, token = await self._run(
                self.store.list,
                states=states or None,
                labels=dict(request.labels),
                limit=page_size,
                page_token=request.page_token,
            )
        except ValueError as exc:  # a malformed page token
            raise ServiceError.invalid_argument("page_token", str(exc)) from None
        return training_pb2.ListJobsResponse(jobs=[job_to_proto(j) for j in jobs], next_page_token=token)

    async def CancelJob(self, request, context):
        job = await self._run(self.store.cancel, self._job_id(request), reason=request.reason)
        log.info("job cancel requested", extra={"fields": {"job_id": job.job_id, "state": job.state.value}})
        return training_pb2.CancelJobResponse(job=job_to_proto(job))

    async def RetryJob(self, request, context):
        job = await self._run(self.store.retry, self._job_id(request))
        log.info("job retried", extra={"fields": {"job_id": job.job_id, "stage": job.current_stage}})
        return training_pb2.RetryJobResponse(job=job_to_proto(job))

    async def WatchJob(self, request, context):
        job_id = self._job_id(request)
        if request.after_sequence < 0:
            raise ServiceError.invalid_argument("after_sequence", "must be >= 0")
        stopped = threading.Event()
        events = self.store.watch(
            job_id, after_sequence=request.after_sequence, block_s=WATCH_BLOCK_S, stop=stopped.is_set
        )
        try:
            while True:
                # next() blocks in Redis XREAD for at most WATCH_BLOCK_S before it checks `stopped`, so
                # a cancelled stream frees its thread within that time.
                event = await self._run(next, events, None)
                if event is None:
                    return
                yield event_to_proto(event)
        finally:
            stopped.set()


class TrainingService(Service):
    """Connects a JobStore to ``redis_url``; ready once Redis answers a PING. ``health`` (the
    server's HealthServicer, when given) follows Redis: NOT_SERVING while it is unreachable."""

    service_name = SERVICE_NAME

    def __init__(self, redis_url: str, work_dir: str | None = None, store=None, health=None):
        self.redis_url = redis_url
        self.work_dir = work_dir
        self.servicer = TrainingServicer()
        self._preloaded = store
        self.health = health
        self._monitor: asyncio.Task | None = None

    def add_to_server(self, server) -> None:
        training_pb2_grpc.add_TrainingServiceServicer_to_server(self.servicer, server)

    async def load(self) -> None:
        store = self._preloaded
        if store is None:
            from internlm2.plugins.runtime.jobs import JobStore
            from internlm2.plugins.runtime.settings import RuntimeSettings

            settings = RuntimeSettings.from_env(redis_url=self.redis_url, work_dir=self.work_dir)
            store = JobStore(settings=settings)
        delay = 0.1
        while True:
            try:
                await asyncio.to_thread(store.r.ping)
                break
            except Exception as exc:  # Redis not up yet (compose / local stack start order)
                log.warning("waiting for Redis at %s: %s", self.redis_url, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.servicer.store = store
        if self.health is not None:
            self._monitor = asyncio.create_task(self._watch_redis(store))

    async def _watch_redis(self, store) -> None:
        """Ping Redis every REDIS_PROBE_S; flip health and the servicer's gate when it changes."""
        from grpc_health.v1 import health_pb2

        while True:
            await asyncio.sleep(REDIS_PROBE_S)
            try:
                ok = bool(await asyncio.wait_for(asyncio.to_thread(store.r.ping), REDIS_PROBE_S * 3))
            except Exception:  # unreachable, refused, timed out
                ok = False
            if ok == self.servicer.redis_ok:
                continue
            self.servicer.redis_ok = ok
            log.warning("Redis %s", "reachable again" if ok else "unreachable: NOT_SERVING until it answers")
            status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in (self.service_name, ""):
                await self.health.set(name, status)

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        self.servicer.close()
