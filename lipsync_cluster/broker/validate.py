"""Checks on client request headers, done by the broker before anything is queued.

Every failure raises :class:`BadRequest` (or :class:`UnknownModel`) naming the field, so a client
learns what to fix and the broker never forwards a request a worker would reject for its shape.
Tensor payloads are checked for size only (``protocol.read_arrays`` makes views, it does not read
the data); value checks such as NaNs are the worker's job.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from ..common.errors import BadRequest, UnknownModel
from ..common.protocol import (CLIENT_OPS, optional_number, read_arrays, require_choice,
                               require_int, require_model_id)

FORMATS = ("png", "jpeg", "raw", "patch")
QUALITY_RANGE = {"jpeg": (1, 100), "png": (0, 9), "raw": (0, 100), "patch": (0, 100)}
MAX_DEADLINE_MS = 24 * 3600 * 1000
MAX_FRAME_INDEX = 2**31 - 1

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
    model = require_model_id(header)
    if not known(model):
        raise UnknownModel(f"model {model!r} is not configured", model_id=model)
    return model


def check_deadline(header: dict) -> Optional[float]:
    """``deadline_ms`` (optional) as seconds."""
    ms = optional_number(header, "deadline_ms", 1, MAX_DEADLINE_MS)
    return None if ms is None else ms / 1000.0


def _check_dims(name: str, array: Any, dtypes: tuple[str, ...], shapes: list[tuple]) -> None:
    if array.dtype.name not in dtypes:
        raise BadRequest(f"field 'tensors.{name}.dtype' is {array.dtype.name}; expected {' or '.join(dtypes)}")
    for shape in shapes:
        if len(shape) == array.ndim and all(s is None or s == d for s, d in zip(shape, array.shape)):
            return
    want = " or ".join("[" + ",".join("N" if s is None else str(s) for s in shape) + "]" for shape in shapes)
    raise BadRequest(f"field 'tensors.{name}.shape' is {list(array.shape)}; expected {want}")


def check_infer(header: dict, payloads: list, max_batch_size: int) -> int:
    """Check an ``infer`` header (everything but ``model_id``); returns the batch size."""
    batch = require_int(header, "batch_size", 1, max_batch_size)
    require_int(header, "start_frame_idx", 0, MAX_FRAME_INDEX, default=0)
    if header.get("audio_frame_offset") is not None:
        require_int(header, "audio_frame_offset", -MAX_FRAME_INDEX, MAX_FRAME_INDEX)
    fmt = require_choice(header, "format", FORMATS, default="png")
    if header.get("quality") is not None:
        lo, hi = QUALITY_RANGE[fmt]
        require_int(header, "quality", lo, hi)
    arrays = read_arrays(header, payloads)
    has_features, has_pcm = "audio_features" in arrays, "audio_pcm" in arrays
    if has_features == has_pcm:
        raise BadRequest("field 'tensors' must carry exactly one audio source: 'audio_features' or 'audio_pcm'"
                         + (" (both given)" if has_features else ""))
    if has_features:
        _check_dims("audio_features", arrays["audio_features"], ("float32",),
                    [(batch, 32, 16, 16), (32, 16, 16)])
    else:
        _check_dims("audio_pcm", arrays["audio_pcm"], ("float32", "int16"), [(None,)])
        if arrays["audio_pcm"].shape[0] == 0:
            raise BadRequest("field 'tensors.audio_pcm.shape' is [0]; the audio is empty")
    if "visual_frames" in arrays:
        _check_dims("visual_frames", arrays["visual_frames"], ("float32",), [(batch, 6, 320, 320)])
    return batch


def check_load(header: dict) -> None:
    force = header.get("force_reload", False)
    if not isinstance(force, bool):
        raise BadRequest(f"field 'force_reload' is {force!r}; expected true or false")
    worker = header.get("worker")
    if worker is not None and (not isinstance(worker, str) or not worker):
        raise BadRequest(f"field 'worker' is {worker!r}; expected a worker name")
    if header.get("gpu") is not None:
        require_int(header, "gpu", 0, 4096)
