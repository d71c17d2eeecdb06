"""The request id of the call being served, visible to every coroutine the call runs.

Set by ``RequestIdInterceptor`` from the client's ``x-request-id`` header (or a new uuid), read by
the JSON log formatter and by servicers that need an id (the inference engine's request id).
"""

from __future__ import annotations

import contextvars
import uuid

REQUEST_ID_KEY = "x-request-id"

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("internlm2_request_id", default=None)


def current_request_id() -> str | None:
    return _request_id.get()


def set_request_id(request_id: str) -> contextvars.Token:
    return _request_id.set(request_id)


def reset_request_id(token: contextvars.Token) -> None:
    _request_id.reset(token)


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_from_metadata(metadata) -> str | None:
    """The client's ``x-request-id`` if it sent a usable one (printable, at most 128 chars)."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and 0 < len(value) <= 128 and value.isprintable():
            return value
    return None
