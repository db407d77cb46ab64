"""Reading a person's video: decode with OpenCV, resample to the target fps, letterbox to the target size.

Resampling is by time, not by dropping every k-th frame: output frame ``i`` shows the source frame
on screen at time ``i / fps``, i.e. source frame ``floor(i * src_fps / fps)``. The rates are exact
fractions (29.97 fps is 30000/1001), so a 10 s video at 30 fps gives exactly 250 frames at 25 fps
(source frames 0, 1, 2, 3, 4, 6, 7, ... 298) and a 15 fps video shown at 25 fps repeats frames.
Frames that are not needed are only grabbed, not decoded into images (``VideoCapture.grab``).

Letterbox: the frame is scaled to fit the target size with its aspect ratio kept (area
interpolation when shrinking, cubic when enlarging) and centred on black.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Optional

import cv2
import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
MAX_SOURCE_FPS = 1000.0  # above this a container's frame rate is a placeholder, not a rate


class VideoError(Exception):
    """A video cannot be read, or its frames cannot be resampled as asked."""


def parse_size(text: str) -> Optional[tuple[int, int]]:
    """``"1280x720"`` -> (1280, 720); ``"source"`` -> None (keep each video's own size)."""
    value = str(text).strip().lower()
    if value in ("source", "keep", "original"):
        return None
    parts = value.replace("*", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"{text!r} is not a frame size; expected WIDTHxHEIGHT (e.g. 1280x720) or 'source'")
    w, h = int(parts[0]), int(parts[1])
    if not (16 <= w <= 8192 and 16 <= h <= 8192):
        raise ValueError(f"frame size {w}x{h} is out of range; width and height must be 16..8192")
    return w, h


def exact_rate(fps: float) -> Fraction:
    """A frame rate as an exact fraction: 25 -> 25, 29.97002997 -> 30000/1001."""
    return Fraction(float(fps)).limit_denominator(100_000)


def source_index(i: int, src_fps: Fraction, fps: Fraction) -> int:
    """The source frame shown at time ``i / fps``: ``floor(i * src_fps / fps)``."""
    return int((i * src_fps) // fps)


def output_count(n_source: int, src_fps: Fraction, fps: Fraction) -> int:
    """How many output frames ``n_source`` source frames give: every i with ``source_index(i) < n``."""
    # i * src / fps < n  <=>  i < n * fps / src
    return int(math.ceil(Fraction(n_source) * fps / src_fps))


@dataclass(frozen=True)
class Letterbox:
    """Where the source frame lands in the target frame: ``x' = x * scale + ox``."""

    src_size: tuple[int, int]  # (w, h)
    size: tuple[int, int]  # (w, h)
    scale: float
    ox: int
    oy: int
    inner: tuple[int, int]  # the scaled source's (w, h)

    @classmethod
    def fit(cls, src_size: tuple[int, int], size: Optional[tuple[int, int]]) -> "Letterbox":
        sw, sh = src_size
        if size is None or tuple(size) == (sw, sh):
            return cls((sw, sh), (sw, sh), 1.0, 0, 0, (sw, sh))
        w, h = size
        scale = min(w / sw, h / sh)
        iw, ih = max(1, min(w, round(sw * scale))), max(1, min(h, round(sh * scale)))
        return cls((sw, sh), (w, h), scale, (w - iw) // 2, (h - ih) // 2, (iw, ih))

    @property
    def identity(self) -> bool:
        return self.size == self.src_size

    def apply(self, frame: np.ndarray) -> np.ndarray:
        if self.identity:
            return frame
        iw, ih = self.inner
        interp = cv2.INTER_AREA if self.scale < 1 else cv2.INTER_CUBIC
        scaled = cv2.resize(frame, (iw, ih), interpolation=interp)
        w, h = self.size
        if (iw, ih) == (w, h):
            return scaled
        out = np.zeros((h, w, 3), np.uint8)
        out[self.oy:self.oy + ih, self.ox:self.ox + iw] = scaled
        return out


@dataclass
class VideoInfo:
    path: Path
    src_fps: Fraction
    src_size: tuple[int, int]
    frame_count_hint: int  # the container's claim; 0 when unknown. Decoding decides.
    fps_assumed: bool = False  # the container gave no usable rate; src_fps is the target fps


class VideoSource:
    """A video opened for resampled reading. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | Path, fps: float) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise VideoError(f"{self.path}: file not found")
        if self.path.stat().st_size == 0:
            raise VideoError(f"{self.path.name}: the file is empty")
        self.fps = exact_rate(fps)
        # FFmpeg's own complaints ("moov atom not found") would only repeat ours, less clearly.
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
        self._cap = cv2.VideoCapture(str(self.path))
        if not self._cap.isOpened():
            self._cap.release()
            raise VideoError(f"{self.path.name}: OpenCV cannot open it as a video "
                             "(not a video file, truncated, or a codec this OpenCV build lacks)")
        ok, first = self._cap.read()
        if not ok or first is None:
            self._cap.release()
            raise VideoError(f"{self.path.name}: no frame could be decoded (corrupt file or unsupported codec)")
        self._first: Optional[np.ndarray] = first
        raw_fps = self._cap.get(cv2.CAP_PROP_FPS)
        assumed = not (math.isfinite(raw_fps) and 0 < raw_fps <= MAX_SOURCE_FPS)
        src_fps = self.fps if assumed else exact_rate(raw_fps)
        hint = self._cap.get(cv2.CAP_PROP_FRAME_COUNT)
        hint = int(hint) if math.isfinite(hint) and hint > 0 else 0
        self.info = VideoInfo(self.path, src_fps, (first.shape[1], first.shape[0]), hint, assumed)
        self.source_frames = 0  # how many source frames were read so far (grabbed or decoded)

    def __enter__(self) -> "VideoSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._cap.release()

    def expected_frames(self) -> int:
        """The output frame count the container's frame count promises (for progress bars)."""
        if not self.info.frame_count_hint:
            return 0
        return output_count(self.info.frame_count_hint, self.info.src_fps, self.fps)

    def frames(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(i, j, frame)``: output frame i is source frame j (BGR, the source's size), in order."""
        src, fps = self.info.src_fps, self.fps
        i = 0
        j = 0  # index of the source frame held in `frame`
        frame = self._first
        self._first = None
        self.source_frames = 1
        while True:
            want = source_index(i, src, fps)
            while j < want:  # skip source frames nobody shows; decode only the one we need
                if j + 1 < want:
                    ok = self._cap.grab()
                    frame = None
                else:
                    ok, frame = self._cap.read()
                if not ok:
                    return
                j += 1
                self.source_frames = j + 1
            if frame is None:  # pragma: no cover - read() succeeded but gave nothing
                return
            if frame.shape[1] != self.info.src_size[0] or frame.shape[0] != self.info.src_size[1]:
                raise VideoError(f"{self.path.name}: frame {j} is {frame.shape[1]}x{frame.shape[0]} but the "
                                 f"first frame is {self.info.src_size[0]}x{self.info.src_size[1]}")
            yield i, j, frame
            i += 1
