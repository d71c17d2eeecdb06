"""The client methods of the four services, each declared once for the sync and asyncio clients.

A declaration is a request builder (the body: user arguments -> request message) under a decorator
naming the RPC and the response conversion (see `internlm2_client._base` for how the transports
turn them into methods, and for how to add one). Builders take no ``self`` and no ``timeout``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

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
from internlm2_client import types as t
from internlm2_client._base import paged, server_stream, unary


class TokenizerAPI:
    SERVICE = "tokenizer"
    SERVICE_NAME = "internlm2.v1.TokenizerService"
    STUB = tokenizer_pb2_grpc.TokenizerServiceStub

    @unary("Tokenize", returns=cv.tokenized_from_pb)
    def tokenize(
        texts: str | Sequence[str], *, add_bos: bool | None = None, return_pieces: bool = False
    ) -> list[t.TokenizedText]:
        """Encodes each text; a single string is treated as a batch of one."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        return cv.tokenize_request(batch, add_bos, return_pieces)

    @unary("Detokenize", returns=lambda resp: list(resp.texts))
    def detokenize(sequences: Sequence[Sequence[int]], *, skip_special_tokens: bool | None = None) -> list[str]:
        """Decodes each id sequence."""
        return cv.detokenize_request(sequences, skip_special_tokens)

    @unary("ApplyChatTemplate", returns=lambda resp: t.ChatTemplateResult(resp.text, tuple(resp.token_ids)))
    def apply_chat_template(
        messages: Iterable, *, tools: Iterable = (), add_generation_prompt: bool | None = None
    ) -> t.ChatTemplateResult:
        """Renders messages (dicts or ChatMessage) and tools with the chat template."""
        return cv.chat_template_request(messages, tools, add_generation_prompt)

    @unary("CountTokens", returns=cv.token_counts_from_pb)
    def count_tokens(
        texts: Sequence[str] = (),
        *,
        conversations: Sequence = (),
        add_bos: bool | None = None,
        add_generation_prompt: bool | None = None,
    ) -> t.TokenCounts:
        """Counts tokens of texts and of conversations (after the chat template)."""
        return cv.count_tokens_request(texts, conversations, add_bos, add_generation_prompt)

    @unary("GetTokenizerInfo", returns=cv.tokenizer_info_from_pb)
    def info() -> t.TokenizerInfo:
        """Vocabulary size, special tokens and chat template."""
        return tokenizer_pb2.GetTokenizerInfoRequest()


def _generation(request_cls):
    """The builder of Generate and GenerateStream: one prompt / chat / token-id input plus sampling."""

    def build(
        prompt: str | None = None,
        *,
        messages: Iterable | None = None,
        token_ids: Sequence[int] | None = None,
        tools: Iterable = (),
        add_generation_prompt: bool | None = None,
        sampling: t.SamplingParams | None = None,
        request_id: str = "",
        **sampling_kwargs,
    ):
        return cv.generate_request(
            request_cls,
            prompt=prompt,
            messages=messages,
            token_ids=token_ids,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            request_id=request_id,
            sampling=sampling,
            **sampling_kwargs,
        )

    return build


def _named(build, name: str, doc: str, returns: str):
    build.__name__, build.__qualname__, build.__doc__ = name, name, doc
    build.__annotations__ = {**build.__annotations__, "return": returns}
    return build


class InferenceAPI:
    SERVICE = "inference"
    SERVICE_NAME = "internlm2.v1.InferenceService"
    STUB = inference_pb2_grpc.InferenceServiceStub

    generate = unary("Generate", returns=cv.generate_result_from_pb)(
        _named(
            _generation(inference_pb2.GenerateRequest),
            "generate",
            "Generates a completion of a prompt, chat `messages` (+ `tools`) or `token_ids`.\n\n"
            "Sampling: a SamplingParams and/or its fields as keywords (`max_new_tokens=32`).",
            "t.GenerateResult",
        )
    )
    generate_stream = server_stream("GenerateStream", stream="generation")(
        _named(
            _generation(inference_pb2.GenerateStreamRequest),
            "generate_stream",
            "Like generate, streaming (started without await): iterate the deltas, then `stream.result()`\n"
            "(awaited in asyncio); `stream.cancel()` (or leaving a `with` block) aborts the generation.",
            "GenerationStream",
        )
    )

    @unary("Abort", returns=lambda resp: resp.aborted)
    def abort(request_id: str) -> bool:
        """Aborts a running generation by id; True if one was running."""
        return inference_pb2.AbortRequest(request_id=request_id)

    @unary("GetModelInfo", returns=cv.model_info_from_pb)
    def model_info() -> t.ModelInfo:
        """The served model and engine limits."""
        return inference_pb2.GetModelInfoRequest()


class RewardAPI:
    SERVICE = "reward"
    SERVICE_NAME = "internlm2.v1.RewardService"
    STUB = reward_pb2_grpc.RewardServiceStub

    @unary("Score", returns=lambda resp: list(resp.scores))
    def score(conversations: Sequence[Sequence], *, condition: str | None = None) -> list[float]:
        """One score per conversation (a list of messages); higher is better."""
        return cv.score_request(conversations, condition)

    @unary("Compare", returns=cv.comparison_from_pb)
    def compare(prompt: Sequence, response_a: str, response_b: str, *, condition: str | None = None) -> t.Comparison:
        """Which of two responses to `prompt` (messages) is better, and the margin."""
        return cv.compare_request(prompt, response_a, response_b, condition)

    @unary("Rank", returns=cv.ranking_from_pb)
    def rank(prompt: Sequence, responses: Sequence[str], *, condition: str | None = None) -> t.Ranking:
        """Orders candidate responses to `prompt`, best first."""
        return cv.rank_request(prompt, responses, condition)


class TrainingAPI:
    SERVICE = "training"
    SERVICE_NAME = "internlm2.v1.TrainingService"
    STUB = training_pb2_grpc.TrainingServiceStub

    @unary("ListStages", returns=lambda resp: [cv.stage_info_from_pb(s) for s in resp.stages])
    def list_stages() -> list[t.StageInfo]:
        """Installed stages with their config JSON Schemas."""
        return training_pb2.ListStagesRequest()

    @unary("SubmitJob", returns=lambda resp: t.Submission(job=cv.job_from_pb(resp.job), created=resp.created))
    def submit_job(
        stages: Sequence[t.StageSpec | Mapping | str],
        *,
        idempotency_key: str = "",
        name: str = "",
        labels: Mapping[str, str] | None = None,
        inputs: Mapping[str, Mapping[str, str]] | None = None,
    ) -> t.Submission:
        """Submits a pipeline of stages; with an idempotency key a resubmit returns the
        first job (`created=False`). `inputs`: named paths stages refer to as "input:NAME",
        `{"checkpoints": {"base": "/models/x"}, "datasets": {"chat": "/data/c.jsonl"}}`."""
        return cv.submit_job_request(stages, idempotency_key, name, labels, inputs)

    @unary("GetJob", returns=lambda resp: cv.job_from_pb(resp.job))
    def get_job(job_id: str) -> t.Job:
        """One job (NotFoundError if unknown)."""
        return training_pb2.GetJobRequest(job_id=job_id)

    @unary(
        "ListJobs",
        returns=lambda resp: t.JobPage(
            jobs=tuple(cv.job_from_pb(j) for j in resp.jobs), next_page_token=resp.next_page_token
        ),
    )
    def list_jobs(
        *,
        page_size: int = 0,
        page_token: str = "",
        states: Sequence[t.JobState | str] = (),
        labels: Mapping[str, str] | None = None,
    ) -> t.JobPage:
        """One page of jobs, newest first; pass `next_page_token` back for the next page."""
        return cv.list_jobs_request(page_size, page_token, states, labels)

    iter_jobs = paged(
        list_jobs, items=lambda page: page.jobs, doc="All jobs matching the filter, fetching pages as needed."
    )

    @unary("CancelJob", returns=lambda resp: cv.job_from_pb(resp.job))
    def cancel_job(job_id: str, *, reason: str = "") -> t.Job:
        """Asks a job to stop (FailedPreconditionError if it already ended)."""
        return training_pb2.CancelJobRequest(job_id=job_id, reason=reason)

    @unary("RetryJob", returns=lambda resp: cv.job_from_pb(resp.job))
    def retry_job(job_id: str) -> t.Job:
        """Queues a FAILED or CANCELLED job again, resuming from its last committed checkpoint
        (FailedPreconditionError for a job in any other state)."""
        return training_pb2.RetryJobRequest(job_id=job_id)

    @unary("PlanJob", returns=cv.memory_plan_from_pb)
    def plan_job(
        stages: Sequence[t.StageSpec | Mapping | str], *, num_gpus: int, gpu_memory_gib: float, model: str = ""
    ) -> t.MemoryPlan:
        """Per-stage, per-GPU memory of a pipeline on `num_gpus` GPUs of `gpu_memory_gib` GiB, and whether it
        fits; `model` (a preset such as "7b") gives the shapes when a stage's config names no checkpoint."""
        return cv.plan_job_request(stages, num_gpus, gpu_memory_gib, model)

    @server_stream("WatchJob", each=cv.job_event_from_pb)
    def watch_job(job_id: str, *, after_sequence: int = 0) -> ServerStream[t.JobEvent]:  # noqa: F821
        """Streams the job's events until it ends; resume with `after_sequence`."""
        return training_pb2.WatchJobRequest(job_id=job_id, after_sequence=after_sequence)
