"""InternLM2 chat format: messages -> template text, kept as parts that say who wrote them.

Plain messages render exactly as the ``chat_template`` of internlm2-chat-7b::

    <s><|im_start|>{role}\\n{content}<|im_end|>\\n ... [<|im_start|>assistant\\n]

On top of that (InternLM chat_format.md, lagent's INTERNLM2_META / Internlm2Protocol):

- ``name`` on a message: ``<|im_start|>{role} name={name}\\n``; for system/assistant/environment the
  names ``plugin`` and ``interpreter`` become the ``<|plugin|>`` / ``<|interpreter|>`` tokens.
- ``tools``: a ``system name=<|plugin|>`` message holding the function list as JSON (indent 4), put
  right after a leading unnamed system message, else first.
- assistant ``tool_calls``: appended to the content as
  ``<|action_start|><|plugin|>\\n{json}<|action_end|>\\n``.

Rendering returns :class:`ChatPart` s so the tokenizer can keep message text from ever becoming
special tokens (prompt injection) while the template's own markers do.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .specials import ACTION_END, ACTION_START, BOS, IM_END, IM_START, INTERPRETER, PLUGIN
from .tool_calls import ACTION_FOOTER, action_header, coerce_tool_call

ROLES = ("system", "user", "assistant", "environment")
# Roles whose `name` may address a tool (lagent INTERNLM2_META); a user's name is written as is.
_TOOL_NAMED_ROLES = ("system", "assistant", "environment")
_NAME_TOKENS = {"plugin": PLUGIN, "interpreter": INTERPRETER, PLUGIN: PLUGIN, INTERPRETER: INTERPRETER}
# The official agent format writes an assistant's tool call inside its content; these markers are tokens
# there (``assistant_actions``), never in user or environment text.
ACTION_MARKERS = re.compile("(" + "|".join(map(re.escape, (ACTION_START, ACTION_END, PLUGIN, INTERPRETER))) + ")")


@dataclass(frozen=True)
class ChatPart:
    """A run of template text. ``trusted`` parts are the template's own markup: special-token names in
    them are tokens. Untrusted parts are caller data (content, names, tool JSON)."""

    text: str
    trusted: bool


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    tools: Sequence[Any] | None = None,
    assistant_actions: bool = False,
) -> list[ChatPart]:
    """Validate ``messages`` and render them; errors are ``ValueError`` naming the field.
    ``assistant_actions``: the action markers in assistant content (the official agent format,
    ``<|action_start|><|plugin|>...<|action_end|>``) are template markup, as ``get_score`` reads them."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages: must be a list of message dicts")
    msgs = [_validate_message(m, i) for i, m in enumerate(messages)]
    if tools:
        tool_msg = {"role": "system", "name": "plugin", "content": tools_json(tools), "tool_calls": []}
        at = 1 if msgs and msgs[0]["role"] == "system" and not msgs[0]["name"] else 0
        msgs.insert(at, tool_msg)

    parts = [ChatPart(BOS, True)]
    for m in msgs:
        parts.append(ChatPart(IM_START + m["role"], True))
        if m["name"]:
            token = _NAME_TOKENS.get(m["name"]) if m["role"] in _TOOL_NAMED_ROLES else None
            parts.append(ChatPart(" name=", True))
            parts.append(ChatPart(token, True) if token else ChatPart(m["name"], False))
        parts.append(ChatPart("\n", True))
        if assistant_actions and m["role"] == "assistant":
            parts += [ChatPart(chunk, i % 2 == 1) for i, chunk in enumerate(ACTION_MARKERS.split(m["content"]))]
        else:
            parts.append(ChatPart(m["content"], False))
        for call in m["tool_calls"]:
            parts.append(ChatPart(action_header(call.kind), True))
            parts.append(ChatPart(call.body(), False))
            parts.append(ChatPart(ACTION_FOOTER, True))
        parts.append(ChatPart(IM_END + "\n", True))
    if add_generation_prompt:
        parts.append(ChatPart(IM_START + "assistant\n", True))
    return [p for p in parts if p.text]


def tools_json(tools: Sequence[Any]) -> str:
    """The plugin system message: OpenAI ``{"type": "function", "function": f}`` entries unwrap to ``f``."""
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ValueError("tools: must be a list of function descriptions")
    functions = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ValueError(f"tools[{i}]: must be a dict")
        fn = tool.get("function", tool) if tool.get("type", "function") == "function" else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}]: needs a function with a non-empty string 'name'")
        functions.append(dict(fn))
    return json.dumps(functions, ensure_ascii=False, indent=4)


def _validate_message(m: Any, i: int) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, Mapping):
        raise ValueError(f"{where}: must be a dict, got {type(m).__name__}")
    role = m.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}.role: must be one of {', '.join(ROLES)}; got {role!r}")
    raw_calls = m.get("tool_calls") or []
    if raw_calls and role != "assistant":
        raise ValueError(f"{where}.tool_calls: only assistant messages carry tool calls")
    if isinstance(raw_calls, (str, bytes, Mapping)) or not isinstance(raw_calls, Sequence):
        raise ValueError(f"{where}.tool_calls: must be a list")
    calls = [coerce_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(raw_calls)]
    content = m.get("content")
    if content is None and calls:
        content = ""
    if not isinstance(content, str):
        raise ValueError(f"{where}.content: must be a string, got {type(content).__name__}")
    name = m.get("name") or ""
    if not isinstance(name, str):
        raise ValueError(f"{where}.name: must be a string")
    if "\n" in name:
        raise ValueError(f"{where}.name: must not contain a newline")
    return {"role": role, "content": content, "name": name, "tool_calls": calls}
