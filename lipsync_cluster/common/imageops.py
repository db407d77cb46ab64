"""Image operations of the SyncTalk_2D family: face crop, masked network input, paste back, encode.

This is the hot path of every ``infer`` request, so each function is a few vectorised numpy
passes or OpenCV calls (OpenCV releases the GIL, so a worker's encoder threads overlap
inference). The numbers match SyncTalk_2D's ``inference_328.py`` exactly (see docs/ARCHITECTURE.md,
"The numbers of the SyncTalk_2D family"):

* crop: the face rect ``[x1, y1, x2, y2]`` of the background is resized to 328x328 (cubic);
* network input: the inner ``crop[4:324, 4:324]`` (320x320) as float32 BGR / 255, CHW, channels
  0-2 unmasked and 3-5 the same with ``cv2.rectangle(img, (5, 5, 310, 305), 0, -1)`` filled
  black (that is x 5..314 and y 5..309 inclusive, i.e. [5:310, 5:315] in numpy);
* paste back: ``(pred * 255).astype(np.uint8)`` (truncation, not rounding) into a copy of the
  328 crop at ``[4:324, 4:324]``, resized (cubic) to the rect and written into a copy of the
  background; every pixel outside the rect is byte-identical to the background.
"""
from __future__ import annotations

from typing import Optional, Sequence

import cv2
import numpy as np

from .errors import BadRequest

CROP_SIZE = 328
INNER = 4
NET_SIZE = 320
# (x, y, w, h) as SyncTalk passes it to cv2.rectangle. OpenCV's Rect overload draws up to
# br() - (1, 1), so the black area is x in [5, 315) and y in [5, 310) on the 320 image.
MASK_RECT = (5, 5, 310, 305)
_MX, _MY, _MW, _MH = MASK_RECT
MASK_SLICE = (slice(_MY, _MY + _MH), slice(_MX, _MX + _MW))  # rows, cols of the black area

IMAGE_FORMATS = ("png", "jpeg")
PNG_DEFAULT_COMPRESSION = 1
JPEG_DEFAULT_QUALITY = 85

_F255 = np.float32(255)


def _check_rect(frame: np.ndarray, rect: Sequence[int]) -> tuple[int, int, int, int]:
    if len(rect) != 4:
        raise ValueError(f"rect {list(rect)!r} must have 4 values [x1, y1, x2, y2]")
    x1, y1, x2, y2 = (int(v) for v in rect)
    h, w = frame.shape[:2]
    if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
        raise ValueError(f"rect [{x1}, {y1}, {x2}, {y2}] is empty or lies outside the {w}x{h} frame")
    return x1, y1, x2, y2


def _check_crop(crop328: np.ndarray) -> None:
    if crop328.shape != (CROP_SIZE, CROP_SIZE, 3) or crop328.dtype != np.uint8:
        raise ValueError(
            f"face crop must be uint8 ({CROP_SIZE}, {CROP_SIZE}, 3), got {crop328.dtype} {crop328.shape}")


def crop_face(frame: np.ndarray, rect: Sequence[int]) -> np.ndarray:
    """The face region ``frame[y1:y2, x1:x2]`` resized to 328x328 with cubic interpolation."""
    x1, y1, x2, y2 = _check_rect(frame, rect)
    return cv2.resize(frame[y1:y2, x1:x2], (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_CUBIC)


def visual_input(crop328: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """The UNet's visual input [6, 320, 320] float32 for one 328 face crop.

    ``out`` may be a preallocated slot (e.g. ``batch[i]``) to fill in place; it is returned.
    The division is float32 / 255 like SyncTalk's ``astype(np.float32) / 255.0``, so values are
    bit-identical to the reference (multiplying by 1/255 would differ in the last bit).
    """
    _check_crop(crop328)
    if out is None:
        out = np.empty((6, NET_SIZE, NET_SIZE), np.float32)
    elif out.shape != (6, NET_SIZE, NET_SIZE) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 (6, {NET_SIZE}, {NET_SIZE}), got {out.dtype} {out.shape}")
    inner = crop328[INNER:INNER + NET_SIZE, INNER:INNER + NET_SIZE]
    np.divide(inner.transpose(2, 0, 1), _F255, out=out[:3], dtype=np.float32)
    # The masked copy differs from the unmasked one only inside the rectangle, which is zero:
    # copying the floats and zeroing the area is cheaper than a second conversion.
    out[3:] = out[:3]
    out[3:, MASK_SLICE[0], MASK_SLICE[1]] = 0.0
    return out


def build_visual_batch(frames: Sequence[np.ndarray], rects) -> tuple[np.ndarray, list[np.ndarray]]:
    """Visual inputs [B, 6, 320, 320] float32 and the B face crops (328x328x3 uint8).

    ``frames[i]`` is the background for batch item i and ``rects[i]`` its face rect; the crops
    are returned because paste back needs them.
    """
    rects = np.asarray(rects)
    if rects.ndim != 2 or rects.shape[1] != 4 or len(rects) != len(frames):
        raise ValueError(f"rects must be [B, 4] with B = {len(frames)} frames, got shape {rects.shape}")
    batch = np.empty((len(frames), 6, NET_SIZE, NET_SIZE), np.float32)
    crops = []
    for i, (frame, rect) in enumerate(zip(frames, rects)):
        crop = crop_face(frame, rect)
        visual_input(crop, out=batch[i])
        crops.append(crop)
    return batch, crops


def _face_patch328(crop328: np.ndarray, output_chw: np.ndarray) -> np.ndarray:
    """A copy of the 328 crop with the network's 320 output written into its inner square."""
    _check_crop(crop328)
    if output_chw.shape != (3, NET_SIZE, NET_SIZE):
        raise ValueError(f"network output must be (3, {NET_SIZE}, {NET_SIZE}), got {output_chw.shape}")
    # SyncTalk does (pred * 255).astype(np.uint8): float32 product, then TRUNCATION toward zero
    # (not rounding). The clip keeps that exact for the sigmoid's [0, 1] and makes a model that
    # overshoots saturate instead of wrapping around (the float->uint8 cast is undefined there).
    scaled = np.multiply(output_chw, _F255, dtype=np.float32)
    np.clip(scaled, 0, 255, out=scaled)
    planes = scaled.astype(np.uint8)  # contiguous CHW: a fast cast
    patch = crop328.copy()
    # cv2.merge does the CHW->HWC interleave in one pass, far faster than a strided numpy copy.
    patch[INNER:INNER + NET_SIZE, INNER:INNER + NET_SIZE] = cv2.merge((planes[0], planes[1], planes[2]))
    return patch


def paste_patch(rect: Sequence[int], crop328: np.ndarray, output_chw: np.ndarray) -> np.ndarray:
    """Only the face rect's pixels of the composited frame, shape (y2 - y1, x2 - x1, 3) uint8.

    This is what the ``patch`` reply format carries; a client that holds the background writes
    it at ``rect`` and gets the same frame :func:`paste_back` returns.
    """
    if len(rect) != 4:
        raise ValueError(f"rect {list(rect)!r} must have 4 values [x1, y1, x2, y2]")
    x1, y1, x2, y2 = (int(v) for v in rect)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"rect [{x1}, {y1}, {x2}, {y2}] is empty")
    patch = _face_patch328(crop328, output_chw)
    return cv2.resize(patch, (x2 - x1, y2 - y1), interpolation=cv2.INTER_CUBIC)


def paste_back(background: np.ndarray, rect: Sequence[int], crop328: np.ndarray,
               output_chw: np.ndarray) -> np.ndarray:
    """The full composited frame: a copy of ``background`` with the face rect replaced.

    The background itself is never written (it is usually the read-only shared frame).
    """
    x1, y1, x2, y2 = _check_rect(background, rect)
    face = paste_patch((x1, y1, x2, y2), crop328, output_chw)
    frame = background.copy()
    frame[y1:y2, x1:x2] = face
    return frame


def encode_image(image: np.ndarray, fmt: str, quality: Optional[int] = None) -> bytes:
    """Encode a BGR uint8 image as ``png`` or ``jpeg``.

    ``quality`` is the PNG compression level 0..9 (default 1: level 1 is several times faster
    than OpenCV's default 3 and the files are only slightly larger; for real-time streaming the
    encoder's time matters more than bytes on a local link) or the JPEG quality 1..100
    (default 85). Bad values raise :class:`BadRequest` naming the ``format``/``quality`` field.
    """
    if fmt == "png":
        level = _quality(quality, 0, 9, PNG_DEFAULT_COMPRESSION, "PNG compression level")
        params = [cv2.IMWRITE_PNG_COMPRESSION, level]
        ext = ".png"
    elif fmt == "jpeg":
        level = _quality(quality, 1, 100, JPEG_DEFAULT_QUALITY, "JPEG quality")
        params = [cv2.IMWRITE_JPEG_QUALITY, level]
        ext = ".jpg"
    else:
        raise BadRequest(f"field 'format' is {fmt!r}; an encoded image format is one of {', '.join(IMAGE_FORMATS)}")
    ok, buf = cv2.imencode(ext, image, params)
    if not ok:  # pragma: no cover - OpenCV fails only on images it cannot represent
        raise ValueError(f"OpenCV could not encode a {image.dtype} {image.shape} image as {fmt}")
    return buf.tobytes()


def _quality(value: Optional[int], lo: int, hi: int, default: int, what: str) -> int:
    if value is None:
        return default
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadRequest(f"field 'quality' is {value!r}; the {what} is an integer in {lo}..{hi}")
    return int(value)


def pingpong_index(i: int, n: int) -> int:
    """The background frame for stream frame ``i`` over ``n`` frames: 0,1,..,n-1,n-2,..,1,0,1,..

    The period is 2n-2 (each end shown once per pass); with one frame it is always 0.
    """
    if n < 1:
        raise ValueError(f"pingpong over {n} frames: need at least 1")
    if n == 1:
        return 0
    period = 2 * n - 2
    k = i % period
    return k if k < n else period - k


def pingpong_indices(start: int, count: int, n: int) -> np.ndarray:
    """``pingpong_index(start + j, n)`` for j in 0..count-1, as an int64 array."""
    if n < 1:
        raise ValueError(f"pingpong over {n} frames: need at least 1")
    if count < 0:
        raise ValueError(f"count is {count}; expected >= 0")
    if n == 1:
        return np.zeros(count, np.int64)
    period = 2 * n - 2
    k = np.arange(start, start + count, dtype=np.int64) % period
    return np.where(k < n, k, period - k)
