"""Synthetic background frames: one cartoon person per seed, drawn with OpenCV.

Each seed gives a different person (skin, hair, eyes, lips, shirt) in front of a different room
(wall colour, pictures, shelves, lamps), with gentle head motion over time: a few pixels of sway
and bob, a slight breathing scale, and an occasional blink. The body follows the head at a
fraction of its sway.

Alongside each frame comes the true face box ``[x1, y1, x2, y2]`` (``x2``/``y2`` exclusive,
``x2 - x1 == y2 - y1``), drawn the way SyncTalk_2D crops: a square around the lower face, from
just under the eyes to the chin and from cheek to cheek. Its side is ``L`` (about 250-350 px at
1280x720, scaled with the frame), and the mouth centre sits at ``(x1 + 0.5 L, y1 + 0.6 L)``, so
after the model's crop (resize to 328, cut ``[4:324, 4:324]``) the mouth lands near (160, 193) in
the 320 crop, where :mod:`lipsync_cluster.demo.light` draws it open.

Everything is a pure function of ``(seed, frame index, size)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

REF_SIZE = (1280, 720)  # the frame size the person's proportions are designed at
FPS = 25.0
SHIFT = 4  # sub-pixel drawing: coordinates are multiplied by 2**SHIFT
_ONE = 1 << SHIFT

# In units of the face box side L, relative to the head centre (hx, hy):
BOX_TOP = -0.32  # y1 = hy - 0.32 L
MOUTH_Y = 0.28  # mouth centre = hy + 0.28 L = y1 + 0.6 L
MOUTH_HALF_WIDTH = 0.15  # the closed mouth spans 0.3 L
HEAD_AXES = (0.52, 0.68)  # head ellipse semi-axes; the chin (hy + 0.68 L) is the box bottom

_SKINS = [  # BGR; all with G >= 80 and R >= 140 so that nothing on the face looks like a mouth interior
    (189, 208, 245), (160, 190, 235), (135, 170, 225), (110, 150, 205), (95, 130, 185),
    (85, 115, 165), (175, 200, 240), (120, 160, 215),
]
_HAIRS = [(30, 30, 35), (25, 45, 90), (40, 90, 160), (90, 150, 210), (60, 60, 70), (140, 140, 150),
          (20, 35, 60), (35, 60, 120)]
_IRISES = [(120, 80, 40), (60, 90, 50), (150, 120, 60), (40, 50, 70), (110, 110, 90)]
_LIPS = [(90, 85, 175), (80, 70, 160), (100, 100, 185), (85, 80, 150), (105, 95, 190)]
_SHIRTS = [(160, 90, 40), (60, 140, 60), (50, 50, 170), (140, 140, 140), (40, 40, 40), (170, 150, 60),
           (90, 60, 120), (200, 200, 200), (60, 120, 200)]
_WALLS = [(200, 215, 225), (170, 190, 150), (140, 160, 190), (210, 190, 170), (120, 120, 125),
          (190, 170, 200), (150, 200, 210), (95, 110, 90)]


def _scale_colour(colour, factor: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, round(c * factor)))) for c in colour)


def _p(x: float, y: float) -> tuple[int, int]:
    return int(round(x * _ONE)), int(round(y * _ONE))


def _ellipse(img, centre, axes, colour, thickness=-1, start=0.0, end=360.0, angle=0.0) -> None:
    cv2.ellipse(img, _p(*centre), (max(1, int(round(axes[0] * _ONE))), max(1, int(round(axes[1] * _ONE)))),
                angle, start, end, colour, thickness, cv2.LINE_AA, SHIFT)


def _line(img, a, b, colour, thickness) -> None:
    cv2.line(img, _p(*a), _p(*b), colour, max(1, int(round(thickness))), cv2.LINE_AA, SHIFT)


@dataclass(frozen=True)
class _Look:
    skin: tuple
    hair: tuple
    iris: tuple
    lips: tuple
    shirt: tuple
    long_hair: bool
    side: float  # face box side at REF_SIZE, px
    offset_x: float  # head centre offset from the frame centre at REF_SIZE, px
    sway: tuple  # amplitude px, period s, phase
    sway2: tuple
    bob: tuple
    breathe: tuple  # scale amplitude, period s, phase
    blink_period: int  # frames
    blink_phase: int


class PersonRenderer:
    """Draws frame ``i`` of person ``seed`` at ``size`` (width, height); :meth:`frame` is pure."""

    def __init__(self, seed: int, size: tuple[int, int] = REF_SIZE):
        width, height = int(size[0]), int(size[1])
        if width < 32 or height < 32:
            raise ValueError(f"frame size {width}x{height} is too small (at least 32x32)")
        self.seed = int(seed)
        self.size = (width, height)
        self.scale = min(width / REF_SIZE[0], height / REF_SIZE[1])
        rng = np.random.RandomState(self.seed % (2**32))
        pick = lambda seq: seq[rng.randint(len(seq))]  # noqa: E731
        self.look = _Look(
            skin=pick(_SKINS), hair=pick(_HAIRS), iris=pick(_IRISES), lips=pick(_LIPS), shirt=pick(_SHIRTS),
            long_hair=bool(rng.rand() < 0.5),
            side=float(rng.uniform(270, 320)),
            offset_x=float(rng.uniform(-120, 120)),
            sway=(float(rng.uniform(4, 7)), float(rng.uniform(3.0, 5.0)), float(rng.uniform(0, 2 * math.pi))),
            sway2=(float(rng.uniform(1, 2)), float(rng.uniform(1.1, 1.7)), float(rng.uniform(0, 2 * math.pi))),
            bob=(float(rng.uniform(2.5, 4.5)), float(rng.uniform(2.0, 3.5)), float(rng.uniform(0, 2 * math.pi))),
            breathe=(float(rng.uniform(0.008, 0.015)), float(rng.uniform(3.5, 5.5)),
                     float(rng.uniform(0, 2 * math.pi))),
            blink_period=int(rng.randint(70, 110)),
            blink_phase=int(rng.randint(0, 60)),
        )
        self._background = self._draw_background(rng)

    # --- geometry -------------------------------------------------------------------------

    def pose(self, i: int) -> tuple[float, float, float]:
        """Head centre (hx, hy) and face box side L of frame ``i``, in pixels of this size."""
        lk, s = self.look, self.scale
        t = i / FPS
        wave = lambda a: a[0] * math.sin(2 * math.pi * t / a[1] + a[2])  # noqa: E731
        width, height = self.size
        hx = width / 2 + (lk.offset_x + wave(lk.sway) + wave(lk.sway2)) * s
        hy = height * 0.42 + wave(lk.bob) * s
        side = lk.side * s * (1.0 + wave(lk.breathe))
        return hx, hy, side

    def rect(self, i: int) -> list[int]:
        """The face box of frame ``i``: ``[x1, y1, x2, y2]``, square, inside the frame."""
        hx, hy, side = self.pose(i)
        n = max(8, int(round(side)))
        width, height = self.size
        n = min(n, width, height)
        x1 = int(round(hx - 0.5 * side))
        y1 = int(round(hy + BOX_TOP * side))
        x1 = min(max(0, x1), width - n)
        y1 = min(max(0, y1), height - n)
        return [x1, y1, x1 + n, y1 + n]

    # --- drawing --------------------------------------------------------------------------

    def _draw_background(self, rng: np.random.RandomState) -> np.ndarray:
        width, height = self.size
        s = self.scale
        wall = np.array(_WALLS[rng.randint(len(_WALLS))], np.float32)
        # a soft vertical gradient (lighter at the top) and a floor band
        ramp = np.linspace(1.08, 0.86, height, dtype=np.float32)[:, None, None]
        img = np.clip(wall[None, None, :] * ramp, 0, 255).astype(np.uint8)
        img = np.ascontiguousarray(np.broadcast_to(img, (height, width, 3)))
        floor_y = int(height * 0.86)
        floor = _scale_colour(rng.randint(40, 160, 3).tolist(), 1.0)
        cv2.rectangle(img, (0, floor_y), (width, height), floor, -1)
        cv2.line(img, (0, floor_y), (width, floor_y), _scale_colour(floor, 0.7), max(1, int(4 * s)))
        # pictures / windows on the wall
        for _ in range(rng.randint(2, 5)):
            w, h = rng.uniform(90, 260) * s, rng.uniform(70, 200) * s
            x, y = rng.uniform(0, width - w), rng.uniform(0.05 * height, 0.6 * height)
            frame_c = tuple(int(v) for v in rng.randint(20, 120, 3))
            fill_c = tuple(int(v) for v in rng.randint(60, 250, 3))
            cv2.rectangle(img, _p(x, y), _p(x + w, y + h), fill_c, -1, cv2.LINE_AA, SHIFT)
            if rng.rand() < 0.5:  # a "landscape": a horizon and a sun
                cv2.rectangle(img, _p(x, y + h * 0.6), _p(x + w, y + h), _scale_colour(fill_c, 0.6), -1,
                              cv2.LINE_AA, SHIFT)
                _ellipse(img, (x + w * 0.7, y + h * 0.3), (h * 0.12, h * 0.12), (80, 220, 250))
            cv2.rectangle(img, _p(x, y), _p(x + w, y + h), frame_c, max(2, int(8 * s)), cv2.LINE_AA, SHIFT)
        # a shelf with round things, or a floor lamp
        if rng.rand() < 0.5:
            y = rng.uniform(0.25, 0.5) * height
            x = rng.uniform(0, width * 0.6)
            w = rng.uniform(200, 400) * s
            cv2.rectangle(img, _p(x, y), _p(x + w, y + 12 * s), (40, 70, 110), -1, cv2.LINE_AA, SHIFT)
            for k in range(rng.randint(2, 6)):
                r = rng.uniform(12, 30) * s
                cx = x + (k + 0.5) * w / 6
                _ellipse(img, (cx, y - r), (r, r), tuple(int(v) for v in rng.randint(30, 240, 3)))
        else:
            x = rng.choice([rng.uniform(0.05, 0.2), rng.uniform(0.8, 0.95)]) * width
            top = 0.3 * height
            _line(img, (x, top), (x, floor_y), (50, 50, 50), 6 * s)
            cv2.fillConvexPoly(img, np.array([_p(x - 50 * s, top), _p(x + 50 * s, top), _p(x + 30 * s, top - 70 * s),
                                              _p(x - 30 * s, top - 70 * s)], np.int32),
                               (150, 230, 250), cv2.LINE_AA, SHIFT)
        # a plant, sometimes
        if rng.rand() < 0.6:
            x = rng.uniform(0.05, 0.95) * width
            pot_top = floor_y - 60 * s
            cv2.rectangle(img, _p(x - 30 * s, pot_top), _p(x + 30 * s, floor_y), (40, 80, 150), -1, cv2.LINE_AA, SHIFT)
            for k in range(7):
                ang = -math.pi / 2 + (k - 3) * 0.35
                tip = (x + math.cos(ang) * 110 * s, pot_top + math.sin(ang) * 130 * s)
                _ellipse(img, ((x + tip[0]) / 2, (pot_top + tip[1]) / 2), (70 * s, 14 * s), (50, 140 + 10 * k, 40),
                         angle=math.degrees(ang))
        return img

    def frame(self, i: int) -> tuple[np.ndarray, list[int]]:
        """Frame ``i`` (BGR uint8, height x width x 3) and its face box."""
        lk = self.look
        img = self._background.copy()
        hx, hy, L = self.pose(i)
        hx0 = self.size[0] / 2 + lk.offset_x * self.scale
        bx = hx0 + 0.4 * (hx - hx0)  # the body sways less than the head
        skin, hair = lk.skin, lk.hair
        skin_dark = _scale_colour(skin, 0.82)
        width, height = self.size

        # body: shoulders, shirt, neck
        if lk.long_hair:
            _ellipse(img, (hx, hy + 0.15 * L), (0.66 * L, 0.95 * L), hair)
        shoulder_y = hy + 1.22 * L
        _ellipse(img, (bx, shoulder_y), (1.2 * L, 0.48 * L), lk.shirt)
        cv2.rectangle(img, _p(bx - 1.2 * L, shoulder_y), _p(bx + 1.2 * L, height + 2), lk.shirt, -1, cv2.LINE_AA, SHIFT)
        neck = np.array([_p(hx - 0.2 * L, hy + 0.35 * L), _p(hx + 0.2 * L, hy + 0.35 * L),
                         _p(bx + 0.22 * L, shoulder_y - 0.3 * L), _p(bx - 0.22 * L, shoulder_y - 0.3 * L)], np.int32)
        cv2.fillConvexPoly(img, neck, skin_dark, cv2.LINE_AA, SHIFT)
        _ellipse(img, (bx, shoulder_y - 0.32 * L), (0.22 * L, 0.16 * L), skin_dark, start=0, end=180)  # collar
        # hair behind the head, ears
        _ellipse(img, (hx, hy - 0.12 * L), (0.6 * L, 0.66 * L), hair)
        for side in (-1, 1):
            _ellipse(img, (hx + side * 0.5 * L, hy - 0.02 * L), (0.075 * L, 0.13 * L), skin_dark)
        # head
        _ellipse(img, (hx, hy), (HEAD_AXES[0] * L, HEAD_AXES[1] * L), skin)
        # fringe
        _ellipse(img, (hx, hy - 0.40 * L), (0.54 * L, 0.32 * L), hair, start=180, end=360)
        # eyes and brows (with a blink now and then)
        blink = (i + lk.blink_phase) % lk.blink_period < 3
        for side in (-1, 1):
            ex, ey = hx + side * 0.2 * L, hy - 0.2 * L
            if blink:
                _line(img, (ex - 0.08 * L, ey), (ex + 0.08 * L, ey), _scale_colour(skin, 0.55), 0.012 * L)
            else:
                _ellipse(img, (ex, ey), (0.085 * L, 0.045 * L), (245, 245, 245))
                _ellipse(img, (ex, ey), (0.036 * L, 0.036 * L), lk.iris)
                _ellipse(img, (ex, ey), (0.016 * L, 0.016 * L), (15, 15, 15))
                _ellipse(img, (ex, ey), (0.085 * L, 0.045 * L), _scale_colour(skin, 0.5),
                         thickness=max(1, int(0.008 * L)))
            _line(img, (ex - 0.09 * L, ey - 0.085 * L), (ex + 0.08 * L, ey - 0.1 * L + side * 0.005 * L), hair,
                  0.02 * L)
        # nose
        nose_c = _scale_colour(skin, 0.72)
        _line(img, (hx + 0.005 * L, hy - 0.13 * L), (hx + 0.03 * L, hy + 0.06 * L), nose_c, 0.01 * L)
        _ellipse(img, (hx, hy + 0.075 * L), (0.065 * L, 0.03 * L), nose_c, thickness=max(1, int(0.01 * L)),
                 start=10, end=170)
        for side in (-1, 1):
            _ellipse(img, (hx + side * 0.03 * L, hy + 0.085 * L), (0.014 * L, 0.008 * L), _scale_colour(skin, 0.55))
        # mouth, closed: upper and lower lip, the line between them
        mx, my = hx, hy + MOUTH_Y * L
        hw = MOUTH_HALF_WIDTH * L
        _ellipse(img, (mx, my - 0.011 * L), (hw, 0.02 * L), lk.lips, start=180, end=360)
        _ellipse(img, (mx, my), (0.9 * hw, 0.03 * L), _scale_colour(lk.lips, 1.1), start=0, end=180)
        # the line is dark but keeps its green: nothing closed may look like the open-mouth interior
        # of the light UNet (BGR (40, 20, 90)), which :func:`..light.mouth_open_pixels` counts
        line = (int(lk.lips[0] * 0.7), max(75, int(lk.lips[1] * 0.95)), int(lk.lips[2] * 0.7))
        _ellipse(img, (mx, my - 0.03 * L), (hw, 0.03 * L), line,
                 thickness=max(2, int(round(0.01 * L))), start=30, end=150)
        # a hint of a chin
        _ellipse(img, (hx, hy + 0.6 * L), (0.09 * L, 0.025 * L), _scale_colour(skin, 0.9),
                 thickness=max(1, int(0.008 * L)), start=20, end=160)
        return img, self.rect(i)


def render_person(seed: int, n_frames: int,
                  size: tuple[int, int] = REF_SIZE) -> tuple[list[np.ndarray], list[list[int]]]:
    """``n_frames`` frames of person ``seed`` (BGR uint8, ``size`` = (width, height)) and their face boxes.

    Deterministic for a given seed; the head sways and bobs a few pixels and breathes slightly, and the
    box ``[x1, y1, x2, y2]`` follows it (mouth at ``(x1 + 0.5 w, y1 + 0.6 h)``).
    """
    renderer = PersonRenderer(seed, size)
    frames, rects = [], []
    for i in range(int(n_frames)):
        img, rect = renderer.frame(i)
        frames.append(img)
        rects.append(rect)
    return frames, rects
