"""GenerateRequest / GenerateStreamRequest -> what the engine takes: prompt ids and SamplingParams.

Pure conversion, no I/O and no second copy of the engine's rules: the engine validates a request once
(``LLMEngine.validate_request``) and names the field; ``engine_error`` maps that name onto the proto
path (``prompt``, ``chat.messages``, ``token_ids.ids``, ``sampling.top_p``,
``sampling.structured_output.regex``). Only what the engine never sees is checked here: which input is
set, the chat messages' shape, an empty prompt text.

The sampling scalars are not listed by hand: every proto3 ``optional`` scalar of SamplingParams maps
onto the engine field of the same name (``_SCALARS``, from the generated descriptor), so a new sampling
parameter touches the proto, the engine's SamplingParams and the sampler only.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from internlm2.core.engine.errors import DuplicateRequestError
from internlm2.v1 import inference_pb2

from ..common.chat import core_value_error, messages_from_proto, tools_from_proto
from ..common.errors import ServiceError

_SAMPLING = inference_pb2.SamplingParams.DESCRIPTOR
# ignore_eos interacts with stop_token_ids (see sampling_from_proto), so it is mapped by hand.
_SPECIAL = {"ignore_eos"}
_SCALARS = tuple(
    f.name
    for f in _SAMPLING.fields
    if f.has_presence and f.message_type is None and not f.is_repeated and f.name not in _SPECIAL
)
_FLOATS = frozenset(f.name for f in _SAMPLING.fields if f.type in (f.TYPE_FLOAT, f.TYPE_DOUBLE))


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
    if kind == "token_ids":  # emptiness and the vocabulary range are the engine's to judge
        return Prompt(list(request.token_ids.ids), "token_ids.ids")
    chat = request.chat
    messages = messages_from_proto(chat.messages, "chat.messages")
    tools = tools_from_proto(chat.tools, "chat.tools") or None
    add_generation_prompt = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
    try:
        ids = tokenizer.encode_chat(messages, add_generation_prompt, tools)
    except ValueError as exc:
        raise core_value_error(exc, "chat") from None
    return Prompt(ids, "chat.messages", is_chat=True)


def sampling_from_proto(msg, params_cls, structured_cls):
    """Proto SamplingParams -> the engine's (not validated: the engine does that, once); unset fields
    keep the engine defaults.

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
    if msg.HasField("structured_output"):
        so = msg.structured_output
        kind = so.WhichOneof("kind")
        # Unset kind: an empty StructuredOutput, which the engine rejects naming the field.
        kwargs["structured_output"] = structured_cls(**({kind: getattr(so, kind)} if kind else {}))
    return params_cls(**kwargs)


def engine_error(exc: ValueError, prompt_field: str) -> ServiceError:
    """The engine's InvalidRequestError(field) -> INVALID_ARGUMENT naming the proto field: sampling
    fields live under ``sampling.``, prompt problems (too long for the context) on the input field."""
    if isinstance(exc, DuplicateRequestError):
        return ServiceError(
            grpc.StatusCode.ALREADY_EXISTS, f"request_id {exc.request_id!r} is already running",
            reason="DUPLICATE_REQUEST_ID",
        )
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
