"""Chat messages, tools and tool calls between protobuf (``internlm2.v1``) and the core's dicts.

Field paths in errors are proto paths relative to the request (``chat.messages[2].role``), so a
client can point at the exact field; the core's own ValueErrors ("messages[2].role: ...") are
re-rooted with the same prefix.
"""

from __future__ import annotations

import json
import re
from typing import Any

from internlm2.v1 import common_pb2

from .errors import ServiceError
from .json_schema import JsonDepthError, load_json, schema_problem

_TOOL_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w]*(?:\[\d+\])?(?:\.[A-Za-z_][\w]*(?:\[\d+\])?)*): (.*)$", re.S)


def join_path(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix else path


def core_value_error(exc: Exception, prefix: str = "", default_field: str = "") -> ServiceError:
    """A core ValueError whose message starts with a field path ("messages[1].role: ...") ->
    INVALID_ARGUMENT naming ``prefix`` + that path; otherwise naming ``default_field``."""
    text = str(exc)
    match = _FIELD_PREFIX.match(text)
    if match:
        return ServiceError.invalid_argument(join_path(prefix, match.group(1)), match.group(2))
    return ServiceError.invalid_argument(
        join_path(prefix, default_field) if default_field else prefix or "request", text
    )


def json_field(text: str, path: str, default: Any) -> Any:
    """A JSON-text field of a request (``default`` when blank), with the nesting bound of
    ``json_schema.load_json``; malformed or too deep -> INVALID_ARGUMENT naming ``path``."""
    if not text.strip():
        return default
    try:
        return load_json(text)
    except JsonDepthError as exc:
        raise ServiceError.invalid_argument(path, f"JSON {exc}") from None
    except json.JSONDecodeError as exc:
        raise ServiceError.invalid_argument(path, f"not valid JSON: {exc}") from None


def tool_call_from_proto(call: common_pb2.ToolCall, path: str) -> dict:
    arguments = json_field(call.arguments_json, f"{path}.arguments_json", {})
    if not isinstance(arguments, dict):
        raise ServiceError.invalid_argument(f"{path}.arguments_json", "must be a JSON object")
    if call.kind == common_pb2.TOOL_KIND_INTERPRETER:
        code = arguments.get("code")
        if not isinstance(code, str):
            raise ServiceError.invalid_argument(f"{path}.arguments_json", 'an interpreter call needs {"code": "..."}')
        return {"type": "interpreter", "code": code}
    if not call.name:
        raise ServiceError.invalid_argument(f"{path}.name", "a plugin call needs a name")
    return {"name": call.name, "arguments": arguments}


def messages_from_proto(messages, prefix: str = "messages", *, required: bool = True) -> list[dict]:
    """Repeated ChatMessage -> the core's message dicts. Roles are checked by the core."""
    if required and not messages:
        raise ServiceError.invalid_argument(prefix, "at least one message is required")
    out = []
    for i, m in enumerate(messages):
        path = f"{prefix}[{i}]"
        message = {"role": m.role, "content": m.content}
        if m.name:
            message["name"] = m.name
        if m.tool_calls:
            message["tool_calls"] = [
                tool_call_from_proto(c, f"{path}.tool_calls[{j}]") for j, c in enumerate(m.tool_calls)
            ]
        out.append(message)
    return out


def tools_from_proto(tools, prefix: str = "tools") -> list[dict]:
    out = []
    for i, tool in enumerate(tools):
        path = f"{prefix}[{i}]"
        if not _TOOL_NAME.fullmatch(tool.name):
            raise ServiceError.invalid_argument(f"{path}.name", "must match [A-Za-z0-9_.-]+")
        parameters = json_field(tool.parameters_json, f"{path}.parameters_json", {})
        if not isinstance(parameters, dict):
            raise ServiceError.invalid_argument(f"{path}.parameters_json", "must be a JSON Schema object")
        if problem := schema_problem(parameters):
            raise ServiceError.invalid_argument(f"{path}.parameters_json", f"not a valid JSON Schema: {problem}")
        # Key order is prompt text: name, description, parameters, as the client wrote it (OpenAI's and
        # lagent's order, which InternLM2-chat was trained on) and as the core renders a tool dict.
        entry = {"name": tool.name}
        if tool.description:
            entry["description"] = tool.description
        entry["parameters"] = parameters
        out.append(entry)
    return out


def tool_calls_to_proto(calls) -> list[common_pb2.ToolCall]:
    """The core's parsed ToolCalls -> proto, with ids call_0, call_1, ..."""
    out = []
    for i, call in enumerate(calls):
        kind = common_pb2.TOOL_KIND_INTERPRETER if call.kind == "interpreter" else common_pb2.TOOL_KIND_PLUGIN
        out.append(
            common_pb2.ToolCall(
                kind=kind,
                name=call.name,
                raw=call.raw,
                id=f"call_{i}",
                arguments_json=json.dumps(call.arguments, ensure_ascii=False),
            )
        )
    return out
