"""Error codes shared by every process, and one exception class per code.

A reply on the wire carries ``error: {code, message}``; :func:`error_from_wire` turns it back
into the matching exception so that a client sees the server's own words.
"""
from __future__ import annotations

from typing import Any

class LipsyncError(Exception):
    """Base of every error the cluster reports. ``code`` is a key of :data:`ERROR_CLASSES`."""

    code = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_wire(self) -> dict:
        wire = {"code": self.code, "message": self.message}
        if self.details:
            wire["details"] = self.details
        return wire


class BadRequest(LipsyncError):
    """The request is malformed: a field is missing, of the wrong type or out of range."""

    code = "bad_request"


class UnknownModel(LipsyncError):
    """No model with this id is configured."""

    code = "unknown_model"


class ModelLoadFailed(LipsyncError):
    """The model exists but could not be loaded (bad package, bad ONNX, unreadable frames)."""

    code = "model_load_failed"


class CapacityFull(LipsyncError):
    """The model does not fit in the worker's budget even after evicting what can be evicted."""

    code = "capacity_full"


class Overloaded(LipsyncError):
    """A queue is full; retry later (``details['retry_after_ms']`` when known)."""

    code = "overloaded"


class RequestTimeout(LipsyncError):
    """The request's deadline passed before it was answered."""

    code = "timeout"


class Unavailable(LipsyncError):
    """No broker or no worker answered."""

    code = "unavailable"


class Unauthorized(LipsyncError):
    """The caller's key is not allowed to do this."""

    code = "unauthorized"


class InternalError(LipsyncError):
    """A bug or an unexpected failure on the server side."""

    code = "internal"


ERROR_CLASSES: dict[str, type[LipsyncError]] = {
    cls.code: cls
    for cls in (BadRequest, UnknownModel, ModelLoadFailed, CapacityFull, Overloaded,
                RequestTimeout, Unavailable, Unauthorized, InternalError)
}


def error_from_wire(error: Any) -> LipsyncError:
    """Build the exception that matches a reply's ``error`` map (unknown codes become internal)."""
    if not isinstance(error, dict):
        return InternalError(f"malformed error in reply: {error!r}")
    code = error.get("code", "internal")
    cls = ERROR_CLASSES.get(code, InternalError)
    details = error.get("details") or {}
    exc = cls(str(error.get("message", code)), **(details if isinstance(details, dict) else {}))
    return exc
