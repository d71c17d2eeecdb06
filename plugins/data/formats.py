"""The JSONL record formats of training data, validated (documented with examples in FORMATS.md).

    text        {"text": str}
    chat (SFT)  {"messages": [{"role", "content", "loss"?: bool, "name"?, "tool_calls"?}, ...]}
    preference  {"prompt": [messages], "chosen": [messages], "rejected": [messages], "condition"?: str}

Errors are :class:`DataFormatError` naming file, line and field: ``chat.jsonl:3: messages[1].role: ...``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant", "environment")
FORMATS_DOC = Path(__file__).with_name("FORMATS.md")


class DataFormatError(ValueError):
    def __init__(self, where: str, field: str, message: str):
        super().__init__(f"{where}: {field}: {message}")
        self.where, self.field = where, field


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields ``("file:line", record)`` for each non-blank line."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(where, "line", f"invalid JSON: {exc}") from None
            if not isinstance(record, dict):
                raise DataFormatError(where, "line", "must be a JSON object")
            yield where, record


def check_text(record: Mapping[str, Any], where: str) -> str:
    text = record.get("text")
    if not isinstance(text, str) or not text:
        raise DataFormatError(where, "text", "must be a non-empty string")
    return text


def check_messages(messages: Any, where: str, field: str = "messages") -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(where, field, "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        f = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise DataFormatError(where, f, "must be an object {role, content}")
        if m.get("role") not in ROLES:
            raise DataFormatError(where, f"{f}.role", f"must be one of {ROLES}, got {m.get('role')!r}")
        if not isinstance(m.get("content", ""), str):
            raise DataFormatError(where, f"{f}.content", "must be a string")
        if "loss" in m and not isinstance(m["loss"], bool):
            raise DataFormatError(where, f"{f}.loss", "must be true or false")
        out.append(m)
    return out


def check_chat(record: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    messages = check_messages(record.get("messages"), where)
    if not any(m["role"] == "assistant" and m.get("loss", True) for m in messages):
        raise DataFormatError(where, "messages", "no assistant turn with loss (nothing to learn)")
    return messages


def check_preference(record: Mapping[str, Any], where: str) -> dict[str, Any]:
    out = {k: check_messages(record.get(k), where, k) for k in ("prompt", "chosen", "rejected")}
    condition = record.get("condition")
    if condition is not None and not isinstance(condition, str):
        raise DataFormatError(where, "condition", "must be a string (a domain or a system prompt)")
    out["condition"] = condition
    return out


def load_chat(path: str | os.PathLike) -> list[list[dict[str, Any]]]:
    return [check_chat(r, w) for w, r in read_jsonl(path)]


def load_preferences(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [check_preference(r, w) for w, r in read_jsonl(path)]
