"""asyncio clients: the same API as the blocking ones, with `await` and `async for`.

async with aio.InferenceClient("127.0.0.1:50052") as client:
    async with client.generate_stream("Hello", max_new_tokens=32) as stream:
        async for delta in stream:
            print(delta.text, end="")
    result = await stream.result()
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import grpc

from internlm2.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    reward_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from internlm2_client import _convert as cv
from internlm2_client import _foreign, errors
from internlm2_client import types as t
from internlm2_client._base import CLIENT_ARGS_DOC, health_method, make_config
from internlm2_client.errors import InternLM2Error, from_rpc_error

__all__ = [
    "GenerationStream",
    "InferenceClient",
    "RewardClient",
    "ServerStream",
    "TokenizerClient",
    "TrainingClient",
    "check_health",
]

T = TypeVar("T")
_UNSET: Any = object()


class _Client:
    """Owns one grpc.aio channel; `async with` or `await close()`."""

    SERVICE: str = ""
    SERVICE_NAME: str = ""

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        channel: grpc.aio.Channel | None = None,
        **channel_kwargs,
    ):
        self.config = make_config(self.SERVICE, address, **channel_kwargs)
        self._owns_channel = channel is None
        self.channel = channel if channel is not None else self.config.aio_channel()
        self._timeout = timeout
        self._metadata = self.config.metadata(metadata)
        self._stub = self._make_stub(self.channel)

    def _make_stub(self, channel):
        raise NotImplementedError

    def _deadline(self, timeout):
        return self._timeout if timeout is _UNSET else timeout

    async def _call(self, method: Callable, request, timeout: float | None = _UNSET):
        try:
            return await method(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    async def health(self, service: str | None = None, *, timeout: float | None = _UNSET) -> str:
        """grpc.health.v1 status: "SERVING", "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN"."""
        name = self.SERVICE_NAME if service is None else service
        try:
            resp = await self._call(health_method(self.channel), _foreign.HealthCheckRequest(service=name), timeout)
        except InternLM2Error as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise
        return _foreign.HEALTH_STATUS_NAMES.get(resp.status, "UNKNOWN")

    async def wait_until_ready(self, timeout: float | None = None) -> None:
        """Waits until the channel connects (not until the service is SERVING)."""
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout)
        except TimeoutError as e:
            raise InternLM2Error(
                f"{self.config.address} not reachable within {timeout}s", code=grpc.StatusCode.UNAVAILABLE
            ) from e

    async def close(self) -> None:
        if self._owns_channel:
            await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class ServerStream(Generic[T]):
    """Async iterator over a server stream's converted messages; `cancel()` ends it."""

    def __init__(self, call, convert: Callable[[Any], T | None]):
        self._call = call
        self._convert = convert
        self._iter = call.__aiter__()
        self._done = False

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        while True:
            try:
                message = await self._iter.__anext__()
            except StopAsyncIteration:
                self._done = True
                raise
            except grpc.RpcError as e:
                self._done = True
                raise from_rpc_error(e) from e
            except asyncio.CancelledError:
                # The call was cancelled locally (grpc.aio raises asyncio's error then).
                if self._call.cancelled():
                    self._done = True
                    raise errors.CancelledError("the call was cancelled") from None
                raise
            item = self._convert(message)
            if item is not None:
                return item

    def cancel(self) -> None:
        """Cancels the call; a later iteration raises CancelledError (ours)."""
        if not self._done:
            self._call.cancel()

    close = cancel

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        self.cancel()


class GenerationStream(ServerStream[t.GenerateDelta]):
    """Yields GenerateDelta; `await result()` gives the whole GenerateResult."""

    def __init__(self, call, request_id: str = ""):
        super().__init__(call, self._on_message)
        self.request_id = request_id
        self.deltas: list[t.GenerateDelta] = []
        self.final: inference_pb2.GenerateFinal | None = None

    def _on_message(self, msg: inference_pb2.GenerateStreamResponse) -> t.GenerateDelta | None:
        self.request_id = msg.request_id or self.request_id
        if msg.HasField("final"):
            self.final = msg.final
            return None
        delta = cv.delta_from_pb(msg.delta)
        self.deltas.append(delta)
        return delta

    async def result(self) -> t.GenerateResult:
        """Drains the stream (if not yet done) and returns the folded result."""
        async for _ in self:
            pass
        if self.final is None:
            raise InternLM2Error("the stream ended without a final message", code=grpc.StatusCode.INTERNAL)
        return cv.result_from_stream(self.request_id, self.deltas, self.final)


class TokenizerClient(_Client):
    __doc__ = "asyncio client of internlm2.v1.TokenizerService (default port 50051)." + CLIENT_ARGS_DOC
    SERVICE = "tokenizer"
    SERVICE_NAME = "internlm2.v1.TokenizerService"

    def _make_stub(self, channel):
        return tokenizer_pb2_grpc.TokenizerServiceStub(channel)

    async def tokenize(
        self,
        texts: str | Sequence[str],
        *,
        add_bos: bool | None = None,
        return_pieces: bool = False,
        timeout: float | None = _UNSET,
    ) -> list[t.TokenizedText]:
        batch = [texts] if isinstance(texts, str) else list(texts)
        resp = await self._call(self._stub.Tokenize, cv.tokenize_request(batch, add_bos, return_pieces), timeout)
        return cv.tokenized_from_pb(resp)

    async def detokenize(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        skip_special_tokens: bool | None = None,
        timeout: float | None = _UNSET,
    ) -> list[str]:
        req = cv.detokenize_request(sequences, skip_special_tokens)
        return list((await self._call(self._stub.Detokenize, req, timeout)).texts)

    async def apply_chat_template(
        self,
        messages: Iterable,
        *,
        tools: Iterable = (),
        add_generation_prompt: bool | None = None,
        timeout: float | None = _UNSET,
    ) -> t.ChatTemplateResult:
        req = cv.chat_template_request(messages, tools, add_generation_prompt)
        resp = await self._call(self._stub.ApplyChatTemplate, req, timeout)
        return t.ChatTemplateResult(resp.text, tuple(resp.token_ids))

    async def count_tokens(
        self,
        texts: Sequence[str] = (),
        *,
        conversations: Sequence = (),
        add_bos: bool | None = None,
        add_generation_prompt: bool | None = None,
        timeout: float | None = _UNSET,
    ) -> t.TokenCounts:
        req = cv.count_tokens_request(texts, conversations, add_bos, add_generation_prompt)
        return cv.token_counts_from_pb(await self._call(self._stub.CountTokens, req, timeout))

    async def info(self, *, timeout: float | None = _UNSET) -> t.TokenizerInfo:
        resp = await self._call(self._stub.GetTokenizerInfo, tokenizer_pb2.GetTokenizerInfoRequest(), timeout)
        return cv.tokenizer_info_from_pb(resp)


class InferenceClient(_Client):
    __doc__ = "asyncio client of internlm2.v1.InferenceService (default port 50052)." + CLIENT_ARGS_DOC
    SERVICE = "inference"
    SERVICE_NAME = "internlm2.v1.InferenceService"

    def _make_stub(self, channel):
        return inference_pb2_grpc.InferenceServiceStub(channel)

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable | None = None,
        token_ids: Sequence[int] | None = None,
        tools: Iterable = (),
        add_generation_prompt: bool | None = None,
        sampling: t.SamplingParams | None = None,
        request_id: str = "",
        timeout: float | None = _UNSET,
        **sampling_kwargs,
    ) -> t.GenerateResult:
        req = cv.generate_request(
            inference_pb2.GenerateRequest,
            prompt=prompt,
            messages=messages,
            token_ids=token_ids,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            request_id=request_id,
            sampling=sampling,
            **sampling_kwargs,
        )
        return cv.generate_result_from_pb(await self._call(self._stub.Generate, req, timeout))

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable | None = None,
        token_ids: Sequence[int] | None = None,
        tools: Iterable = (),
        add_generation_prompt: bool | None = None,
        sampling: t.SamplingParams | None = None,
        request_id: str = "",
        timeout: float | None = _UNSET,
        **sampling_kwargs,
    ) -> GenerationStream:
        """Starts a stream (no await needed): `async for delta in stream`."""
        req = cv.generate_request(
            inference_pb2.GenerateStreamRequest,
            prompt=prompt,
            messages=messages,
            token_ids=token_ids,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            request_id=request_id,
            sampling=sampling,
            **sampling_kwargs,
        )
        call = self._stub.GenerateStream(req, timeout=self._deadline(timeout), metadata=self._metadata)
        return GenerationStream(call, request_id)

    async def abort(self, request_id: str, *, timeout: float | None = _UNSET) -> bool:
        resp = await self._call(self._stub.Abort, inference_pb2.AbortRequest(request_id=request_id), timeout)
        return resp.aborted

    async def model_info(self, *, timeout: float | None = _UNSET) -> t.ModelInfo:
        resp = await self._call(self._stub.GetModelInfo, inference_pb2.GetModelInfoRequest(), timeout)
        return cv.model_info_from_pb(resp)


class RewardClient(_Client):
    __doc__ = "asyncio client of internlm2.v1.RewardService (default port 50053)." + CLIENT_ARGS_DOC
    SERVICE = "reward"
    SERVICE_NAME = "internlm2.v1.RewardService"

    def _make_stub(self, channel):
        return reward_pb2_grpc.RewardServiceStub(channel)

    async def score(
        self,
        conversations: Sequence[Sequence],
        *,
        condition: str | None = None,
        timeout: float | None = _UNSET,
    ) -> list[float]:
        return list((await self._call(self._stub.Score, cv.score_request(conversations, condition), timeout)).scores)

    async def compare(
        self,
        prompt: Sequence,
        response_a: str,
        response_b: str,
        *,
        condition: str | None = None,
        timeout: float | None = _UNSET,
    ) -> t.Comparison:
        req = cv.compare_request(prompt, response_a, response_b, condition)
        return cv.comparison_from_pb(await self._call(self._stub.Compare, req, timeout))

    async def rank(
        self,
        prompt: Sequence,
        responses: Sequence[str],
        *,
        condition: str | None = None,
        timeout: float | None = _UNSET,
    ) -> t.Ranking:
        req = cv.rank_request(prompt, responses, condition)
        return cv.ranking_from_pb(await self._call(self._stub.Rank, req, timeout))


class TrainingClient(_Client):
    __doc__ = "asyncio client of internlm2.v1.TrainingService (default port 50054)." + CLIENT_ARGS_DOC
    SERVICE = "training"
    SERVICE_NAME = "internlm2.v1.TrainingService"

    def _make_stub(self, channel):
        return training_pb2_grpc.TrainingServiceStub(channel)

    async def list_stages(self, *, timeout: float | None = _UNSET) -> list[t.StageInfo]:
        resp = await self._call(self._stub.ListStages, training_pb2.ListStagesRequest(), timeout)
        return [cv.stage_info_from_pb(s) for s in resp.stages]

    async def submit_job(
        self,
        stages: Sequence[t.StageSpec | Mapping | str],
        *,
        idempotency_key: str = "",
        name: str = "",
        labels: Mapping[str, str] | None = None,
        timeout: float | None = _UNSET,
    ) -> t.Submission:
        req = cv.submit_job_request(stages, idempotency_key, name, labels)
        resp = await self._call(self._stub.SubmitJob, req, timeout)
        return t.Submission(job=cv.job_from_pb(resp.job), created=resp.created)

    async def get_job(self, job_id: str, *, timeout: float | None = _UNSET) -> t.Job:
        resp = await self._call(self._stub.GetJob, training_pb2.GetJobRequest(job_id=job_id), timeout)
        return cv.job_from_pb(resp.job)

    async def list_jobs(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        states: Sequence[t.JobState | str] = (),
        labels: Mapping[str, str] | None = None,
        timeout: float | None = _UNSET,
    ) -> t.JobPage:
        req = cv.list_jobs_request(page_size, page_token, states, labels)
        resp = await self._call(self._stub.ListJobs, req, timeout)
        return t.JobPage(jobs=tuple(cv.job_from_pb(j) for j in resp.jobs), next_page_token=resp.next_page_token)

    async def cancel_job(self, job_id: str, *, reason: str = "", timeout: float | None = _UNSET) -> t.Job:
        req = training_pb2.CancelJobRequest(job_id=job_id, reason=reason)
        return cv.job_from_pb((await self._call(self._stub.CancelJob, req, timeout)).job)

    def watch_job(
        self, job_id: str, *, after_sequence: int = 0, timeout: float | None = _UNSET
    ) -> ServerStream[t.JobEvent]:
        req = training_pb2.WatchJobRequest(job_id=job_id, after_sequence=after_sequence)
        call = self._stub.WatchJob(req, timeout=self._deadline(timeout), metadata=self._metadata)
        return ServerStream(call, cv.job_event_from_pb)


class _HealthOnly(_Client):
    SERVICE = "tokenizer"  # only supplies a default address; callers always pass one

    def _make_stub(self, channel):
        return None


async def check_health(address: str, service: str = "", *, timeout: float = 5.0, **channel_kwargs) -> str:
    """grpc.health.v1 status of `service` at `address` ("" = the whole server)."""
    async with _HealthOnly(address, **channel_kwargs) as client:
        return await client.health(service, timeout=timeout)
