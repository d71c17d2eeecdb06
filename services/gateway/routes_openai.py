"""OpenAI's API: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}]."""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from internlm2.v1 import inference_pb2

from .errors import ApiError
from .schemas import ChatCompletionRequest, CompletionRequest
from .streams import ChatChunker, CompletionChunker, OpenStreams, sse_body
from .translate import (
    chat_completion,
    chat_param_of,
    chat_request,
    choices_of,
    completion_logprobs,
    completion_param_of,
    completion_requests,
    finish_reason,
    usage_json,
)

log = logging.getLogger("internlm2.services.gateway")
router = APIRouter()

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _context(request: Request):
    return request.app.state.gateway, request.state.request_id


def _log_user(body) -> None:
    """OpenAI's ``user`` (the caller's end-user id, for abuse tracing) goes into the log with the request id."""
    if body.user:
        log.info("end user", extra={"fields": {"user": body.user}})


@router.get("/v1/models")
async def list_models(request: Request):
    gateway, request_id = _context(request)
    return {"object": "list", "data": await gateway.models(request_id)}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    gateway, request_id = _context(request)
    models = await gateway.models(request_id)
    for model in models:
        if model["id"] == model_id:
            return model
    raise ApiError.model_not_found(model_id, [m["id"] for m in models])


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    gateway, request_id = _context(request)
    started = time.monotonic()
    model = await gateway.resolve_model(body.model, request_id)
    _log_user(body)
    param_of = chat_param_of(body)
    tools_offered = bool(body.tools) and body.tool_choice != "none"
    completion_id = f"chatcmpl-{request_id}"
    if not body.stream:
        if body.stream_options is not None:
            raise ApiError.bad_param("stream_options", "only allowed with stream: true")
        proto = chat_request(body, inference_pb2.GenerateRequest)
        response = await until_disconnected(
            request, gateway.backends.call("inference", "Generate", proto, request_id, param_of=param_of)
        )
        return chat_completion(response, model, completion_id, tools_offered, bool(body.logprobs))

    proto = chat_request(body, inference_pb2.GenerateStreamRequest)
    action_start = await gateway.action_start_id(request_id) if tools_offered else None
    streams = await OpenStreams.open(gateway.backends, [proto], request_id, param_of)
    chunker = ChatChunker(
        completion_id,
        model,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        tools_offered=tools_offered,
        logprobs=bool(body.logprobs),
        action_start_id=action_start,
    )

    async def chunks():
        async for _, message in streams.messages():
            if message.HasField("final"):
                for chunk in chunker.on_final(message.final):
                    yield chunk
            else:
                for chunk in chunker.on_delta(message.delta):
                    yield chunk

    body_iter = sse_body(chunks(), streams, gateway.metrics, "/v1/chat/completions", started)
    return StreamingResponse(body_iter, media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    gateway, request_id = _context(request)
    started = time.monotonic()
    model = await gateway.resolve_model(body.model, request_id)
    _log_user(body)
    param_of = completion_param_of(body)
    n = body.n or 1
    completion_id = f"cmpl-{request_id}"
    logprobs = body.logprobs is not None
    if not body.stream:
        if body.stream_options is not None:
            raise ApiError.bad_param("stream_options", "only allowed with stream: true")
        protos = completion_requests(body, inference_pb2.GenerateRequest)
        calls = [gateway.backends.call("inference", "Generate", p, request_id, param_of=param_of) for p in protos]
        responses = await until_disconnected(request, _gather(calls))
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        cached = 0
        for p, response in enumerate(responses):
            for c in choices_of(response):
                choices.append(
                    {
                        "index": p * n + c.index,
                        "text": c.text,
                        "logprobs": completion_logprobs(c.logprobs) if logprobs else None,
                        "finish_reason": finish_reason(c, False),
                    }
                )
            one = usage_json(response.usage)
            for key in usage:
                usage[key] += one[key]
            cached += one["prompt_tokens_details"]["cached_tokens"]
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
        return {"id": completion_id, "object": "text_completion", "created": int(time.time()), "model": model,
                "choices": choices, "usage": usage, "system_fingerprint": None}

    protos = completion_requests(body, inference_pb2.GenerateStreamRequest)
    streams = await OpenStreams.open(gateway.backends, protos, request_id, param_of)
    chunker = CompletionChunker(
        completion_id, model, include_usage=bool(body.stream_options and body.stream_options.include_usage),
        logprobs=logprobs, n=n,
    )

    async def chunks():
        async for p, message in streams.messages():
            if message.HasField("final"):
                for chunk in chunker.on_final(p, message.final, len(protos)):
                    yield chunk
            else:
                for chunk in chunker.on_delta(p, message.delta):
                    yield chunk

    body_iter = sse_body(chunks(), streams, gateway.metrics, "/v1/completions", started)
    return StreamingResponse(body_iter, media_type="text/event-stream", headers=SSE_HEADERS)


async def _gather(coros):
    """All results, or the first failure with the other calls cancelled."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


async def until_disconnected(request: Request, work):
    """``work``'s result, unless the client hangs up first: then ``work`` is cancelled (its gRPC calls, so
    the engine aborts the request and frees its blocks) instead of generating an answer nobody reads.
    The body has been read, so the next ASGI message is the disconnect."""
    task = asyncio.ensure_future(work)

    async def hung_up():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    listener = asyncio.ensure_future(hung_up())
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        raise ApiError(499, "the client closed the connection", code="client_closed_request")
    return task.result()
