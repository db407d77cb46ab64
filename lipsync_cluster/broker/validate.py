"""Checks on client request headers, done by the broker before anything is queued.

Every failure raises :class:`BadRequest` (or :class:`UnknownModel`) naming the field, so a client
learns what to fix and the broker never forwards a request a worker would reject for its shape.
Tensor payloads are checked for size only (the rules of ``protocol.read_arrays``, without building
arrays or reading the data); value checks such as NaNs are the worker's job.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import math

import numpy as np

from ..common.errors import BadRequest, UnknownModel
from ..common.infer_request import FORMATS, MAX_FRAME_INDEX, QUALITY_RANGE
from ..common.protocol import (ALLOWED_DTYPES, CLIENT_OPS, optional_number, require_choice,
                               require_int, require_model_id)

MAX_DEADLINE_MS = 24 * 3600 * 1000

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
    ms = header.get("deadline_ms")
    if ms is None:
        return None
    if type(ms) not in (int, float) or not 1 <= ms <= MAX_DEADLINE_MS:
        ms = optional_number(header, "deadline_ms", 1, MAX_DEADLINE_MS)  # raises, naming the field
    return ms / 1000.0


_ITEMSIZE = {name: np.dtype(name).itemsize for name in ALLOWED_DTYPES}


def _nbytes(frame: Any) -> int:
    if isinstance(frame, memoryview):
        return frame.nbytes
    return len(frame)  # zmq.Frame and bytes: their byte length


def check_tensors(header: dict, payloads: list) -> dict[str, tuple[str, list]]:
    """The checks of ``protocol.read_arrays`` (same rules, same messages) without building arrays.

    Returns ``{name: (dtype, shape)}``. The broker runs this on every request, so it stays in
    plain Python: no numpy call, and the payload bytes are never read.
    """
    tensors = header.get("tensors", {})
    if tensors is None:
        return {}
    if not isinstance(tensors, dict):
        raise BadRequest("field 'tensors' must be a map of name -> {frame, dtype, shape}")
    out: dict[str, tuple[str, list]] = {}
    for name, desc in tensors.items():
        field = f"tensors.{name}"
        if not isinstance(name, str) or not isinstance(desc, dict):
            raise BadRequest(f"field '{field}' must be a map with frame, dtype, shape")
        index, dtype, shape = desc.get("frame"), desc.get("dtype"), desc.get("shape")
        if type(index) is not int or not 0 <= index < len(payloads):
            raise BadRequest(
                f"field '{field}.frame' is {index!r}; the message has {len(payloads)} payload frame(s)")
        itemsize = _ITEMSIZE.get(dtype) if isinstance(dtype, str) else None
        if itemsize is None:
            raise BadRequest(f"field '{field}.dtype' is {dtype!r}; allowed: {', '.join(ALLOWED_DTYPES)}")
        if type(shape) is not list or len(shape) > 8:
            raise BadRequest(f"field '{field}.shape' must be a list of at most 8 non-negative ints, got {shape!r}")
        for d in shape:
            if type(d) is not int or not 0 <= d < 2**31:
                raise BadRequest(f"field '{field}.shape' must be a list of at most 8 non-negative ints, got {shape!r}")
        nbytes = _nbytes(payloads[index])
        expected = math.prod(shape) * itemsize
        if nbytes != expected:
            raise BadRequest(
                f"payload for '{name}' has {nbytes} bytes; dtype {dtype} x shape {shape} needs {expected}")
        out[name] = (dtype, shape)
    return out


def _check_dims(name: str, desc: tuple[str, list], dtypes: tuple[str, ...], shapes: list[tuple]) -> None:
    dtype, dims = desc
    if dtype not in dtypes:
        raise BadRequest(f"field 'tensors.{name}.dtype' is {dtype}; expected {' or '.join(dtypes)}")
    for shape in shapes:
        if len(shape) == len(dims) and all(s is None or s == d for s, d in zip(shape, dims)):
            return
    want = " or ".join("[" + ",".join("N" if s is None else str(s) for s in shape) + "]" for shape in shapes)
    raise BadRequest(f"field 'tensors.{name}.shape' is {list(dims)}; expected {want}")


def check_infer(header: dict, payloads: list, max_batch_size: int) -> int:
    """Check an ``infer`` header (everything but ``model_id``); returns the batch size.

    Runs on every request, so each field gets a cheap test first; only a failing field goes
    through the generic check, which words the error.
    """
    get = header.get
    batch = get("batch_size")
    if type(batch) is not int or not 1 <= batch <= max_batch_size:
        require_int(header, "batch_size", 1, max_batch_size)
    start = get("start_frame_idx")
    if start is not None and (type(start) is not int or not 0 <= start <= MAX_FRAME_INDEX):
        require_int(header, "start_frame_idx", 0, MAX_FRAME_INDEX)
    offset = get("audio_frame_offset")
    if offset is not None and (type(offset) is not int or not 0 <= offset <= MAX_FRAME_INDEX):
        require_int(header, "audio_frame_offset", 0, MAX_FRAME_INDEX)
    fmt = get("format", "png")
    if type(fmt) is not str or fmt not in QUALITY_RANGE:  # a map or list is unhashable: check first
        require_choice(header, "format", FORMATS, default="png")
    quality = get("quality")
    if quality is not None:
        lo, hi = QUALITY_RANGE[fmt]
        if type(quality) is not int or not lo <= quality <= hi:
            require_int(header, "quality", lo, hi)
    arrays = check_tensors(header, payloads)
    features, pcm = arrays.get("audio_features"), arrays.get("audio_pcm")
    if (features is None) == (pcm is None):
        raise BadRequest("field 'tensors' must carry exactly one audio source: 'audio_features' or 'audio_pcm'"
                         + (" (both given)" if features is not None else ""))
    if features is not None:
        dims = features[1]
        if features[0] != "float32" or (dims != [batch, 32, 16, 16] and dims != [32, 16, 16]):
            _check_dims("audio_features", features, ("float32",), [(batch, 32, 16, 16), (32, 16, 16)])
    else:
        if pcm[0] not in ("float32", "int16") or len(pcm[1]) != 1:
            _check_dims("audio_pcm", pcm, ("float32", "int16"), [(None,)])
        if pcm[1][0] == 0:
            raise BadRequest("field 'tensors.audio_pcm.shape' is [0]; the audio is empty")
    visual = arrays.get("visual_frames")
    if visual is not None and (visual[0] != "float32" or visual[1] != [batch, 6, 320, 320]):
        _check_dims("visual_frames", visual, ("float32",), [(batch, 6, 320, 320)])
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
