"""A hand-built audio encoder with the real one's interface: ``mel_spectrogram`` -> ``audio_features``.

The real SyncTalk_2D audio encoder (AVE) maps a mel window ``[B, 1, 80, 16]`` (normalised to
[-4, 4]; -4 is digital silence) to ``[B, 512]`` features. No trained weights exist on this
machine, so this one is built by hand and does one honest thing: it measures how loud the
window is.

The mapping (all float32)::

    e     = mean(mel[:, 0, :, C0:C1])          # 80 bins x mel columns C0..C1-1 (0..7)
    a     = max(0, (e + 4) / 3)                # silence (-4) -> 0; loud speech (mean ~ -1) -> ~1
    out_c = a * W[c]   for c in 0..511         # W: fixed positive weights, mean exactly 1

so ``mean(out) == a`` and any consumer can read the energy back from one frame's 512 features
(the demo UNets do: :mod:`lipsync_cluster.demo.light`).

Why columns 0..7 and not the middle of the window: video frame ``i`` takes the 16 mel frames
*starting* at its own time (``int(80 * i / 25)``), one mel frame every 12.5 ms, so columns 0..3
are the frame's own 40 ms and 4..7 the next 40 ms. Averaging 0..7 keeps the mouth in time with
the sound (leading it by ~25 ms, as real mouths do) while smoothing the 40 ms jitter; the middle
columns would open the mouth ~100 ms before the sound.

Calibration (mel per docs/ARCHITECTURE.md, 16 kHz): digital silence e = -4 (a = 0); white noise at
-60 dBFS e ~ -3 (a ~ 0.34); a voiced vowel peaking at 0.1 / 0.3 / 0.8 full scale
e ~ -1.7 / -1.3 / -0.6 (a ~ 0.78 / 0.90 / 1.14).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
INPUT_NAME = "mel_spectrogram"
OUTPUT_NAME = "audio_features"
N_MELS = 80
N_COLS = 16
FEATURE_DIM = 512
ENERGY_COLUMNS = (0, 8)  # mel columns C0..C1-1 whose mean is the frame's energy
SILENCE = -4.0  # the normalised mel of digital silence
LOUD = -1.0  # the mean normalised mel that maps to 1.0 (loud speech)
_WEIGHT_SEED = 512


def channel_weights() -> np.ndarray:
    """The fixed positive per-channel weights ``W`` (float32 [512], in ~[0.5, 1.5], mean 1)."""
    w = np.random.RandomState(_WEIGHT_SEED).uniform(0.5, 1.5, FEATURE_DIM)
    return (w / w.mean()).astype(np.float32)


def reference_energy(mel: np.ndarray) -> np.ndarray:
    """The scalar ``a`` per window (float32 [B]) that the encoder spreads over its 512 outputs."""
    mel = np.asarray(mel, np.float32)
    if mel.ndim != 4 or mel.shape[1:] != (1, N_MELS, N_COLS):
        raise ValueError(f"mel must be [B, 1, {N_MELS}, {N_COLS}], got {list(mel.shape)}")
    c0, c1 = ENERGY_COLUMNS
    e = mel[:, :, :, c0:c1].mean(axis=(1, 2, 3), dtype=np.float32)
    return np.maximum(np.float32(0), (e - np.float32(SILENCE)) * np.float32(1.0 / (LOUD - SILENCE)))


def reference_audio_encoder(mel: np.ndarray) -> np.ndarray:
    """Pure-numpy twin of the ONNX graph: ``[B, 1, 80, 16]`` -> ``[B, 512]`` float32."""
    return (reference_energy(mel)[:, None] * channel_weights()[None, :]).astype(np.float32)


def make_audio_encoder_model() -> onnx.ModelProto:
    """The encoder as an in-memory ONNX model (opset 17, checked)."""
    c0, c1 = ENERGY_COLUMNS
    inits = [
        numpy_helper.from_array(np.array([c0], np.int64), "cols_start"),
        numpy_helper.from_array(np.array([c1], np.int64), "cols_end"),
        numpy_helper.from_array(np.array([3], np.int64), "cols_axis"),
        numpy_helper.from_array(np.array([-SILENCE], np.float32), "energy_shift"),
        numpy_helper.from_array(np.array([1.0 / (LOUD - SILENCE)], np.float32), "energy_scale"),
        numpy_helper.from_array(np.array([-1, 1], np.int64), "to_column"),
        numpy_helper.from_array(channel_weights()[None, :], "channel_weights"),
    ]
    nodes = [
        helper.make_node("Slice", [INPUT_NAME, "cols_start", "cols_end", "cols_axis"], ["mel_window"]),
        helper.make_node("ReduceMean", ["mel_window"], ["energy4"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["energy4", "to_column"], ["energy"]),  # [B, 1]
        helper.make_node("Add", ["energy", "energy_shift"], ["energy_shifted"]),
        helper.make_node("Mul", ["energy_shifted", "energy_scale"], ["energy_scaled"]),
        helper.make_node("Relu", ["energy_scaled"], ["loudness"]),
        helper.make_node("Mul", ["loudness", "channel_weights"], [OUTPUT_NAME]),  # [B,1] * [1,512]
    ]
    graph = helper.make_graph(
        nodes, "demo_audio_encoder",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["B", 1, N_MELS, N_COLS])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["B", FEATURE_DIM])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="lipsync_cluster.demo", doc_string=__doc__.split("\n\n")[0])
    model.ir_version = 8  # readable by every ONNX Runtime from 1.10 on
    onnx.checker.check_model(model, full_check=True)
    return model


def build_audio_encoder(path: str | os.PathLike) -> Path:
    """Write the demo audio encoder ONNX to ``path`` (atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = make_audio_encoder_model().SerializeToString()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path
