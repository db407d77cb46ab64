"""Many videos at once: find them, check their names, prepare them in parallel, summarise.

Each video is one task in a process pool (``--workers``); a task never raises (its failure is its
:class:`~lipsync_cluster.prepare.build.Result`), and a worker process that dies (e.g. killed for
memory) fails only the videos it held. Each worker process owns one progress bar line
(``position``), so the bars of concurrent videos do not overwrite each other.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..common.model_package import is_valid_model_id, suggest_model_id
from .build import Result, Settings, Task, prepare_video
from .video import VIDEO_EXTENSIONS

RULE = "=" * 70


class NameProblems(Exception):
    """Videos that cannot become models as named; raised before any work is done."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def id_problem(name: str) -> Optional[str]:
    """None for a valid model id, else the sentence with a suggestion."""
    if is_valid_model_id(name):
        return None
    return f"{name!r} is not a valid model id; try {suggest_model_id(name)!r}"


def list_videos(video_dir: Path) -> list[Path]:
    return sorted(p for p in Path(video_dir).iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in VIDEO_EXTENSIONS)


def find_tasks(video_dir: Path, names: Sequence[str] = (), crop_rects: Optional[Path] = None) -> list[Task]:
    """The videos to prepare, as tasks; raises :class:`NameProblems` listing every problem at once.

    ``names``: model names (or video file names) to take; none means every video in the folder.
    ``crop_rects``: a file (only with exactly one video) or a folder of ``NAME.json`` files (a video
    without one gets face detection).
    """
    video_dir = Path(video_dir)
    videos = list_videos(video_dir)
    by_stem: dict[str, list[Path]] = {}
    for v in videos:
        by_stem.setdefault(v.stem, []).append(v)
    problems: list[str] = []
    chosen: list[tuple[str, Path]] = []
    exts = "/".join(e.lstrip(".") for e in VIDEO_EXTENSIONS)
    if names:
        seen = set()
        for raw in names:
            name = raw[:-len(Path(raw).suffix)] if Path(raw).suffix.lower() in VIDEO_EXTENSIONS else raw
            if name in seen:
                continue
            seen.add(name)
            bad = id_problem(name)
            if bad:
                problems.append(bad)
                continue
            found = by_stem.get(name, [])
            if not found:
                problems.append(f"no video for {name!r} in {video_dir} (looked for {name}.{{{exts}}})")
            elif len(found) > 1:
                problems.append(f"{name!r} has {len(found)} videos ({', '.join(p.name for p in found)}); keep one")
            else:
                chosen.append((name, found[0]))
    else:
        if not videos:
            raise NameProblems([f"no videos in {video_dir} (looked for *.{{{exts}}})"])
        for stem, found in sorted(by_stem.items()):
            bad = id_problem(stem)
            if bad:
                problems.append(f"{bad} (rename {found[0].name!r} to "
                                f"'{suggest_model_id(stem)}{found[0].suffix}', or name the others on the command line)")
            elif len(found) > 1:
                problems.append(f"{stem!r} has {len(found)} videos ({', '.join(p.name for p in found)}); keep one")
            else:
                chosen.append((stem, found[0]))
    if problems:
        raise NameProblems(problems)

    tasks = []
    one_file = crop_rects is not None and not Path(crop_rects).is_dir()
    if one_file and len(chosen) != 1:
        raise NameProblems([f"--crop-rects {crop_rects} is one file but {len(chosen)} videos were chosen; name "
                            "one video, or pass a folder with NAME.json for each video"])
    for name, video in chosen:
        rects = None
        if crop_rects is not None:
            rects = Path(crop_rects) if one_file else Path(crop_rects) / f"{name}.json"
            if not one_file and not rects.is_file():
                rects = None  # this video gets face detection
        tasks.append(Task(name=name, video=video, crop_rects=rects))
    return tasks


# --- the pool ----------------------------------------------------------------------------------

_POSITION = 0
_PROGRESS = True


def _init_worker(counter, threads: int, progress: bool) -> None:  # pragma: no cover - runs in a child
    global _POSITION, _PROGRESS
    import cv2  # noqa: PLC0415

    cv2.setNumThreads(threads)
    with counter.get_lock():
        _POSITION = counter.value
        counter.value += 1
    _PROGRESS = progress


def _run_task(task: Task, settings: Settings) -> Result:  # pragma: no cover - runs in a child
    return prepare_video(task, settings, position=_POSITION, progress=_PROGRESS)


def _context():
    methods = multiprocessing.get_all_start_methods()
    # A fresh interpreter per worker: forking a process whose OpenCV/ONNX thread pools already run
    # can deadlock the child.
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def run_tasks(tasks: Sequence[Task], settings: Settings, workers: int = 4, progress: bool = True,
              on_result: Optional[Callable[[Result], None]] = None) -> list[Result]:
    """Prepare every task; results in task order. ``on_result`` is called as each one finishes."""
    results: dict[int, Result] = {}

    def done(k: int, result: Result) -> None:
        results[k] = result
        if on_result is not None:
            on_result(result)

    workers = max(1, min(int(workers), len(tasks)))
    if workers == 1:
        for k, task in enumerate(tasks):
            done(k, prepare_video(task, settings, position=0, progress=progress))
        return [results[k] for k in range(len(tasks))]

    ctx = _context()
    counter = ctx.Value("i", 0)
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(counter, threads, progress)) as pool:
        futures = {pool.submit(_run_task, task, settings): k for k, task in enumerate(tasks)}
        for future in as_completed(futures):
            k = futures[future]
            try:
                result = future.result()
            except BrokenProcessPool:
                result = Result(model=tasks[k].name, video=str(tasks[k].video),
                                reason="the worker process died (killed for memory?); try fewer --workers")
            except Exception as exc:  # noqa: BLE001 - e.g. a result that could not be sent back
                result = Result(model=tasks[k].name, video=str(tasks[k].video), reason=f"{type(exc).__name__}: {exc}")
            done(k, result)
    return [results[k] for k in range(len(tasks))]


# --- reporting ---------------------------------------------------------------------------------


def _mb(n_bytes: float) -> float:
    return n_bytes / 2**20


def result_line(r: Result) -> str:
    if r.status == "failed":
        return f"❌ {r.model}: {r.reason}"
    what = (f"{r.frames:,} frames ({_mb(r.size_bytes):.1f} MB on disk"
            + (f", ~{r.memory_estimate_mb:,.0f} MB when loaded)" if r.memory_estimate_mb is not None else ")"))
    if r.status == "up to date":
        head = f"⏭️  {r.model}: up to date, {what}; --force re-prepares it"
    else:
        head = f"✅ {r.model}: prepared {what}"
    if not r.servable:
        head += f" ⚠️  {r.reason}"
    return head


def totals(results: Sequence[Result]) -> dict:
    ok = [r for r in results if r.ok]
    frames = sum(r.frames for r in ok)
    size = sum(r.size_bytes for r in ok)
    memory = sum(r.memory_estimate_mb or 0 for r in ok)
    return {
        "models": len(results),
        "successful": len(ok),
        "prepared": sum(r.status == "prepared" for r in results),
        "up_to_date": sum(r.status == "up to date" for r in results),
        "failed": len(results) - len(ok),
        "not_servable": sum(r.ok and not r.servable for r in results),
        "frames": frames,
        "size_bytes": size,
        "size_mb": round(_mb(size), 1),
        "average_frames": round(frames / len(ok)) if ok else 0,
        "average_size_mb": round(_mb(size) / len(ok), 1) if ok else 0.0,
        "memory_estimate_mb": round(memory, 1),
    }


def header(tasks: Sequence[Task], video_dir: Path, settings: Settings, workers: int) -> str:
    size = f"{settings.size[0]}x{settings.size[1]} (letterboxed)" if settings.size else "as in each video"
    detect = sum(t.crop_rects is None for t in tasks)
    boxes = []
    if detect:
        boxes.append(f"face detection (OpenCV Haar cascade) for {detect}")
    if len(tasks) - detect:
        boxes.append(f"--crop-rects for {len(tasks) - detect}")
    unet = str(settings.onnx) if settings.onnx else "none given (kept from existing packages; new ones not servable)"
    lines = [RULE, "🎬 Model preparation", RULE,
             f"Models to process: {len(tasks)}",
             f"Video directory: {video_dir}",
             f"Models directory: {settings.models_dir}",
             f"Frame rate: {settings.fps:g} fps",
             f"Frame size: {size}",
             f"JPEG quality: {settings.quality}",
             f"Face boxes: {', '.join(boxes) or '-'}",
             f"UNet: {unet}",
             RULE, "",
             f"⚡ Processing {len(tasks)} model(s) with {max(1, min(workers, len(tasks)))} worker(s)...", ""]
    return "\n".join(lines)


def summary(results: Sequence[Result]) -> str:
    t = totals(results)
    width = max([5] + [len(r.model) for r in results])
    lines = ["", RULE, "📊 Summary", RULE,
             f"{'model':<{width}}  {'status':<10}  {'frames':>7}  {'disk MB':>8}  {'memory MB':>9}  note"]
    for r in results:
        note = r.reason if (r.status == "failed" or not r.servable) else f"version {r.version}"
        frames = f"{r.frames:,}" if r.ok else "-"
        disk = f"{_mb(r.size_bytes):.1f}" if r.ok else "-"
        memory = f"{r.memory_estimate_mb:,.0f}" if r.ok and r.memory_estimate_mb is not None else "-"
        lines.append(f"{r.model:<{width}}  {r.status:<10}  {frames:>7}  {disk:>8}  {memory:>9}  {note}")
    lines += ["-" * 70,
              f"Total models: {t['models']}",
              f"Successful: {t['successful']}" + (f" ({t['up_to_date']} up to date)" if t["up_to_date"] else ""),
              f"Failed: {t['failed']}"]
    if t["not_servable"]:
        lines.append(f"Prepared but not servable: {t['not_servable']} (see the note column)")
    lines += ["",
              f"Total frames: {t['frames']:,}",
              f"Total size: {t['size_mb']:,.1f} MB",
              f"Average frames per model: {t['average_frames']:,}",
              f"Average size per model: {t['average_size_mb']:,.1f} MB",
              "",
              f"Estimated memory (all models loaded): {t['memory_estimate_mb']:,.0f} MB",
              RULE]
    return "\n".join(lines)


def report(results: Sequence[Result], video_dir: Path, settings: Settings, workers: int) -> dict:
    """What --output-json writes: the settings, one entry per model, and the totals."""
    return {
        "video_dir": str(video_dir),
        "models_dir": str(settings.models_dir),
        "settings": {"fps": settings.fps, "quality": settings.quality,
                     "size": list(settings.size) if settings.size else "source",
                     "onnx": str(settings.onnx) if settings.onnx else None, "max_missing": settings.max_missing,
                     "force": settings.force, "workers": workers},
        "models": [r.to_dict() for r in results],
        "totals": totals(results),
    }


def progress_default() -> bool:
    return sys.stderr.isatty()
