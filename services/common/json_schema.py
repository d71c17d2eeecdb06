"""JSON from requests: parsing with an explicit nesting bound (``internlm2.core.json_limits``, the one
rule the engine shares, re-exported here), and a structural check of the JSON Schemas that describe tool
parameters. Because ``load_json`` refuses deep documents before parsing, ``schema_problem``, the chat
template and the prompt renderer never meet one.

Not a validator of the whole specification (that needs a meta-schema library the services do not
depend on): it checks the keywords a tool description actually uses (``type``, ``properties``,
``required``, ``items``, ``enum``, ``additionalProperties``, ``anyOf``/``oneOf``/``allOf``,
``description``) have the shape the specification gives them, so a schema the model could not make
sense of is refused with the path of the bad keyword instead of being rendered into the prompt.
Unknown keywords are allowed, as JSON Schema allows them.
"""

from __future__ import annotations

from typing import Any

from internlm2.core.json_limits import MAX_JSON_DEPTH, JsonDepthError, load_json, nesting_depth

__all__ = ["MAX_JSON_DEPTH", "JsonDepthError", "load_json", "nesting_depth", "schema_problem"]

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
