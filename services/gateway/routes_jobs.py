"""Training jobs as JSON for the playground (and scripts): the TrainingService read side over HTTP.

    GET /v1/internlm2/jobs                     ListJobs (page_size, page_token, state=running,...)
    GET /v1/internlm2/jobs/{job_id}            GetJob
    GET /v1/internlm2/jobs/{job_id}/events     WatchJob as server-sent events, from after_sequence on:
                                               state changes, progress, metrics (the loss curves),
                                               artifacts, logs; the stream ends after the job's end

Enum values are the SDK's lower-case names ("running", "checkpoint"), timestamps RFC 3339.
"""

from __future__ import annotations

import grpc
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from google.protobuf import json_format

from internlm2.v1 import training_pb2

from .errors import ApiError, ProtoPaths, from_rpc_error
from .streams import DONE, sse

router = APIRouter(prefix="/v1/internlm2")

_ENUM_PREFIXES = ("JOB_STATE_", "ARTIFACT_KIND_")


def _lower_enums(value):
    if isinstance(value, dict):
        return {k: _lower_enums(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_lower_enums(v) for v in value]
    if isinstance(value, str):
        for prefix in _ENUM_PREFIXES:
            if value.startswith(prefix):
                return value.removeprefix(prefix).lower()
    return value


def to_json(message) -> dict:
    return _lower_enums(
        json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    )


def _context(request: Request):
    return request.app.state.gateway, request.state.request_id


def _state(name: str) -> int:
    try:
        return training_pb2.JobState.Value("JOB_STATE_" + name.upper())
    except ValueError:
        names = [n.removeprefix("JOB_STATE_").lower() for n in training_pb2.JobState.keys()[1:]]
        raise ApiError.bad_param("state", f"unknown state {name!r}; one of {', '.join(names)}") from None


@router.get("/jobs")
async def list_jobs(request: Request, page_size: int = 0, page_token: str = "",
                    state: list[str] = Query(default=[])):  # noqa: B008 - FastAPI's declaration style
    gateway, request_id = _context(request)
    proto = training_pb2.ListJobsRequest(page_size=page_size, page_token=page_token, states=[_state(s) for s in state])
    paths = ProtoPaths({"page_size": "page_size", "page_token": "page_token", "states": "state"})
    result = await gateway.backends.call("training", "ListJobs", proto, request_id, param_of=paths)
    return {"object": "list", "data": [to_json(j) for j in result.jobs], "next_page_token": result.next_page_token}


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, request: Request):
    gateway, request_id = _context(request)
    result = await gateway.backends.call("training", "GetJob", training_pb2.GetJobRequest(job_id=job_id), request_id,
                                         param_of=ProtoPaths({"job_id": "job_id"}))
    return to_json(result.job)


@router.get("/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request, after_sequence: int = 0):
    gateway, request_id = _context(request)
    proto = training_pb2.WatchJobRequest(job_id=job_id, after_sequence=after_sequence)
    call = gateway.backends.stream("training", "WatchJob", proto, request_id)
    paths = ProtoPaths({"job_id": "job_id", "after_sequence": "after_sequence"})
    try:
        first = await call.read()  # NOT_FOUND and bad input answer with their HTTP status
    except grpc.RpcError as exc:
        raise from_rpc_error(exc, paths) from None

    async def events():
        message = first
        gateway.metrics.streams.inc()
        try:
            while message is not grpc.aio.EOF:
                yield sse(to_json(message))
                message = await call.read()
        except grpc.RpcError as exc:
            yield sse(from_rpc_error(exc, paths).body())
        finally:
            call.cancel()
            gateway.metrics.streams.dec()
        yield DONE

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
