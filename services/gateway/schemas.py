"""The HTTP request bodies, as pydantic models: the one place a request's shape is checked.

Only shape and types are checked here. Ranges (``temperature`` >= 0, ``top_p`` in (0, 1], stop
strings' count, ``max_tokens`` within the context) are the engine's rules; it answers
INVALID_ARGUMENT naming the field and the gateway turns that into a 400 naming the parameter.

Unknown parameters are refused (400 naming them) rather than ignored: a client that asks for
``logit_bias`` must learn that it did not get it. OpenAI parameters this server cannot honour are
declared and refused with a reason in ``unsupported()``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------- chat


class FunctionCall(Strict):
    name: str
    arguments: str = "{}"


class ToolCallIn(Strict):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(Strict):
    type: str
    text: str | None = None
    # Other part kinds (image_url, input_audio, file) are declared so the refusal can name them.
    image_url: Any = None
    input_audio: Any = None
    file: Any = None


class ChatMessageIn(BaseModel):
    # Assistant messages a client copies back from a response carry its read-only fields too
    # (refusal, annotations, audio); they are accepted and not rendered, anything else is refused.
    # ``tool_call_id`` is accepted and not rendered: InternLM2's environment turn carries no call id,
    # results answer the calls in order.
    model_config = ConfigDict(extra="forbid")

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: Any = None
    function_call: Any = None


class FunctionDef(Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(Strict):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(Strict):
    type: Literal["function"] = "function"
    function: dict[str, Any]


class JsonSchemaFormat(Strict):
    name: str = "response"
    description: str | None = None
    # `schema` shadows a BaseModel attribute, hence the alias.
    json_schema: dict[str, Any] | bool = Field(alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(Strict):
    include_usage: bool | None = None


class SamplingFields(Strict):
    """Sampling parameters shared by chat and text completions (OpenAI's plus vLLM's extras)."""

    model: str
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    max_tokens: int | None = None
    user: str | None = None
    # vLLM's extra sampling parameters (sent through `extra_body`).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    # Refused with a reason (see unsupported()).
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = []
        if self.logit_bias:
            out.append(("logit_bias", "is not supported by this server"))
        if self.best_of not in (None, 1):
            out.append(("best_of", "only 1 is supported; use n for several completions"))
        return out


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn]
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    response_format: ResponseFormat | None = None
    # Refused with a reason (see unsupported()).
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    store: bool | None = None
    # vLLM's extra: leave out the assistant header (continue a prefilled assistant turn instead).
    add_generation_prompt: bool | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.functions is not None or self.function_call is not None:
            name = "functions" if self.functions is not None else "function_call"
            out.append((name, "the deprecated functions API is not supported; use tools"))
        if self.modalities and self.modalities != ["text"]:
            out.append(("modalities", "only text output is supported"))
        for name in ("audio", "prediction"):
            if getattr(self, name) is not None:
                out.append((name, "is not supported by this server"))
        if self.store:
            out.append(("store", "stored completions are not supported"))
        if self.parallel_tool_calls is False:
            out.append(("parallel_tool_calls", "false is not supported: the model may call several tools"))
        if isinstance(self.tool_choice, NamedToolChoice) or self.tool_choice == "required":
            out.append(("tool_choice", "forcing a tool call is not supported; use 'auto' or 'none'"))
        return out


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.echo:
            out.append(("echo", "only false is supported"))
        if self.suffix:
            out.append(("suffix", "insertion (suffix) is not supported"))
        return out


# ------------------------------------------------------------------------------------ vLLM extras


class TokenizeRequest(Strict):
    """vLLM's /tokenize: either ``prompt`` (plain text) or ``messages`` (rendered by the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    tools: list[ToolDef] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]
    skip_special_tokens: bool | None = None


class ScoreRequest(Strict):
    """vLLM's Score API: ``text_1`` is the query (a user turn), ``text_2`` the candidate answer(s)."""

    model: str | None = None
    text_1: str
    text_2: str | list[str]
    condition: str | None = None


class PoolingRequest(Strict):
    """vLLM's /pooling for a reward model: one conversation (``messages``) or several (``input``)."""

    model: str | None = None
    messages: list[ChatMessageIn] | None = None
    input: list[list[ChatMessageIn]] | None = None
    condition: str | None = None
