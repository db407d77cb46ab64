"""Which optional install ("extra") a command needs, and the one line that says so when it is missing.

A plain ``pip install lipsync-cluster`` is the client library and the management CLI (numpy, pyzmq,
msgpack, click). Everything else is an extra (setup.cfg); a command whose extra is missing stops
with, e.g.::

    lipsync-cluster render needs the 'tools' extra: pip install 'lipsync-cluster[tools]'
"""
from __future__ import annotations

import importlib.util
from typing import Iterable, Optional

DISTRIBUTION = "lipsync-cluster"

# The modules each extra provides that its commands import (setup.cfg lists the distributions).
# 'cpu' and 'gpu' provide the same modules (onnxruntime and onnxruntime-gpu both install
# `onnxruntime`), so 'cpu' stands for both; the message names the other.
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "cpu": ("onnxruntime", "onnx", "cv2", "yaml", "PIL", "psutil", "prometheus_client"),
    "tools": ("cv2", "onnx", "yaml", "PIL", "scipy", "tqdm", "imageio_ffmpeg"),
    "console": ("rich", "tqdm"),
    "plot": ("matplotlib",),
    "gateway": ("aiohttp",),
    "pipecat": ("pipecat",),
    "livekit": ("livekit",),
    "webrtc": ("aiohttp", "aiortc", "av"),
}
_HINT = {"cpu": " (or 'gpu' on a GPU host: pip install 'lipsync-cluster[gpu]')"}


class MissingExtra(ImportError):
    """A command needs an extra that is not installed; the message is the one line to show."""

    def __init__(self, command: str, extra: str, module: Optional[str] = None) -> None:
        self.command, self.extra, self.module = command, extra, module
        super().__init__(f"{command} needs the '{extra}' extra: pip install '{DISTRIBUTION}[{extra}]'"
                         f"{_HINT.get(extra, '')}", name=module)


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (found without importing them)."""
    return [m for m in EXTRA_MODULES[extra] if importlib.util.find_spec(m) is None]


def require(command: str, *extras: str) -> None:
    """Raise :class:`MissingExtra` for the first of ``extras`` that is not fully installed."""
    for extra in extras:
        missing = missing_modules(extra)
        if missing:
            raise MissingExtra(command, extra, missing[0])


def extra_providing(module: Optional[str], prefer: Iterable[str] = ()) -> Optional[str]:
    """The extra that installs top-level ``module`` (one of ``prefer`` first), or None."""
    top = (module or "").split(".")[0]
    for extra in [*prefer, *EXTRA_MODULES]:
        if top in EXTRA_MODULES.get(extra, ()):
            return extra
    return None


__all__ = ["EXTRA_MODULES", "MissingExtra", "extra_providing", "missing_modules", "require"]
