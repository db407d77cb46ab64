"""The wire format: ``[b"LSC1", msgpack header, raw payload frames...]``.

Large data never goes inside msgpack. The header's ``tensors`` map names each payload frame:
``{"audio_features": {"frame": 0, "dtype": "float32", "shape": [5, 32, 16, 16]}}``, where
``frame`` counts from the first payload frame. Replies with images carry ``images``, a list
of per-image maps whose ``frame`` field names the payload frame holding the encoded bytes.

Client <-> broker ops: infer, list_models, load_model, unload_model, model_stats, health.
Broker <-> worker adds: ready, heartbeat, disconnect, event, reply (see ``worker/loop.py`` and
``broker/``).
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import msgpack
import numpy as np

from .errors import BadRequest

TAG = b"LSC1"

CLIENT_OPS = ("infer", "list_models", "load_model", "unload_model", "model_stats", "health")
WORKER_OPS = ("ready", "heartbeat", "disconnect", "event", "reply")

MODEL_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_]{0,63}$")

# dtypes a payload may carry; anything else is refused before it reaches numpy.
ALLOWED_DTYPES = ("float32", "float16", "int16", "uint8", "int32", "int64", "float64")


def pack_header(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def encode(header: dict, payloads: Sequence[Any] = ()) -> list:
    """Frames for ``socket.send_multipart``: tag, packed header, payloads as given (no copy)."""
    return [TAG, pack_header(header), *payloads]


def _as_bytes(frame: Any) -> bytes | memoryview:
    # zmq.Frame (copy=False) exposes .buffer; bytes pass through.
    buf = getattr(frame, "buffer", None)
    return buf if buf is not None else frame


def decode(frames: Sequence[Any]) -> tuple[dict, list]:
    """Split a received message into (header, payload frames).

    Raises :class:`BadRequest` naming what is wrong: the tag, the header's encoding, its type.
    """
    if len(frames) < 2:
        raise BadRequest(f"message has {len(frames)} frame(s); expected at least 2 (tag, header)")
    tag = bytes(_as_bytes(frames[0]))
    if tag != TAG:
        raise BadRequest(f"frame 0 (protocol tag) is {tag[:16]!r}; expected {TAG!r}")
    try:
        header = msgpack.unpackb(_as_bytes(frames[1]), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types; all mean the same to a caller
        raise BadRequest(f"frame 1 (header) is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise BadRequest(f"frame 1 (header) must be a msgpack map, got {type(header).__name__}")
    return header, list(frames[2:])


# --- tensors --------------------------------------------------------------------------


def attach_arrays(header: dict, arrays: dict[str, np.ndarray], first_frame: int = 0) -> list:
    """Describe ``arrays`` in ``header['tensors']`` and return their buffers as payload frames.

    ``first_frame`` is the index (among payload frames) where these arrays start, for messages
    that already carry other payloads.
    """
    tensors = header.setdefault("tensors", {})
    payloads = []
    for name, array in arrays.items():
        if array is None:
            continue
        array = np.ascontiguousarray(array)
        tensors[name] = {
            "frame": first_frame + len(payloads),
            "dtype": array.dtype.name,
            "shape": list(array.shape),
        }
        payloads.append(memoryview(array).cast("B") if array.size else b"")
    return payloads


def read_arrays(header: dict, payloads: Sequence[Any]) -> dict[str, np.ndarray]:
    """Turn the payload frames named in ``header['tensors']`` into read-only numpy arrays.

    Every fact is checked: the map's shape, the frame index, the dtype, and that the frame's
    byte size equals dtype size x product(shape). Errors name the tensor and the numbers.
    """
    tensors = header.get("tensors", {})
    if tensors is None:
        return {}
    if not isinstance(tensors, dict):
        raise BadRequest("field 'tensors' must be a map of name -> {frame, dtype, shape}")
    out: dict[str, np.ndarray] = {}
    for name, desc in tensors.items():
        field = f"tensors.{name}"
        if not isinstance(name, str) or not isinstance(desc, dict):
            raise BadRequest(f"field '{field}' must be a map with frame, dtype, shape")
        index, dtype, shape = desc.get("frame"), desc.get("dtype"), desc.get("shape")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(payloads):
            raise BadRequest(
                f"field '{field}.frame' is {index!r}; the message has {len(payloads)} payload frame(s)")
        if dtype not in ALLOWED_DTYPES:
            raise BadRequest(f"field '{field}.dtype' is {dtype!r}; allowed: {', '.join(ALLOWED_DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)):
            raise BadRequest(f"field '{field}.shape' must be a list of at most 8 non-negative ints, got {shape!r}")
        buf = _as_bytes(payloads[index])
        nbytes = memoryview(buf).nbytes
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if nbytes != expected:
            raise BadRequest(
                f"payload for '{name}' has {nbytes} bytes; dtype {dtype} x shape {shape} needs {expected}")
        out[name] = np.frombuffer(buf, dtype=dtype).reshape(shape) if expected else np.zeros(shape, dtype)
    return out


# --- field checks shared by broker and worker --------------------------------------------


def require_int(header: dict, field: str, lo: int, hi: int, default: int | None = None) -> int:
    value = header.get(field, default)
    if value is None:
        raise BadRequest(f"field '{field}' is required (an integer in {lo}..{hi})")
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadRequest(f"field '{field}' is {value!r}; expected an integer in {lo}..{hi}")
    return value


def require_model_id(header: dict, field: str = "model_id") -> str:
    value = header.get(field)
    if not isinstance(value, str) or not MODEL_ID_RE.match(value):
        raise BadRequest(
            f"field '{field}' is {value!r}; a model id matches {MODEL_ID_RE.pattern} "
            "(lowercase letters, digits, underscores)")
    return value


def require_choice(header: dict, field: str, choices: Iterable[str], default: str | None = None) -> str:
    choices = tuple(choices)
    value = header.get(field, default)
    if value not in choices:
        raise BadRequest(f"field '{field}' is {value!r}; expected one of {', '.join(choices)}")
    return value


def optional_number(header: dict, field: str, lo: float, hi: float) -> float | None:
    value = header.get(field)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadRequest(f"field '{field}' is {value!r}; expected a number in {lo}..{hi}")
    return value


def reply_header(request_id: Any, ok: bool = True, **fields: Any) -> dict:
    return {"id": request_id, "ok": ok, **fields}


def error_header(request_id: Any, error) -> dict:
    """A failure reply; ``error`` is a :class:`LipsyncError`."""
    return {"id": request_id, "ok": False, "error": error.to_wire()}
