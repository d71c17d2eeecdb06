"""JSON from requests: parsing with an explicit nesting bound, and a structural check of the JSON
Schemas that describe tool parameters.

``load_json`` measures how deep a document nests BEFORE parsing it (one linear pass over its
brackets outside strings), so ``json.loads`` never recurses past ``MAX_JSON_DEPTH`` levels and
``schema_problem``, the chat template and the prompt renderer never meet a deeper document. (Left
to itself, ``json.loads`` of 100,000 nested brackets raises RecursionError deep inside the call.)


Not a validator of the whole specification (that needs a meta-schema library the services do not
depend on): it checks the keywords a tool description actually uses (``type``, ``properties``,
``required``, ``items``, ``enum``, ``additionalProperties``, ``anyOf``/``oneOf``/``allOf``,
``description``) have the shape the specification gives them, so a schema the model could not make
sense of is refused with the path of the bad keyword instead of being rendered into the prompt.
Unknown keywords are allowed, as JSON Schema allows them.
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


TYPES = frozenset({"null", "boolean", "object", "array", "number", "string", "integer"})
_COMBINATORS = ("anyOf", "oneOf", "allOf")


def schema_problem(schema: Any, path: str = "") -> str | None:
    """None when ``schema`` is well formed, else "<path>: <what is wrong>" (path "" is the root)."""
    where = path or "(root)"
    if isinstance(schema, bool):  # true / false are schemas too (draft 6+)
        return None
    if not isinstance(schema, dict):
        return f"{where}: a schema must be an object or a boolean"
    if "type" in schema and not _valid_type(schema["type"]):
        return f"{_join(path, 'type')}: must be one of {sorted(TYPES)} or a list of them, got {schema['type']!r}"
    if "description" in schema and not isinstance(schema["description"], str):
        return f"{_join(path, 'description')}: must be a string"
    if "required" in schema:
        required = schema["required"]
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            return f"{_join(path, 'required')}: must be a list of property names"
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        return f"{_join(path, 'enum')}: must be a non-empty list"
    if "properties" in schema:
        properties = schema["properties"]
        if not isinstance(properties, dict):
            return f"{_join(path, 'properties')}: must be an object of schemas"
        for name, sub in properties.items():
            if problem := schema_problem(sub, _join(path, f"properties.{name}")):
                return problem
    for key in ("items", "additionalProperties"):
        if key in schema:
            subs = schema[key] if key == "items" and isinstance(schema[key], list) else [schema[key]]
            for i, sub in enumerate(subs):
                sub_path = _join(path, f"{key}[{i}]" if isinstance(schema[key], list) else key)
                if problem := schema_problem(sub, sub_path):
                    return problem
    for key in _COMBINATORS:
        if key in schema:
            subs = schema[key]
            if not isinstance(subs, list) or not subs:
                return f"{_join(path, key)}: must be a non-empty list of schemas"
            for i, sub in enumerate(subs):
                if problem := schema_problem(sub, _join(path, f"{key}[{i}]")):
                    return problem
    return None


def _valid_type(value: Any) -> bool:
    if isinstance(value, str):
        return value in TYPES
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, str) and v in TYPES for v in value)
        and len(set(value)) == len(value)
    )


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
