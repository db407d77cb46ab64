"""Model preparation: from a person's video to a servable model package (see docs/PREPARE.md).

``lipsync-cluster prepare`` and ``lipsync-cluster check-model`` live in :mod:`.cli`; the work is in
:mod:`.video` (decode, resample, letterbox), :mod:`.faces` (detect, track, smooth, crop rects),
:mod:`.build` (one package, written atomically) and :mod:`.batch` (many videos in parallel, summary).
"""
from .batch import NameProblems, find_tasks, run_tasks
from .build import PrepareError, Result, Settings, Task, prepare_video

__all__ = ["NameProblems", "PrepareError", "Result", "Settings", "Task", "find_tasks", "prepare_video", "run_tasks"]
