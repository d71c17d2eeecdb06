"""InternLM2 tool calls: the structured form, how an assistant turn writes one, and how to parse them back.

The format follows InternLM's chat_format.md and lagent's ``Internlm2Protocol``::

    <|action_start|><|plugin|>\\n{"name": "get_weather", "parameters": {"city": "Shanghai"}}<|action_end|>\\n
    <|action_start|><|interpreter|>\\n```python\\nprint(1)\\n```<|action_end|>\\n

A plugin call's body is one JSON object with ``name`` and ``parameters``; an interpreter call's body is
the code itself, which :class:`ToolCall` carries as ``arguments == {"code": body}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .specials import ACTION_END, ACTION_START, EOS, IM_END, INTERPRETER, PLUGIN

ToolKind = Literal["plugin", "interpreter"]
INTERPRETER_NAME = "interpreter"
_KIND_TOKEN: dict[str, str] = {"plugin": PLUGIN, "interpreter": INTERPRETER}


@dataclass(frozen=True)
class ToolCall:
    """One call the assistant made.

    ``raw`` is the call's body exactly as written between the ``<|action_start|><|...|>\\n`` header and
    ``<|action_end|>`` (the JSON text, or the code); empty for calls built by hand.
    """

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    raw: str = ""
    kind: ToolKind = "plugin"

    def body(self) -> str:
        """The text written between the action header and ``<|action_end|>``."""
        if self.kind == "interpreter":
            return str(self.arguments.get("code", ""))
        return json.dumps({"name": self.name, "parameters": self.arguments}, ensure_ascii=False)


def action_header(kind: ToolKind) -> str:
    return f"{ACTION_START}{_KIND_TOKEN[kind]}\n"


ACTION_FOOTER = f"{ACTION_END}\n"


def coerce_tool_call(obj: Any, where: str) -> ToolCall:
    """Accept a :class:`ToolCall`, an OpenAI-style ``{"type": "function", "function": {...}}`` entry,
    a bare ``{"name", "arguments"|"parameters"}`` dict, or ``{"type": "interpreter", "code": ...}``.

    ``where`` names the field in error messages (e.g. ``messages[3].tool_calls[0]``).
    """
    if isinstance(obj, ToolCall):
        if obj.kind not in _KIND_TOKEN:
            raise ValueError(f"{where}.kind: must be 'plugin' or 'interpreter', got {obj.kind!r}")
        return obj
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: must be a ToolCall or a dict, got {type(obj).__name__}")
    if obj.get("type") == INTERPRETER_NAME or obj.get("kind") == INTERPRETER_NAME:
        code = obj.get("code", (obj.get("arguments") or {}).get("code"))
        if not isinstance(code, str):
            raise ValueError(f"{where}.code: an interpreter call needs its code as a string")
        return ToolCall(INTERPRETER_NAME, {"code": code}, kind="interpreter")
    fn = obj.get("function", obj)
    if not isinstance(fn, Mapping):
        raise ValueError(f"{where}.function: must be a dict")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name: a tool call needs a non-empty string name")
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}.arguments: not valid JSON: {e}") from e
    if not isinstance(args, Mapping):
        raise ValueError(f"{where}.arguments: must be a JSON object")
    return ToolCall(name, dict(args), kind="plugin")


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """Split generated assistant text (decoded with special tokens) into content and calls.

    Each well-formed ``<|action_start|><|plugin|>|<|interpreter|>\\n ... <|action_end|>`` span becomes
    a :class:`ToolCall` and is removed from the content together with the one newline that follows
    it. A call cut off by the end of generation (no ``<|action_end|>``) counts when its body is complete
    up to ``<|im_end|>`` or the end of text. A plugin body that is not a JSON object with a string
    ``name`` is not a call: its text stays in the content unchanged. A trailing stop marker
    (``<|im_end|>`` or ``</s>``) is dropped from the content.
    """
    content: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while (start := text.find(ACTION_START, pos)) >= 0:
        head = start + len(ACTION_START)
        kind = next((k for k, tok in _KIND_TOKEN.items() if text.startswith(tok, head)), None)
        if kind is None:  # a stray <|action_start|> is ordinary text
            content.append(text[pos:head])
            pos = head
            continue
        body_start = head + len(_KIND_TOKEN[kind])
        if text.startswith("\n", body_start):
            body_start += 1
        end = text.find(ACTION_END, body_start)
        if end >= 0:
            body, span_end = text[body_start:end], end + len(ACTION_END)
            if text.startswith("\n", span_end):
                span_end += 1
        else:
            stop = text.find(IM_END, body_start)
            stop = len(text) if stop < 0 else stop
            body, span_end = text[body_start:stop], stop
        call = _parse_body(kind, body)
        if call is None:
            content.append(text[pos:span_end])
        else:
            content.append(text[pos:start])
            calls.append(call)
        pos = span_end
    content.append(text[pos:])
    return _drop_stop_marker("".join(content)), calls


def _parse_body(kind: ToolKind, body: str) -> ToolCall | None:
    if kind == "interpreter":
        if not body.strip():
            return None
        return ToolCall(INTERPRETER_NAME, {"code": body}, raw=body, kind="interpreter")
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, RecursionError):  # generated text can nest without end: not a call
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("parameters", obj.get("arguments", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (json.JSONDecodeError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], args, raw=body, kind="plugin")


def _drop_stop_marker(text: str) -> str:
    stripped = text.rstrip()
    for marker in (IM_END, EOS):
        if stripped.endswith(marker):
            return stripped[: -len(marker)]
    return text
