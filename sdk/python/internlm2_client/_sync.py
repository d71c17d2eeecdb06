"""Blocking clients, one per service. The asyncio twins live in `internlm2_client.aio`.

Every method takes `timeout=` (seconds, the call's deadline) and raises only
`internlm2_client.errors.InternLM2Error` subclasses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
from internlm2_client import _foreign
from internlm2_client import types as t
from internlm2_client._base import CLIENT_ARGS_DOC, health_method, make_config
from internlm2_client.errors import InternLM2Error, from_rpc_error

T = TypeVar("T")
_UNSET: Any = object()


class _Client:
    """Owns one channel to one service; context manager; `close()` releases it."""

    SERVICE: str = ""
    SERVICE_NAME: str = ""

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        channel: grpc.Channel | None = None,
        **channel_kwargs,
    ):
        self.config = make_config(self.SERVICE, address, **channel_kwargs)
        self._owns_channel = channel is None
        self.channel = channel if channel is not None else self.config.sync_channel()
        self._timeout = timeout
        self._metadata = self.config.metadata(metadata)
        self._stub = self._make_stub(self.channel)

    def _make_stub(self, channel):
        raise NotImplementedError

    def _call(self, method: Callable, request, timeout: float | None = _UNSET, metadata=()):
        try:
            return method(request, timeout=self._deadline(timeout), metadata=self._metadata + tuple(metadata))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    def _deadline(self, timeout):
        return self._timeout if timeout is _UNSET else timeout

    def health(self, service: str | None = None, *, timeout: float | None = _UNSET) -> str:
        """grpc.health.v1 status of `service` (default: this client's service):
        "SERVING", "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN"."""
        name = self.SERVICE_NAME if service is None else service
        try:
            resp = self._call(health_method(self.channel), _foreign.HealthCheckRequest(service=name), timeout)
        except InternLM2Error as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise
        return _foreign.HEALTH_STATUS_NAMES.get(resp.status, "UNKNOWN")

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """Blocks until the channel connects (not until the service is SERVING)."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError as e:
            raise InternLM2Error(
                f"{self.config.address} not reachable within {timeout}s", code=grpc.StatusCode.UNAVAILABLE
            ) from e

    def close(self) -> None:
        if self._owns_channel:
            self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ServerStream(Generic[T]):
    """Iterator over a server stream's converted messages; `cancel()` ends it early
    (the server sees CANCELLED and frees what the call held). Context manager."""

    def __init__(self, call, convert: Callable[[Any], T | None]):
        self._call = call
        self._convert = convert
        self._done = False

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        while True:
            try:
                message = next(self._call)
            except StopIteration:
                self._done = True
                raise
            except grpc.RpcError as e:
                self._done = True
                raise from_rpc_error(e) from e
            item = self._convert(message)
            if item is not None:
                return item

    def cancel(self) -> None:
        """Cancels the call; a later `next()` raises CancelledError."""
        if not self._done:
            self._call.cancel()

    close = cancel

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()


class GenerationStream(ServerStream[t.GenerateDelta]):
    """Yields GenerateDelta objects; after the last one `result()` returns the whole
    GenerateResult (finish reason, usage, tool calls). `request_id` is known once the
    first message arrived (or given by the caller)."""

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

    def result(self) -> t.GenerateResult:
        """Drains the stream (if not yet done) and returns the folded result."""
        for _ in self:
            pass
        if self.final is None:
            raise InternLM2Error("the stream ended without a final message", code=grpc.StatusCode.INTERNAL)
        return cv.result_from_stream(self.request_id, self.deltas, self.final)


class TokenizerClient(_Client):
    __doc__ = "Client of internlm2.v1.TokenizerService (default port 50051)." + CLIENT_ARGS_DOC
    SERVICE = "tokenizer"
    SERVICE_NAME = "internlm2.v1.TokenizerService"

    def _make_stub(self, channel):
        return tokenizer_pb2_grpc.TokenizerServiceStub(channel)

    def tokenize(
        self,
        texts: str | Sequence[str],
        *,
        add_bos: bool | None = None,
        return_pieces: bool = False,
        timeout: float | None = _UNSET,
    ) -> list[t.TokenizedText]:
        """Encodes each text; a single string is treated as a batch of one."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        resp = self._call(self._stub.Tokenize, cv.tokenize_request(batch, add_bos, return_pieces), timeout)
        return cv.tokenized_from_pb(resp)

    def detokenize(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        skip_special_tokens: bool | None = None,
        timeout: float | None = _UNSET,
    ) -> list[str]:
        """Decodes each id sequence."""
        resp = self._call(self._stub.Detokenize, cv.detokenize_request(sequences, skip_special_tokens), timeout)
        return list(resp.texts)

    def apply_chat_template(
        self,
        messages: Iterable,
        *,
        tools: Iterable = (),
        add_generation_prompt: bool | None = None,
        timeout: float | None = _UNSET,
    ) -> t.ChatTemplateResult:
        """Renders messages (dicts or ChatMessage) and tools with the chat template."""
        req = cv.chat_template_request(messages, tools, add_generation_prompt)
        resp = self._call(self._stub.ApplyChatTemplate, req, timeout)
        return t.ChatTemplateResult(resp.text, tuple(resp.token_ids))

    def count_tokens(
        self,
        texts: Sequence[str] = (),
        *,
        conversations: Sequence = (),
        add_bos: bool | None = None,
        add_generation_prompt: bool | None = None,
        timeout: float | None = _UNSET,
    ) -> t.TokenCounts:
        """Counts tokens of texts and of conversations (after the chat template)."""
        req = cv.count_tokens_request(texts, conversations, add_bos, add_generation_prompt)
        return cv.token_counts_from_pb(self._call(self._stub.CountTokens, req, timeout))

    def info(self, *, timeout: float | None = _UNSET) -> t.TokenizerInfo:
        """Vocabulary size, special tokens and chat template."""
        resp = self._call(self._stub.GetTokenizerInfo, tokenizer_pb2.GetTokenizerInfoRequest(), timeout)
        return cv.tokenizer_info_from_pb(resp)


class InferenceClient(_Client):
    __doc__ = "Client of internlm2.v1.InferenceService (default port 50052)." + CLIENT_ARGS_DOC
    SERVICE = "inference"
    SERVICE_NAME = "internlm2.v1.InferenceService"

    def _make_stub(self, channel):
        return inference_pb2_grpc.InferenceServiceStub(channel)

    def generate(
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
        """Generates a completion of a prompt, chat `messages` (+ `tools`) or `token_ids`.

        Sampling: a SamplingParams and/or its fields as keywords (`max_new_tokens=32`).
        """
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
        return cv.generate_result_from_pb(self._call(self._stub.Generate, req, timeout))

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
        """Like generate, streaming: iterate the deltas, then `stream.result()`;
        `stream.cancel()` (or leaving a `with` block) aborts the generation."""
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

    def abort(self, request_id: str, *, timeout: float | None = _UNSET) -> bool:
        """Aborts a running generation by id; True if one was running."""
        resp = self._call(self._stub.Abort, inference_pb2.AbortRequest(request_id=request_id), timeout)
        return resp.aborted

    def model_info(self, *, timeout: float | None = _UNSET) -> t.ModelInfo:
        """The served model and engine limits."""
        resp = self._call(self._stub.GetModelInfo, inference_pb2.GetModelInfoRequest(), timeout)
        return cv.model_info_from_pb(resp)


class RewardClient(_Client):
    __doc__ = "Client of internlm2.v1.RewardService (default port 50053)." + CLIENT_ARGS_DOC
    SERVICE = "reward"
    SERVICE_NAME = "internlm2.v1.RewardService"

    def _make_stub(self, channel):
        return reward_pb2_grpc.RewardServiceStub(channel)

    def score(
        self,
        conversations: Sequence[Sequence],
        *,
        condition: str | None = None,
        timeout: float | None = _UNSET,
    ) -> list[float]:
        """One score per conversation (a list of messages); higher is better."""
        resp = self._call(self._stub.Score, cv.score_request(conversations, condition), timeout)
        return list(resp.scores)

    def compare(
        self,
        prompt: Sequence,
        response_a: str,
        response_b: str,
        *,
        condition: str | None = None,
        timeout: float | None = _UNSET,
    ) -> t.Comparison:
        """Which of two responses to `prompt` (messages) is better, and the margin."""
        req = cv.compare_request(prompt, response_a, response_b, condition)
        return cv.comparison_from_pb(self._call(self._stub.Compare, req, timeout))

    def rank(
        self,
        prompt: Sequence,
        responses: Sequence[str],
        *,
        condition: str | None = None,
        timeout: float | None = _UNSET,
    ) -> t.Ranking:
        """Orders candidate responses to `prompt`, best first."""
        req = cv.rank_request(prompt, responses, condition)
        return cv.ranking_from_pb(self._call(self._stub.Rank, req, timeout))


class TrainingClient(_Client):
    __doc__ = "Client of internlm2.v1.TrainingService (default port 50054)." + CLIENT_ARGS_DOC
    SERVICE = "training"
    SERVICE_NAME = "internlm2.v1.TrainingService"

    def _make_stub(self, channel):
        return training_pb2_grpc.TrainingServiceStub(channel)

    def list_stages(self, *, timeout: float | None = _UNSET) -> list[t.StageInfo]:
        """Installed stages with their config JSON Schemas."""
        resp = self._call(self._stub.ListStages, training_pb2.ListStagesRequest(), timeout)
        return [cv.stage_info_from_pb(s) for s in resp.stages]

    def submit_job(
        self,
        stages: Sequence[t.StageSpec | Mapping | str],
        *,
        idempotency_key: str = "",
        name: str = "",
        labels: Mapping[str, str] | None = None,
        timeout: float | None = _UNSET,
    ) -> t.Submission:
        """Submits a pipeline of stages; with an idempotency key a resubmit returns the
        first job (`created=False`)."""
        req = cv.submit_job_request(stages, idempotency_key, name, labels)
        resp = self._call(self._stub.SubmitJob, req, timeout)
        return t.Submission(job=cv.job_from_pb(resp.job), created=resp.created)

    def get_job(self, job_id: str, *, timeout: float | None = _UNSET) -> t.Job:
        """One job (NotFoundError if unknown)."""
        resp = self._call(self._stub.GetJob, training_pb2.GetJobRequest(job_id=job_id), timeout)
        return cv.job_from_pb(resp.job)

    def list_jobs(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        states: Sequence[t.JobState | str] = (),
        labels: Mapping[str, str] | None = None,
        timeout: float | None = _UNSET,
    ) -> t.JobPage:
        """One page of jobs, newest first; pass `next_page_token` back for the next page."""
        req = cv.list_jobs_request(page_size, page_token, states, labels)
        resp = self._call(self._stub.ListJobs, req, timeout)
        return t.JobPage(jobs=tuple(cv.job_from_pb(j) for j in resp.jobs), next_page_token=resp.next_page_token)

    def iter_jobs(
        self,
        *,
        states: Sequence[t.JobState | str] = (),
        labels: Mapping[str, str] | None = None,
        page_size: int = 0,
        timeout: float | None = _UNSET,
    ) -> Iterator[t.Job]:
        """All jobs matching the filter, fetching pages as needed."""
        token = ""
        while True:
            page = self.list_jobs(page_size=page_size, page_token=token, states=states, labels=labels, timeout=timeout)
            yield from page.jobs
            token = page.next_page_token
            if not token:
                return

    def cancel_job(self, job_id: str, *, reason: str = "", timeout: float | None = _UNSET) -> t.Job:
        """Asks a job to stop (FailedPreconditionError if it already ended)."""
        req = training_pb2.CancelJobRequest(job_id=job_id, reason=reason)
        return cv.job_from_pb(self._call(self._stub.CancelJob, req, timeout).job)

    def watch_job(
        self, job_id: str, *, after_sequence: int = 0, timeout: float | None = _UNSET
    ) -> ServerStream[t.JobEvent]:
        """Streams the job's events until it ends; resume with `after_sequence`."""
        req = training_pb2.WatchJobRequest(job_id=job_id, after_sequence=after_sequence)
        call = self._stub.WatchJob(req, timeout=self._deadline(timeout), metadata=self._metadata)
        return ServerStream(call, cv.job_event_from_pb)


class _HealthOnly(_Client):
    SERVICE = "tokenizer"  # only supplies a default address; callers always pass one

    def _make_stub(self, channel):
        return None


def check_health(address: str, service: str = "", *, timeout: float = 5.0, **channel_kwargs) -> str:
    """grpc.health.v1 status of `service` at `address` ("" = the whole server)."""
    with _HealthOnly(address, **channel_kwargs) as client:
        return client.health(service, timeout=timeout)
