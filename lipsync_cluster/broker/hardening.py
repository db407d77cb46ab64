"""The broker's defences: security setup, message size, broken models, sane worker reports.

Kept apart from ``broker.py`` (which calls in at a few points) so the hot path stays readable:

* :func:`open_security` - the loopback rule and CurveZMQ/ZAP (``common/security.py``);
* :func:`check_message_size` - ZMQ_MAXMSGSIZE limits each *frame*; a multipart message whose
  frames are each under the limit can still be larger in total, which this refuses by name;
* :func:`catalog_reader` - the catalog as the broker sees it, broken packages included (with their
  ``error``) so a request for one gets ``model_load_failed`` and the reason, not ``unknown_model``;
* :func:`clean_stats` - a worker's ``stats`` report reduced to well-typed values before the broker
  keeps it (management answers and the stats snapshot are built from it; ``workers.StatsReport``);
* :func:`clean_event` - a worker's ``event``: a known kind about a valid model id, only the fields
  events have, each typed and bounded, before the broker keeps (last RECENT_EVENTS) and publishes it
  (``workers.ModelEvent``).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import zmq

from ..common import vocab
from ..common.errors import BadRequest
from ..common.infer_request import is_model_id
from ..common.model_package import public_reason
from ..common.security import BrokerSecurity, check_bind_allowed

_NUMBER = (int, float)

EVENT_NUMBERS = ("time", "load_ms", "memory_bytes", "usage_count")
MAX_EVENT_TEXT = 512        # characters of an event's reason (a worker's clients see short reasons too)
MAX_EVENT_MODELS = 1024     # entries of an event's loaded/loading lists


def open_security(config: Any, ctx: zmq.Context) -> BrokerSecurity:
    """Check the loopback rule and start the ZAP handler; raises ``SecurityError``."""
    security = getattr(config, "security", None)
    curve = bool(getattr(security, "curve", False))
    check_bind_allowed((("frontend", config.frontend), ("backend", config.backend),
                        ("stats", config.stats_endpoint)), curve)
    sec = BrokerSecurity(security)
    sec.start(ctx)
    return sec


def message_bytes(frames: list) -> int:
    total = 0
    for f in frames:
        try:
            total += len(f)
        except TypeError:
            total += memoryview(f).nbytes
    return total


def check_message_size(frames: list, max_bytes: int) -> None:
    """``frames``: the message without the ROUTER identity frame."""
    size = message_bytes(frames)
    if size > max_bytes:
        raise BadRequest(f"message is {size} bytes in {len(frames)} frames; the limit is "
                         f"{max_bytes} bytes (server.max_message_size_mb = {max_bytes // 2**20})",
                         size=size, limit=max_bytes)


def catalog_reader(catalog: Any) -> Callable[[], dict]:
    """``catalog.summary`` (rescanned on every call) plus broken packages marked with ``error``."""

    def read() -> dict:
        summary = catalog.summary(max_age_s=0)
        for model_id, reason in list(getattr(catalog, "errors", {}).items()):
            if is_model_id(model_id) and model_id not in summary:
                summary[model_id] = {"version": None, "preload": False, "num_frames": None,
                                     "memory_estimate_mb": None, "error": public_reason(str(reason))}
        return summary

    return read


def _num(value: Any) -> Any:
    return value if isinstance(value, _NUMBER) and not isinstance(value, bool) else None


# The worker's measured memory in its stats (worker/memory.py), in bytes (and a count).
MEMORY_BYTES = frozenset(vocab.MEM_STATS)


def clean_stats(header: dict) -> dict:
    """A worker's ``stats`` body with every value the broker reads of the right type.

    Unknown keys pass if they are scalars; ``models`` keeps only maps with a valid ``model_id``
    (their values: scalars only); the numbers the broker sums must be numbers.
    """
    out: dict = {}
    for key, value in header.items():
        if not isinstance(key, str):
            continue
        if key == "models":
            models = []
            for entry in value if isinstance(value, list) else ():
                if isinstance(entry, dict) and is_model_id(entry.get("model_id")):
                    models.append({k: v for k, v in entry.items() if isinstance(k, str)
                                   and (v is None or isinstance(v, (str, bool, int, float)))})
            out["models"] = models[:1024]
        elif key in ("memory_bytes", "max_memory_bytes", "max_models", "loaded_models", "in_flight",
                     "served", "total_memory_bytes"):
            number = _num(value)
            if number is not None and number >= 0:
                out[key] = number
        elif key in MEMORY_BYTES:  # byte counts the broker places by and exports: whole and >= 0
            if type(value) is int and value >= 0:
                out[key] = value
        elif value is None or isinstance(value, (str, bool, int, float)):
            out[key] = value
        elif isinstance(value, (list, dict)) and len(value) <= 1024:
            out[key] = value  # opaque extras (shown as sent); never summed
    return out


def clean_event(header: dict) -> Optional[dict]:
    """A worker's ``event`` as the broker keeps and publishes it, or None when it is not one.

    The kind must be one of ``vocab.MODEL_EVENTS`` and ``model_id`` a model id; the fields kept are
    the ones workers send: ``version`` and ``reason`` (text, cut to :data:`MAX_EVENT_TEXT`),
    finite non-negative numbers (:data:`EVENT_NUMBERS`), and ``loaded`` / ``loading`` (model ids,
    at most :data:`MAX_EVENT_MODELS`). Everything else is dropped, so an event costs the broker
    at most a few KiB however large the message was.
    """
    event, model = header.get("event"), header.get("model_id")
    if type(event) is not str or event not in vocab.MODEL_EVENTS or not is_model_id(model):
        return None
    body: dict = {"event": event, "model_id": model}
    for key in ("version", "reason"):
        value = header.get(key)
        if isinstance(value, str):
            body[key] = value[:MAX_EVENT_TEXT]
    for key in EVENT_NUMBERS:
        number = _num(header.get(key))
        if number is not None and 0 <= number < float("inf"):
            body[key] = number
    for key in ("loaded", "loading"):
        value = header.get(key)
        if isinstance(value, list):
            body[key] = [m for m in value[:MAX_EVENT_MODELS] if is_model_id(m)]
    return body
