"""Model preparation: from a person's video to a servable model package (see docs/PREPARE.md).

``lipsync-cluster prepare`` and ``lipsync-cluster check-model`` live in :mod:`.cli`; the work is in
:mod:`.video` (decode, resample, letterbox), :mod:`.faces` (detect, track, smooth, crop rects),
:mod:`.build` (one package, written atomically) and :mod:`.batch` (many videos in parallel, summary).

The names below load on first use: the CLI imports this package to register its commands, and
OpenCV (the 'tools' extra) is needed only when a command runs.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"NameProblems": "batch", "find_tasks": "batch", "run_tasks": "batch", "PrepareError": "build",
          "Result": "build", "Settings": "build", "Task": "build", "prepare_video": "build"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
