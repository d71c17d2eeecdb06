"""Scripted in-process servicers of the four internlm2.v1 services, for the SDK/CLI tests.

They run in a REAL grpc.aio server on loopback (in a background thread with its own event
loop), so the SDK is tested over real HTTP/2 with real status codes, trailers, deadlines,
cancellation and retries. They implement protocol behaviour only (no model): the real
services are tested end to end by the services area.

Scripted prompts of the inference fake:
- "status:CODE"  -> abort with grpc.StatusCode[CODE] and rich google.rpc details
- "sleep"        -> sleep 30 s (deadline / cancellation tests)
- "slow"         -> (stream) a delta every 20 ms until cancelled or aborted
- "tool"         -> a response carrying a parsed tool call
- anything else  -> echo: one delta per word of "echo: <prompt>", then the final message
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from internlm2.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)

SERVICE_NAMES = (
    "internlm2.v1.TokenizerService",
    "internlm2.v1.InferenceService",
    "internlm2.v1.RewardService",
    "internlm2.v1.TrainingService",
)


async def abort_rich(context, code: grpc.StatusCode, message: str, *, field: str = "", request_id: str = "x"):
    """Aborts like the platform servers: google.rpc.Status details + x-request-id trailer."""
    details = []
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        br = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field or "sampling.top_p", description=message)
            ]
        )
        details.append(br)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        details.append(error_details_pb2.RetryInfo(retry_delay={"seconds": 1, "nanos": 500_000_000}))
    details.append(error_details_pb2.ErrorInfo(reason=code.name, domain="internlm2.test"))
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    status = status_pb2.Status(code=code.value[0], message=message, details=packed)
    await context.abort(
        code,
        message,
        trailing_metadata=(
            ("grpc-status-details-bin", status.SerializeToString()),
            ("x-request-id", request_id),
        ),
    )


class FakeTokenizer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    """Byte-level 'tokenizer': id = ord(char), BOS = 1."""

    async def Tokenize(self, request, context):
        if not request.texts:
            await abort_rich(context, grpc.StatusCode.INVALID_ARGUMENT, "no texts", field="texts")
        bos = [1] if (not request.HasField("add_bos") or request.add_bos) else []
        return tokenizer_pb2.TokenizeResponse(
            results=[
                tokenizer_pb2.TokenizedText(
                    token_ids=bos + [ord(c) for c in t], pieces=list(t) if request.return_pieces else []
                )
                for t in request.texts
            ]
        )

    async def Detokenize(self, request, context):
        skip = not request.HasField("skip_special_tokens") or request.skip_special_tokens
        return tokenizer_pb2.DetokenizeResponse(
            texts=[
                "".join("<s>" if i == 1 and not skip else chr(i) for i in s.ids if i != 1 or not skip)
                for s in request.sequences
            ]
        )

    async def ApplyChatTemplate(self, request, context):
        text = "<s>" + "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in request.messages)
        if not request.HasField("add_generation_prompt") or request.add_generation_prompt:
            text += "<|im_start|>assistant\n"
        return tokenizer_pb2.ApplyChatTemplateResponse(text=text, token_ids=[ord(c) for c in text])

    async def CountTokens(self, request, context):
        texts = [len(t) + 1 for t in request.texts]
        convs = [sum(len(m.content) for m in c.messages) for c in request.conversations]
        return tokenizer_pb2.CountTokensResponse(
            text_counts=texts, conversation_counts=convs, total=sum(texts) + sum(convs)
        )

    async def GetTokenizerInfo(self, request, context):
        return tokenizer_pb2.GetTokenizerInfoResponse(
            vocab_size=92544,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
            unk_token_id=0,
            special_tokens=[tokenizer_pb2.SpecialToken(content="<|im_end|>", id=92542)],
            default_stop_token_ids=[2, 92542],
            add_bos_token=True,
            source="fake",
        )


class FakeInference(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self):
        self.requests: list = []
        self.calls: Counter = Counter()
        self.unavailable_before_success = 0  # GetModelInfo fails this many times first
        self.cancelled = threading.Event()  # set when a handler saw its RPC cancelled
        self.live: dict[str, asyncio.Event] = {}

    def _prompt(self, request) -> str:
        which = request.WhichOneof("input")
        if which == "prompt":
            return request.prompt
        if which == "chat":
            return request.chat.messages[-1].content if request.chat.messages else ""
        return " ".join(map(str, request.token_ids.ids))

    async def _script(self, request, context) -> str:
        prompt = self._prompt(request)
        if prompt.startswith("status:"):
            await abort_rich(
                context,
                grpc.StatusCode[prompt.split(":", 1)[1]],
                f"scripted {prompt}",
                request_id=request.request_id or "srv-1",
            )
        if prompt == "sleep":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return prompt

    async def Generate(self, request, context):
        self.requests.append(request)
        self.calls["Generate"] += 1
        prompt = await self._script(request, context)
        text = f"echo: {prompt}"
        calls = []
        if prompt == "tool":
            calls = [
                common_pb2.ToolCall(
                    kind=common_pb2.TOOL_KIND_PLUGIN,
                    name="search",
                    arguments_json='{"q": "x"}',
                    raw='{"name": "search"}',
                    id="call_0",
                )
            ]
        return inference_pb2.GenerateResponse(
            request_id=request.request_id or "srv-1",
            text=text,
            token_ids=[ord(c) for c in text],
            finish_reason=inference_pb2.FINISH_REASON_EOS,
            usage=common_pb2.Usage(
                prompt_tokens=len(prompt), completion_tokens=len(text), total_tokens=len(prompt) + len(text)
            ),
            tool_calls=calls,
            raw_text=text + "<|im_end|>",
            content=text,
            metrics=inference_pb2.RequestMetrics(time_to_first_token_s=0.01, e2e_latency_s=0.02),
        )

    async def GenerateStream(self, request, context):
        self.requests.append(request)
        self.calls["GenerateStream"] += 1
        rid = request.request_id or "srv-stream"
        prompt = await self._script(request, context)
        if prompt == "slow":
            aborted = self.live[rid] = asyncio.Event()
            try:
                n = 0
                while not aborted.is_set():
                    n += 1
                    yield inference_pb2.GenerateStreamResponse(
                        request_id=rid, delta=inference_pb2.GenerateDelta(text=".", token_ids=[46])
                    )
                    await asyncio.sleep(0.02)
                yield inference_pb2.GenerateStreamResponse(
                    request_id=rid,
                    final=inference_pb2.GenerateFinal(
                        finish_reason=inference_pb2.FINISH_REASON_CANCELLED,
                        usage=common_pb2.Usage(completion_tokens=n),
                    ),
                )
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            finally:
                self.live.pop(rid, None)
            return
        words = f"echo: {prompt}".split(" ")
        for i, w in enumerate(words):
            piece = w if i == 0 else " " + w
            lp = (
                [common_pb2.TokenLogprob(token_id=ord(piece[0]), logprob=-0.5, token=piece[0])]
                if request.sampling.HasField("logprobs")
                else []
            )
            yield inference_pb2.GenerateStreamResponse(
                request_id=rid,
                delta=inference_pb2.GenerateDelta(text=piece, token_ids=[ord(c) for c in piece], logprobs=lp),
            )
        text = " ".join(words)
        yield inference_pb2.GenerateStreamResponse(
            request_id=rid,
            final=inference_pb2.GenerateFinal(
                finish_reason=inference_pb2.FINISH_REASON_STOP,
                stop_reason="</s>",
                usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=len(words), total_tokens=3 + len(words)),
                raw_text=text,
                content=text,
            ),
        )

    async def Abort(self, request, context):
        event = self.live.get(request.request_id)
        if event is not None:
            event.set()
        return inference_pb2.AbortResponse(aborted=event is not None)

    async def GetModelInfo(self, request, context):
        self.calls["GetModelInfo"] += 1
        if self.unavailable_before_success > 0:
            self.unavailable_before_success -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        md = dict(context.invocation_metadata())
        return inference_pb2.GetModelInfoResponse(
            model_name="fake-internlm2",
            max_model_len=4096,
            vocab_size=92544,
            dtype="float32",
            device="cpu",
            default_stop_token_ids=[2, 92542],
            server_version=md.get("authorization", ""),
        )


class FakeReward(reward_pb2_grpc.RewardServiceServicer):
    """score = length of the last message (+ 100 with a condition)."""

    def __init__(self):
        self.requests: list = []

    @staticmethod
    def _score(messages, condition: str) -> float:
        return float(len(messages[-1].content)) + (100.0 if condition else 0.0)

    async def Score(self, request, context):
        self.requests.append(request)
        return reward_pb2.ScoreResponse(
            scores=[self._score(c.messages, request.condition) for c in request.conversations],
            token_counts=[len(c.messages) for c in request.conversations],
        )

    async def Compare(self, request, context):
        a, b = float(len(request.response_a)), float(len(request.response_b))
        pref = reward_pb2.PREFERENCE_A if a > b else reward_pb2.PREFERENCE_B if b > a else reward_pb2.PREFERENCE_TIE
        return reward_pb2.CompareResponse(preferred=pref, margin=abs(a - b), score_a=a, score_b=b)

    async def Rank(self, request, context):
        scores = [float(len(r)) for r in request.responses]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        return reward_pb2.RankResponse(order=order, scores=scores)


def _stamp(ts, seconds: int) -> None:
    ts.FromSeconds(1_700_000_000 + seconds)


class FakeTraining(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self):
        self.jobs: dict[str, training_pb2.Job] = {}
        self.by_key: dict[str, str] = {}

    async def ListStages(self, request, context):
        sft = training_pb2.StageInfo(name="sft", description="supervised fine-tuning", version="0.1", queue="gpu")
        sft.config_schema.update({"type": "object", "properties": {"lr": {"type": "number"}}})
        return training_pb2.ListStagesResponse(stages=[sft, training_pb2.StageInfo(name="eval", queue="gpu")])

    async def SubmitJob(self, request, context):
        if request.idempotency_key in self.by_key:
            return training_pb2.SubmitJobResponse(job=self.jobs[self.by_key[request.idempotency_key]], created=False)
        for i, s in enumerate(request.stages):
            if s.stage not in ("sft", "eval"):
                await abort_rich(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"unknown stage {s.stage!r}",
                    field=f"stages[{i}].stage",
                )
        job_id = f"job-{len(self.jobs) + 1}"
        job = training_pb2.Job(
            job_id=job_id,
            name=request.name,
            state=training_pb2.JOB_STATE_QUEUED,
            labels=request.labels,
            idempotency_key=request.idempotency_key,
        )
        for s in request.stages:
            job.stages.add(name=s.name or s.stage, stage=s.stage, config=s.config, state=training_pb2.JOB_STATE_QUEUED)
        _stamp(job.create_time, len(self.jobs))
        self.jobs[job_id] = job
        if request.idempotency_key:
            self.by_key[request.idempotency_key] = job_id
        return training_pb2.SubmitJobResponse(job=job, created=True)

    async def _get(self, job_id, context) -> training_pb2.Job:
        if job_id not in self.jobs:
            await abort_rich(context, grpc.StatusCode.NOT_FOUND, f"no job {job_id!r}")
        return self.jobs[job_id]

    async def GetJob(self, request, context):
        return training_pb2.GetJobResponse(job=await self._get(request.job_id, context))

    async def ListJobs(self, request, context):
        jobs = [j for j in reversed(self.jobs.values()) if not request.states or j.state in request.states]
        start = int(request.page_token or 0)
        size = request.page_size or 50
        page = jobs[start : start + size]
        nxt = str(start + size) if start + size < len(jobs) else ""
        return training_pb2.ListJobsResponse(jobs=page, next_page_token=nxt)

    async def CancelJob(self, request, context):
        job = await self._get(request.job_id, context)
        if job.state in (
            training_pb2.JOB_STATE_SUCCEEDED,
            training_pb2.JOB_STATE_FAILED,
            training_pb2.JOB_STATE_CANCELLED,
        ):
            await abort_rich(context, grpc.StatusCode.FAILED_PRECONDITION, "job already ended")
        job.state = training_pb2.JOB_STATE_CANCELLED
        return training_pb2.CancelJobResponse(job=job)

    async def WatchJob(self, request, context):
        """Runs the job's scripted life: running, progress 0.5 and 1.0, metrics, artifact, log, succeeded."""
        job = await self._get(request.job_id, context)
        stage = job.stages[0].name if job.stages else ""
        events = [
            dict(state_changed=training_pb2.StateChanged(state=training_pb2.JOB_STATE_RUNNING)),
            dict(stage=stage, progress=training_pb2.ProgressUpdate(fraction=0.5, step=5, total_steps=10)),
            dict(stage=stage, metrics=training_pb2.MetricsUpdate(step=5, values={"loss": 1.25})),
            dict(stage=stage, progress=training_pb2.ProgressUpdate(fraction=1.0, step=10, total_steps=10)),
            dict(
                stage=stage,
                artifact=training_pb2.Artifact(
                    name="final", kind=training_pb2.ARTIFACT_KIND_CHECKPOINT, uri="/ckpt/final", stage=stage
                ),
            ),
            dict(stage=stage, log=training_pb2.LogMessage(level="INFO", message="done")),
            dict(state_changed=training_pb2.StateChanged(state=training_pb2.JOB_STATE_SUCCEEDED)),
        ]
        for seq, fields in enumerate(events, 1):
            if seq <= request.after_sequence:
                continue
            msg = training_pb2.WatchJobResponse(job_id=job.job_id, sequence=seq, **fields)
            _stamp(msg.time, seq)
            yield msg
        job.state = training_pb2.JOB_STATE_SUCCEEDED
        job.progress = 1.0
        job.artifacts.add(name="final", kind=training_pb2.ARTIFACT_KIND_CHECKPOINT, uri="/ckpt/final", stage=stage)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Bearer-token check like the platform's (health exempt)."""

    def __init__(self, token: str):
        self.token = token

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if details.method.startswith("/grpc.health.v1.Health/"):
            return handler
        if dict(details.invocation_metadata).get("authorization") == f"Bearer {self.token}":
            return handler

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        return grpc.unary_unary_rpc_method_handler(
            deny,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class WatchedHealth(HealthServicer):
    """The standard health servicer, noting which services a client has Watched (to know a waiter waits)."""

    def __init__(self):
        super().__init__()
        self.watched: set[str] = set()

    async def Watch(self, request, context):
        self.watched.add(request.service)
        return await super().Watch(request, context)


class FakePlatform:
    """All four fake services + grpc.health.v1 on one loopback port, served from a thread."""

    def __init__(self, *, token: str | None = None, server_credentials=None):
        self.tokenizer, self.inference = FakeTokenizer(), FakeInference()
        self.reward, self.training = FakeReward(), FakeTraining()
        self.health = WatchedHealth()
        self._token, self._creds = token, server_credentials
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _start(self) -> int:
        interceptors = [TokenInterceptor(self._token)] if self._token else []
        self._server = grpc.aio.server(interceptors=interceptors)
        tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(self.tokenizer, self._server)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(self.inference, self._server)
        reward_pb2_grpc.add_RewardServiceServicer_to_server(self.reward, self._server)
        training_pb2_grpc.add_TrainingServiceServicer_to_server(self.training, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self._creds is not None:
            port = self._server.add_secure_port("127.0.0.1:0", self._creds)
        else:
            port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return port

    def run(self, coro, timeout: float = 10):
        """Runs a coroutine on the server's loop (e.g. health changes) and waits for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> FakePlatform:
        self._thread.start()
        self.port = self.run(self._start())
        return self

    def stop(self) -> None:
        self.run(self._server.stop(grace=None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def set_health(self, service: str, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.run(self.health.set(service, status))
