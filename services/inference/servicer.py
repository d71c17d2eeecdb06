"""InferenceServicer: requests -> ``AsyncLLMEngine.generate`` -> deltas / a whole response.

Cancellation is structural: the engine's output iterator is closed (``aclosing``) whenever the RPC
ends early — client cancel, deadline, server shutdown past its grace period — and closing it aborts
the request in the engine and frees its KV blocks at once. ``Abort`` ends another call's request
from the engine side; that call then finishes normally with FINISH_REASON_CANCELLED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from importlib import metadata
from pathlib import Path

from internlm2.core import InternLM2ForCausalLM
from internlm2.core.engine import (
    AsyncLLMEngine,
    EngineClosedError,
    EngineConfig,
    EngineOverloadedError,
    SamplingParams,
    StructuredOutput,
)
from internlm2.core.tokenizer import InternLM2Tokenizer
from internlm2.v1 import inference_pb2, inference_pb2_grpc

from ..common.app import Service
from ..common.context import current_request_id, new_request_id
from ..common.errors import ServiceError
from ..common.interceptors import DEADLINE_SLACK_S
from .metrics import EngineStatsCollector, RequestMetricsRecorder
from .requests import Prompt, engine_error, prompt_from_request, sampling_from_proto
from .responses import Completion

log = logging.getLogger("internlm2.services.inference")

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


def _version() -> str:
    try:
        return metadata.version("internlm2-platform")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _deadline_passed(context) -> bool:
    """Whether the call's deadline is what ended it (cancel and deadline both close the stream); the same
    slack as the access log's status (``interceptors.final_code``), so metrics and logs agree."""
    remaining = context.time_remaining() if context is not None else None
    return remaining is not None and remaining <= DEADLINE_SLACK_S


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """``engine``, ``tokenizer`` and ``model_info`` are set once loaded (ReadinessInterceptor guards)."""

    def __init__(self):
        self.engine = None
        self.tokenizer = None
        self.model_info: inference_pb2.GetModelInfoResponse | None = None
        self.recorder: RequestMetricsRecorder | None = None
        self.live: set[str] = set()

    # ---- shared by Generate and GenerateStream ------------------------------------------------------
    async def _prepare(self, request) -> tuple[str, Prompt, SamplingParams]:
        """Id, prompt ids and (unvalidated) params: the engine validates them, once, when the call starts
        (a duplicate live id included). Tokenizing a prompt of many MiB takes seconds, so it runs off the
        event loop; the id is chosen on the loop, after it, with no await before ``_outputs`` claims it in
        ``live`` — so concurrent calls sharing an x-request-id cannot pick the same one."""
        prompt = await asyncio.to_thread(prompt_from_request, request, self.tokenizer)
        params = sampling_from_proto(request.sampling, SamplingParams, StructuredOutput)
        request_id = request.request_id or current_request_id() or new_request_id()
        if not request.request_id and request_id in self.live:  # a client reusing its x-request-id
            request_id = new_request_id()
        return request_id, prompt, params

    async def _outputs(self, request_id: str, prompt: Prompt, params, context):
        """The engine's deltas for one request (all its siblings), engine errors mapped to status codes.
        Closing this generator early aborts the request in the engine."""
        ours = request_id not in self.live  # a duplicate's id stays the live original's
        self.live.add(request_id)
        completion_tokens = 0
        num_finished = finished_tokens = 0
        rejected = False
        try:
            async with contextlib.aclosing(self.engine.generate(request_id, prompt.token_ids, params)) as stream:
                try:
                    async for out in stream:
                        completion_tokens += len(out.new_token_ids)
                        if out.finished:
                            num_finished += 1
                            finished_tokens += out.completion_tokens
                            self.recorder.finished(out, count_prompt=out.index == 0)
                            if out.finish_reason == "error":
                                log.error("engine failed request: %s", out.error)
                        yield out
                except EngineOverloadedError as exc:
                    rejected = True
                    raise ServiceError.resource_exhausted(f"engine overloaded: {exc}") from None
                except EngineClosedError:
                    rejected = True
                    raise ServiceError.unavailable("engine is shutting down") from None
                except ValueError as exc:  # InvalidRequestError: e.g. prompt longer than the context
                    rejected = True
                    raise engine_error(exc, prompt.field) from None
        finally:
            if ours:
                self.live.discard(request_id)
            if num_finished < params.num_sequences and not rejected:  # the RPC ended (cancel, deadline) first
                reason = "deadline_exceeded" if _deadline_passed(context) else "cancelled"
                log.info("request %s ended before it finished: %s", request_id, reason)
                prompt_tokens = len(prompt.token_ids) if num_finished == 0 else 0
                self.recorder.cancelled(prompt_tokens, completion_tokens - finished_tokens, reason)

    # ---- RPCs ---------------------------------------------------------------------------------------
    async def Generate(self, request, context):
        request_id, prompt, params = await self._prepare(request)
        completion = Completion(self.tokenizer, request_id, prompt.token_ids, n=params.num_sequences, keep=params.n)
        async with contextlib.aclosing(self._outputs(request_id, prompt, params, context)) as outputs:
            async for out in outputs:
                completion.add(out)
        return completion.response()

    async def GenerateStream(self, request, context):
        request_id, prompt, params = await self._prepare(request)
        if params.best_of is not None and params.best_of > params.n:
            raise ServiceError.invalid_argument(
                "sampling.best_of", "best_of > n needs Generate: which completions are best is known only at the end"
            )
        completion = Completion(self.tokenizer, request_id, prompt.token_ids, n=params.num_sequences)
        async with contextlib.aclosing(self._outputs(request_id, prompt, params, context)) as outputs:
            async for out in outputs:
                delta = completion.add(out)
                if delta is not None:
                    yield inference_pb2.GenerateStreamResponse(request_id=request_id, delta=delta)
        yield inference_pb2.GenerateStreamResponse(request_id=request_id, final=completion.final())

    async def Abort(self, request, context):
        if not request.request_id:
            raise ServiceError.invalid_argument("request_id", "must not be empty")
        aborted = await self.engine.abort(request.request_id)
        return inference_pb2.AbortResponse(aborted=aborted)

    async def GetModelInfo(self, request, context):
        return self.model_info


class InferenceService(Service):
    """Loads a causal-LM checkpoint and its tokenizer, and runs an AsyncLLMEngine over them."""

    service_name = SERVICE_NAME

    def __init__(
        self,
        model_path: str | Path,
        device: str = "cpu",
        dtype: str | None = None,
        engine_config=None,
        model_name: str | None = None,
        model=None,
        tokenizer=None,
    ):
        self.model_path = str(model_path)
        self.device = device
        self.dtype = dtype
        self.engine_config = engine_config
        self.model_name = model_name or Path(self.model_path).name
        self.servicer = InferenceServicer()
        self._preloaded = (model, tokenizer)

    def add_to_server(self, server) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(self.servicer, server)

    def register_metrics(self, registry) -> None:
        registry.register(EngineStatsCollector(lambda: self.servicer.engine, self.model_name))
        self.servicer.recorder = RequestMetricsRecorder(registry, self.model_name)

    def _load(self):
        model, tokenizer = self._preloaded
        if model is None:
            model = InternLM2ForCausalLM.from_pretrained(self.model_path, dtype=self.dtype, device=self.device)
        if tokenizer is None:
            tokenizer = InternLM2Tokenizer.from_pretrained(self.model_path)
        engine = AsyncLLMEngine(model, tokenizer, self.engine_config or EngineConfig())
        return model, tokenizer, engine

    async def load(self) -> None:
        model, tokenizer, engine = await asyncio.to_thread(self._load)
        stats = engine.stats()
        engine_config = engine.engine.config
        self.servicer.model_info = inference_pb2.GetModelInfoResponse(
            model_name=self.model_name,
            model_path=self.model_path,
            architecture=type(model).__name__,
            max_model_len=stats.max_model_len or model.config.max_position_embeddings,
            vocab_size=model.config.vocab_size,
            num_parameters=sum(p.numel() for p in model.parameters()),
            dtype=str(model.dtype).removeprefix("torch."),
            device=str(model.device),
            max_num_seqs=engine_config.max_num_seqs,
            block_size=stats.block_size,
            num_kv_blocks=stats.num_total_blocks,
            default_stop_token_ids=tokenizer.stop_token_ids,
            server_version=_version(),
        )
        self.servicer.tokenizer = tokenizer
        self.servicer.engine = engine

    async def close(self) -> None:
        engine = self.servicer.engine
        if engine is not None:
            await engine.shutdown()
