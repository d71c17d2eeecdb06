"""OpenAI requests -> InferenceService requests, and InferenceService results -> OpenAI objects.

Pure functions, no I/O. The tables here are the one place that says which OpenAI (or vLLM) parameter
becomes which ``SamplingParams`` field; the same tables map a backend's field violation
(``sampling.top_p``) back to the parameter the client sent (``top_p``).

Chat messages map one to one, in order (so ``messages[i]`` is ``chat.messages[i]``):
``developer`` -> ``system``; ``tool`` -> ``environment`` on the ``plugin`` channel (InternLM2's tool
result turn); an assistant's ``tool_calls`` -> structured ``ToolCall``s the chat template renders as
``<|action_start|><|plugin|>`` blocks. Tools are offered as InternLM2 plugins; the calls the model
emits come back as OpenAI ``tool_calls`` with ``finish_reason: "tool_calls"``.
"""

from __future__ import annotations

import json
import re
import time

from internlm2.v1 import common_pb2, inference_pb2

from .errors import ApiError, ProtoPaths
from .schemas import ChatCompletionRequest, ChatMessageIn, CompletionRequest, SamplingFields, ToolDef

# OpenAI / vLLM parameter -> SamplingParams field with the same meaning and value.
DIRECT = {
    "temperature": "temperature",
    "top_p": "top_p",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "seed": "seed",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "min_tokens": "min_new_tokens",
    "ignore_eos": "ignore_eos",
    "skip_special_tokens": "skip_special_tokens",
    "n": "n",
}

FINISH_REASONS = {
    inference_pb2.FINISH_REASON_EOS: "stop",
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    # Aborted from another connection (Abort RPC): OpenAI has no name for it; vLLM says "abort".
    inference_pb2.FINISH_REASON_CANCELLED: "abort",
}


def sampling_params(req: SamplingFields, *, max_tokens: int | None, logprobs: int | None):
    """The request's SamplingParams message; unset parameters stay unset (the engine's defaults apply)."""
    for param, reason in req.unsupported():
        raise ApiError.unsupported(param, reason)
    msg = inference_pb2.SamplingParams()
    for param, field in DIRECT.items():
        value = getattr(req, param, None)
        if value is not None:
            setattr(msg, field, value)
    if max_tokens is not None:
        msg.max_new_tokens = max_tokens
    if logprobs is not None:
        msg.logprobs = logprobs
    if req.stop is not None:
        msg.stop.extend([req.stop] if isinstance(req.stop, str) else req.stop)
    if req.stop_token_ids is not None:
        msg.stop_token_ids.ids.extend(req.stop_token_ids)
    return msg


def sampling_paths(max_tokens_param: str, logprobs_param: str, input_param: str) -> dict[str, str]:
    """Proto paths -> this request's parameter names (ProtoPaths rules)."""
    rules = {f"sampling.{field}": param for param, field in DIRECT.items()}
    rules.update(
        {
            "sampling.max_new_tokens": max_tokens_param,
            "sampling.logprobs": logprobs_param,
            "sampling.stop": "stop",
            "sampling.stop_token_ids": "stop_token_ids",
            "sampling.structured_output": "response_format",
            "sampling": "request",
            "input": input_param,
            "prompt": input_param,
            "token_ids": input_param,
            "token_ids.ids": input_param,
            "request_id": "request",
        }
    )
    return rules


# ---------------------------------------------------------------------------------------------- chat

_TOOL_PATH_FIXUPS = (
    (re.compile(r"^tools(\[\d+\])\.parameters_json"), r"tools\1.function.parameters"),
    (re.compile(r"^tools(\[\d+\])\.(name|description)"), r"tools\1.function.\2"),
    (re.compile(r"^(messages\[\d+\]\.tool_calls\[\d+\])\.arguments_json"), r"\1.function.arguments"),
    (re.compile(r"^(messages\[\d+\]\.tool_calls\[\d+\])\.name"), r"\1.function.name"),
)


def chat_param_of(req: ChatCompletionRequest):
    """The function mapping a backend's proto path onto this chat request's parameter."""
    max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    rules = sampling_paths(max_param, "top_logprobs", "messages")
    rules.update({"chat.messages": "messages", "chat.tools": "tools", "chat": "messages"})
    paths = ProtoPaths(rules, default="messages")

    def param_of(path: str) -> str | None:
        name = paths(path)
        for pattern, replacement in _TOOL_PATH_FIXUPS:
            name = pattern.sub(replacement, name) if name else name
        return name

    return param_of


def _content_text(message: ChatMessageIn, i: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise ApiError.unsupported(f"messages[{i}].content[{j}].type", f"{part.type!r} parts are not supported; "
                                       "this model reads text only")
        texts.append(part.text)
    return "".join(texts)


def _tool_call_to_proto(call) -> common_pb2.ToolCall:
    name = call.function.name
    kind = common_pb2.TOOL_KIND_INTERPRETER if name == "interpreter" else common_pb2.TOOL_KIND_PLUGIN
    return common_pb2.ToolCall(kind=kind, name=name, arguments_json=call.function.arguments, id=call.id)


def messages_to_proto(messages: list[ChatMessageIn]) -> list[common_pb2.ChatMessage]:
    out = []
    for i, m in enumerate(messages):
        role, name = m.role, m.name or ""
        if role == "developer":
            role = "system"
        elif role == "tool":
            # The tool's result: InternLM2's environment turn on the plugin channel.
            role, name = "environment", "plugin"
        message = common_pb2.ChatMessage(role=role, content=_content_text(m, i), name=name)
        message.tool_calls.extend(_tool_call_to_proto(call) for call in m.tool_calls or ())
        out.append(message)
    return out


def tools_to_proto(tools: list[ToolDef]) -> list[common_pb2.Tool]:
    return [
        common_pb2.Tool(
            name=t.function.name,
            description=t.function.description or "",
            parameters_json=json.dumps(t.function.parameters, ensure_ascii=False) if t.function.parameters else "",
        )
        for t in tools
    ]


def structured_output(req: ChatCompletionRequest):
    """``response_format`` -> StructuredOutput, or None for plain text."""
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return inference_pb2.StructuredOutput(json_object=True)
    if fmt.json_schema is None:
        raise ApiError.bad_param("response_format.json_schema", "is required when type is 'json_schema'")
    return inference_pb2.StructuredOutput(json_schema=json.dumps(fmt.json_schema.json_schema))


def chat_request(req: ChatCompletionRequest, request_cls=inference_pb2.GenerateStreamRequest):
    """A chat completion request -> GenerateRequest / GenerateStreamRequest."""
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError.bad_param("top_logprobs", "needs logprobs: true")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    sampling = sampling_params(req, max_tokens=max_tokens, logprobs=logprobs)
    constraint = structured_output(req)
    if constraint is not None:
        sampling.structured_output.CopyFrom(constraint)
    chat = inference_pb2.ChatInput(messages=messages_to_proto(req.messages))
    if req.tools and req.tool_choice != "none":
        chat.tools.extend(tools_to_proto(req.tools))
    if req.add_generation_prompt is not None:
        chat.add_generation_prompt = req.add_generation_prompt
    return request_cls(chat=chat, sampling=sampling)


# --------------------------------------------------------------------------------------- completions


def completion_prompts(req: CompletionRequest) -> list[dict]:
    """The prompt(s) of a text completion as GenerateRequest input fields: text or token ids."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if not prompt:
        raise ApiError.bad_param("prompt", "must not be empty")
    if all(isinstance(p, int) for p in prompt):
        return [{"token_ids": common_pb2.TokenIds(ids=prompt)}]
    if all(isinstance(p, str) for p in prompt):
        return [{"prompt": p} for p in prompt]
    return [{"token_ids": common_pb2.TokenIds(ids=p)} for p in prompt]


def completion_requests(req: CompletionRequest, request_cls=inference_pb2.GenerateStreamRequest) -> list:
    sampling = sampling_params(req, max_tokens=req.max_tokens, logprobs=req.logprobs)
    return [request_cls(sampling=sampling, **fields) for fields in completion_prompts(req)]


def completion_param_of(req: CompletionRequest):
    return ProtoPaths(sampling_paths("max_tokens", "logprobs", "prompt"), default="prompt")


# ---------------------------------------------------------------------------------- response objects


def choices_of(result) -> list:
    """GenerateResponse / GenerateFinal -> its per-sibling choices (the service always fills them)."""
    return list(result.choices)


def finish_reason(choice, tools_offered: bool) -> str:
    if choice.finish_reason == inference_pb2.FINISH_REASON_ERROR:
        raise ApiError(500, "the engine failed this request", code="engine_error")
    if tools_offered and choice.tool_calls:
        return "tool_calls"
    return FINISH_REASONS.get(choice.finish_reason, "stop")


def tool_calls_json(calls) -> list[dict]:
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json or "{}"}}
        for c in calls
    ]


def usage_json(usage: common_pb2.Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_text(piece: str) -> tuple[str, list[int]]:
    """A SentencePiece piece -> (its text, its UTF-8 bytes): "▁" is a space; a byte-fallback piece
    ("<0xE4>") is one raw byte, shown as OpenAI shows partial characters ("bytes:\\xe4")."""
    match = _BYTE_PIECE.match(piece)
    if match:
        value = int(match.group(1), 16)
        return (chr(value) if value < 0x80 else f"bytes:\\x{value:02x}"), [value]
    text = piece.replace("\u2581", " ")
    return text, list(text.encode("utf-8"))


def chat_logprobs(entries) -> dict:
    content = []
    for e in entries:
        text, raw = token_text(e.token)
        top = []
        for alt in e.top:
            alt_text, alt_raw = token_text(alt.token)
            top.append({"token": alt_text, "logprob": alt.logprob, "bytes": alt_raw})
        content.append({"token": text, "logprob": e.logprob, "bytes": raw, "top_logprobs": top})
    return {"content": content, "refusal": None}


def completion_logprobs(entries, offset: int = 0) -> dict:
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for e in entries:
        text, _ = token_text(e.token)
        tokens.append(text)
        token_logprobs.append(e.logprob)
        top_logprobs.append({token_text(a.token)[0]: a.logprob for a in e.top})
        text_offset.append(offset)
        offset += 0 if text.startswith("bytes:") else len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def chat_message(choice, tools_offered: bool) -> dict:
    calls = tool_calls_json(choice.tool_calls) if tools_offered else []
    if calls:
        return {"role": "assistant", "content": choice.content or None, "tool_calls": calls, "refusal": None}
    return {"role": "assistant", "content": choice.text, "refusal": None}


def chat_completion(response: inference_pb2.GenerateResponse, model: str, completion_id: str,
                    tools_offered: bool, logprobs: bool) -> dict:
    choices = []
    for c in choices_of(response):
        choices.append(
            {
                "index": c.index,
                "message": chat_message(c, tools_offered),
                "logprobs": chat_logprobs(c.logprobs) if logprobs else None,
                "finish_reason": finish_reason(c, tools_offered),
            }
        )
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_json(response.usage),
        "system_fingerprint": None,
    }
