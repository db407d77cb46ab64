"""The light demo UNet: the real I/O, a mouth that opens with the audio, and almost no cost.

Inputs ``input`` [B,6,320,320] (BGR /255; channels 0-2 the unmasked face crop) and ``audio``
[B,32,16,16]; output ``output`` [B,3,320,320] in [0, 1], BGR. The output is the unmasked crop
with a mouth drawn in where the demo person's mouth sits (:mod:`lipsync_cluster.demo.frames`
puts it at (0.5, 0.6) of the face box, i.e. (160, 192.8) in the 320 crop).

How wide it opens comes from *this* frame's audio only. The window for frame i is the encoder
outputs of frames i-8..i+7 (16 x 512) reshaped to (32, 16, 16), so frame i's own 512 features
are ``audio[:, 16:18]``; their mean is the loudness ``a`` of
:mod:`lipsync_cluster.demo.audio_encoder` (0 for silence, ~1 for loud speech). Then::

    frac = clip((a - A0) / (A1 - A0), 0, 1)       # A0 = 0.35 (room noise stays shut), A1 = 1.0
    h    = frac * MAX_OPENING / 2                  # half the vertical opening, px (<= 30)
    G(x) = sqrt(max(0, 1 - ((x - CX) / RX)^2))     # the ellipse's profile, a constant map
    m    = sigmoid(K (h G(x) - |y - CY|)) * sigmoid(K (RX - |x - CX|)) * sigmoid(KG (h - H0))
    t    = sigmoid(K (-0.65 h G(x) - (y - CY)))     # upper teeth: the top 35 % of the opening
    out  = clip(crop + m (INTERIOR + t (TEETH - INTERIOR) - crop), 0, 1)

All of it is elementwise arithmetic over constant coordinate maps, so it costs a few passes over
the crop. The last factor of ``m`` closes the mouth completely (``m < 1e-3``) below ~1 px of
opening, so silence returns the input crop unchanged (within 1/255): the person's own closed
mouth stays.

:func:`mouth_open_pixels` measures the opening on a decoded 320 crop (pixels near the interior
colour around the mouth), for tests here and elsewhere.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .audio_encoder import FEATURE_DIM

OPSET = 17
CROP = 320
INPUT_NAME, AUDIO_NAME, OUTPUT_NAME = "input", "audio", "output"

# Where the mouth is in the 320 crop: the face box is resized to 328 and cut to [4:324, 4:324];
# the mouth centre is at (0.5, 0.6) of the box and the closed mouth is 0.3 of the box wide.
MOUTH_CX = 0.5 * 328 - 4  # 160.0
MOUTH_CY = 0.6 * 328 - 4  # 192.8
MOUTH_HALF_WIDTH = 52.0  # RX: covers the drawn closed mouth (0.15 * 328 = 49.2) with a margin
MOUTH_WIDTH = 2 * MOUTH_HALF_WIDTH
MAX_OPENING = 60.0  # px, the full vertical opening at loud speech

A0, A1 = 0.35, 1.0  # loudness (mean feature) at which the mouth starts to open / is fully open
EDGE_K = 1.5  # edge sharpness, 1/px (10-90 % over ~3 px)
GATE_K, GATE_H0 = 2.0, 3.5  # the closing gate on the half-opening h
TEETH_FRACTION = 0.35

INTERIOR_BGR = (40, 20, 90)
TEETH_BGR = (225, 232, 238)
FRAME_CHANNELS = (16, 18)  # frame i's own encoder output in the (32, 16, 16) window


def opening_for_loudness(a) -> np.ndarray:
    """The vertical opening in px (float) that loudness ``a`` asks for (0 .. MAX_OPENING)."""
    return np.clip((np.asarray(a, np.float32) - A0) / (A1 - A0), 0.0, 1.0) * MAX_OPENING


def window_loudness(audio: np.ndarray) -> np.ndarray:
    """Frame i's loudness from UNet audio windows [B, 32, 16, 16] (mean of channels 16-17)."""
    audio = np.asarray(audio, np.float32)
    return audio[:, FRAME_CHANNELS[0]:FRAME_CHANNELS[1]].mean(axis=(1, 2, 3))


def loudness_window(a: float | np.ndarray, batch: int | None = None) -> np.ndarray:
    """A UNet audio window [B, 32, 16, 16] whose frame-i loudness is ``a`` (every frame the same)."""
    a = np.atleast_1d(np.asarray(a, np.float32))
    if batch is not None and a.size == 1:
        a = np.repeat(a, batch)
    from .audio_encoder import channel_weights

    feats = a[:, None] * channel_weights()[None, :]  # [B, 512]
    return np.ascontiguousarray(np.repeat(feats[:, None, :], 16, axis=1).reshape(len(a), 32, 16, 16))


def _maps() -> dict[str, np.ndarray]:
    x = np.arange(CROP, dtype=np.float64)
    y = np.arange(CROP, dtype=np.float64)
    dx = (x - MOUTH_CX) / MOUTH_HALF_WIDTH
    g = np.sqrt(np.maximum(0.0, 1.0 - dx * dx))
    mx = 1.0 / (1.0 + np.exp(-EDGE_K * (MOUTH_HALF_WIDTH - np.abs(x - MOUTH_CX))))
    dy = y - MOUTH_CY
    f = lambda a, shape: a.astype(np.float32).reshape(shape)  # noqa: E731
    return {
        "profile": f(g, (1, 1, 1, CROP)),
        "width_mask": f(mx, (1, 1, 1, CROP)),
        "dy": f(dy, (1, 1, CROP, 1)),
        "abs_dy": f(np.abs(dy), (1, 1, CROP, 1)),
    }


def _colour(bgr) -> np.ndarray:
    return (np.asarray(bgr, np.float32) / 255.0).reshape(1, 3, 1, 1)


def _sigmoid(v):
    return 0.5 * (1.0 + np.tanh(0.5 * v))


def reference_light_unet(visual: np.ndarray, audio: np.ndarray) -> np.ndarray:
    """Pure-numpy twin of the ONNX graph (float32 in, float32 [B,3,320,320] out)."""
    visual = np.asarray(visual, np.float32)
    maps = _maps()
    crop = visual[:, 0:3]
    h = (opening_for_loudness(window_loudness(audio)) / 2.0).reshape(-1, 1, 1, 1)
    hg = h * maps["profile"]
    m = _sigmoid(EDGE_K * (hg - maps["abs_dy"])) * maps["width_mask"] * _sigmoid(GATE_K * (h - GATE_H0))
    t = _sigmoid(EDGE_K * (-(1 - TEETH_FRACTION) * hg - maps["dy"]))
    colour = _colour(INTERIOR_BGR) + t * (_colour(TEETH_BGR) - _colour(INTERIOR_BGR))
    return np.clip(crop + m * (colour - crop), 0.0, 1.0).astype(np.float32)


def make_light_unet_model() -> onnx.ModelProto:
    """The light UNet as an in-memory ONNX model (opset 17, checked)."""
    maps = _maps()
    c = lambda name, value: numpy_helper.from_array(np.asarray(value, np.float32), name)  # noqa: E731
    i64 = lambda name, value: numpy_helper.from_array(np.asarray(value, np.int64), name)  # noqa: E731
    inits = [
        i64("ch_start", [0]), i64("ch_end", [3]), i64("ch_axis", [1]),
        i64("au_start", [FRAME_CHANNELS[0]]), i64("au_end", [FRAME_CHANNELS[1]]),
        c("a0", [A0]), c("inv_span", [1.0 / (A1 - A0)]), c("zero", 0.0), c("one", 1.0),
        c("half_max", [MAX_OPENING / 2.0]),
        c("edge_k", [EDGE_K]), c("gate_k", [GATE_K]), c("gate_h0", [GATE_H0]),
        c("teeth_shift", [-(1.0 - TEETH_FRACTION)]),
        c("profile", maps["profile"]), c("width_mask", maps["width_mask"]),
        c("dy", maps["dy"]), c("abs_dy", maps["abs_dy"]),
        c("interior", _colour(INTERIOR_BGR)), c("teeth_minus_interior", _colour(TEETH_BGR) - _colour(INTERIOR_BGR)),
    ]
    n = helper.make_node
    nodes = [
        n("Slice", [INPUT_NAME, "ch_start", "ch_end", "ch_axis"], ["crop"]),
        # loudness of this frame -> half-opening h [B,1,1,1]
        n("Slice", [AUDIO_NAME, "au_start", "au_end", "ch_axis"], ["frame_audio"]),
        n("ReduceMean", ["frame_audio"], ["loudness"], axes=[1, 2, 3], keepdims=1),
        n("Sub", ["loudness", "a0"], ["l0"]),
        n("Mul", ["l0", "inv_span"], ["l1"]),
        n("Clip", ["l1", "zero", "one"], ["frac"]),
        n("Mul", ["frac", "half_max"], ["h"]),
        # the opening's vertical extent per column, and the soft interior mask m [B,1,320,320]
        n("Mul", ["h", "profile"], ["hg"]),  # [B,1,1,320]
        n("Sub", ["hg", "abs_dy"], ["inside_by"]),  # [B,1,320,320], px inside the ellipse (vertically)
        n("Mul", ["inside_by", "edge_k"], ["inside_k"]),
        n("Sigmoid", ["inside_k"], ["m_vertical"]),
        n("Mul", ["m_vertical", "width_mask"], ["m_ellipse"]),
        n("Sub", ["h", "gate_h0"], ["g0"]),
        n("Mul", ["g0", "gate_k"], ["g1"]),
        n("Sigmoid", ["g1"], ["gate"]),  # [B,1,1,1]
        n("Mul", ["m_ellipse", "gate"], ["m"]),
        # upper teeth band t
        n("Mul", ["hg", "teeth_shift"], ["teeth_edge"]),  # -0.65 h G(x)
        n("Sub", ["teeth_edge", "dy"], ["teeth_by"]),
        n("Mul", ["teeth_by", "edge_k"], ["teeth_k"]),
        n("Sigmoid", ["teeth_k"], ["t"]),
        n("Mul", ["t", "teeth_minus_interior"], ["t_colour"]),  # [B,3,320,320]
        n("Add", ["t_colour", "interior"], ["mouth_colour"]),
        # blend and clip
        n("Sub", ["mouth_colour", "crop"], ["delta"]),
        n("Mul", ["delta", "m"], ["delta_m"]),
        n("Add", ["crop", "delta_m"], ["blended"]),
        n("Clip", ["blended", "zero", "one"], [OUTPUT_NAME]),
    ]
    graph = helper.make_graph(
        nodes, "demo_light_unet",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["B", 6, CROP, CROP]),
         helper.make_tensor_value_info(AUDIO_NAME, TensorProto.FLOAT, ["B", 32, 16, 16])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["B", 3, CROP, CROP])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="lipsync_cluster.demo",
                              doc_string="light demo UNet: crop + audio-driven mouth")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def build_light_unet(path: str | os.PathLike) -> Path:
    """Write the light demo UNet ONNX to ``path`` (atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(make_light_unet_model().SerializeToString())
    os.replace(tmp, path)
    return path


# --- measuring the mouth on decoded frames ----------------------------------------------------

OPEN_TOLERANCE = 40  # max per-channel distance from INTERIOR_BGR that still counts as "open mouth"
_MARGIN = 6


def mouth_window() -> tuple[int, int, int, int]:
    """The (x1, y1, x2, y2) region of the 320 crop that :func:`mouth_open_pixels` looks at."""
    x1 = int(np.floor(MOUTH_CX - MOUTH_HALF_WIDTH - _MARGIN))
    x2 = int(np.ceil(MOUTH_CX + MOUTH_HALF_WIDTH + _MARGIN)) + 1
    y1 = int(np.floor(MOUTH_CY - MAX_OPENING / 2 - _MARGIN))
    y2 = int(np.ceil(MOUTH_CY + MAX_OPENING / 2 + _MARGIN)) + 1
    return max(0, x1), max(0, y1), min(CROP, x2), min(CROP, y2)


def mouth_open_pixels(crop320_bgr_uint8: np.ndarray, tolerance: int = OPEN_TOLERANCE) -> int:
    """How many pixels around the mouth look like the open-mouth interior (BGR (40, 20, 90)).

    ``crop320_bgr_uint8``: a 320x320x3 BGR crop as the network sees it (the face box resized to
    328, cut [4:324, 4:324]); float input in [0, 1] is scaled by 255. About 0 for a closed mouth,
    thousands for a wide-open one; it grows with the opening.
    """
    img = np.asarray(crop320_bgr_uint8)
    if img.ndim == 4 and img.shape[0] == 1:
        img = img[0]
    if img.ndim == 3 and img.shape[0] == 3 and img.shape[-1] != 3:  # CHW
        img = img.transpose(1, 2, 0)
    if img.shape != (CROP, CROP, 3):
        raise ValueError(f"expected a {CROP}x{CROP}x3 crop, got {list(img.shape)}")
    if img.dtype != np.uint8:
        img = np.clip(np.rint(img.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    x1, y1, x2, y2 = mouth_window()
    region = img[y1:y2, x1:x2].astype(np.int16)
    dist = np.abs(region - np.asarray(INTERIOR_BGR, np.int16)).max(axis=-1)
    return int((dist <= tolerance).sum())


__all__ = ["build_light_unet", "make_light_unet_model", "reference_light_unet", "mouth_open_pixels", "mouth_window",
           "opening_for_loudness", "window_loudness", "loudness_window", "MOUTH_CX", "MOUTH_CY",
           "MOUTH_WIDTH", "MOUTH_HALF_WIDTH", "MAX_OPENING", "INTERIOR_BGR", "TEETH_BGR", "FEATURE_DIM"]
