"""Demo models: synthetic people and honest hand-built ONNX models, for running without real weights.

- :mod:`.frames`: ``render_person(seed, n_frames, size)`` -> frames and true face boxes
- :mod:`.audio_encoder`: ``build_audio_encoder(path)`` (mel -> 512, tracks loudness)
- :mod:`.light`: ``build_light_unet(path)`` (crop + a mouth that opens with the audio), ``mouth_open_pixels``
- :mod:`.unet`: ``build_synctalk_unet(path, seed)`` (SyncTalk_2D 328 topology, ~12 M random weights)
- :mod:`.build`: ``build_demo_models(out_dir, ...)`` -> packages + audio encoder + cluster.yaml
- :mod:`.cli`: the ``lipsync-cluster demo-models`` command

Names are imported lazily, so ``lipsync-cluster --help`` does not pay for onnx and OpenCV.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "render_person": "frames",
    "PersonRenderer": "frames",
    "build_audio_encoder": "audio_encoder",
    "reference_audio_encoder": "audio_encoder",
    "build_light_unet": "light",
    "reference_light_unet": "light",
    "mouth_open_pixels": "light",
    "build_synctalk_unet": "unet",
    "build_demo_models": "build",
    "model_id": "build",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
