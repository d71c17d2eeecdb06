"""Requests protobuf cannot parse: find where, and answer INVALID_ARGUMENT naming that field.

gRPC parses a request before any servicer or interceptor code runs, and a parse failure there
(``DecodeError``: a string field that is not UTF-8, a truncated varint, nesting past protobuf's
recursion limit) would reach the client as UNKNOWN naming the exception class. ``DecodeInterceptor``
(``interceptors.py``) wraps the deserializer so a failure becomes an ``UndecodableRequest`` value,
refused once the call is authenticated (and a large request a ``PendingRequest``, parsed in a worker
thread rather than on the event loop); ``locate_decode_error`` walks the raw bytes against the
message descriptor to name the first bad field by its proto path (``conversations[0].messages[1].
content``), as every other field error does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf import descriptor as _descriptor

from .errors import ServiceError

# Protobuf's parser gives up past 100 nested messages. The walk runs only once parsing failed, so it
# may be a little stricter: the failure it names is then the depth, wherever the parser stopped.
MAX_MESSAGE_DEPTH = 90

_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LENGTH, _WIRE_START_GROUP, _WIRE_END_GROUP, _WIRE_FIXED32 = range(6)
_FD = _descriptor.FieldDescriptor


class _Corrupt(Exception):
    """The bytes at ``path`` are not a valid encoding; ``problem`` says what is wrong."""

    def __init__(self, path: str, problem: str):
        super().__init__(problem)
        self.path = path
        self.problem = problem


@dataclass(frozen=True)
class UndecodableRequest:
    """Stands in for a request gRPC could not parse; the call is refused with ``error()``."""

    message_name: str
    field: str
    problem: str

    def error(self) -> ServiceError:
        if self.field:
            return ServiceError.invalid_argument(self.field, self.problem, reason="MALFORMED_FIELD")
        return ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a valid {self.message_name} message: {self.problem}",
            reason="MALFORMED_REQUEST",
        )


# gRPC calls the deserializer on the event loop; parsing a request this large (a 30 MiB reward batch
# takes 25-60 ms) is left to a worker thread instead, so health checks are not kept waiting.
PARSE_OFF_LOOP_BYTES = 1 << 20


@dataclass(frozen=True)
class PendingRequest:
    """A large request's bytes, to be parsed (``parse()``) off the event loop."""

    data: bytes
    parse_bytes: Callable[[bytes], object]

    def parse(self):
        return self.parse_bytes(self.data)


def tolerant_deserializer(deserializer):
    """``deserializer`` (a generated ``Message.FromString``) returning an ``UndecodableRequest``
    instead of raising, and a ``PendingRequest`` for requests of ``PARSE_OFF_LOOP_BYTES`` or more."""
    message_cls = getattr(deserializer, "__self__", None)
    if not hasattr(message_cls, "DESCRIPTOR"):
        message_cls = None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, and anything else a parser raises on hostile bytes
            return describe(message_cls, data, exc)

    def deserialize(data: bytes):
        return PendingRequest(data, parse) if len(data) >= PARSE_OFF_LOOP_BYTES else parse(data)

    return deserialize


def describe(message_cls, data: bytes, exc: Exception) -> UndecodableRequest:
    name = message_cls.DESCRIPTOR.full_name if message_cls is not None else "request"
    if message_cls is not None:
        try:
            located = locate_decode_error(message_cls.DESCRIPTOR, data)
        except Exception:  # the refusal itself must never fail: fall back to the parser's words
            located = None
        if located is not None:
            return UndecodableRequest(name, *located)
    return UndecodableRequest(name, "", str(exc) or type(exc).__name__)


def locate_decode_error(descriptor, data: bytes) -> tuple[str, str] | None:
    """(proto path, problem) of the first field of ``data`` (a serialized ``descriptor`` message)
    that cannot be decoded; path "" when the message's own framing is broken; None if the walk finds
    nothing wrong (the parser objected to something this walk does not check)."""
    try:
        _walk(descriptor, memoryview(data), "", 0)
    except _Corrupt as corrupt:
        return corrupt.path, corrupt.problem
    return None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _varint(data: memoryview, pos: int, path: str) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise _Corrupt(path, "truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _Corrupt(path, "varint longer than 10 bytes")


# Too-deep nesting is blamed on the field near the top where it starts ("stages[0].config"), not on
# the 90-level path where the walk stopped.
_ANCHOR_DEPTH = 2


def _walk(descriptor, data: memoryview, path: str, depth: int, anchor: str = "") -> None:
    if depth <= _ANCHOR_DEPTH:
        anchor = path
    if depth > MAX_MESSAGE_DEPTH:
        raise _Corrupt(anchor, f"messages nested deeper than {MAX_MESSAGE_DEPTH} levels")
    counts: dict[int, int] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos, path)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Corrupt(path, "field number 0 is invalid")
        field = descriptor.fields_by_number.get(number)
        where = path
        if field is not None:
            where = _join(path, field.name)
            if field.is_repeated and wire == _WIRE_LENGTH and field.type in _LENGTH_TYPES:
                where = f"{where}[{counts.get(number, 0)}]"
                counts[number] = counts.get(number, 0) + 1
        if wire == _WIRE_VARINT:
            _, pos = _varint(data, pos, where)
        elif wire in (_WIRE_FIXED64, _WIRE_FIXED32):
            pos += 8 if wire == _WIRE_FIXED64 else 4
            if pos > len(data):
                raise _Corrupt(where, "truncated fixed-width value")
        elif wire == _WIRE_LENGTH:
            size, pos = _varint(data, pos, where)
            if pos + size > len(data):
                raise _Corrupt(where, f"length {size} runs past the end of the message")
            value = data[pos : pos + size]
            pos += size
            if field is not None:
                _check_value(field, value, where, depth, anchor)
        elif wire in (_WIRE_START_GROUP, _WIRE_END_GROUP):
            raise _Corrupt(where, "groups are not used by this API")
        else:
            raise _Corrupt(where, f"invalid wire type {wire}")


_LENGTH_TYPES = frozenset({_FD.TYPE_STRING, _FD.TYPE_BYTES, _FD.TYPE_MESSAGE})
_VARINT_TYPES = frozenset(
    {_FD.TYPE_INT32, _FD.TYPE_INT64, _FD.TYPE_UINT32, _FD.TYPE_UINT64, _FD.TYPE_SINT32, _FD.TYPE_SINT64}
    | {_FD.TYPE_BOOL, _FD.TYPE_ENUM}
)


def _check_value(field, value: memoryview, path: str, depth: int, anchor: str) -> None:
    if field.type == _FD.TYPE_STRING:
        try:
            bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Corrupt(path, f"not valid UTF-8 (byte {exc.start})") from None
    elif field.type == _FD.TYPE_MESSAGE:
        _walk(field.message_type, value, path, depth + 1, anchor)
    elif field.is_repeated and field.type in _VARINT_TYPES:  # packed: varints back to back
        pos = 0
        while pos < len(value):
            _, pos = _varint(value, pos, path)
