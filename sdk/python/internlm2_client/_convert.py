"""Pure conversions between the SDK's dataclasses (types.py) and internlm2.v1 messages.

No I/O here: the clients build requests with `*_request` functions and turn responses
into dataclasses with `*_from_pb` functions; both are unit-tested without a server.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from internlm2.v1 import common_pb2, inference_pb2, reward_pb2, tokenizer_pb2, training_pb2
from internlm2_client import types as t

# ---------------------------------------------------------------- enums


def _enum_from_pb(enum_cls, pb_enum, value: int):
    """FINISH_REASON_EOS -> FinishReason.EOS; unknown numbers (newer server) -> UNSPECIFIED."""
    prefix = pb_enum.DESCRIPTOR.values[0].name.removesuffix("UNSPECIFIED")
    try:
        name = pb_enum.Name(value)
    except ValueError:
        return enum_cls.UNSPECIFIED
    return enum_cls(name.removeprefix(prefix).lower())


def _enum_to_pb(pb_enum, value) -> int:
    prefix = pb_enum.DESCRIPTOR.values[0].name.removesuffix("UNSPECIFIED")
    return pb_enum.Value(prefix + str(value).upper())


def finish_reason_from_pb(value: int) -> t.FinishReason:
    return _enum_from_pb(t.FinishReason, inference_pb2.FinishReason, value)


def job_state_from_pb(value: int) -> t.JobState:
    return _enum_from_pb(t.JobState, training_pb2.JobState, value)


def job_state_to_pb(value: t.JobState | str) -> int:
    return _enum_to_pb(training_pb2.JobState, t.JobState(value))


# ---------------------------------------------------------------- common


def _time(ts: timestamp_pb2.Timestamp, present: bool) -> _dt.datetime | None:
    return ts.ToDatetime(tzinfo=_dt.UTC) if present else None


def struct_to_dict(value: struct_pb2.Struct) -> dict:
    return json_format.MessageToDict(value)


def dict_to_struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(dict(value))
    return s


def tool_call_to_pb(call: t.ToolCall) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(
        kind=_enum_to_pb(common_pb2.ToolKind, call.kind),
        name=call.name,
        arguments_json=call.arguments_json,
        raw=call.raw,
        id=call.id,
    )


def tool_call_from_pb(pb: common_pb2.ToolCall) -> t.ToolCall:
    return t.ToolCall(
        name=pb.name,
        arguments_json=pb.arguments_json or "{}",
        kind=_enum_from_pb(t.ToolKind, common_pb2.ToolKind, pb.kind),
        raw=pb.raw,
        id=pb.id,
    )


def message_to_pb(message: t.ChatMessage | Mapping[str, Any]) -> common_pb2.ChatMessage:
    m = t.ChatMessage.coerce(message)
    return common_pb2.ChatMessage(
        role=m.role, content=m.content, name=m.name, tool_calls=[tool_call_to_pb(c) for c in m.tool_calls]
    )


def messages_to_pb(messages: Iterable[t.ChatMessage | Mapping[str, Any]]) -> list[common_pb2.ChatMessage]:
    return [message_to_pb(m) for m in messages]


def tool_to_pb(tool: t.Tool | Mapping[str, Any]) -> common_pb2.Tool:
    tl = t.Tool.coerce(tool)
    params = json.dumps(dict(tl.parameters), ensure_ascii=False) if tl.parameters is not None else ""
    return common_pb2.Tool(name=tl.name, description=tl.description, parameters_json=params)


def conversation_to_pb(conversation) -> common_pb2.Conversation:
    return common_pb2.Conversation(messages=messages_to_pb(conversation))


def _logprobs(items) -> tuple[t.TokenLogprob, ...]:
    return tuple(
        t.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            token=lp.token,
            top=tuple(t.TopLogprob(a.token_id, a.logprob, a.token) for a in lp.top),
        )
        for lp in items
    )


def usage_from_pb(pb: common_pb2.Usage) -> t.Usage:
    return t.Usage(
        prompt_tokens=pb.prompt_tokens,
        completion_tokens=pb.completion_tokens,
        total_tokens=pb.total_tokens,
        cached_prompt_tokens=pb.cached_prompt_tokens,
    )


# ---------------------------------------------------------------- inference

def _scalar_fields(descriptor) -> tuple[str, ...]:
    """The proto3 `optional` scalars of a message: they map 1:1 onto same-named SDK fields, so a new
    sampling scalar needs no edit here (it comes from the generated descriptor)."""
    return tuple(f.name for f in descriptor.fields if f.has_presence and f.message_type is None and not f.is_repeated)


_SCALAR_SAMPLING_FIELDS = _scalar_fields(inference_pb2.SamplingParams.DESCRIPTOR)


def structured_output_to_pb(value: t.StructuredOutput | Mapping[str, Any]) -> inference_pb2.StructuredOutput:
    """StructuredOutput (or a dict of one of its keys) -> proto; a dict JSON schema is serialized.
    Which kinds are set is left to the server to judge (it names the field)."""
    so = t.StructuredOutput.coerce(value)
    pb = inference_pb2.StructuredOutput()
    if so.json_schema is not None:
        schema = so.json_schema
        pb.json_schema = schema if isinstance(schema, str) else json.dumps(dict(schema), ensure_ascii=False)
    if so.regex is not None:
        pb.regex = so.regex
    if so.grammar is not None:
        pb.grammar = so.grammar
    if so.json_object is not None:
        pb.json_object = so.json_object
    return pb


def sampling_to_pb(params: t.SamplingParams | None = None, **overrides: Any) -> inference_pb2.SamplingParams:
    """SamplingParams (+ keyword overrides) -> proto; None fields stay unset (engine default). Any scalar
    of the proto's SamplingParams is accepted as a keyword even before types.SamplingParams names it."""
    values = dict(vars(params)) if params is not None else {}
    unknown = set(overrides) - set(vars(t.SamplingParams())) - set(_SCALAR_SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    pb = inference_pb2.SamplingParams()
    for name in _SCALAR_SAMPLING_FIELDS:
        if values.get(name) is not None:
            setattr(pb, name, values[name])
    stop = values.get("stop") or []
    pb.stop.extend([stop] if isinstance(stop, str) else stop)
    if values.get("stop_token_ids") is not None:
        pb.stop_token_ids.SetInParent()  # present even when empty: "no stop ids at all"
        pb.stop_token_ids.ids.extend(values["stop_token_ids"])
    if values.get("structured_output") is not None:
        pb.structured_output.CopyFrom(structured_output_to_pb(values["structured_output"]))
    return pb


def generate_request(
    request_cls,
    *,
    prompt: str | None = None,
    messages=None,
    token_ids=None,
    tools=None,
    add_generation_prompt: bool | None = None,
    request_id: str = "",
    sampling: t.SamplingParams | None = None,
    **sampling_kwargs: Any,
):
    """Builds a GenerateRequest or GenerateStreamRequest; exactly one input must be given."""
    given = [
        name for name, v in (("prompt", prompt), ("messages", messages), ("token_ids", token_ids)) if v is not None
    ]
    if len(given) != 1:
        raise ValueError(f"give exactly one of prompt, messages, token_ids (got {given or 'none'})")
    if tools and messages is None:
        raise ValueError("tools need chat messages (messages=...)")
    req = request_cls(request_id=request_id, sampling=sampling_to_pb(sampling, **sampling_kwargs))
    if prompt is not None:
        req.prompt = prompt
    elif token_ids is not None:
        req.token_ids.ids.extend(token_ids)
        req.token_ids.SetInParent()
    else:
        req.chat.messages.extend(messages_to_pb(messages))
        req.chat.tools.extend(tool_to_pb(x) for x in tools or ())
        req.chat.SetInParent()
        if add_generation_prompt is not None:
            req.chat.add_generation_prompt = add_generation_prompt
    return req


def _metrics(pb: inference_pb2.RequestMetrics) -> t.RequestMetrics:
    return t.RequestMetrics(
        queue_time_s=pb.queue_time_s,
        time_to_first_token_s=pb.time_to_first_token_s,
        mean_inter_token_latency_s=pb.mean_inter_token_latency_s,
        e2e_latency_s=pb.e2e_latency_s,
    )


def _choice_from_pb(pb: inference_pb2.GenerateChoice, deltas: Sequence[t.GenerateDelta] = ()) -> t.GenerateChoice:
    """A choice of a response, or (``deltas`` given) of a stream, whose final leaves text, ids and
    logprobs to the deltas of its index."""
    mine = [d for d in deltas if d.index == pb.index]
    return t.GenerateChoice(
        index=pb.index,
        text=pb.text or "".join(d.text for d in mine),
        token_ids=tuple(pb.token_ids) or tuple(i for d in mine for i in d.token_ids),
        finish_reason=finish_reason_from_pb(pb.finish_reason),
        stop_reason=pb.stop_reason,
        logprobs=_logprobs(pb.logprobs) or tuple(lp for d in mine for lp in d.logprobs),
        tool_calls=tuple(tool_call_from_pb(c) for c in pb.tool_calls),
        raw_text=pb.raw_text,
        content=pb.content,
        completion_tokens=pb.completion_tokens,
    )


def generate_result_from_pb(pb: inference_pb2.GenerateResponse) -> t.GenerateResult:
    return t.GenerateResult(
        request_id=pb.request_id,
        text=pb.text,
        token_ids=tuple(pb.token_ids),
        finish_reason=finish_reason_from_pb(pb.finish_reason),
        stop_reason=pb.stop_reason,
        usage=usage_from_pb(pb.usage),
        logprobs=_logprobs(pb.logprobs),
        prompt_logprobs=_logprobs(pb.prompt_logprobs),
        tool_calls=tuple(tool_call_from_pb(c) for c in pb.tool_calls),
        raw_text=pb.raw_text,
        content=pb.content,
        metrics=_metrics(pb.metrics),
        choices=tuple(_choice_from_pb(c) for c in pb.choices),
    )


def delta_from_pb(pb: inference_pb2.GenerateDelta) -> t.GenerateDelta:
    return t.GenerateDelta(
        text=pb.text,
        token_ids=tuple(pb.token_ids),
        logprobs=_logprobs(pb.logprobs),
        prompt_logprobs=_logprobs(pb.prompt_logprobs),
        index=pb.index,
    )


def result_from_stream(
    request_id: str, deltas: Sequence[t.GenerateDelta], final: inference_pb2.GenerateFinal
) -> t.GenerateResult:
    """Folds a stream's deltas and its final message into the result Generate would return: the
    top-level fields are sibling 0's (deltas of index 0), `choices` every sibling's."""
    first = [d for d in deltas if d.index == 0]
    return t.GenerateResult(
        request_id=request_id,
        text="".join(d.text for d in first),
        token_ids=tuple(i for d in first for i in d.token_ids),
        finish_reason=finish_reason_from_pb(final.finish_reason),
        stop_reason=final.stop_reason,
        usage=usage_from_pb(final.usage),
        logprobs=tuple(lp for d in first for lp in d.logprobs),
        prompt_logprobs=tuple(lp for d in deltas for lp in d.prompt_logprobs),
        tool_calls=tuple(tool_call_from_pb(c) for c in final.tool_calls),
        raw_text=final.raw_text,
        content=final.content,
        metrics=_metrics(final.metrics),
        choices=tuple(_choice_from_pb(c, deltas) for c in final.choices),
    )


def model_info_from_pb(pb: inference_pb2.GetModelInfoResponse) -> t.ModelInfo:
    return t.ModelInfo(
        model_name=pb.model_name,
        model_path=pb.model_path,
        architecture=pb.architecture,
        max_model_len=pb.max_model_len,
        vocab_size=pb.vocab_size,
        num_parameters=pb.num_parameters,
        dtype=pb.dtype,
        device=pb.device,
        max_num_seqs=pb.max_num_seqs,
        block_size=pb.block_size,
        num_kv_blocks=pb.num_kv_blocks,
        default_stop_token_ids=tuple(pb.default_stop_token_ids),
        server_version=pb.server_version,
    )


# ---------------------------------------------------------------- tokenizer


def tokenize_request(texts: Sequence[str], add_bos: bool | None, return_pieces: bool):
    req = tokenizer_pb2.TokenizeRequest(texts=list(texts), return_pieces=return_pieces)
    if add_bos is not None:
        req.add_bos = add_bos
    return req


def tokenized_from_pb(pb: tokenizer_pb2.TokenizeResponse) -> list[t.TokenizedText]:
    return [t.TokenizedText(tuple(r.token_ids), tuple(r.pieces)) for r in pb.results]


def detokenize_request(sequences: Sequence[Sequence[int]], skip_special_tokens: bool | None):
    req = tokenizer_pb2.DetokenizeRequest(sequences=[common_pb2.TokenIds(ids=list(s)) for s in sequences])
    if skip_special_tokens is not None:
        req.skip_special_tokens = skip_special_tokens
    return req


def chat_template_request(messages, tools, add_generation_prompt: bool | None):
    req = tokenizer_pb2.ApplyChatTemplateRequest(
        messages=messages_to_pb(messages), tools=[tool_to_pb(x) for x in tools or ()]
    )
    if add_generation_prompt is not None:
        req.add_generation_prompt = add_generation_prompt
    return req


def count_tokens_request(texts, conversations, add_bos: bool | None, add_generation_prompt: bool | None):
    req = tokenizer_pb2.CountTokensRequest(
        texts=list(texts or ()), conversations=[conversation_to_pb(c) for c in conversations or ()]
    )
    if add_bos is not None:
        req.add_bos = add_bos
    if add_generation_prompt is not None:
        req.add_generation_prompt = add_generation_prompt
    return req


def token_counts_from_pb(pb: tokenizer_pb2.CountTokensResponse) -> t.TokenCounts:
    return t.TokenCounts(tuple(pb.text_counts), tuple(pb.conversation_counts), pb.total)


def tokenizer_info_from_pb(pb: tokenizer_pb2.GetTokenizerInfoResponse) -> t.TokenizerInfo:
    return t.TokenizerInfo(
        vocab_size=pb.vocab_size,
        bos_token_id=pb.bos_token_id,
        eos_token_id=pb.eos_token_id,
        pad_token_id=pb.pad_token_id,
        unk_token_id=pb.unk_token_id,
        special_tokens={s.content: s.id for s in pb.special_tokens},
        default_stop_token_ids=tuple(pb.default_stop_token_ids),
        chat_template=pb.chat_template,
        add_bos_token=pb.add_bos_token,
        add_eos_token=pb.add_eos_token,
        source=pb.source,
    )


# ---------------------------------------------------------------- reward


def score_request(conversations, condition: str | None) -> reward_pb2.ScoreRequest:
    req = reward_pb2.ScoreRequest(conversations=[conversation_to_pb(c) for c in conversations])
    if condition is not None:
        req.condition = condition
    return req


def compare_request(prompt, response_a: str, response_b: str, condition: str | None):
    req = reward_pb2.CompareRequest(prompt=messages_to_pb(prompt), response_a=response_a, response_b=response_b)
    if condition is not None:
        req.condition = condition
    return req


def comparison_from_pb(pb: reward_pb2.CompareResponse) -> t.Comparison:
    return t.Comparison(
        preferred=_enum_from_pb(t.Preference, reward_pb2.Preference, pb.preferred),
        margin=pb.margin,
        score_a=pb.score_a,
        score_b=pb.score_b,
    )


def rank_request(prompt, responses: Sequence[str], condition: str | None) -> reward_pb2.RankRequest:
    req = reward_pb2.RankRequest(prompt=messages_to_pb(prompt), responses=list(responses))
    if condition is not None:
        req.condition = condition
    return req


def ranking_from_pb(pb: reward_pb2.RankResponse) -> t.Ranking:
    return t.Ranking(order=tuple(pb.order), scores=tuple(pb.scores))


# ---------------------------------------------------------------- training


def stage_info_from_pb(pb: training_pb2.StageInfo) -> t.StageInfo:
    return t.StageInfo(
        name=pb.name,
        description=pb.description,
        config_schema=struct_to_dict(pb.config_schema),
        version=pb.version,
        queue=pb.queue,
    )


def artifact_from_pb(pb: training_pb2.Artifact) -> t.Artifact:
    return t.Artifact(
        name=pb.name,
        kind=_enum_from_pb(t.ArtifactKind, training_pb2.ArtifactKind, pb.kind),
        uri=pb.uri,
        stage=pb.stage,
        size_bytes=pb.size_bytes,
        create_time=_time(pb.create_time, pb.HasField("create_time")),
    )


def stage_run_from_pb(pb: training_pb2.StageRun) -> t.StageRun:
    return t.StageRun(
        name=pb.name,
        stage=pb.stage,
        state=job_state_from_pb(pb.state),
        config=struct_to_dict(pb.config),
        progress=pb.progress,
        metrics=dict(pb.metrics),
        artifacts=tuple(artifact_from_pb(a) for a in pb.artifacts),
        start_time=_time(pb.start_time, pb.HasField("start_time")),
        end_time=_time(pb.end_time, pb.HasField("end_time")),
        error=pb.error,
    )


def job_from_pb(pb: training_pb2.Job) -> t.Job:
    return t.Job(
        job_id=pb.job_id,
        state=job_state_from_pb(pb.state),
        name=pb.name,
        stages=tuple(stage_run_from_pb(s) for s in pb.stages),
        current_stage=pb.current_stage,
        progress=pb.progress,
        artifacts=tuple(artifact_from_pb(a) for a in pb.artifacts),
        labels=dict(pb.labels),
        idempotency_key=pb.idempotency_key,
        create_time=_time(pb.create_time, pb.HasField("create_time")),
        start_time=_time(pb.start_time, pb.HasField("start_time")),
        end_time=_time(pb.end_time, pb.HasField("end_time")),
        error=pb.error,
    )


def submit_job_request(
    stages, idempotency_key: str, name: str, labels: Mapping[str, str] | None, inputs: Mapping | None = None
) -> training_pb2.SubmitJobRequest:
    specs = [t.StageSpec.coerce(s) for s in stages]
    inputs = dict(inputs or {})
    unknown = set(inputs) - {"checkpoints", "datasets"}
    if unknown:
        raise ValueError(f"inputs: unknown keys {sorted(unknown)} (expected checkpoints, datasets)")
    return training_pb2.SubmitJobRequest(
        stages=[training_pb2.StageSpec(stage=s.stage, config=dict_to_struct(s.config), name=s.name) for s in specs],
        idempotency_key=idempotency_key,
        name=name,
        labels=dict(labels or {}),
        inputs=training_pb2.JobInputs(
            checkpoints=dict(inputs.get("checkpoints", {})), datasets=dict(inputs.get("datasets", {}))
        ),
    )


def plan_job_request(stages, num_gpus: int, gpu_memory_gib: float, model: str) -> training_pb2.PlanJobRequest:
    specs = submit_job_request(stages, "", "", None).stages
    return training_pb2.PlanJobRequest(stages=specs, num_gpus=num_gpus, gpu_memory_gib=gpu_memory_gib, model=model)


def memory_plan_from_pb(pb: training_pb2.PlanJobResponse) -> t.MemoryPlan:
    fields = [f.name for f in dataclasses.fields(t.StagePlan) if f.name != "notes"]
    stages = tuple(t.StagePlan(**{f: getattr(s, f) for f in fields}, notes=tuple(s.notes)) for s in pb.stages)
    return t.MemoryPlan(stages=stages, fits=pb.fits, gpu_memory_gib=pb.gpu_memory_gib)


def list_jobs_request(page_size: int, page_token: str, states, labels) -> training_pb2.ListJobsRequest:
    return training_pb2.ListJobsRequest(
        page_size=page_size,
        page_token=page_token,
        states=[job_state_to_pb(s) for s in states or ()],
        labels=dict(labels or {}),
    )


def job_event_from_pb(pb: training_pb2.WatchJobResponse) -> t.JobEvent:
    common = dict(job_id=pb.job_id, sequence=pb.sequence, stage=pb.stage, time=_time(pb.time, pb.HasField("time")))
    which = pb.WhichOneof("event")
    if which == "state_changed":
        return t.JobEvent(
            kind=t.JobEventKind.STATE,
            state=job_state_from_pb(pb.state_changed.state),
            message=pb.state_changed.message,
            **common,
        )
    if which == "progress":
        p = pb.progress
        return t.JobEvent(
            kind=t.JobEventKind.PROGRESS,
            fraction=p.fraction,
            step=p.step,
            total_steps=p.total_steps,
            message=p.message,
            **common,
        )
    if which == "metrics":
        return t.JobEvent(kind=t.JobEventKind.METRICS, step=pb.metrics.step, metrics=dict(pb.metrics.values), **common)
    if which == "artifact":
        return t.JobEvent(kind=t.JobEventKind.ARTIFACT, artifact=artifact_from_pb(pb.artifact), **common)
    if which == "log":
        return t.JobEvent(kind=t.JobEventKind.LOG, level=pb.log.level, message=pb.log.message, **common)
    return t.JobEvent(kind=t.JobEventKind.UNKNOWN, **common)  # an event type newer than this SDK
