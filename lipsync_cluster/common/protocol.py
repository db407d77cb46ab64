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

from typing import Any, Sequence

import msgpack
import numpy as np

# The request rules (model ids, dtypes, field and tensor checks) live in infer_request.py; these
# names are re-exported for the modules that read them with the wire format.
from .infer_request import (ALLOWED_DTYPES, MODEL_ID_RE, is_model_id, optional_number,  # noqa: F401
                            read_arrays, require_choice, require_int, require_model_id)
from .wire import TAG, read_header  # noqa: F401 - TAG is the protocol's, re-exported

CLIENT_OPS = ("infer", "list_models", "load_model", "unload_model", "model_stats", "health")


def pack_header(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def encode(header: dict, payloads: Sequence[Any] = ()) -> list:
    """Frames for ``socket.send_multipart``: tag, packed header, payloads as given (no copy)."""
    return [TAG, pack_header(header), *payloads]


def decode(frames: Sequence[Any], max_header_bytes: int = 0) -> tuple[dict, list]:
    """Split a received message into (header, payload frames).

    Raises :class:`BadRequest` naming what is wrong: the tag, the header's size (when
    ``max_header_bytes`` is given), its encoding, its type (``wire.read_header``).
    """
    return read_header(frames, 0, max_header_bytes), list(frames[2:])


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
