"""Model packages: a folder per avatar (manifest, UNet, background frames, face boxes).

See ARCHITECTURE.md, "Model package". This module is the one place that reads them.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

MANIFEST = "model.yaml"


def compute_version(onnx_path: Path, crop_rects_path: Path, frame_paths: list[Path]) -> str:
    """Content hash of a package: UNet bytes, crop rects bytes, and each frame's name and bytes.

    16 hex digits of SHA-256. Any change to what the cluster would serve changes it.
    """
    h = hashlib.sha256()
    for path in (onnx_path, crop_rects_path):
        h.update(Path(path).name.encode())
        h.update(Path(path).read_bytes())
    for path in sorted(frame_paths, key=lambda p: Path(p).name):
        h.update(Path(path).name.encode())
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]
