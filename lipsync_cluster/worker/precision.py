"""fp16 models: the UNet and the audio encoder converted at load, and how far they are from fp32.

``onnx.precision: fp16`` converts each model's float32 weights and arithmetic to float16 when the
worker opens it (``onnxconverter-common``'s ``convert_float_to_float16``), keeping the inputs
and outputs float32 (``keep_io_types``): the pipeline feeds and reads the same arrays, binds the
UNet by rank and shape as before, and only the graph inside changes. Nothing is written next to
the package; the converted model lives in the session.

The error this costs is measured against the fp32 model on the same inputs where the pictures
are redrawn (:func:`mouth_error`: the masked rectangle of the 320x320 crop, as 8-bit pixels after
the paste-back's truncation). ``tests/test_precision.py`` holds it to :data:`FP16_BOUND` on the
``unet`` demo (bench/gpu.py measures it again on a GPU, where fp16 arithmetic really runs in
fp16; ONNX Runtime's CPU provider casts most fp16 nodes back to float32, so on the CPU the
error is mostly the weights' rounding).
"""
from __future__ import annotations

import math
import os
import time
import warnings
from typing import Union

import numpy as np

PRECISIONS = ("fp32", "fp16")

# The bound fp16 is held to against fp32 on the `unet` demo (max over the mouth region of a
# batch; docs/CONFIG.md "precision"): the largest 8-bit difference, and the PSNR floor.
FP16_BOUND = {"max_abs_8bit": 8, "psnr_db": 40.0}

# The rectangle the UNet redraws on its 320x320 output (the masked area of its input,
# common/imageops.MASK_RECT: x 5..314, y 5..309).
_MOUTH = (slice(5, 310), slice(5, 315))


class PrecisionError(RuntimeError):
    """A model cannot be opened at the precision asked; the message says why and what to do."""


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"onnx.precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision


def to_fp16(path: Union[str, os.PathLike]) -> bytes:
    """The ONNX model at ``path`` with float16 weights and arithmetic, float32 inputs and outputs,
    serialized (for ``make_session``). Raises :class:`PrecisionError` when it cannot convert."""
    try:
        import onnx  # noqa: PLC0415 - server extras; imported only when fp16 is asked for
        from onnxconverter_common import float16  # noqa: PLC0415
    except ImportError as exc:
        raise PrecisionError("onnx.precision: fp16 needs the onnx and onnxconverter-common packages "
                             "(in the cpu and gpu extras): pip install 'lipsync-cluster[cpu]' or '[gpu]'") from exc
    try:
        model = onnx.load(str(path))
        with warnings.catch_warnings():  # one line per weight below fp16's range, "truncated to 1e-07"
            warnings.simplefilter("ignore")
            converted = float16.convert_float_to_float16(model, keep_io_types=True)
        return converted.SerializeToString()
    except Exception as exc:  # an export the converter cannot handle: say so, the caller keeps serving
        raise PrecisionError(f"fp16 conversion of {os.path.basename(str(path))} failed: "
                             f"{type(exc).__name__}: {exc}") from exc


def model_source(path: Union[str, os.PathLike], precision: str) -> tuple[Union[str, bytes], float]:
    """What to open for ``path`` at ``precision`` (the path itself, or fp16 bytes) and the ms the
    conversion took (0 for fp32)."""
    if check_precision(precision) == "fp32":
        return str(path), 0.0
    started = time.perf_counter()
    data = to_fp16(path)
    return data, (time.perf_counter() - started) * 1000


def mouth_error(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """How far ``candidate`` UNet outputs ([B,3,320,320], 0..1) are from ``reference`` on the
    mouth region: ``max_abs`` (float outputs), ``max_abs_8bit`` and ``psnr_db`` on the 8-bit
    pixels the paste-back writes (``(x * 255)`` truncated, as common/imageops does)."""
    if reference.shape != candidate.shape:
        raise ValueError(f"outputs differ in shape: {reference.shape} vs {candidate.shape}")
    ref = reference[..., _MOUTH[0], _MOUTH[1]].astype(np.float32)
    got = candidate[..., _MOUTH[0], _MOUTH[1]].astype(np.float32)

    def to8(x: np.ndarray) -> np.ndarray:
        return np.clip(np.multiply(x, np.float32(255), dtype=np.float32), 0, 255).astype(np.uint8).astype(np.int16)

    diff8 = np.abs(to8(ref) - to8(got))
    mse = float(np.mean(diff8.astype(np.float64) ** 2))
    return {
        "max_abs": float(np.max(np.abs(ref - got))),
        "max_abs_8bit": int(diff8.max()),
        "mean_abs_8bit": round(float(diff8.mean()), 4),
        "psnr_db": math.inf if mse == 0 else round(10 * math.log10(255.0 ** 2 / mse), 2),
    }


def within_bound(error: dict, bound: dict = FP16_BOUND) -> bool:
    return error["max_abs_8bit"] <= bound["max_abs_8bit"] and error["psnr_db"] >= bound["psnr_db"]


__all__ = ["FP16_BOUND", "PRECISIONS", "PrecisionError", "check_precision", "model_source", "mouth_error",
           "to_fp16", "within_bound"]
