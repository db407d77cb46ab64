"""The broker's own checks on client request headers, done before anything is queued.

The envelope (``id``, ``op``), a model id the catalog knows, and ``load_model``'s options. The
request rules themselves (limits, formats, tensors, deadlines) are ``common/infer_request.py``'s,
the same the worker applies. Every failure raises :class:`BadRequest` (or :class:`UnknownModel`)
naming the field, so a client learns what to fix.
"""
from __future__ import annotations

from typing import Any, Callable

from ..common.errors import BadRequest, UnknownModel
from ..common.infer_request import require_int, require_model_id
from ..common.protocol import CLIENT_OPS

_SCALAR = (str, int, float, bytes, type(None))


def check_envelope(header: dict) -> tuple[Any, str]:
    """The fields every request needs: ``id`` and a known ``op``. Returns (id, op)."""
    if "id" not in header:
        raise BadRequest("field 'id' is required (any scalar; it is echoed in the reply)")
    cid = header["id"]
    if not isinstance(cid, _SCALAR):
        raise BadRequest(f"field 'id' must be a scalar (string, number, bytes), got {type(cid).__name__}")
    op = header.get("op")
    if op not in CLIENT_OPS:
        raise BadRequest(f"field 'op' is {op!r}; expected one of {', '.join(CLIENT_OPS)}")
    return cid, op


def check_model(header: dict, known: Callable[[str], bool]) -> str:
    return check_known(require_model_id(header), known)


def check_known(model: str, known: Callable[[str], bool]) -> str:
    """``model`` (a valid id) is in the catalog, else :class:`UnknownModel`."""
    if not known(model):
        raise UnknownModel(f"model {model!r} is not configured", model_id=model)
    return model


def check_load(header: dict) -> None:
    force = header.get("force_reload", False)
    if not isinstance(force, bool):
        raise BadRequest(f"field 'force_reload' is {force!r}; expected true or false")
    worker = header.get("worker")
    if worker is not None and (not isinstance(worker, str) or not worker):
        raise BadRequest(f"field 'worker' is {worker!r}; expected a worker name")
    if header.get("gpu") is not None:
        require_int(header, "gpu", 0, 4096)
