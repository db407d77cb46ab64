"""Face boxes for a prepared model: detect, track, clean up, smooth, and turn into SyncTalk_2D crop rects.

Detector
    OpenCV's Haar cascade ``haarcascade_frontalface_alt2.xml``. Its weights ship inside the
    opencv-python(-headless) 4.x wheel (``cv2.data.haarcascades``), so nothing is downloaded at run
    time; OpenCV 5 dropped ``CascadeClassifier`` from the main wheel, hence ``opencv<5`` in
    setup.cfg. alt2 rather than ``frontalface_default``: on the test footage default fires on
    background texture at several scales, alt2 does not, and alt2's boxes jitter less. No profile
    fallback: a profile detector's box is centred on the visible half of the face, so mixing it in
    would make the crop jump sideways; the UNets of this family are trained on frontal talking
    heads, and short gaps are better filled from the frontal boxes on either side. See
    docs/PREPARE.md for the measurements.

Tracking (:class:`FaceTracker`)
    The first search (and any search after the face was lost for ``LOST_AFTER`` frames) covers the
    whole frame, scaled so that its long side is at most ``SEARCH_SIDE`` px, and keeps the
    candidate with the most neighbour detections (the cascade's own confidence). After that each
    frame is searched only around the previous box (the box plus one box size on every side, face
    sizes 0.6-1.6x the previous), scaled so that the face is about ``TRACK_FACE_PX`` px: that is
    several times faster, and a false positive elsewhere in the frame cannot steal the track.
    With several faces the one nearest the previous box wins.

Clean-up and smoothing (:func:`stabilise`)
    Detections whose centre is more than ``OUTLIER_SHIFT`` face sizes from, or whose size differs
    by more than ``OUTLIER_SCALE`` from, the median of the detections within ``MEDIAN_WINDOW_S``
    are dropped; frames without a detection are filled by linear interpolation of the centre and
    size (the ends hold the nearest value); then centre and size are smoothed with a
    Savitzky-Golay filter (order 2, ``SMOOTH_WINDOW_S`` long): it follows steady pans and zooms
    without the lag of a moving average, even at the ends of the video. More than ``max_missing``
    of the frames without a face is an error that names the count.

Crop rect (:func:`face_to_rect`)
    From the detected face box (x, y, side s; it spans roughly eyebrows to chin and cheek to
    cheek): a square of side ``RECT_SIDE * s`` centred horizontally on the face, its top
    ``RECT_TOP * s`` below the face box's top (just under the eyes, on the nose). Like SyncTalk_2D's
    landmark crop (x from cheek to cheek, y from the nose down by the same width) it holds the nose,
    mouth and chin. It is moved (not cut) to lie inside the frame, and shrunk only when it is larger
    than the frame.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import cv2
import numpy as np

CASCADE = "haarcascade_frontalface_alt2.xml"
SEARCH_SIDE = 640  # px, long side of the frame for a full-frame search
SEARCH_MIN_FACE = 24  # px in the scaled search image
SEARCH_SCALE_FACTOR, SEARCH_NEIGHBOURS = 1.1, 4
TRACK_FACE_PX = 100  # the previous face is scaled to about this size for the local search
TRACK_SCALE_FACTOR, TRACK_NEIGHBOURS = 1.05, 3
TRACK_MARGIN = 1.0  # search region: the previous box plus this many box sizes on every side
TRACK_SIZE_RANGE = (0.6, 1.6)
LOST_AFTER = 12  # frames without the face before the search covers the whole frame again
GATE_SHIFT = 1.0  # a full-frame candidate while tracking must lie within this many face sizes

OUTLIER_SHIFT, OUTLIER_SCALE, MEDIAN_WINDOW_S = 0.25, 0.25, 0.5
SMOOTH_WINDOW_S, SMOOTH_ORDER = 0.5, 2
MAX_MISSING = 0.2

RECT_SIDE = 1.0  # crop side / face box side
RECT_TOP = 0.45  # crop top below the face box top, in face box sides

DETECTOR_ID = f"opencv-haar:{CASCADE}"


class FaceError(Exception):
    """Too few frames with a face, or boxes that cannot be made into crop rects."""


def cascade_path() -> str:
    return cv2.data.haarcascades + CASCADE


def load_cascade() -> cv2.CascadeClassifier:
    path = cascade_path()
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():  # pragma: no cover - a broken OpenCV install
        raise FaceError(f"OpenCV could not load its face detector {path} (opencv-python-headless 4.x ships it)")
    return cascade


@dataclass
class FaceTracker:
    """Detects one face per frame, following it from frame to frame. Boxes are (x, y, s) floats."""

    cascade: cv2.CascadeClassifier = field(default_factory=load_cascade)
    previous: Optional[np.ndarray] = None
    since_seen: int = 0
    full_searches: int = 0

    def _search(self, grey: np.ndarray, x0: int, y0: int, scale: float, min_side: int,
                max_side: Optional[int], scale_factor: float, neighbours: int) -> list[tuple[np.ndarray, int]]:
        small = grey if scale >= 1 else cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        small = cv2.equalizeHist(small)
        min_side = max(20, int(min_side))
        kwargs = {"minSize": (min_side, min_side)}
        if max_side is not None:
            if max_side <= min_side:
                return []
            kwargs["maxSize"] = (int(max_side), int(max_side))
        boxes, counts = self.cascade.detectMultiScale2(small, scale_factor, neighbours, **kwargs)
        s = min(scale, 1.0)
        return [(np.array([x / s + x0, y / s + y0, max(w, h) / s], float), int(n))
                for (x, y, w, h), n in zip(boxes, counts)]

    def _full(self, grey: np.ndarray) -> list[tuple[np.ndarray, int]]:
        self.full_searches += 1
        h, w = grey.shape
        scale = min(1.0, SEARCH_SIDE / max(h, w))
        return self._search(grey, 0, 0, scale, SEARCH_MIN_FACE, None, SEARCH_SCALE_FACTOR, SEARCH_NEIGHBOURS)

    def _local(self, grey: np.ndarray, prev: np.ndarray) -> list[tuple[np.ndarray, int]]:
        h, w = grey.shape
        px, py, ps = prev
        m = TRACK_MARGIN * ps
        x0, y0 = int(max(0, px - m)), int(max(0, py - m))
        x1, y1 = int(min(w, px + ps + m)), int(min(h, py + ps + m))
        if x1 - x0 < 20 or y1 - y0 < 20:
            return []
        scale = min(1.0, TRACK_FACE_PX / ps)
        lo, hi = TRACK_SIZE_RANGE
        return self._search(grey[y0:y1, x0:x1], x0, y0, scale, lo * ps * scale, hi * ps * scale,
                            TRACK_SCALE_FACTOR, TRACK_NEIGHBOURS)

    @staticmethod
    def _distance(box: np.ndarray, ref: np.ndarray) -> float:
        return float(np.hypot(box[0] + box[2] / 2 - ref[0] - ref[2] / 2, box[1] + box[2] / 2 - ref[1] - ref[2] / 2))

    def detect(self, frame: np.ndarray) -> Optional[np.ndarray]:
        """The face box (x, y, s) of this frame, or None. Feed the frames in order."""
        grey = frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        prev = self.previous if self.since_seen < LOST_AFTER else None
        found: Optional[np.ndarray] = None
        if prev is not None:
            candidates = self._local(grey, prev)
            if not candidates:
                candidates = [(b, n) for b, n in self._full(grey)
                              if self._distance(b, prev) <= GATE_SHIFT * prev[2]
                              and TRACK_SIZE_RANGE[0] <= b[2] / prev[2] <= TRACK_SIZE_RANGE[1]]
            if candidates:
                found = min(candidates, key=lambda c: (self._distance(c[0], prev), -c[1]))[0]
        else:
            candidates = self._full(grey)
            if candidates:
                found = max(candidates, key=lambda c: (c[1], c[0][2]))[0]
        if found is None:
            self.since_seen += 1
        else:
            self.previous, self.since_seen = found, 0
        return found


@dataclass
class FaceTrack:
    """The smoothed face per frame and what it took to get there."""

    boxes: np.ndarray  # [N, 3] float: centre x, centre y, side
    detected: int  # frames with a detection that was kept
    missing: int  # frames without a detection (filled from their neighbours)
    rejected: int  # detections dropped as outliers (also counted in missing)

    def summary(self) -> dict:
        n = len(self.boxes)
        return {"frames": n, "detected": self.detected, "filled": self.missing, "outliers": self.rejected,
                "missing_fraction": round(self.missing / n, 4) if n else 0.0}


def _odd_window(seconds: float, fps: float, n: int) -> int:
    w = max(1, int(round(seconds * fps)))
    w = w if w % 2 else w + 1
    w = min(w, n if n % 2 else n - 1)
    return max(w, 1)


def stabilise(raw: Sequence[Optional[Sequence[float]]], fps: float, max_missing: float = MAX_MISSING) -> FaceTrack:
    """Per-frame detections (x, y, s) or None -> a complete, smooth track of (cx, cy, s).

    Raises :class:`FaceError` when more than ``max_missing`` of the frames have no usable face.
    """
    from scipy.signal import savgol_filter  # noqa: PLC0415 - scipy is slow to import

    n = len(raw)
    if n == 0:
        raise FaceError("the video has no frames")
    centres = np.full((n, 3), np.nan)
    for i, box in enumerate(raw):
        if box is not None:
            x, y, s = (float(v) for v in box)
            centres[i] = (x + s / 2, y + s / 2, s)
    have = ~np.isnan(centres[:, 0])
    found = int(have.sum())

    # Outliers: far from the median of the detections around them.
    rejected = 0
    half = max(1, int(round(MEDIAN_WINDOW_S * fps / 2)))
    idx = np.flatnonzero(have)
    if len(idx) >= 3:
        keep = have.copy()
        for i in idx:
            near = idx[(idx >= i - half) & (idx <= i + half)]
            if len(near) < 3:
                continue
            med = np.median(centres[near], axis=0)
            shift = np.hypot(*(centres[i, :2] - med[:2])) / med[2]
            ratio = centres[i, 2] / med[2]
            if shift > OUTLIER_SHIFT or abs(ratio - 1) > OUTLIER_SCALE:
                keep[i] = False
        rejected = int(have.sum() - keep.sum())
        have = keep
    missing = n - int(have.sum())
    if missing > max_missing * n:
        what = f"no face found in {n - found} of {n} frames"
        if rejected:
            what += f" and {rejected} more detection(s) rejected as outliers"
        raise FaceError(f"{what} ({missing / n:.0%} without a usable face; at most {max_missing:.0%} may be "
                        "missing): is there one frontal face in the video? Pass --crop-rects to give the boxes")

    good = np.flatnonzero(have)
    filled = centres.copy()
    everyone = np.arange(n)
    for k in range(3):
        filled[:, k] = np.interp(everyone, good, centres[good, k])
    window = _odd_window(SMOOTH_WINDOW_S, fps, n)
    if window > SMOOTH_ORDER + 1:
        filled = savgol_filter(filled, window, SMOOTH_ORDER, axis=0, mode="interp")
    return FaceTrack(boxes=filled, detected=int(have.sum()), missing=missing, rejected=rejected)


def face_to_rect(cx: float, cy: float, s: float, frame_size: tuple[int, int]) -> list[int]:
    """The SyncTalk_2D-style square crop [x1, y1, x2, y2] for a face box centred at (cx, cy), side s."""
    w, h = frame_size
    side = int(round(RECT_SIDE * s))
    side = max(8, min(side, w, h))
    top = cy - s / 2 + RECT_TOP * s
    x1 = int(round(cx - side / 2))
    y1 = int(round(top))
    x1 = min(max(x1, 0), w - side)
    y1 = min(max(y1, 0), h - side)
    return [x1, y1, x1 + side, y1 + side]


def rects_from_track(track: FaceTrack, frame_size: tuple[int, int]) -> list[list[int]]:
    return [face_to_rect(cx, cy, s, frame_size) for cx, cy, s in track.boxes]


def rect_problems(rects: np.ndarray, frame_size: tuple[int, int], limit: int = 3) -> list[str]:
    """Rects that are empty or leave the frame (for boxes given with --crop-rects)."""
    w, h = frame_size
    rects = np.asarray(rects).reshape(-1, 4)
    x1, y1, x2, y2 = rects.T
    bad = np.flatnonzero((x1 >= x2) | (y1 >= y2) | (x1 < 0) | (y1 < 0) | (x2 > w) | (y2 > h))
    out = [f"rect {i} {rects[i].tolist()} is empty or lies outside the {w}x{h} frame" for i in bad[:limit]]
    if len(bad) > limit:
        out.append(f"and {len(bad) - limit} more such rects")
    return out
