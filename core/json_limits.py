"""JSON from requests, parsed with an explicit nesting bound: the one rule for every place that parses
client JSON (tool schemas and arguments in the services, JSON schemas of structured output in the engine).

``load_json`` measures how deep a document nests BEFORE parsing it (one linear pass over its brackets
outside strings), so ``json.loads`` never recurses past ``MAX_JSON_DEPTH`` levels. (Left to itself,
``json.loads`` of 100,000 nested brackets raises RecursionError deep inside the call.)
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

# Real tool schemas and arguments nest a handful of levels; 64 leaves room and keeps every
# recursive walk over a parsed document (this module's, json.dumps in the renderer) shallow.
MAX_JSON_DEPTH = 64

_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]++")
_BRACKET_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # as int8: +1 opens, -1 closes
_CHUNK = 1 << 22


class JsonDepthError(ValueError):
    """The document nests deeper than allowed."""


def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in ``text`` (brackets inside strings do not count).
    Linear time; the answer for malformed JSON is approximate, and ``json.loads`` rejects it anyway."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).encode("ascii")
    steps = np.frombuffer(brackets.translate(_BRACKET_STEP), dtype=np.int8)
    level = peak = 0
    for start in range(0, len(steps), _CHUNK):
        running = np.cumsum(steps[start : start + _CHUNK], dtype=np.int64) + level
        peak = max(peak, int(running.max()))
        level = int(running[-1])
    return peak


def load_json(text: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(text)``, refusing documents nested deeper than ``max_depth`` before parsing.
    Raises JsonDepthError or json.JSONDecodeError (both ValueErrors)."""
    depth = nesting_depth(text)
    if depth > max_depth:
        raise JsonDepthError(f"nested {depth} levels deep; at most {max_depth} are allowed")
    return json.loads(text)
