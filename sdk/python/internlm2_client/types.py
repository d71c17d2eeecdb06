"""Typed values the SDK takes and returns: plain dataclasses and string enums, no protobuf.

Enums are `StrEnum`s whose values are the lower-case names ("running", "eos", ...), so
they compare equal to plain strings and serialize to JSON as such.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class FinishReason(StrEnum):
    """Why generation ended (mirrors the engine's finish_reason)."""

    UNSPECIFIED = "unspecified"
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    CANCELLED = "cancelled"
    ERROR = "error"


class ToolKind(StrEnum):
    """Channel of a tool call: a plugin (function) call or interpreter code."""

    UNSPECIFIED = "unspecified"
    PLUGIN = "plugin"
    INTERPRETER = "interpreter"


class JobState(StrEnum):
    """Lifecycle state of a training job or stage."""

    UNSPECIFIED = "unspecified"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class ArtifactKind(StrEnum):
    """What a job artifact is."""

    UNSPECIFIED = "unspecified"
    CHECKPOINT = "checkpoint"
    EVAL_REPORT = "eval_report"
    LOG = "log"
    OTHER = "other"


class Preference(StrEnum):
    """Outcome of a reward comparison."""

    UNSPECIFIED = "unspecified"
    A = "a"
    B = "b"
    TIE = "tie"


# ---------------------------------------------------------------- chat and tools


@dataclass(frozen=True)
class ToolCall:
    """A tool call the model made. `arguments` is the parsed JSON object (None if it
    did not parse; `arguments_json` and `raw` keep the text)."""

    name: str
    arguments_json: str = "{}"
    kind: ToolKind = ToolKind.PLUGIN
    raw: str = ""
    id: str = ""

    @property
    def arguments(self) -> dict | None:
        try:
            value = json.loads(self.arguments_json or "{}")
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class ChatMessage:
    """One chat message. role: system | user | assistant | environment; name: "" |
    "plugin" | "interpreter" (tool channel of system/environment messages)."""

    role: str
    content: str
    name: str = ""
    tool_calls: tuple[ToolCall, ...] = ()

    @classmethod
    def coerce(cls, value: ChatMessage | Mapping[str, Any]) -> ChatMessage:
        """Accepts a ChatMessage or an OpenAI-style dict {"role", "content", "name"?}."""
        if isinstance(value, ChatMessage):
            return value
        calls = tuple(c if isinstance(c, ToolCall) else ToolCall(**c) for c in value.get("tool_calls", ()))
        return cls(role=value["role"], content=value.get("content", ""), name=value.get("name", ""), tool_calls=calls)


@dataclass(frozen=True)
class Tool:
    """A tool offered to the model; `parameters` is the JSON Schema of its arguments."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] | None = None

    @classmethod
    def coerce(cls, value: Tool | Mapping[str, Any]) -> Tool:
        """Accepts a Tool, {"name", "description", "parameters"} or OpenAI's
        {"type": "function", "function": {...}}."""
        if isinstance(value, Tool):
            return value
        spec = value.get("function", value)
        return cls(name=spec["name"], description=spec.get("description", ""), parameters=spec.get("parameters"))


# ---------------------------------------------------------------- generation


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the output (inference.proto StructuredOutput); set exactly one of:
    `json_schema` (a JSON Schema as a dict or JSON text), `regex` (the whole output matches it),
    `grammar` (EBNF in the GBNF dialect, start rule `root`) or `json_object=True` (any JSON object)."""

    json_schema: Mapping[str, Any] | str | None = None
    regex: str | None = None
    grammar: str | None = None
    json_object: bool | None = None

    @classmethod
    def coerce(cls, value: StructuredOutput | Mapping[str, Any]) -> StructuredOutput:
        """Accepts a StructuredOutput or a dict with one of its keys, e.g. {"regex": "[0-9]+"}."""
        return value if isinstance(value, StructuredOutput) else cls(**dict(value))


@dataclass
class SamplingParams:
    """Sampling and stopping; None = the engine default (see inference.proto).

    `stop_token_ids=None` means the tokenizer's defaults; an empty list means none.
    `n` sibling completions come back as `GenerateResult.choices` (streams: deltas carry `index`);
    `structured_output` constrains the output (a StructuredOutput or a dict like {"regex": ...});
    `best_of` (unary generate only) samples that many and returns the `n` most likely.
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool | None = None
    n: int | None = None
    structured_output: StructuredOutput | Mapping[str, Any] | None = None
    best_of: int | None = None


@dataclass(frozen=True)
class TopLogprob:
    """An alternative token at one position."""

    token_id: int
    logprob: float
    token: str = ""


@dataclass(frozen=True)
class TokenLogprob:
    """Logprob of a chosen (or prompt) token plus its top alternatives."""

    token_id: int
    logprob: float
    token: str = ""
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Usage:
    """Token counts of one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class RequestMetrics:
    """Engine timings of one request, in seconds."""

    queue_time_s: float = 0.0
    time_to_first_token_s: float = 0.0
    mean_inter_token_latency_s: float = 0.0
    e2e_latency_s: float = 0.0


@dataclass(frozen=True)
class GenerateDelta:
    """Output produced since the previous delta of a stream; `index` is the sibling completion
    (0 .. n-1) it extends."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    index: int = 0


@dataclass(frozen=True)
class GenerateChoice:
    """One of the n completions of a request (`index` 0 .. n-1)."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    stop_reason: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    raw_text: str = ""
    content: str = ""
    completion_tokens: int = 0

    def as_message(self) -> ChatMessage:
        """The assistant message to append to a chat history."""
        return ChatMessage(role="assistant", content=self.content or self.text, tool_calls=self.tool_calls)


@dataclass(frozen=True)
class GenerateResult:
    """A finished generation. `content` is `text` without tool-call blocks; `raw_text`
    keeps special tokens. `choices` has every sibling completion (sampling `n`), index order;
    the top-level fields are choices[0]'s and `usage` counts the whole request."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    stop_reason: str = ""
    usage: Usage = field(default_factory=Usage)
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    raw_text: str = ""
    content: str = ""
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    choices: tuple[GenerateChoice, ...] = ()

    def as_message(self) -> ChatMessage:
        """The assistant message to append to a chat history."""
        return ChatMessage(role="assistant", content=self.content or self.text, tool_calls=self.tool_calls)


@dataclass(frozen=True)
class ModelInfo:
    """The served model and engine limits."""

    model_name: str
    model_path: str = ""
    architecture: str = ""
    max_model_len: int = 0
    vocab_size: int = 0
    num_parameters: int = 0
    dtype: str = ""
    device: str = ""
    max_num_seqs: int = 0
    block_size: int = 0
    num_kv_blocks: int = 0
    default_stop_token_ids: tuple[int, ...] = ()
    server_version: str = ""


# ---------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class TokenizedText:
    """Encoding of one text; `pieces` only when asked for."""

    token_ids: tuple[int, ...]
    pieces: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChatTemplateResult:
    """A rendered chat prompt and its token ids."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class TokenCounts:
    """Token counts of texts and conversations."""

    text_counts: tuple[int, ...] = ()
    conversation_counts: tuple[int, ...] = ()
    total: int = 0


@dataclass(frozen=True)
class TokenizerInfo:
    """Facts about the tokenizer."""

    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    unk_token_id: int
    special_tokens: dict[str, int] = field(default_factory=dict)
    default_stop_token_ids: tuple[int, ...] = ()
    chat_template: str = ""
    add_bos_token: bool = True
    add_eos_token: bool = False
    source: str = ""


# ---------------------------------------------------------------- reward


@dataclass(frozen=True)
class Comparison:
    """Which of two responses the reward model prefers, and by how much."""

    preferred: Preference
    margin: float
    score_a: float
    score_b: float


@dataclass(frozen=True)
class Ranking:
    """Candidates ordered best first (`order` indexes the input); `scores` in input order."""

    order: tuple[int, ...]
    scores: tuple[float, ...]


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class StageInfo:
    """An installed training stage and the JSON Schema of its config."""

    name: str
    description: str = ""
    config_schema: dict = field(default_factory=dict)
    version: str = ""
    queue: str = ""


@dataclass(frozen=True)
class StagePlan:
    """Estimated per-GPU memory of one stage, in GiB (PlanJob)."""

    name: str
    stage: str
    num_gpus: int
    weights_gib: float = 0.0
    grads_gib: float = 0.0
    optimizer_gib: float = 0.0
    activations_gib: float = 0.0
    kv_gib: float = 0.0
    frozen_gib: float = 0.0
    other_gib: float = 0.0
    total_gib: float = 0.0
    fits: bool = True
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class MemoryPlan:
    """PlanJob's answer: one StagePlan per stage and whether all fit GPUs of ``gpu_memory_gib``."""

    stages: tuple[StagePlan, ...]
    fits: bool
    gpu_memory_gib: float


@dataclass(frozen=True)
class StageSpec:
    """One stage of a pipeline to submit."""

    stage: str
    config: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""

    @classmethod
    def coerce(cls, value: StageSpec | Mapping[str, Any] | str) -> StageSpec:
        """Accepts a StageSpec, {"stage", "config"?, "name"?} or a bare stage name."""
        if isinstance(value, StageSpec):
            return value
        if isinstance(value, str):
            return cls(stage=value)
        return cls(stage=value["stage"], config=value.get("config") or {}, name=value.get("name", ""))


@dataclass(frozen=True)
class Artifact:
    """A checkpoint, eval report or other file a stage produced."""

    name: str
    kind: ArtifactKind
    uri: str
    stage: str = ""
    size_bytes: int = 0
    create_time: _dt.datetime | None = None


@dataclass(frozen=True)
class StageRun:
    """State of one stage of a job."""

    name: str
    stage: str
    state: JobState
    config: dict = field(default_factory=dict)
    progress: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: tuple[Artifact, ...] = ()
    start_time: _dt.datetime | None = None
    end_time: _dt.datetime | None = None
    error: str = ""


@dataclass(frozen=True)
class Job:
    """A training job: a pipeline of stages and where its artifacts are."""

    job_id: str
    state: JobState
    name: str = ""
    stages: tuple[StageRun, ...] = ()
    current_stage: int = 0
    progress: float = 0.0
    artifacts: tuple[Artifact, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    idempotency_key: str = ""
    create_time: _dt.datetime | None = None
    start_time: _dt.datetime | None = None
    end_time: _dt.datetime | None = None
    error: str = ""

    @property
    def is_terminal(self) -> bool:
        return self.state.is_terminal


@dataclass(frozen=True)
class Submission:
    """Result of submit_job: the job, and False in `created` when the idempotency key
    matched an earlier job."""

    job: Job
    created: bool


@dataclass(frozen=True)
class JobPage:
    """One page of list_jobs."""

    jobs: tuple[Job, ...]
    next_page_token: str = ""


class JobEventKind(StrEnum):
    """What a JobEvent reports."""

    STATE = "state"
    PROGRESS = "progress"
    METRICS = "metrics"
    ARTIFACT = "artifact"
    LOG = "log"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class JobEvent:
    """One event of watch_job. `stage` is empty for job-level events; the payload fields
    that apply depend on `kind`:

    - STATE: `state`, `message`
    - PROGRESS: `fraction`, `step`, `total_steps`, `message`
    - METRICS: `step`, `metrics`
    - ARTIFACT: `artifact`
    - LOG: `level`, `message`
    """

    job_id: str
    sequence: int
    kind: JobEventKind
    stage: str = ""
    time: _dt.datetime | None = None
    state: JobState | None = None
    message: str = ""
    fraction: float | None = None
    step: int | None = None
    total_steps: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    artifact: Artifact | None = None
    level: str = ""

    @property
    def is_terminal(self) -> bool:
        """True for the job-level state change that ends the job (the stream's last event)."""
        return self.kind is JobEventKind.STATE and not self.stage and bool(self.state and self.state.is_terminal)
