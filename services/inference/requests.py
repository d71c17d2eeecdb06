"""GenerateRequest / GenerateStreamRequest -> what the engine takes: prompt ids and SamplingParams.

Pure conversion and validation, no I/O. Every error is a ServiceError naming the field by its proto
path: ``input``, ``prompt``, ``chat.messages[1].role``, ``token_ids.ids``, ``sampling.top_p``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..common.chat import core_value_error, messages_from_proto, tools_from_proto
from ..common.errors import ServiceError

# Proto SamplingParams scalars that map 1:1 onto engine fields of the same name.
_SCALARS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "max_new_tokens",
    "min_new_tokens",
    "logprobs",
    "prompt_logprobs",
    "skip_special_tokens",
)
_FLOATS = {"temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"}


@dataclass(frozen=True)
class Prompt:
    """A request's prompt: its ids, the proto field it came from (for errors about it) and whether it
    is a chat (whose output may carry tool calls)."""

    token_ids: list[int]
    field: str
    is_chat: bool = False


def prompt_from_request(request, tokenizer) -> Prompt:
    kind = request.WhichOneof("input")
    if kind is None:
        raise ServiceError.invalid_argument("input", "set exactly one of prompt, chat, token_ids")
    if kind == "prompt":
        if not request.prompt:
            raise ServiceError.invalid_argument("prompt", "must not be empty")
        return Prompt(tokenizer.encode(request.prompt, add_bos=True), "prompt")
    if kind == "token_ids":
        ids = list(request.token_ids.ids)
        if not ids:
            raise ServiceError.invalid_argument("token_ids.ids", "must not be empty")
        vocab = tokenizer.vocab_size
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise ServiceError.invalid_argument(
                "token_ids.ids", f"token id {bad} is outside the vocabulary [0, {vocab})"
            )
        return Prompt(ids, "token_ids.ids")
    chat = request.chat
    messages = messages_from_proto(chat.messages, "chat.messages")
    tools = tools_from_proto(chat.tools, "chat.tools") or None
    add_generation_prompt = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
    try:
        ids = tokenizer.encode_chat(messages, add_generation_prompt, tools)
    except ValueError as exc:
        raise core_value_error(exc, "chat") from None
    return Prompt(ids, "chat.messages", is_chat=True)


def sampling_from_proto(msg, params_cls):
    """Proto SamplingParams -> the engine's, validated; unset fields keep the engine defaults.

    ``stop_token_ids`` set (even empty) means exactly these end generation (the proto's contract), so
    the tokenizer's defaults are dropped (engine ``ignore_eos``); ``ignore_eos`` means keep going past
    every end id, defaults and listed ones alike. Stop strings apply either way.
    """
    kwargs = {}
    for name in _SCALARS:
        if msg.HasField(name):
            value = getattr(msg, name)
            kwargs[name] = float(value) if name in _FLOATS else value
    if msg.stop:
        kwargs["stop"] = tuple(msg.stop)
    if msg.HasField("ignore_eos") and msg.ignore_eos:
        kwargs["ignore_eos"] = True
        kwargs["stop_token_ids"] = []
    elif msg.HasField("stop_token_ids"):
        kwargs["ignore_eos"] = True
        kwargs["stop_token_ids"] = list(msg.stop_token_ids.ids)
    params = params_cls(**kwargs)
    try:
        return params.validate()
    except ValueError as exc:
        raise engine_error(exc, "prompt") from None


def engine_error(exc: ValueError, prompt_field: str) -> ServiceError:
    """The engine's InvalidRequestError(field) -> INVALID_ARGUMENT naming the proto field: sampling
    fields live under ``sampling.``, prompt problems (too long for the context) on the input field."""
    field = getattr(exc, "field", None)
    message = getattr(exc, "message", None) or str(exc)
    if not field:
        return ServiceError.invalid_argument(prompt_field, message)
    if field in ("prompt", "prompt_token_ids", "input"):
        return ServiceError.invalid_argument(prompt_field, message)
    if field == "request_id":
        return ServiceError.invalid_argument("request_id", message)
    if field == "params":
        return ServiceError.invalid_argument("sampling", message)
    if field == "stop_token_ids":
        return ServiceError.invalid_argument("sampling.stop_token_ids.ids", message)
    return ServiceError.invalid_argument(field if field.startswith("sampling.") else f"sampling.{field}", message)
