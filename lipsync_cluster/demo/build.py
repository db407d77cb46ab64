"""Write demo model packages, the shared audio encoder and a ready cluster config.

``build_demo_models(OUT)`` makes::

    OUT/
      cluster.yaml            ready for `lipsync-cluster start --config OUT/cluster.yaml`
      audio_encoder.onnx      mel [B,1,80,16] -> [B,512] (demo.audio_encoder)
      demo_ada/
        model.yaml            the manifest (common.model_package)
        model.onnx            demo.light or demo.unet (one built file, hard-linked into each package)
        frames/frame_0000.jpg ...
        crop_rects.json       [[x1, y1, x2, y2], ...]
      demo_ben/ ...

A package whose recorded build parameters match (and whose content hash still checks out) is
kept as it is unless ``force``. Packages are assembled in ``OUT/.demo_build/`` and renamed into
place, so an interrupted build never leaves a half package where a models_dir scan looks.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import cv2
import yaml

from ..common.model_package import MANIFEST, compute_version
from ..common.protocol import MODEL_ID_RE
from .audio_encoder import make_audio_encoder_model
from .frames import FPS, PersonRenderer
from .light import build_light_unet
from .unet import build_synctalk_unet

KINDS = ("light", "unet")
JPEG_QUALITY = 95
AUDIO_ENCODER_FILE = "audio_encoder.onnx"
CLUSTER_FILE = "cluster.yaml"
BUILD_DIR = ".demo_build"  # scratch folder for packages being assembled
PARAMS_FILE = ".demo_build.json"  # what a package was built from, to skip it next time
GENERATOR = 1  # bump when the drawing or the models change, so old packages are rebuilt

NAMES = ("ada", "ben", "cleo", "dev", "eva", "finn", "gia", "hugo", "iris", "jon", "kai", "lena", "milo", "nora",
         "omar", "pia", "quinn", "rosa", "sam", "tess", "uma", "vik", "wren", "xavi", "yara", "zeke")


def model_id(index: int) -> str:
    """The id of the ``index``-th demo model (0-based): ``demo_ada`` ... ``demo_zeke``, then ``demo_27`` ..."""
    mid = f"demo_{NAMES[index]}" if index < len(NAMES) else f"demo_{index + 1:02d}"
    assert MODEL_ID_RE.fullmatch(mid), mid
    return mid


def person_seed(seed: int, index: int) -> int:
    """The drawing seed of model ``index`` in a build with ``seed`` (distinct across both)."""
    return (int(seed) * 1_000_003 + int(index)) % (2**31)


def memory_estimate_mb(onnx_bytes: int, frame_count: int, size: tuple[int, int]) -> int:
    """ONNX file size plus the decoded frames (N x H x W x 3 bytes), in MiB, rounded up."""
    width, height = size
    return int(math.ceil((onnx_bytes + frame_count * width * height * 3) / 2**20))


CLUSTER_YAML = """\
# lipsync-cluster configuration for the demo models in this folder.
# Written by `lipsync-cluster demo-models` (kept as it is on later runs, unless --force).
# Start it with:
#   lipsync-cluster start --config {config} --gpus 0 --per-gpu 2
# Relative paths below are resolved against this file's folder.

# Where the model packages are: every sub-folder holding a model.yaml is served under its id.
models_dir: .

# The shared audio encoder (mel [B,1,80,16] -> features [B,512]), used when a client sends
# 16 kHz PCM instead of ready audio features.
audio_encoder: {audio_encoder}

# What each worker keeps loaded, and how it makes room for the next model.
capacity:
  max_models: 3            # models loaded at once per worker
  max_memory_gb: 4         # per-worker budget: the worker's whole footprint (process + models + workspace;
                           # GPU memory on a GPU); docs/CONFIG.md, docs/RELIABILITY.md
  eviction_policy: lfu     # lfu: evict the least requested (cluster-wide, decayed); lru: least recent
  idle_unload_minutes: 30  # unload a model no request touched for this long (0 = never)

# ONNX Runtime settings for the UNet sessions.
onnx:
  cuda_enabled: true       # use CUDA on workers given a GPU; CPU workers (--gpus 0) never ask for it
  intra_op_threads: 1      # threads per session (0 = this host's cores split evenly between its workers)

# The worker pool. The command-line flags --gpus and --per-gpu override these.
cluster:
  gpus: 0                  # GPUs to use; 0 runs CPU workers
  per_gpu: 2               # worker processes per GPU (the number of CPU workers when gpus is 0)

# What gets logged.
logging:
  level: info                 # debug, info, warning or error
  log_model_operations: true  # a line for every model load, eviction and unload
  stats_report_minutes: 1     # a stats summary every N minutes (0 = off)
"""


@dataclass
class BuildResult:
    """What :func:`build_demo_models_report` did."""

    out_dir: Path
    packages: list[Path] = field(default_factory=list)
    built: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    cluster_yaml: Optional[Path] = None
    audio_encoder: Optional[Path] = None


def _params(kind: str, frames: int, size: tuple[int, int], seed: int, index: int) -> dict:
    return {"generator": GENERATOR, "kind": kind, "frames": int(frames), "size": [int(size[0]), int(size[1])],
            "seed": int(seed), "person_seed": person_seed(seed, index)}


def _frame_name(i: int) -> str:
    return f"frame_{i:04d}.jpg"


def _package_is_current(pkg: Path, params: dict) -> bool:
    """True when ``pkg`` was built from ``params`` and its files still hash to its version."""
    try:
        if json.loads((pkg / PARAMS_FILE).read_text()) != params:
            return False
        manifest = yaml.safe_load((pkg / MANIFEST).read_text())
        frame_paths = [pkg / "frames" / _frame_name(i) for i in range(params["frames"])]
        if manifest.get("frame_count") != params["frames"] or not all(p.is_file() for p in frame_paths):
            return False
        version = compute_version(pkg / manifest["onnx"], pkg / manifest["crop_rects"], frame_paths)
        return version == manifest.get("version")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError):
        return False


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _write_if_changed(path: Path, data: bytes) -> None:
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_manifest(pkg: Path, mid: str, kind: str, frames: int, size: tuple[int, int]) -> dict:
    frame_paths = [pkg / "frames" / _frame_name(i) for i in range(frames)]
    onnx_path, rects_path = pkg / "model.onnx", pkg / "crop_rects.json"
    manifest = {
        "id": mid,
        "onnx": "model.onnx",
        "frames": "frames",
        "crop_rects": "crop_rects.json",
        "fps": int(FPS),
        "frame_count": int(frames),
        "frame_size": [int(size[0]), int(size[1])],
        "version": compute_version(onnx_path, rects_path, frame_paths),
        "kind": kind,
        "memory_estimate_mb": memory_estimate_mb(onnx_path.stat().st_size, frames, size),
        "preload": False,
    }
    comments = {
        "frame_size": "width, height",
        "version": "content hash of model.onnx, crop_rects.json and the frames",
        "kind": "light | unet (demo models)",
        "memory_estimate_mb": "model.onnx + decoded frames (N x H x W x 3 bytes), MiB",
    }
    lines = ["# Demo avatar model package (synthetic person), written by `lipsync-cluster demo-models`."]
    for key, value in manifest.items():
        flow = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
        text = f"{key}: {flow.removesuffix('...').strip()}"
        lines.append(f"{text:<34}# {comments[key]}" if key in comments else text)
    (pkg / MANIFEST).write_text("\n".join(lines) + "\n")
    return manifest


def _render_frames(pkg: Path, pseed: int, frames: int, size: tuple[int, int], bar) -> list[list[int]]:
    """Draw and JPEG-encode every frame on a thread pool (OpenCV releases the GIL); return the rects."""
    renderer = PersonRenderer(pseed, size)
    frames_dir = pkg / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> list[int]:
        img, rect = renderer.frame(i)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:  # pragma: no cover - OpenCV always encodes a uint8 BGR image
            raise RuntimeError(f"JPEG encoding failed for frame {i}")
        (frames_dir / _frame_name(i)).write_bytes(buf.tobytes())
        return rect

    rects: list[list[int]] = []
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="demo-frames") as pool:
        for rect in pool.map(one, range(frames)):
            rects.append(rect)
            bar.update(1)
    return rects


def build_demo_models_report(out_dir, count: int = 3, kind: str = "light", frames: int = 100,
                             size: tuple[int, int] = (1280, 720), seed: int = 0, force: bool = False,
                             progress: bool = True) -> BuildResult:
    """:func:`build_demo_models`, also telling which packages were built and which kept."""
    from tqdm import tqdm

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    size = (int(size[0]), int(size[1]))
    if size[0] < 64 or size[1] < 64:
        raise ValueError(f"size must be at least 64x64, got {size[0]}x{size[1]}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = BuildResult(out_dir=out)

    # shared files: the audio encoder (deterministic, tiny) and the cluster config
    result.audio_encoder = out / AUDIO_ENCODER_FILE
    _write_if_changed(result.audio_encoder, make_audio_encoder_model().SerializeToString())
    result.cluster_yaml = out / CLUSTER_FILE
    if force or not result.cluster_yaml.exists():
        text = CLUSTER_YAML.format(config=str(out / CLUSTER_FILE), audio_encoder=AUDIO_ENCODER_FILE)
        _write_if_changed(result.cluster_yaml, text.encode())

    shared_onnx: Optional[Path] = None  # the one built model file the packages link to
    models_bar = tqdm(total=count, desc=f"demo models ({kind})", unit="model", disable=not progress, position=0)
    try:
        for index in range(count):
            mid = model_id(index)
            pkg = out / mid
            params = _params(kind, frames, size, seed, index)
            result.packages.append(pkg)
            if not force and _package_is_current(pkg, params):
                result.skipped.append(mid)
                models_bar.update(1)
                continue
            # assembled one level down, where a models_dir scan does not look, then renamed into place
            tmp = out / BUILD_DIR / f"{mid}.{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                if shared_onnx is None:
                    models_bar.set_postfix_str(f"building {kind} ONNX")
                    if kind == "light":
                        build_light_unet(tmp / "model.onnx")
                    else:
                        build_synctalk_unet(tmp / "model.onnx", seed=seed)
                    shared_onnx = pkg / "model.onnx"  # where it will live after the rename below
                else:
                    _link_or_copy(shared_onnx, tmp / "model.onnx")
                models_bar.set_postfix_str(mid)
                with tqdm(total=frames, desc=f"  {mid} frames", unit="frame", disable=not progress, position=1,
                          leave=False) as bar:
                    rects = _render_frames(tmp, person_seed(seed, index), frames, size, bar)
                (tmp / "crop_rects.json").write_text(json.dumps(rects, separators=(",", ":")) + "\n")
                _write_manifest(tmp, mid, kind, frames, size)
                (tmp / PARAMS_FILE).write_text(json.dumps(params, sort_keys=True) + "\n")
                if pkg.exists() or pkg.is_symlink():
                    old = out / BUILD_DIR / f"{mid}.old.{os.getpid()}"
                    os.replace(pkg, old)
                    shutil.rmtree(old, ignore_errors=True)
                os.replace(tmp, pkg)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                if shared_onnx is not None and not shared_onnx.exists():
                    shared_onnx = None  # it was in the folder we just removed
                raise
            result.built.append(mid)
            models_bar.update(1)
    finally:
        models_bar.close()
        try:
            (out / BUILD_DIR).rmdir()
        except OSError:
            pass
    return result


def build_demo_models(out_dir, count: int = 3, kind: str = "light", frames: int = 100,
                      size: tuple[int, int] = (1280, 720), seed: int = 0, force: bool = False,
                      progress: bool = True) -> list[Path]:
    """Write ``count`` demo model packages of ``kind`` (light|unet) into ``out_dir``; return their folders.

    Each package gets its own synthetic person (``frames`` frames at ``size`` = (width, height),
    drawn from ``seed`` and its index), the face boxes, the model file and a manifest. Also writes
    ``out_dir/audio_encoder.onnx`` and ``out_dir/cluster.yaml`` (kept if present, unless ``force``).
    Packages already built with the same parameters are kept unless ``force``.
    """
    return build_demo_models_report(out_dir, count=count, kind=kind, frames=frames, size=size, seed=seed,
                                    force=force, progress=progress).packages
