"""Prepare one model package from one video (see docs/PREPARE.md).

The package is built in ``MODELS_DIR/.prepare-tmp/<name>.<pid>.<tag>/`` (a hidden folder without a
manifest, which no scan of MODELS_DIR takes for a model) in this order: frames, crop_rects.json, the
UNet, prepare.json, and model.yaml last (written to a temporary name and ``os.replace``-d). The
finished folder is then swapped in for ``MODELS_DIR/<name>``: a plain rename when the model is new;
when it exists, an atomic exchange of the two folders (Linux ``renameat2(RENAME_EXCHANGE)``), so that
``MODELS_DIR/<name>`` is at every instant either the complete old package or the complete new one;
where the file system cannot exchange, the old folder is renamed aside first (a window of
microseconds in which the model is absent). A running cluster therefore never reads a half-written
package, and a failed preparation leaves the old package untouched.

``prepare.json`` beside model.yaml records what the package was made from (the source video's size
and modification time, every parameter, the UNet's source) and what came out (frames, face
detection statistics, sizes). A later run with the same inputs skips the model; one where only
``--onnx`` changed reuses the frames (hard links) and only replaces the UNet and the version.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np
import yaml

from ..common.model_package import (MANIFEST, SESSION_MEMORY_FACTOR, ModelPackageError, check_unet_onnx,
                                    compute_version, list_frame_files, read_crop_rects, read_package,
                                    validate_package)
from . import faces
from .video import Letterbox, VideoError, VideoSource

PREPARE_RECORD = "prepare.json"
PREPARE_FORMAT = 1
TMP_DIR = ".prepare-tmp"
UNET_FILE = "model.onnx"
FRAMES_DIR = "frames"
RECTS_FILE = "crop_rects.json"
KIND = "prepared"
WRITE_AHEAD = 8  # frames being encoded at once per video


class PrepareError(Exception):
    """A video cannot be made into a package; the message says why, for the summary table."""


@dataclass(frozen=True)
class Settings:
    models_dir: Path
    fps: float = 25.0
    quality: int = 85
    size: Optional[tuple[int, int]] = (1280, 720)  # None: keep each video's size
    onnx: Optional[Path] = None
    max_missing: float = faces.MAX_MISSING
    force: bool = False
    write_threads: int = 2


@dataclass(frozen=True)
class Task:
    name: str  # the model id
    video: Path
    crop_rects: Optional[Path] = None  # boxes given by the user instead of detection


@dataclass
class Result:
    """One line of the summary table (and of --output-json)."""

    model: str
    video: str
    status: str = "failed"  # prepared | up to date | failed
    servable: bool = False
    reason: str = ""  # why it failed, or why it is not servable
    notes: list[str] = field(default_factory=list)
    frames: int = 0
    frame_size: Optional[list[int]] = None
    fps: Optional[float] = None
    size_bytes: int = 0
    memory_estimate_mb: Optional[float] = None
    version: Optional[str] = None
    boxes: Optional[str] = None  # "detected" | "file"
    face: Optional[dict] = None  # detection statistics
    package: Optional[str] = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def to_dict(self) -> dict:
        return asdict(self)


# --- small helpers ------------------------------------------------------------------------


def estimate_memory_mb(frames: int, frame_size: tuple[int, int], onnx_bytes: int) -> float:
    """Memory when loaded: every frame decoded (N x H x W x 3 bytes) plus the UNet's session."""
    w, h = frame_size
    total = frames * w * h * 3 + onnx_bytes * SESSION_MEMORY_FACTOR
    return round(total / 2**20, 1)


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def file_stamp(path: Path, with_hash: bool = False) -> dict:
    st = Path(path).stat()
    stamp: dict[str, Any] = {"file": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if with_hash:
        stamp["sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return stamp


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_jpeg(path: Path, image: np.ndarray, quality: int) -> int:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 BGR image
        raise PrepareError(f"OpenCV could not encode frame {path.name}")
    buf.tofile(str(path))
    return int(buf.size)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp(tmp_root: Path, name: str) -> None:
    if not tmp_root.is_dir():
        return
    for entry in tmp_root.iterdir():
        parts = entry.name.split(".")
        if len(parts) >= 3 and parts[0] == name and parts[1].isdigit() and not _pid_alive(int(parts[1])):
            shutil.rmtree(entry, ignore_errors=True)


def _new_tmp(models_dir: Path, name: str) -> Path:
    root = models_dir / TMP_DIR
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root, name)
    tmp = root / f"{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _cleanup_tmp_root(models_dir: Path) -> None:
    try:
        (models_dir / TMP_DIR).rmdir()  # only when empty: other workers may be using it
    except OSError:
        pass


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two folders (Linux renameat2 RENAME_EXCHANGE). False when not possible here."""
    try:
        # The symbols already loaded into this process (libc among them): ctypes.util.find_library
        # would start `ldconfig -p` (a process) on every swap.
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def swap_in(tmp: Path, dest: Path) -> None:
    """Make the finished package ``tmp`` the package at ``dest``; the old one (if any) is removed."""
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise PrepareError(f"{dest} exists and is not a folder; remove it or choose another name")
    if not dest.exists():
        try:
            os.rename(tmp, dest)
            return
        except OSError:
            if not dest.exists():
                raise
    if _exchange(tmp, dest):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old package
        return
    aside = tmp.with_name(tmp.name + ".old")
    os.rename(dest, aside)
    try:
        os.rename(tmp, dest)
    except OSError:
        os.rename(aside, dest)
        raise
    shutil.rmtree(aside, ignore_errors=True)


# --- what a package was made from ------------------------------------------------------------


def parameters(task: Task, settings: Settings) -> dict:
    """Everything the frames and boxes depend on (not the UNet: that is recorded separately)."""
    st = task.video.stat()
    if task.crop_rects is not None:
        boxes: dict[str, Any] = {"crop_rects": file_stamp(task.crop_rects, with_hash=True)}
    else:
        boxes = {"detector": faces.DETECTOR_ID, "rect_side": faces.RECT_SIDE, "rect_top": faces.RECT_TOP,
                 "smooth_s": faces.SMOOTH_WINDOW_S, "max_missing": settings.max_missing}
    return {
        "format": PREPARE_FORMAT,
        "source": {"file": str(task.video.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns},
        "fps": float(settings.fps),
        "quality": int(settings.quality),
        "size": list(settings.size) if settings.size else "source",
        "boxes": boxes,
    }


def read_record(package: Path) -> Optional[dict]:
    """The package's prepare.json (what it was made from, and how), or None when absent or unreadable."""
    try:
        data = json.loads((package / PREPARE_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _manifest(package: Path) -> Optional[dict]:
    try:
        data = yaml.safe_load((package / MANIFEST).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _package_intact(package: Path, record: dict) -> bool:
    """The package still is what the record says (nobody edited or deleted parts of it)."""
    manifest = _manifest(package)
    if manifest is None or manifest.get("version") != record.get("version"):
        return False
    try:
        frames = list_frame_files(package / FRAMES_DIR)
    except ModelPackageError:
        return False
    return len(frames) == record.get("frames") and (package / RECTS_FILE).is_file()


# --- building ----------------------------------------------------------------------------


def _position_bar(name: str, total: int, position: int, progress: bool):
    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(total=total or None, desc=name[:24].ljust(24), position=position, leave=False, unit="frame",
                disable=not progress, dynamic_ncols=True)


def _decode_and_write(task: Task, settings: Settings, frames_dir: Path, detect: bool, position: int,
                      progress: bool, result: Result) -> tuple[int, tuple[int, int], list, VideoSource]:
    """Resample, letterbox, write the frames; detect faces on the way. Returns (n, size, raw boxes)."""
    try:
        src = VideoSource(task.video, settings.fps)
    except VideoError as exc:
        raise PrepareError(str(exc)) from None
    with src:
        if src.info.fps_assumed:
            result.notes.append(f"the video does not say its frame rate; assumed {settings.fps:g} fps")
        box = Letterbox.fit(src.info.src_size, settings.size)
        tracker = faces.FaceTracker() if detect else None
        raw: list = []
        bar = _position_bar(task.name, src.expected_frames(), position, progress)
        pending: deque = deque()
        n = 0
        try:
            with ThreadPoolExecutor(max(1, settings.write_threads), thread_name_prefix="jpeg") as pool:
                for i, _, frame in src.frames():
                    out = box.apply(frame)
                    pending.append(pool.submit(_write_jpeg, frames_dir / f"frame_{i:04d}.jpg", out, settings.quality))
                    if tracker is not None:
                        raw.append(tracker.detect(out))
                    while len(pending) > WRITE_AHEAD:
                        pending.popleft().result()
                    n = i + 1
                    bar.update(1)
                while pending:
                    pending.popleft().result()
        except VideoError as exc:
            raise PrepareError(str(exc)) from None
        finally:
            bar.close()
        result.notes.append(f"{src.source_frames} source frames at {float(src.info.src_fps):.3g} fps, "
                            f"{src.info.src_size[0]}x{src.info.src_size[1]}")
    if n == 0:
        raise PrepareError(f"{task.video.name}: no frames decoded")
    return n, box.size, raw, src


def _rects(task: Task, settings: Settings, n: int, size: tuple[int, int], raw: list, src: VideoSource,
           result: Result) -> list[list[int]]:
    if task.crop_rects is not None:
        try:
            rects = read_crop_rects(task.crop_rects)
        except ModelPackageError as exc:
            raise PrepareError(f"--crop-rects {exc.message}") from None
        if len(rects) != n:
            raise PrepareError(
                f"--crop-rects {task.crop_rects.name} has {len(rects)} rects but the video gives {n} frames at "
                f"{settings.fps:g} fps ({src.source_frames} source frames at {float(src.info.src_fps):.3g} fps); "
                "give one rect per output frame")
        problems = faces.rect_problems(rects, size)
        if problems:
            raise PrepareError(f"--crop-rects {task.crop_rects.name}: " + "; ".join(problems)
                               + " (rects are in the coordinates of the prepared frames, after --size)")
        result.boxes = "file"
        return rects.tolist()
    try:
        track = faces.stabilise(raw, settings.fps, settings.max_missing)
    except faces.FaceError as exc:
        raise PrepareError(str(exc)) from None
    result.boxes = "detected"
    result.face = track.summary()
    return faces.rects_from_track(track, size)


def _finish_package(tmp: Path, task: Task, settings: Settings, record: dict, n: int,
                    size: tuple[int, int], result: Result) -> None:
    """UNet bookkeeping, version, prepare.json, and model.yaml (last, atomically)."""
    unet = tmp / UNET_FILE
    frame_paths = list_frame_files(tmp / FRAMES_DIR)
    onnx_bytes = unet.stat().st_size if unet.is_file() else 0
    version = compute_version(unet, tmp / RECTS_FILE, frame_paths) if unet.is_file() else None
    memory = estimate_memory_mb(n, size, onnx_bytes)
    record.update({"version": version, "frames": n, "frame_size": list(size), "memory_estimate_mb": memory,
                   "boxes_from": result.boxes, "face": result.face,
                   "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    _write_atomic(tmp / PREPARE_RECORD, json.dumps(record, indent=2) + "\n")
    manifest = {"id": task.name, "onnx": UNET_FILE, "frames": FRAMES_DIR, "crop_rects": RECTS_FILE,
                "fps": float(settings.fps), "frame_count": n, "frame_size": [int(size[0]), int(size[1])]}
    if version:  # without a UNet the cluster computes it from the files once one is added
        manifest["version"] = version
    manifest.update({"kind": KIND, "memory_estimate_mb": memory, "preload": False})
    _write_atomic(tmp / MANIFEST, "# written by lipsync-cluster prepare; see prepare.json for the inputs\n"
                  + yaml.safe_dump(manifest, sort_keys=False))
    problems = validate_package(read_package(tmp, task.name), check_onnx=unet.is_file())
    # The UNet's own problems make the package unservable, not unprepared (see _describe); only a
    # UNet kept from the previous package can have any: --onnx is checked before any work.
    problems = [p for p in problems if not p.startswith(f"{UNET_FILE}:")]
    if problems:
        raise PrepareError("the package does not validate: " + "; ".join(problems[:3]))
    result.version, result.frames, result.frame_size = version, n, [int(size[0]), int(size[1])]
    result.memory_estimate_mb, result.fps = memory, float(settings.fps)


def _place_unet(tmp: Path, settings: Settings, dest: Path, record: dict, old: Optional[dict]) -> None:
    target = tmp / UNET_FILE
    if settings.onnx is not None:
        shutil.copyfile(settings.onnx, target)  # a copy: a later in-place rewrite of the source cannot
        record["onnx"] = file_stamp(settings.onnx)  # change the package behind its version
    elif (dest / UNET_FILE).is_file():
        _link_or_copy(dest / UNET_FILE, target)
        record["onnx"] = (old or {}).get("onnx") or {"file": "kept from the previous package"}
    else:
        record["onnx"] = None


def _describe(result: Result, dest: Path) -> None:
    result.package = str(dest)
    result.size_bytes = folder_bytes(dest)
    unet = dest / UNET_FILE
    problems = check_unet_onnx(unet, UNET_FILE) if unet.is_file() else ["no UNet (pass --onnx)"]
    result.servable = not problems
    if problems:
        result.reason = "not servable: " + "; ".join(problems[:2])


def prepare_video(task: Task, settings: Settings, position: int = 0, progress: bool = True) -> Result:
    """Make (or skip, or update) the package of one video. Never raises: failures are in the Result."""
    started = time.perf_counter()
    result = Result(model=task.name, video=str(task.video))
    models_dir = Path(settings.models_dir)
    dest = models_dir / task.name
    tmp: Optional[Path] = None
    try:
        params = parameters(task, settings)
        old = read_record(dest) if dest.is_dir() else None
        if dest.exists() and old is None and not settings.force:
            raise PrepareError(f"{dest} exists and was not made by prepare (no {PREPARE_RECORD}); "
                               "pass --force to replace it")
        same_frames = (old is not None and old.get("params") == params and _package_intact(dest, old))
        onnx_same = settings.onnx is None or (old is not None and old.get("onnx") == file_stamp(settings.onnx))
        if same_frames and onnx_same and not settings.force:
            result.status = "up to date"
            result.frames = int(old.get("frames", 0))
            result.frame_size = old.get("frame_size")
            result.fps = params["fps"]
            result.memory_estimate_mb = old.get("memory_estimate_mb")
            result.version = old.get("version")
            result.boxes, result.face = old.get("boxes_from"), old.get("face")
            _describe(result, dest)
            return result

        tmp = _new_tmp(models_dir, task.name)
        record: dict[str, Any] = {"format": PREPARE_FORMAT, "model": task.name, "params": params}
        if same_frames and not settings.force:
            # Only the UNet changed: reuse the frames and boxes (hard links), new UNet and version.
            (tmp / FRAMES_DIR).mkdir()
            for p in list_frame_files(dest / FRAMES_DIR):
                _link_or_copy(p, tmp / FRAMES_DIR / p.name)
            shutil.copyfile(dest / RECTS_FILE, tmp / RECTS_FILE)
            n, size = int(old["frames"]), tuple(old["frame_size"])
            result.boxes, result.face = old.get("boxes_from"), old.get("face")
            result.notes.append("only the UNet changed: frames and boxes reused")
        else:
            (tmp / FRAMES_DIR).mkdir()
            detect = task.crop_rects is None
            n, size, raw, src = _decode_and_write(task, settings, tmp / FRAMES_DIR, detect, position, progress, result)
            rects = _rects(task, settings, n, size, raw, src, result)
            _write_atomic(tmp / RECTS_FILE, "[\n" + ",\n".join(json.dumps(r) for r in rects) + "\n]\n")
        _place_unet(tmp, settings, dest, record, old)
        _finish_package(tmp, task, settings, record, n, size, result)
        swap_in(tmp, dest)
        tmp = None
        result.status = "prepared"
        _describe(result, dest)
    except PrepareError as exc:
        result.status, result.reason = "failed", str(exc)
    except Exception as exc:  # noqa: BLE001 - one video's surprise must not stop the others
        result.status, result.reason = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _cleanup_tmp_root(models_dir)
        result.seconds = round(time.perf_counter() - started, 2)
    return result
