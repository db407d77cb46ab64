"""What the client returns: plain dataclasses built from reply headers and payload frames."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from ..common.errors import InternalError
from ..common.extras import MissingExtra
from ..common.protocol import attach_arrays


@dataclass
class InferResult:
    model_id: str
    model_version: str
    format: str
    frames: list  # bytes (png/jpeg/patch) or np.ndarray uint8 BGR (raw)
    frame_indices: list[int]
    background_indices: list[int]
    rects: list[list[int]]
    timings: dict
    model_loaded: bool
    model_load_ms: float
    worker: str
    header: dict = field(repr=False, default_factory=dict)

    def image(self, i: int) -> np.ndarray:
        """Frame ``i`` as a BGR uint8 array (decodes png/jpeg/patch; raw is returned as is)."""
        return decode_image(self.frames[i], self.format, f"frame {i} of the reply")


def decode_image(frame: Any, fmt: str, what: str) -> np.ndarray:
    """An encoded frame (png/jpeg/patch bytes) as a BGR uint8 array; a raw frame is returned as is.

    Decoding needs OpenCV, which a plain install does not bring: ask for ``format="raw"`` there, or
    install the 'tools' extra.
    """
    if isinstance(frame, np.ndarray):
        return frame
    try:
        import cv2
    except ModuleNotFoundError:
        raise MissingExtra(f"decoding {fmt} frames", "tools", "cv2") from None
    image = cv2.imdecode(np.frombuffer(frame, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise InternalError(f"{what} is not a decodable {fmt} image")
    return image


def _buffer(frame: Any) -> Any:
    return getattr(frame, "buffer", frame)


def infer_result(header: dict, payloads: Sequence[Any]) -> InferResult:
    images = header.get("images") or []
    fmt = header.get("format", "png")
    frames: list = []
    for info in images:
        data = _buffer(payloads[info["frame"]])
        if fmt == "raw":
            frames.append(np.frombuffer(data, np.uint8).reshape(info["shape"]))
        else:
            frames.append(bytes(data))
    return InferResult(
        model_id=header.get("model_id", ""),
        model_version=header.get("model_version", ""),
        format=fmt,
        frames=frames,
        frame_indices=[int(i["index"]) for i in images],
        background_indices=[int(i["background_index"]) for i in images],
        rects=[list(i.get("rect", [])) for i in images],
        timings=dict(header.get("timings") or {}),
        model_loaded=bool(header.get("model_loaded", False)),
        model_load_ms=float(header.get("model_load_ms", 0.0)),
        worker=str(header.get("worker", "")),
        header=header,
    )


def infer_request(model_id: str, *, start_frame_idx: int = 0, batch_size: Optional[int] = None,
                  audio_features: Optional[np.ndarray] = None, audio_pcm: Optional[np.ndarray] = None,
                  audio_frame_offset: Optional[int] = None, visual_frames: Optional[np.ndarray] = None,
                  format: str = "png", quality: Optional[int] = None,
                  deadline_ms: Optional[float] = None) -> tuple[dict, list]:
    """The header and payload frames of an ``infer`` request (the id is set by the transport)."""
    if batch_size is None:
        if audio_features is not None and np.ndim(audio_features) == 4:
            batch_size = int(np.shape(audio_features)[0])
        elif visual_frames is not None:
            batch_size = int(np.shape(visual_frames)[0])
        else:
            batch_size = 1
    header: dict = {"op": "infer", "model_id": model_id, "batch_size": int(batch_size),
                    "start_frame_idx": int(start_frame_idx), "format": format}
    if quality is not None:
        header["quality"] = int(quality)
    if deadline_ms is not None:
        header["deadline_ms"] = deadline_ms
    if audio_frame_offset is not None:
        header["audio_frame_offset"] = int(audio_frame_offset)
    arrays = {}
    if audio_features is not None:
        arrays["audio_features"] = np.asarray(audio_features, dtype=np.float32)
    if audio_pcm is not None:
        pcm = np.asarray(audio_pcm)
        arrays["audio_pcm"] = pcm if pcm.dtype == np.int16 else pcm.astype(np.float32, copy=False)
    if visual_frames is not None:
        arrays["visual_frames"] = np.asarray(visual_frames, dtype=np.float32)
    payloads = attach_arrays(header, arrays)
    return header, payloads
