"""Image operations of the SyncTalk_2D family: face crop, masked network input, paste back, encode.

This is the hot path of every ``infer`` request, so each function is a few vectorised numpy
passes or OpenCV calls (OpenCV releases the GIL, so a worker's encoder threads overlap
inference). Scratch arrays (the 328 patch, the scaled output) are kept per thread and reused:
a fresh array of a megabyte or more is a fresh mmap, and its page faults cost more than the
arithmetic. Results are always new arrays (or the caller's ``dst``), never scratch. The numbers
match SyncTalk_2D's ``inference_328.py`` exactly (see docs/ARCHITECTURE.md,
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

import re
import threading
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
# float32(v) / 255 for every uint8 v: the same division SyncTalk does, looked up (cv2.LUT) instead
# of recomputed per pixel, so the values are bit-identical.
_LUT_DIV255 = np.arange(256, dtype=np.float32) / _F255
_LUT_DIV255.setflags(write=False)

_scratch = threading.local()


def _scratch_array(name: str, shape: tuple, dtype) -> np.ndarray:
    """A per-thread array reused across calls (contents undefined); reallocated on a new shape."""
    arr = getattr(_scratch, name, None)
    if arr is None or arr.shape != shape or arr.dtype != dtype:
        arr = np.empty(shape, dtype)
        setattr(_scratch, name, arr)
    return arr


def single_threaded_opencv() -> None:
    """Make OpenCV run each call on the calling thread only (process-wide).

    A worker already spreads frames over its own composite threads and runs the UNet beside
    them; OpenCV's own thread pool on top of that (every core, per process) only adds hand-offs
    and busy-waiting that take CPU from the UNet: on 2 cores it more than doubled the CPU that
    crops and paste back cost per frame (`bench/pipeline.py --stages`).
    """
    cv2.setNumThreads(1)


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
    # cv2.split de-interleaves HWC into contiguous planes in one pass; the table lookup writes
    # each plane's floats straight into its CHW slot (a strided numpy divide is several times slower).
    for c, plane in enumerate(cv2.split(inner)):
        cv2.LUT(plane, _LUT_DIV255, dst=out[c])
    # The masked copy differs from the unmasked one only inside the rectangle, which is zero:
    # copy the border around it and zero the inside (no read of the part that is zeroed).
    (r0, r1), (c0, c1) = (MASK_SLICE[0].start, MASK_SLICE[0].stop), (MASK_SLICE[1].start, MASK_SLICE[1].stop)
    out[3:, :r0] = out[:3, :r0]
    out[3:, r1:] = out[:3, r1:]
    out[3:, r0:r1, :c0] = out[:3, r0:r1, :c0]
    out[3:, r0:r1, c1:] = out[:3, r0:r1, c1:]
    out[3:, r0:r1, c0:c1] = 0.0
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
    """The 328 crop with the network's 320 output written into its inner square.

    The result is this thread's scratch array: valid until the thread's next call."""
    _check_crop(crop328)
    if output_chw.shape != (3, NET_SIZE, NET_SIZE):
        raise ValueError(f"network output must be (3, {NET_SIZE}, {NET_SIZE}), got {output_chw.shape}")
    # SyncTalk does (pred * 255).astype(np.uint8): float32 product, then TRUNCATION toward zero
    # (not rounding). The clip keeps that exact for the sigmoid's [0, 1] and makes a model that
    # overshoots saturate instead of wrapping around (the float->uint8 cast is undefined there).
    scaled = _scratch_array("scaled", (3, NET_SIZE, NET_SIZE), np.float32)
    np.multiply(output_chw, _F255, out=scaled, dtype=np.float32)
    np.clip(scaled, 0, 255, out=scaled)
    planes = _scratch_array("planes", (3, NET_SIZE, NET_SIZE), np.uint8)
    np.copyto(planes, scaled, casting="unsafe")  # contiguous CHW: a fast truncating cast
    patch = _scratch_array("patch", (CROP_SIZE, CROP_SIZE, 3), np.uint8)
    np.copyto(patch, crop328)
    # cv2.merge does the CHW->HWC interleave in one pass, straight into the inner square.
    cv2.merge((planes[0], planes[1], planes[2]), dst=patch[INNER:INNER + NET_SIZE, INNER:INNER + NET_SIZE])
    return patch


def paste_patch(rect: Sequence[int], crop328: np.ndarray, output_chw: np.ndarray,
                dst: Optional[np.ndarray] = None) -> np.ndarray:
    """Only the face rect's pixels of the composited frame, shape (y2 - y1, x2 - x1, 3) uint8.

    This is what the ``patch`` reply format carries; a client that holds the background writes
    it at ``rect`` and gets the same frame :func:`paste_back` returns. ``dst`` (that shape and
    dtype, rows may be strided: a region of a frame) receives the pixels in place and is returned.
    """
    if len(rect) != 4:
        raise ValueError(f"rect {list(rect)!r} must have 4 values [x1, y1, x2, y2]")
    x1, y1, x2, y2 = (int(v) for v in rect)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"rect [{x1}, {y1}, {x2}, {y2}] is empty")
    if dst is not None and (dst.shape != (y2 - y1, x2 - x1, 3) or dst.dtype != np.uint8):
        raise ValueError(f"dst must be uint8 ({y2 - y1}, {x2 - x1}, 3), got {dst.dtype} {dst.shape}")
    patch = _face_patch328(crop328, output_chw)
    if dst is None:
        return cv2.resize(patch, (x2 - x1, y2 - y1), interpolation=cv2.INTER_CUBIC)
    out = cv2.resize(patch, (x2 - x1, y2 - y1), dst=dst, interpolation=cv2.INTER_CUBIC)
    if not np.shares_memory(out, dst):  # pragma: no cover - OpenCV wrote elsewhere (a layout it cannot take)
        dst[...] = out
    return dst


def paste_back(background: np.ndarray, rect: Sequence[int], crop328: np.ndarray,
               output_chw: np.ndarray, dst: Optional[np.ndarray] = None) -> np.ndarray:
    """The full composited frame: ``background`` with the face rect replaced, in a new array or
    in ``dst`` (same shape and dtype as ``background``; returned).

    The background itself is never written (it is usually the read-only shared frame). The face
    is resized straight into the frame's rect: one full-frame copy, no intermediate face array.
    """
    x1, y1, x2, y2 = _check_rect(background, rect)
    if dst is None:
        dst = np.empty_like(background)
    elif dst.shape != background.shape or dst.dtype != background.dtype or np.shares_memory(dst, background):
        raise ValueError(f"dst must be a separate {background.dtype} {background.shape} array, "
                         f"got {dst.dtype} {dst.shape}")
    np.copyto(dst, background)
    paste_patch((x1, y1, x2, y2), crop328, output_chw, dst=dst[y1:y2, x1:x2])
    return dst


def frame_scratch(shape: tuple, dtype=np.uint8) -> np.ndarray:
    """This thread's reusable frame buffer for a frame that is encoded and then dropped.

    For :func:`paste_back`'s ``dst`` when only the encoded bytes leave the thread (jpeg, png);
    never for a frame that is itself returned (``raw``), which must own its memory."""
    return _scratch_array("frame", tuple(shape), dtype)


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


# --- JPEG by MCU rows -----------------------------------------------------------------------
# A composited frame differs from its background only in the face rect. With a restart marker
# after every MCU row (16 pixel rows at 4:2:0), each row's entropy-coded bytes depend on that
# row's pixels alone (colour conversion, 2x2 chroma averaging, DCT, quantisation and the DC
# prediction all restart there; the Huffman tables are the standard ones). So the rows above and
# below the face are the same bytes in every frame of that background: a frame is the cached
# rows around a fresh encoding of only the strip of rows the rect touches, byte-identical to
# encoding the whole frame (``encode_jpeg_rows``), for about 40 % of the encoder's work.

JPEG_MCU = 16  # pixels per MCU side at 4:2:0 chroma subsampling (OpenCV's default, set explicitly)
_RST_MARKER = re.compile(b"\xff[\xd0-\xd7]")  # in entropy-coded data 0xFF is stuffed (FF 00) or a marker
_SOS, _EOI = 0xDA, b"\xff\xd9"


def encode_jpeg_rows(image: np.ndarray, quality: Optional[int] = None) -> bytes:
    """``image`` as a baseline 4:2:0 JPEG with a restart marker after every MCU row.

    Decodes to the same pixels as :func:`encode_image`'s JPEG at the same quality (restart markers
    change how the coefficients are coded, not their values); a few hundred bytes larger."""
    level = _quality(quality, 1, 100, JPEG_DEFAULT_QUALITY, "JPEG quality")
    per_row = -(-image.shape[1] // JPEG_MCU)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, level, cv2.IMWRITE_JPEG_RST_INTERVAL, per_row,
                                           cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420])
    if not ok:  # pragma: no cover - OpenCV fails only on images it cannot represent
        raise ValueError(f"OpenCV could not encode a {image.dtype} {image.shape} image as jpeg")
    return buf.tobytes()


def mcu_rows(rect: Sequence[int], height: int) -> tuple[int, int]:
    """The MCU rows ``[r0, r1)`` that ``rect``'s pixel rows touch in a frame ``height`` high."""
    y1, y2 = int(rect[1]), int(rect[3])
    return y1 // JPEG_MCU, min(-(-y2 // JPEG_MCU), -(-height // JPEG_MCU))


def _jpeg_rows(data: bytes) -> Optional[tuple[bytes, list[bytes]]]:
    """(the header through the SOS segment, each MCU row's entropy-coded bytes without its
    marker) of an :func:`encode_jpeg_rows` image; None for any other layout."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        i += 2 + length
        if marker == _SOS:
            if not data.endswith(_EOI):
                return None
            return data[:i], _RST_MARKER.split(data[i:-2])
    return None


def _rst(k: int) -> bytes:
    return bytes((0xFF, 0xD0 + k % 8))


def jpeg_outside_rows(data: bytes, rows: tuple[int, int], height: int) -> Optional[tuple[bytes, bytes, int]]:
    """What frames of this background share, from one whole frame ``data`` (:func:`encode_jpeg_rows`)
    whose face strip is MCU rows ``rows``: (header + the rows above, each followed by its restart
    marker; the rows below + EOI; the row count). None when ``data`` is not laid out by rows."""
    parsed = _jpeg_rows(data)
    n = -(-height // JPEG_MCU)
    if parsed is None or len(parsed[1]) != n:
        return None
    header, segs = parsed
    r0, r1 = rows
    above = header + b"".join(segs[k] + _rst(k) for k in range(r0))
    below = b"".join(segs[k] + (_rst(k) if k < n - 1 else b"") for k in range(r1, n)) + _EOI
    return above, below, n


def jpeg_join_rows(outside: tuple[bytes, bytes, int], rows: tuple[int, int], strip_jpeg: bytes) -> Optional[bytes]:
    """The whole frame's JPEG from the shared rows (:func:`jpeg_outside_rows`) and an
    :func:`encode_jpeg_rows` encoding of the frame's strip of MCU rows ``rows``; None when the
    strip's encoding does not have those rows."""
    above, below, n = outside
    r0, r1 = rows
    parsed = _jpeg_rows(strip_jpeg)
    if parsed is None or len(parsed[1]) != r1 - r0:
        return None
    mid = b"".join(seg + (_rst(r0 + j) if r0 + j < n - 1 else b"") for j, seg in enumerate(parsed[1]))
    return above + mid + below


def paste_strip(background: np.ndarray, rect: Sequence[int], crop328: np.ndarray, output_chw: np.ndarray,
                rows: tuple[int, int]) -> np.ndarray:
    """Pixel rows ``[16*r0, 16*r1)`` (clipped to the frame) of :func:`paste_back`'s frame, in this
    thread's scratch (valid until its next call): the background's rows with the face pasted."""
    x1, y1, x2, y2 = _check_rect(background, rect)
    top, bottom = rows[0] * JPEG_MCU, min(rows[1] * JPEG_MCU, background.shape[0])
    if not (top <= y1 and y2 <= bottom):
        raise ValueError(f"rows {rows} do not cover rect [{x1}, {y1}, {x2}, {y2}]")
    strip = _scratch_array("strip", (bottom - top, *background.shape[1:]), background.dtype)
    np.copyto(strip, background[top:bottom])
    paste_patch((x1, y1, x2, y2), crop328, output_chw, dst=strip[y1 - top:y2 - top, x1:x2])
    return strip


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
