"""Errors the engine raises to its callers; the services map them onto gRPC status codes."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request the engine will never run as given (-> INVALID_ARGUMENT). ``field`` names the culprit."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class DuplicateRequestError(InvalidRequestError):
    """A request id that is already live in this engine (-> ALREADY_EXISTS); the live one is untouched."""

    def __init__(self, request_id: str):
        super().__init__("request_id", f"{request_id!r} is already running")
        self.request_id = request_id


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (-> RESOURCE_EXHAUSTED); retrying later may succeed."""


class EngineClosedError(RuntimeError):
    """The engine was shut down; no new requests are taken (-> UNAVAILABLE)."""
