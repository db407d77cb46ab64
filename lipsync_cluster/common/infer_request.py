"""The request rules: the one owner of what a client request may say.

The broker, the worker and the client library all check requests with these functions, so they
can never disagree (a request the worker would refuse must be refused by the broker before it is
queued, routed, or makes a model load):

* model ids: :data:`MODEL_ID_RE`, :func:`is_model_id` (the whole string: ``"demo_ada\\n"`` is no id);
* limits and formats: :data:`FORMATS`, :data:`QUALITY_RANGE`, :data:`MAX_FRAME_INDEX`,
  :data:`MAX_PCM_SAMPLES`, :data:`MAX_DEADLINE_MS`, :data:`ALLOWED_DTYPES`;
* field checks naming the field and the limit: :func:`require_int`, :func:`require_choice`,
  :func:`optional_number`, :func:`require_model_id`, :func:`check_deadline`;
* tensors: :func:`check_tensors` (descriptors and byte sizes from the header alone) and
  :func:`read_arrays` (the same checks, then read-only numpy views); an ``infer`` names only
  :data:`INFER_TENSORS`;
* ``infer``: :func:`check_infer` checks everything that can be checked without reading tensor
  contents (the broker's per-request budget; PCM length included); :func:`parse_infer` is the
  worker's: the same checks, plus the arrays; :meth:`InferRequest.check_values` reads contents;
* :data:`BROKER_FIELDS`: header fields only the broker sets on the leg it sends a worker;
  :func:`strip_broker_fields` removes them from what a client sent.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from zmq import Frame as _Frame

from .errors import BadRequest
from .wire import frame_buffer

MODEL_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_]{0,63}$")  # always used with fullmatch (see is_model_id)
FORMATS = ("png", "jpeg", "raw", "patch")
# quality per format: png compression level; jpeg (and patch, a jpeg of the face) quality; raw ignores it
QUALITY_RANGE = {"png": (0, 9), "jpeg": (1, 100), "patch": (1, 100), "raw": (0, 100)}
MAX_BATCH_SIZE = 25            # the default of cluster.max_batch_size (the broker's own limit)
MAX_FRAME_INDEX = 2**31 - 1
PCM_SAMPLE_RATE = 16000
MAX_PCM_SECONDS = 60           # one request's audio; a stream sends a batch's span at a time
MAX_PCM_SAMPLES = PCM_SAMPLE_RATE * MAX_PCM_SECONDS
MAX_DEADLINE_MS = 3_600_000    # one hour
INFER_TENSORS = ("audio_features", "audio_pcm", "visual_frames")
# dtypes a payload may carry; anything else is refused before it reaches numpy.
ALLOWED_DTYPES = ("float32", "float16", "int16", "uint8", "int32", "int64", "float64")
_ITEMSIZE = {name: np.dtype(name).itemsize for name in ALLOWED_DTYPES}

# Set by the broker on each leg it sends a worker; a client's values are never forwarded.
BROKER_FIELDS = frozenset(("rid", "client_op", "queue_ms", "deadline", "deadline_left_ms",
                           "evict_hint", "model_version"))


def strip_broker_fields(header: dict) -> None:
    """Remove (in place) the fields only the broker may set; cheap when none is there."""
    if not BROKER_FIELDS.isdisjoint(header):
        for key in BROKER_FIELDS.intersection(header):
            del header[key]


# --- fields ---------------------------------------------------------------------------------


def is_model_id(value: Any) -> bool:
    return type(value) is str and MODEL_ID_RE.fullmatch(value) is not None


def require_model_id(header: dict, field: str = "model_id") -> str:
    value = header.get(field)
    if not is_model_id(value):
        raise BadRequest(
            f"field '{field}' is {value!r}; a model id matches {MODEL_ID_RE.pattern} "
            "(lowercase letters, digits, underscores)")
    return value


def require_int(header: dict, field: str, lo: int, hi: int, default: int | None = None) -> int:
    value = header.get(field, default)
    if value is None:
        raise BadRequest(f"field '{field}' is required (an integer in {lo}..{hi})")
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadRequest(f"field '{field}' is {value!r}; expected an integer in {lo}..{hi}")
    return value


def require_choice(header: dict, field: str, choices: Iterable[str], default: str | None = None) -> str:
    choices = tuple(choices)
    value = header.get(field, default)
    if type(value) is not str or value not in choices:  # a map or list is unhashable: type first
        raise BadRequest(f"field '{field}' is {value!r}; expected one of {', '.join(choices)}")
    return value


def optional_number(header: dict, field: str, lo: float, hi: float) -> float | None:
    value = header.get(field)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadRequest(f"field '{field}' is {value!r}; expected a number in {lo}..{hi}")
    return value


def check_quality(fmt: str, quality: Any) -> Optional[int]:
    """``quality`` for frames of format ``fmt`` (None: the format's default), by :data:`QUALITY_RANGE`:
    what a client checks up front, in the words the broker would use."""
    fmt = require_choice({"format": fmt}, "format", FORMATS)
    if quality is None:
        return None
    lo, hi = QUALITY_RANGE[fmt]
    return require_int({"quality": quality}, "quality", lo, hi)


def check_deadline(header: dict) -> Optional[float]:
    """``deadline_ms`` (optional, 1 ms .. 1 h) as seconds."""
    ms = header.get("deadline_ms")
    if ms is None:
        return None
    if type(ms) not in (int, float) or not 1 <= ms <= MAX_DEADLINE_MS:
        ms = optional_number(header, "deadline_ms", 1, MAX_DEADLINE_MS)  # raises, naming the field
    return ms / 1000.0


# --- tensors --------------------------------------------------------------------------------


def _nbytes(frame: Any) -> int:
    if isinstance(frame, memoryview):
        return frame.nbytes
    if isinstance(frame, (bytes, bytearray)) or hasattr(frame, "buffer"):
        return len(frame)  # zmq.Frame and bytes: their byte length
    return memoryview(frame).nbytes


def check_tensors(header: dict, payloads: Sequence[Any]) -> dict[str, tuple[str, list]]:
    """Every fact about ``header['tensors']`` that the header and the frame sizes tell, without
    reading any payload: the map's shape, each frame index, dtype (from :data:`ALLOWED_DTYPES`),
    shape (at most 8 non-negative ints) and that the frame's byte size is dtype x shape.

    Returns ``{name: (dtype, shape)}``. Runs on every request in the broker, so it stays in
    plain Python (no numpy call).
    """
    tensors = header.get("tensors", {})
    if tensors is None:
        return {}
    if not isinstance(tensors, dict):
        raise BadRequest("field 'tensors' must be a map of name -> {frame, dtype, shape}")
    out: dict[str, tuple[str, list]] = {}
    for name, desc in tensors.items():
        if not isinstance(name, str) or not isinstance(desc, dict):
            raise BadRequest(f"field 'tensors.{name}' must be a map with frame, dtype, shape")
        index, dtype, shape = desc.get("frame"), desc.get("dtype"), desc.get("shape")
        if type(index) is not int or not 0 <= index < len(payloads):
            raise BadRequest(
                f"field 'tensors.{name}.frame' is {index!r}; the message has {len(payloads)} payload frame(s)")
        itemsize = _ITEMSIZE.get(dtype) if isinstance(dtype, str) else None
        if itemsize is None:
            raise BadRequest(f"field 'tensors.{name}.dtype' is {dtype!r}; allowed: {', '.join(ALLOWED_DTYPES)}")
        if type(shape) is not list or len(shape) > 8:
            raise BadRequest(f"field 'tensors.{name}.shape' must be a list of at most 8 non-negative ints, "
                             f"got {shape!r}")
        for d in shape:
            if type(d) is not int or not 0 <= d < 2**31:
                raise BadRequest(f"field 'tensors.{name}.shape' must be a list of at most 8 non-negative ints, "
                                 f"got {shape!r}")
        frame = payloads[index]
        nbytes = len(frame) if type(frame) is _Frame else _nbytes(frame)  # a received frame: its length
        expected = math.prod(shape) * itemsize
        if nbytes != expected:
            raise BadRequest(
                f"payload for '{name}' has {nbytes} bytes; dtype {dtype} x shape {shape} needs {expected}")
        out[name] = (dtype, shape)
    return out


def read_arrays(header: dict, payloads: Sequence[Any]) -> dict[str, np.ndarray]:
    """The payload frames named in ``header['tensors']`` as read-only numpy arrays, after the
    checks of :func:`check_tensors` (errors name the tensor and the numbers)."""
    out: dict[str, np.ndarray] = {}
    for name, (dtype, shape) in check_tensors(header, payloads).items():
        buf = frame_buffer(payloads[header["tensors"][name]["frame"]])
        out[name] = np.frombuffer(buf, dtype=dtype).reshape(shape) if math.prod(shape) else np.zeros(shape, dtype)
    return out


def _check_dims(name: str, desc: tuple[str, list], dtypes: tuple[str, ...], shapes: list[tuple]) -> None:
    dtype, dims = desc
    if dtype not in dtypes:
        raise BadRequest(f"field 'tensors.{name}.dtype' is {dtype}; expected {' or '.join(dtypes)}")
    for shape in shapes:
        if len(shape) == len(dims) and all(s is None or s == d for s, d in zip(shape, dims)):
            return
    want = " or ".join("[" + ", ".join("N" if s is None else str(s) for s in shape) + "]" for shape in shapes)
    raise BadRequest(f"field 'tensors.{name}.shape' is {list(dims)}; expected {want}")


# --- infer ----------------------------------------------------------------------------------


def check_infer(header: dict, payloads: Sequence[Any], max_batch_size: int = MAX_BATCH_SIZE) -> int:
    """Check an ``infer`` header and its payload sizes, without reading tensor contents; returns
    the batch size. Raises :class:`BadRequest` naming the field and the limit.

    Runs on every request in the broker, so each field gets a cheap test first; only a failing
    field goes through the generic check, which words the error.
    """
    get = header.get
    model = get("model_id")
    if type(model) is not str or MODEL_ID_RE.fullmatch(model) is None:
        require_model_id(header)
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
    deadline = get("deadline_ms")
    if deadline is not None:
        check_deadline(header)
    arrays = check_tensors(header, payloads)
    if len(arrays) > 1 or (arrays and next(iter(arrays)) not in INFER_TENSORS):
        unknown = sorted(set(arrays) - set(INFER_TENSORS))
        if unknown:
            raise BadRequest(f"field 'tensors.{unknown[0]}' is not an infer input; expected one of "
                             + ", ".join(INFER_TENSORS))
    features, pcm = arrays.get("audio_features"), arrays.get("audio_pcm")
    if (features is None) == (pcm is None):
        raise BadRequest("field 'tensors' must carry exactly one audio source: 'audio_features' "
                         "[B,32,16,16] or 'audio_pcm' (16 kHz mono)" + (" (both given)" if features else ""))
    if features is not None:
        dims = features[1]
        if features[0] != "float32" or (dims != [batch, 32, 16, 16] and dims != [32, 16, 16]):
            _check_dims("audio_features", features, ("float32",), [(batch, 32, 16, 16), (32, 16, 16)])
    else:
        if pcm[0] not in ("float32", "int16") or len(pcm[1]) != 1:
            _check_dims("audio_pcm", pcm, ("float32", "int16"), [(None,)])
        samples = pcm[1][0]
        if not 0 < samples <= MAX_PCM_SAMPLES:
            raise BadRequest(f"field 'tensors.audio_pcm.shape' is [{samples}]; expected 1..{MAX_PCM_SAMPLES} "
                             f"samples ({MAX_PCM_SECONDS} s of {PCM_SAMPLE_RATE} Hz mono)")
    visual = arrays.get("visual_frames")
    if visual is not None and (visual[0] != "float32" or visual[1] != [batch, 6, 320, 320]):
        _check_dims("visual_frames", visual, ("float32",), [(batch, 6, 320, 320)])
    return batch


@dataclass
class InferRequest:
    model_id: str
    batch_size: int
    start_frame_idx: int
    format: str
    quality: Optional[int]
    deadline_ms: Optional[float]
    audio_features: Optional[np.ndarray] = None  # [B,32,16,16] or [32,16,16]
    audio_pcm: Optional[np.ndarray] = None  # 1-D, float32 in [-1,1] or int16
    audio_frame_offset: int = 0
    visual_frames: Optional[np.ndarray] = None  # [B,6,320,320]

    @property
    def frame_indices(self) -> list[int]:
        return list(range(self.start_frame_idx, self.start_frame_idx + self.batch_size))

    def check_values(self) -> None:
        """Reject NaN/inf in float tensors (they would silently become garbage frames)."""
        for name in ("audio_features", "visual_frames", "audio_pcm"):
            array = getattr(self, name)
            if array is not None and array.dtype.kind == "f" and not np.isfinite(array).all():
                raise BadRequest(f"tensor '{name}' contains NaN or infinite values")


def parse_infer(header: dict, payloads: Sequence[Any], max_batch_size: int = MAX_BATCH_SIZE) -> InferRequest:
    """The worker's reading of an ``infer``: :func:`check_infer`'s rules, then the arrays."""
    batch = check_infer(header, payloads, max_batch_size)
    tensors = read_arrays(header, payloads)
    start = header.get("start_frame_idx") or 0
    offset = header.get("audio_frame_offset")
    return InferRequest(model_id=header["model_id"], batch_size=batch, start_frame_idx=start,
                        format=header.get("format", "png"), quality=header.get("quality"),
                        deadline_ms=header.get("deadline_ms"),
                        audio_features=tensors.get("audio_features"), audio_pcm=tensors.get("audio_pcm"),
                        audio_frame_offset=start if offset is None or "audio_pcm" not in tensors else offset,
                        visual_frames=tensors.get("visual_frames"))
