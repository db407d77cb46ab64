"""The ``infer`` request: its fields, their limits, and the checks both broker and worker apply.

``parse_infer`` checks everything that can be checked without reading tensor contents (cheap,
for the broker); ``InferRequest.check_values`` checks contents (NaN/inf; the worker's job).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from .errors import BadRequest
from .protocol import optional_number, read_arrays, require_choice, require_int, require_model_id

FORMATS = ("png", "jpeg", "raw", "patch")
# quality per format: png compression level; jpeg (and patch, a jpeg of the face) quality; raw ignores it
QUALITY_RANGE = {"png": (0, 9), "jpeg": (1, 100), "patch": (1, 100), "raw": (0, 100)}
MAX_FRAME_INDEX = 2**31 - 1
MAX_PCM_SECONDS = 60  # one request's audio; a stream sends a batch's span at a time


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


def parse_infer(header: dict, payloads: Sequence[Any], max_batch_size: int = 25) -> InferRequest:
    model_id = require_model_id(header)
    batch = require_int(header, "batch_size", 1, max_batch_size)
    start = require_int(header, "start_frame_idx", 0, MAX_FRAME_INDEX, default=0)
    fmt = require_choice(header, "format", FORMATS, default="png")
    quality = header.get("quality")
    if quality is not None:
        quality = require_int(header, "quality", *QUALITY_RANGE[fmt])
    deadline = optional_number(header, "deadline_ms", 1, 3_600_000)
    tensors = read_arrays(header, payloads)
    unknown = sorted(set(tensors) - {"audio_features", "audio_pcm", "visual_frames"})
    if unknown:
        raise BadRequest(f"tensor '{unknown[0]}' is not an infer input; expected audio_features, audio_pcm, visual_frames")
    features, pcm, visual = tensors.get("audio_features"), tensors.get("audio_pcm"), tensors.get("visual_frames")
    if (features is None) == (pcm is None):
        raise BadRequest("give exactly one audio source: tensor 'audio_features' [B,32,16,16] or 'audio_pcm' (16 kHz mono)")
    if features is not None:
        if features.dtype != np.float32:
            raise BadRequest(f"tensor 'audio_features' must be float32, got {features.dtype}")
        if tuple(features.shape) not in ((batch, 32, 16, 16), (32, 16, 16)):
            raise BadRequest(f"tensor 'audio_features' has shape {list(features.shape)}; "
                             f"expected [{batch}, 32, 16, 16] (batch_size={batch}) or [32, 16, 16]")
    offset = start
    if pcm is not None:
        if pcm.dtype not in (np.float32, np.int16):
            raise BadRequest(f"tensor 'audio_pcm' must be float32 or int16, got {pcm.dtype}")
        if pcm.ndim != 1 or not 0 < pcm.shape[0] <= 16000 * MAX_PCM_SECONDS:
            raise BadRequest(f"tensor 'audio_pcm' must be 1-D with 1..{16000 * MAX_PCM_SECONDS} samples "
                             f"(16 kHz mono), got shape {list(pcm.shape)}")
        offset = require_int(header, "audio_frame_offset", 0, MAX_FRAME_INDEX, default=start)
    if visual is not None:
        if visual.dtype != np.float32 or tuple(visual.shape) != (batch, 6, 320, 320):
            raise BadRequest(f"tensor 'visual_frames' must be float32 [{batch}, 6, 320, 320], "
                             f"got {visual.dtype} {list(visual.shape)}")
    return InferRequest(model_id=model_id, batch_size=batch, start_frame_idx=start, format=fmt, quality=quality,
                        deadline_ms=deadline, audio_features=features, audio_pcm=pcm, audio_frame_offset=offset,
                        visual_frames=visual)
