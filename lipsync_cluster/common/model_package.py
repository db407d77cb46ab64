"""Model packages: a folder per avatar (manifest, UNet, background frames, face boxes).

See docs/ARCHITECTURE.md, "Model package". This module is the one place that reads them::

    models/<model_id>/
      model.yaml          manifest (below)
      model.onnx          the UNet: inputs [B,6,320,320] and [B,32,16,16] float32, output [B,3,320,320]
      frames/frame_0000.jpg ...
      crop_rects.json     [[x1,y1,x2,y2], ...]  or  {"0": {"rect": [x1,y1,x2,y2], ...}, ...}

``model.yaml`` keys (all but none required; paths are relative to the package folder):

    id                  model id, ^[a-z0-9][a-z0-9_]{0,63}$ (default: the folder's name)
    onnx                UNet file (default model.onnx)
    frames              background frames folder (default frames)
    crop_rects          face boxes file (default crop_rects.json)
    fps                 default 25
    frame_count         expected number of frames (checked when given)
    frame_size          [w, h] of every frame (default: the first frame's size; checked)
    version             content version (default: compute_version's hash of the files). When
                        given it is trusted: it keys the shared-memory frame copy, so change it
                        whenever the package's content changes.
    kind                free-form label (e.g. "light", "synctalk")
    memory_estimate_mb  the model's memory estimate for the cache budget
    preload             load at worker start (default false)
    audio_encoder       optional per-model audio encoder ONNX (mel -> 512)

An unknown key is an error (it is usually a typo of one of these).

Package authors are not trusted with the host (docs/SECURITY.md): every file a package names,
its defaults included, is resolved (symlinks followed) and must stay inside the package folder,
or the package is refused before any of its files is read; image sizes come from the files'
headers and a frame may have at most :data:`MAX_FRAME_PIXELS` pixels, so a small image bomb
costs no decoding. :func:`files_key` identifies the exact files a version was computed from, so a
load can check, after reading, that it read that version's files and not a re-prepared set.

The earlier single-process server's explicit config form (``models: {id: {model_path, background_dir, crop_rects_path,
num_frames, ...}}``) becomes the same :class:`ModelPackage` through :func:`package_from_entry`.

Every problem is reported as a sentence that names the file and the fact;
:func:`validate_package` returns them all (``check-model``), and :func:`load_package` /
:func:`package_from_entry` raise :class:`ModelPackageError` (code ``model_load_failed``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import yaml

from .errors import ModelLoadFailed
from .protocol import MODEL_ID_RE

MANIFEST = "model.yaml"
MANIFEST_KEYS = ("id", "onnx", "frames", "crop_rects", "fps", "frame_count", "frame_size", "version",
                 "kind", "memory_estimate_mb", "preload", "audio_encoder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# A session's memory cannot be measured on a GPU before it exists; the worker's cache (before a
# load) and `prepare` (the manifest's memory_estimate_mb) estimate it from the ONNX file: weights
# once, plus activations and workspace about as much again.
SESSION_MEMORY_FACTOR = 2.0
# The UNet's tensors without the batch dimension (SyncTalk_2D, 328 crop / 320 network).
VISUAL_SHAPE = (6, 320, 320)
AUDIO_SHAPE = (32, 16, 16)
OUTPUT_SHAPE = (3, 320, 320)
# Only used to break a tie when the shapes alone cannot tell the inputs apart (fully symbolic).
_VISUAL_NAMES = ("input", "visual_input", "visual", "image", "img")
_AUDIO_NAMES = ("audio", "audio_input", "audio_feat", "audio_features")
# A version names a shared-memory file, so it must be a safe file name part.
VERSION_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_MAX_LISTED = 5  # per kind of bad rect, so that one broken file does not produce 500 lines
# Frames bigger than 8K UHD are refused from their header: decoding a 16000x16000 image costs
# 768 MB and seconds in every process that looks at it.
MAX_FRAME_PIXELS = 7680 * 4320


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


class ModelPackageError(ModelLoadFailed):
    """A package is missing, malformed or inconsistent. ``problems`` lists every problem found."""

    def __init__(self, message: str, problems: Optional[list[str]] = None, **details: Any) -> None:
        self.problems = list(problems) if problems else [message]
        super().__init__(message, problems=self.problems, **details)


@dataclass
class ModelPackage:
    """One servable model, from a package folder or from the explicit config form."""

    model_id: str
    onnx_path: Path
    frame_paths: list[Path] = field(repr=False)  # sorted in frame order
    crop_rects: np.ndarray = field(repr=False)  # [N, 4] int32, x1, y1, x2, y2
    fps: float
    frame_size: Optional[tuple[int, int]]  # (w, h); None only while the frames are unreadable
    version: str
    num_frames: int
    preload: bool = False
    memory_estimate_mb: Optional[float] = None
    audio_encoder_path: Optional[Path] = None
    kind: Optional[str] = None
    source: str = "config"  # the package folder, or 'config' for the explicit form
    crop_rects_path: Optional[Path] = None
    frames_dir: Optional[Path] = None
    declared_frames: Optional[int] = None  # model.yaml frame_count / config num_frames
    frame_size_declared: bool = False  # frame_size came from the manifest, not the first frame
    load_problems: list[str] = field(default_factory=list, repr=False)
    files: tuple = field(default=(), repr=False, compare=False)  # files_key() when the version was fixed

    def files_changed(self) -> bool:
        """True when the files on disk are no longer the ones this package's version describes."""
        return files_key(self) != self.files

    def frames_bytes(self) -> int:
        """Bytes of all background frames decoded (N x H x W x 3), i.e. the shared-memory copy."""
        if self.frame_size is None:
            return 0
        w, h = self.frame_size
        return self.num_frames * h * w * 3

    def name(self, path: Optional[Path]) -> str:
        """How messages name a file: relative to the package folder when inside it."""
        if path is None:
            return "?"
        if self.source != "config":
            try:
                return str(Path(path).relative_to(self.source))
            except ValueError:
                pass
        return str(path)


# --- model ids --------------------------------------------------------------------------


def is_valid_model_id(value: Any) -> bool:
    """True when ``value`` is a model id: ^[a-z0-9][a-z0-9_]{0,63}$."""
    return isinstance(value, str) and MODEL_ID_RE.fullmatch(value) is not None


def suggest_model_id(name: str) -> str:
    """A valid model id made from a display name: ``"Person 1"`` -> ``"person_1"``."""
    ascii_name = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "_", ascii_name.lower()).strip("_")
    slug = slug[:64].rstrip("_")
    return slug or "model"


def _id_problem(value: Any, where: str) -> str:
    hint = f"; try {suggest_model_id(value)!r}" if isinstance(value, str) else ""
    return (f"{where} is {value!r}, not a valid model id ({MODEL_ID_RE.pattern}: lowercase letters, "
            f"digits, underscores){hint}")


# --- crop rects -------------------------------------------------------------------------


def read_crop_rects(path: str | os.PathLike) -> np.ndarray:
    """Face rects [N, 4] int32 from a JSON file in either form.

    * list: ``[[x1, y1, x2, y2], ...]`` (items may also be ``{"rect": [...]}``);
    * map: ``{"0": {"rect": [x1, y1, x2, y2], ...}, "1": ...}`` (or ``{"0": [x1, ...]}``); keys
      are frame numbers from 0, ordered by their integer value; a missing number is an error.
    """
    return _read_crop_rects(Path(path), str(path))


def _read_crop_rects(path: Path, name: str) -> np.ndarray:
    if not path.is_file():
        raise ModelPackageError(f"{name}: file not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelPackageError(f"{name}: not valid JSON ({exc})") from None
    if isinstance(data, dict):
        entries = _ordered_map_entries(data, name)
    elif isinstance(data, list):
        entries = list(enumerate(data))
    else:
        raise ModelPackageError(
            f"{name}: expected a list [[x1, y1, x2, y2], ...] or a map {{\"0\": {{\"rect\": [...]}}}}, "
            f"got {type(data).__name__}")
    if not entries:
        raise ModelPackageError(f"{name}: contains no rects")
    rects = np.empty((len(entries), 4), np.int32)
    for row, (frame, entry) in enumerate(entries):
        rects[row] = _parse_rect(entry, frame, name)
    return rects


def _ordered_map_entries(data: dict, name: str) -> list[tuple[int, Any]]:
    numbered: dict[int, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or not key.isdigit() or not key.isascii():
            raise ModelPackageError(f"{name}: key {key!r} is not a frame number (\"0\", \"1\", ...)")
        number = int(key)
        if number in numbered:
            raise ModelPackageError(f"{name}: frame {number} appears twice")
        numbered[number] = value
    keys = sorted(numbered)
    if keys and keys[-1] != len(keys) - 1:  # some number in 0..max is missing
        missing = next(k for k in range(keys[-1] + 1) if k not in numbered)
        raise ModelPackageError(f"{name}: no rect for frame {missing} (keys run {keys[0]}..{keys[-1]})")
    return [(k, numbered[k]) for k in keys]


def _parse_rect(entry: Any, frame: int, name: str) -> list[int]:
    value = entry.get("rect") if isinstance(entry, dict) else entry
    bad = ModelPackageError(f"{name}: rect for frame {frame} is {value!r}; expected 4 integers [x1, y1, x2, y2]")
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise bad
    out = []
    for v in value:
        # Face detectors sometimes write 412.0; a fractional value means a real mistake.
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v):
            raise bad
        if abs(v) > 2**31 - 1:
            raise bad
        out.append(int(v))
    return out


# --- frames -----------------------------------------------------------------------------

_FRAME_RE = re.compile(r"^frame_(\d+)\.(jpe?g|png)$", re.IGNORECASE)
_LAST_NUMBER_RE = re.compile(r"(\d+)(?!.*\d)")


def list_frame_files(folder: str | os.PathLike) -> list[Path]:
    """The background frames of a folder in frame order; raises ModelPackageError on problems.

    ``frame_<n>.jpg|png`` files, ordered by n, when there are any; otherwise every image file
    (jpg, jpeg, png, bmp, webp), ordered by the last number in its name (``0.jpg``,
    ``img_00017.png``), or by name when some have no number. Numbers must be consecutive:
    a gap would shift every later frame against its crop rect.
    """
    paths, problems = _list_frames(Path(folder), str(folder))
    if problems:
        raise ModelPackageError(problems[0], problems)
    return paths


def _list_frames(folder: Path, name: str) -> tuple[list[Path], list[str]]:
    if not folder.is_dir():
        return [], [f"{name}/: frames folder not found"]
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]
    numbered = [(int(m.group(1)), p) for p in files if (m := _FRAME_RE.match(p.name))]
    if not numbered:
        matches = [(_LAST_NUMBER_RE.search(p.stem), p) for p in files]
        if files and all(m is not None for m, _ in matches):
            numbered = [(int(m.group(1)), p) for m, p in matches]
        else:
            return sorted(files, key=lambda p: p.name), ([] if files else [
                f"{name}/ has no frames (frame_0000.jpg ... or other .jpg/.png images)"])
    numbered.sort(key=lambda item: (item[0], item[1].name))
    problems = []
    for (a, pa), (b, pb) in zip(numbered, numbered[1:]):
        if a == b:
            problems.append(f"{name}/ has two files for frame {a}: {pa.name}, {pb.name}")
        elif b != a + 1:
            problems.append(f"{name}/ has no frame {a + 1} (between {pa.name} and {pb.name}); "
                            "a gap would shift every later frame against its crop rect")
        if len(problems) >= _MAX_LISTED:
            break
    return [p for _, p in numbered], problems


def image_size(path: str | os.PathLike) -> Optional[tuple[int, int]]:
    """(w, h) of an image as decoders will return it, read from the file's header (no pixels are
    decoded), or None when it is not an image. EXIF rotations by 90 degrees swap w and h, as
    OpenCV's reader applies them."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415 - only needed when frames are checked

    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112) if img.format == "JPEG" else None
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError, SyntaxError):
        return None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def frame_too_big(size: tuple[int, int]) -> Optional[str]:
    """Why a frame of ``size`` (w, h) is refused, or None."""
    w, h = size
    if w * h > MAX_FRAME_PIXELS:
        return f"is {w}x{h} ({w * h} pixels); a frame may have at most {MAX_FRAME_PIXELS} pixels (8K UHD)"
    return None


def files_key(pkg: "ModelPackage") -> tuple:
    """(path, device, inode, size, mtime) of every file a package is made of: equal keys mean the
    same files as when the key was taken (a re-prepare writes new files, so their inodes or times
    change, also when it swaps the whole folder)."""
    paths: list[Optional[Path]] = [pkg.onnx_path, pkg.crop_rects_path, pkg.audio_encoder_path, *pkg.frame_paths]
    if pkg.source != "config":
        paths.append(Path(pkg.source) / MANIFEST)
    key = []
    for p in paths:
        if p is None:
            continue
        try:
            st = os.stat(p)
            key.append((str(p), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            key.append((str(p), None))
    return tuple(key)


# --- the UNet's inputs and outputs ------------------------------------------------------


def _info(item: Any) -> tuple[str, list, Optional[str]]:
    """(name, shape, type) from an ORT NodeArg-like object or a (name, shape[, type]) tuple."""
    if isinstance(item, (tuple, list)):
        name, shape = item[0], item[1]
        typ = item[2] if len(item) > 2 else None
    else:
        name, shape, typ = item.name, item.shape, getattr(item, "type", None)
    return str(name), list(shape) if shape is not None else [], typ


def _fits(shape: list, expected: Sequence[int]) -> bool:
    # Batch dim: anything. Other dims: the exact number, or symbolic (str / None / <= 0).
    if len(shape) != 1 + len(expected):
        return False
    return all(not isinstance(d, int) or d <= 0 or d == e for d, e in zip(shape[1:], expected))


def _fmt_shape(shape: list) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def bind_unet_io(input_infos: Iterable[Any]) -> tuple[str, str]:
    """(visual_name, audio_name) of a UNet, bound by rank and shape whatever the names.

    ``input_infos``: ``session.get_inputs()`` of ONNX Runtime, or (name, shape[, type]) tuples.
    There must be exactly two inputs, one [B,6,320,320] and one [B,32,16,16], float32. Names
    only break a tie between fully symbolic shapes. Raises :class:`ModelPackageError`.
    """
    infos = [_info(i) for i in input_infos]
    described = ", ".join(f"{n!r} {_fmt_shape(s)}" for n, s, _ in infos) or "none"
    want = "a visual input [B,6,320,320] and an audio input [B,32,16,16]"
    if len(infos) != 2:
        raise ModelPackageError(f"the UNet has {len(infos)} input(s) ({described}); expected exactly 2: {want}")
    for name, _, typ in infos:
        if typ is not None and typ not in ("tensor(float)", "float", "float32"):
            raise ModelPackageError(f"the UNet's input {name!r} is {typ}; the pipeline feeds float32 (tensor(float))")
    pairs = [(v, a) for v in range(2) for a in range(2)
             if v != a and _fits(infos[v][1], VISUAL_SHAPE) and _fits(infos[a][1], AUDIO_SHAPE)]
    if len(pairs) > 1:
        by_name = [(v, a) for v, a in pairs if infos[v][0] in _VISUAL_NAMES and infos[a][0] in _AUDIO_NAMES]
        if len(by_name) != 1:
            raise ModelPackageError(
                f"the UNet's inputs ({described}) are ambiguous: either could be the visual input; "
                f"export them with fixed non-batch dimensions ({want})")
        pairs = by_name
    if not pairs:
        raise ModelPackageError(f"the UNet's inputs are {described}; expected {want}")
    v, a = pairs[0]
    return infos[v][0], infos[a][0]


_ONNX_TYPES = {1: "tensor(float)", 10: "tensor(float16)", 11: "tensor(double)", 6: "tensor(int32)",
               7: "tensor(int64)", 2: "tensor(uint8)"}


def _value_info(vi: Any) -> tuple[str, list, Optional[str]]:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        return vi.name, [], "not a tensor"
    shape = []
    if tt.HasField("shape"):
        for d in tt.shape.dim:
            shape.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return vi.name, shape, _ONNX_TYPES.get(tt.elem_type, f"onnx element type {tt.elem_type}")


def check_unet_onnx(path: str | os.PathLike, name: Optional[str] = None) -> list[str]:
    """Problems of a UNet file: not loadable, inputs not bindable, output not [B,3,320,320].

    Reads only the graph (``load_external_data=False``), so it is quick even for large models.
    """
    import onnx  # noqa: PLC0415 - heavy import, only needed here

    name = name or str(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types; all mean "not an ONNX model"
        return [f"{name}: not a loadable ONNX model ({type(exc).__name__}: {exc})"]
    graph = model.graph
    if not graph.node and not graph.input:
        return [f"{name}: not a loadable ONNX model (no graph)"]
    initializers = {init.name for init in graph.initializer}
    # Old exporters list the weights as graph inputs too; they are not fed at run time.
    inputs = [_value_info(vi) for vi in graph.input if vi.name not in initializers]
    problems = []
    try:
        bind_unet_io(inputs)
    except ModelPackageError as exc:
        problems.append(f"{name}: {exc.message}")
    outputs = [_value_info(vi) for vi in graph.output]
    described = ", ".join(f"{n!r} {_fmt_shape(s)}" for n, s, _ in outputs) or "none"
    if len(outputs) != 1 or not _fits(outputs[0][1], OUTPUT_SHAPE):
        problems.append(f"{name}: the UNet's outputs are {described}; expected one output [B,3,320,320]")
    elif outputs[0][2] != "tensor(float)":
        problems.append(f"{name}: the UNet's output {outputs[0][0]!r} is {outputs[0][2]}; expected float32")
    return problems


# --- validation -------------------------------------------------------------------------


def _rect_problems(pkg: ModelPackage) -> list[str]:
    rects = np.asarray(pkg.crop_rects).reshape(-1, 4)
    name = pkg.name(pkg.crop_rects_path)
    problems = []
    x1, y1, x2, y2 = rects.T.astype(np.int64)
    empty = np.flatnonzero((x1 >= x2) | (y1 >= y2))
    for i in empty[:_MAX_LISTED]:
        problems.append(f"{name}: rect {i} {rects[i].tolist()} is empty (needs x1 < x2 and y1 < y2)")
    if len(empty) > _MAX_LISTED:
        problems.append(f"{name}: {len(empty) - _MAX_LISTED} more empty rects")
    if pkg.frame_size is not None:
        w, h = pkg.frame_size
        outside = np.flatnonzero((x1 < 0) | (y1 < 0) | (x2 > w) | (y2 > h))
        outside = outside[~np.isin(outside, empty)]
        for i in outside[:_MAX_LISTED]:
            problems.append(f"{name}: rect {i} {rects[i].tolist()} lies outside the {w}x{h} frame")
        if len(outside) > _MAX_LISTED:
            problems.append(f"{name}: {len(outside) - _MAX_LISTED} more rects lie outside the {w}x{h} frame")
    return problems


def validate_package(pkg: ModelPackage, check_onnx: bool = True, check_frames: bool = True) -> list[str]:
    """Every problem of a package, each a sentence naming the file and the fact ([] = good).

    ``check_onnx`` reads the UNet's graph and checks its inputs/outputs; ``check_frames`` checks
    that every frame exists and that the first and last decode at ``frame_size`` (the full decode
    happens once, in the frame store).
    """
    problems = list(pkg.load_problems)
    frames_name = pkg.name(pkg.frames_dir) if pkg.frames_dir else "frames"
    rects_name = pkg.name(pkg.crop_rects_path)
    if not Path(pkg.onnx_path).is_file():
        problems.append(f"{pkg.name(pkg.onnx_path)}: UNet file not found")
    elif check_onnx:
        problems.extend(check_unet_onnx(pkg.onnx_path, pkg.name(pkg.onnx_path)))
    if pkg.audio_encoder_path is not None and not Path(pkg.audio_encoder_path).is_file():
        problems.append(f"{pkg.name(pkg.audio_encoder_path)}: audio encoder file not found")
    if not (isinstance(pkg.fps, (int, float)) and pkg.fps > 0):
        problems.append(f"fps is {pkg.fps!r}; expected a positive number")

    n_rects, n_frames = len(pkg.crop_rects), len(pkg.frame_paths)
    if n_rects and n_frames and n_rects != n_frames:
        problems.append(f"{rects_name} has {n_rects} rects but {frames_name}/ has {n_frames} frames: "
                        f"expected {n_rects} frames, found {n_frames}")
    if pkg.declared_frames is not None and n_frames and pkg.declared_frames != n_frames:
        where = f"models.{pkg.model_id}.num_frames" if pkg.source == "config" else f"{MANIFEST} frame_count"
        problems.append(f"{where} is {pkg.declared_frames} but {frames_name}/ has {n_frames} frames")
    if n_rects:
        problems.extend(_rect_problems(pkg))

    if check_frames and n_frames:
        missing = [p for p in pkg.frame_paths if not Path(p).is_file()]
        for p in missing[:_MAX_LISTED]:
            problems.append(f"{pkg.name(p)}: frame file not found")
        if len(missing) > _MAX_LISTED:
            problems.append(f"{frames_name}/: {len(missing) - _MAX_LISTED} more frame files not found")
        ends = [pkg.frame_paths[0]] if n_frames == 1 else [pkg.frame_paths[0], pkg.frame_paths[-1]]
        for p in ends:
            if not Path(p).is_file():
                continue
            size = image_size(Path(p))
            if size is None:
                problems.append(f"{pkg.name(p)}: cannot be decoded as an image")
            elif frame_too_big(size):
                problems.append(f"{pkg.name(p)} {frame_too_big(size)}")
            elif pkg.frame_size is not None and size != tuple(pkg.frame_size):
                said = (f"{MANIFEST} frame_size is" if pkg.frame_size_declared
                        else f"the first frame {Path(pkg.frame_paths[0]).name} is")
                problems.append(f"{pkg.name(p)} is {size[0]}x{size[1]} but {said} "
                                f"{pkg.frame_size[0]}x{pkg.frame_size[1]}")
    return problems


def _raise_if(pkg_id: str, where: str, problems: list[str]) -> None:
    if not problems:
        return
    shown = "; ".join(problems[:3])
    more = f" (and {len(problems) - 3} more problem(s))" if len(problems) > 3 else ""
    raise ModelPackageError(f"model {pkg_id!r} ({where}): {shown}{more}", problems, model_id=pkg_id)


_ABSOLUTE_PATH_RE = re.compile(r"(?<![\w.~])/(?:[^\s'\"/:,;()\[\]{}]+/)+([^\s'\"/:,;()\[\]{}]*)")
MAX_REASON_CHARS = 300


def public_reason(text: str) -> str:
    """A load failure as a client may see it: absolute server paths cut to their last part, at
    most :data:`MAX_REASON_CHARS` characters. The whole text belongs in the log."""
    short = _ABSOLUTE_PATH_RE.sub(lambda m: m.group(1) or "/", str(text))
    return short if len(short) <= MAX_REASON_CHARS else short[:MAX_REASON_CHARS - 1] + "…"


# --- reading ----------------------------------------------------------------------------


def _finish(pkg: ModelPackage) -> None:
    """Fill what depends on the files: frame count, frame size (from the first frame)."""
    pkg.num_frames = len(pkg.frame_paths)
    if pkg.frame_size is None and pkg.frame_paths and Path(pkg.frame_paths[0]).is_file():
        pkg.frame_size = image_size(Path(pkg.frame_paths[0]))  # None -> validate reports it


def _rects_or_problem(pkg: ModelPackage) -> np.ndarray:
    if pkg.crop_rects_path is None:
        return np.zeros((0, 4), np.int32)
    try:
        return _read_crop_rects(Path(pkg.crop_rects_path), pkg.name(pkg.crop_rects_path))
    except ModelPackageError as exc:
        pkg.load_problems.extend(exc.problems)
        return np.zeros((0, 4), np.int32)


def _inside(folder: Path, path: Path) -> bool:
    """Whether ``path``, symlinks resolved, is ``folder`` (resolved) or lies under it."""
    try:
        real = path.resolve(strict=False)
    except (OSError, RuntimeError):  # a symlink loop
        return False
    return real == folder or folder in real.parents


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ModelPackageError(f"{folder}: model package folder not found")
    if not path.is_file():
        raise ModelPackageError(f"{path}: not found (a model package folder needs a {MANIFEST} manifest)")
    if not _inside(folder, path):
        raise ModelPackageError(f"{path}: leads outside the package folder (a symlink?); a package's files "
                                "must stay inside it")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ModelPackageError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ModelPackageError(f"{path}: expected a mapping of {', '.join(MANIFEST_KEYS)}, got {type(data).__name__}")
    return data


class _Fields:
    """Typed access to manifest fields; each wrong value becomes one problem, not an exception."""

    def __init__(self, data: dict, problems: list[str]) -> None:
        self.data, self.problems = data, problems

    def _bad(self, key: str, expected: str) -> None:
        self.problems.append(f"{MANIFEST}: field '{key}' is {self.data[key]!r}; expected {expected}")

    def text(self, key: str, default: Optional[str] = None) -> Optional[str]:
        value = self.data.get(key, default)
        if value is None or isinstance(value, str) and value:
            return value
        self._bad(key, "a non-empty string")
        return default

    def number(self, key: str, default: Optional[float], positive: bool) -> Optional[float]:
        value = self.data.get(key, default)
        if value is None:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and (value > 0 if positive else value >= 0):
            return float(value)
        self._bad(key, "a positive number" if positive else "a number >= 0")
        return default

    def count(self, key: str) -> Optional[int]:
        value = self.data.get(key)
        if value is None or isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        self._bad(key, "an integer >= 1")
        return None

    def flag(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if isinstance(value, bool):
            return value
        self._bad(key, "true or false")
        return default

    def size(self, key: str) -> Optional[tuple[int, int]]:
        value = self.data.get(key)
        if value is None:
            return None
        if (isinstance(value, (list, tuple)) and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
            return int(value[0]), int(value[1])
        self._bad(key, "[width, height], two positive integers")
        return None


def load_package(folder: str | os.PathLike, model_id: Optional[str] = None, *,
                 check_onnx: bool = True, check_frames: bool = True) -> ModelPackage:
    """Read and validate a package folder; raises :class:`ModelPackageError` with its problems.

    ``model_id``: the id the caller serves it under (a config key, or the folder name when
    scanning); the manifest's ``id`` must equal it.
    """
    return _load(folder, model_id, check_onnx, check_frames, "the package is served as")


def _load(folder: str | os.PathLike, model_id: Optional[str], check_onnx: bool, check_frames: bool,
          id_from: str) -> ModelPackage:
    pkg = read_package(folder, model_id, _id_from=id_from)
    _raise_if(pkg.model_id, str(folder), validate_package(pkg, check_onnx=check_onnx, check_frames=check_frames))
    _ensure_version(pkg)
    return pkg


def read_package(folder: str | os.PathLike, model_id: Optional[str] = None, *,
                 _id_from: str = "the package is served as") -> ModelPackage:
    """Read a package without validating it: problems found while reading go to ``load_problems``.

    For ``check-model``, which wants :func:`validate_package`'s full list. Raises only when there
    is nothing to build a package from (no folder, no or unreadable manifest, invalid id).
    """
    folder = Path(folder).resolve()
    data = _read_manifest(folder)
    problems: list[str] = []
    for key in data:
        if key not in MANIFEST_KEYS:
            problems.append(f"{MANIFEST}: unknown key {key!r}; known keys: {', '.join(MANIFEST_KEYS)}")
    f = _Fields(data, problems)
    manifest_id = data.get("id")
    if manifest_id is None:
        manifest_id = model_id if model_id is not None else folder.name
    if not is_valid_model_id(manifest_id):
        raise ModelPackageError(_id_problem(manifest_id, f"{folder / MANIFEST}: id"))
    if model_id is not None and manifest_id != model_id:
        problems.append(f"{MANIFEST}: id is {manifest_id!r} but {_id_from} {model_id!r}; they must match")

    outside: list[str] = []

    def rel(key: str, default: Optional[str]) -> Optional[Path]:
        value = f.text(key, default)
        if value is not None and (os.path.isabs(value) or ".." in Path(value).parts):
            # A manifest names files inside its own folder only: no package can make the cluster
            # read elsewhere (docs/SECURITY.md).
            problems.append(f"{MANIFEST}: field '{key}' is {value!r}; a manifest path must stay inside "
                            "the package folder (relative, without '..')")
            value = default
        if value is None:
            return None
        if not _inside(folder, folder / value):  # the text is fine, a symlink leads out
            outside.append(f"{value} ({MANIFEST} field '{key}') leads outside the package folder (a symlink?)")
        return folder / value

    version = data.get("version")
    if version is not None:
        version = str(version)
        if not VERSION_RE.match(version):
            problems.append(f"{MANIFEST}: field 'version' is {version!r}; expected 1-64 of A-Z a-z 0-9 _ . -")
            version = None
    kind = f.text("kind")
    pkg = ModelPackage(
        model_id=manifest_id,
        onnx_path=rel("onnx", "model.onnx") or folder / "model.onnx",
        frame_paths=[],
        crop_rects=np.zeros((0, 4), np.int32),
        fps=f.number("fps", 25.0, positive=True) or 25.0,
        frame_size=f.size("frame_size"),
        version=version or "",
        num_frames=0,
        preload=f.flag("preload", False),
        memory_estimate_mb=f.number("memory_estimate_mb", None, positive=False),
        audio_encoder_path=rel("audio_encoder", None),
        kind=kind,
        source=str(folder),
        crop_rects_path=rel("crop_rects", "crop_rects.json") or folder / "crop_rects.json",
        frames_dir=rel("frames", "frames") or folder / "frames",
        declared_frames=f.count("frame_count"),
        load_problems=problems,
    )
    pkg.frame_size_declared = pkg.frame_size is not None
    if not outside:
        pkg.frame_paths, frame_problems = _list_frames(pkg.frames_dir, pkg.name(pkg.frames_dir))
        problems.extend(frame_problems)
        escaped = [p for p in pkg.frame_paths if not _inside(folder, p)]
        outside.extend(f"{pkg.name(p)} leads outside the package folder (a symlink?)" for p in escaped[:_MAX_LISTED])
        if len(escaped) > _MAX_LISTED:
            outside.append(f"{len(escaped) - _MAX_LISTED} more frames lead outside the package folder")
    if outside:
        # Refused before any of these files is read: a package cannot make the cluster read (and
        # echo back) a file of the host's.
        raise ModelPackageError(f"model {manifest_id!r}: " + "; ".join(outside[:3]) +
                                "; every file of a package must stay inside its folder", outside,
                                model_id=manifest_id)
    pkg.crop_rects = _rects_or_problem(pkg)
    _finish(pkg)
    return pkg


def _ensure_version(pkg: ModelPackage) -> None:
    """Fix the version and the files it stands for; raise when the files changed meanwhile."""
    before = files_key(pkg)
    if not pkg.version:
        pkg.version = compute_version(pkg.onnx_path, pkg.crop_rects_path, pkg.frame_paths)
    pkg.files = files_key(pkg)
    if pkg.files != before:
        raise ModelPackageError(f"model {pkg.model_id!r}: its files changed while they were read "
                                "(being re-prepared?); try again", model_id=pkg.model_id)


def package_from_entry(model_id: str, entry: Any, *, check_onnx: bool = True,
                       check_frames: bool = True) -> ModelPackage:
    """A :class:`ModelPackage` from a config ``models:`` entry (:class:`ModelEntry`).

    ``entry.package`` set: the package folder is read (:func:`load_package`), and the entry's
    ``preload: true``, ``memory_estimate_mb``, ``audio_encoder_path`` and a non-default ``fps``
    override the manifest; ``num_frames`` is checked against the frames. Otherwise the earlier
    server's explicit form: ``model_path``, ``background_dir``, ``crop_rects_path`` (+ ``num_frames``,
    ``fps``, ``preload``, ``memory_estimate_mb``, ``audio_encoder_path``); the version is the
    content hash.
    """
    where = f"models.{model_id}"
    if not is_valid_model_id(model_id):
        raise ModelPackageError(_id_problem(model_id, where))
    if getattr(entry, "package", None):
        pkg = read_package(entry.package, model_id)
        if entry.preload:
            pkg.preload = True
        if entry.memory_estimate_mb is not None:
            pkg.memory_estimate_mb = float(entry.memory_estimate_mb)
        if entry.audio_encoder_path:
            pkg.audio_encoder_path = Path(entry.audio_encoder_path)
        if entry.fps != 25.0:
            pkg.fps = float(entry.fps)
        problems = validate_package(pkg, check_onnx=check_onnx, check_frames=check_frames)
        if entry.num_frames is not None and pkg.frame_paths and entry.num_frames != len(pkg.frame_paths):
            problems.append(f"{where}.num_frames is {entry.num_frames} but "
                            f"{pkg.name(pkg.frames_dir)}/ has {len(pkg.frame_paths)} frames")
        _raise_if(model_id, f"{where}.package {entry.package}", problems)
        _ensure_version(pkg)
        return pkg

    problems: list[str] = []
    for req in ("model_path", "background_dir", "crop_rects_path"):
        if not getattr(entry, req, None):
            problems.append(f"{where}.{req}: required (or give '{where}.package', a package folder)")
    if problems:
        _raise_if(model_id, "config", problems)
    pkg = ModelPackage(
        model_id=model_id,
        onnx_path=Path(entry.model_path),
        frame_paths=[],
        crop_rects=np.zeros((0, 4), np.int32),
        fps=float(entry.fps),
        frame_size=None,
        version="",
        num_frames=0,
        preload=bool(entry.preload),
        memory_estimate_mb=None if entry.memory_estimate_mb is None else float(entry.memory_estimate_mb),
        audio_encoder_path=Path(entry.audio_encoder_path) if entry.audio_encoder_path else None,
        kind=None,
        source="config",
        crop_rects_path=Path(entry.crop_rects_path),
        frames_dir=Path(entry.background_dir),
        declared_frames=entry.num_frames,
        load_problems=problems,
    )
    pkg.frame_paths, frame_problems = _list_frames(pkg.frames_dir, str(pkg.frames_dir))
    problems.extend(frame_problems)
    pkg.crop_rects = _rects_or_problem(pkg)
    _finish(pkg)
    _raise_if(model_id, "config", validate_package(pkg, check_onnx=check_onnx, check_frames=check_frames))
    _ensure_version(pkg)
    return pkg


def scan_models_dir(models_dir: str | os.PathLike, *, check_onnx: bool = True,
                    check_frames: bool = True) -> dict[str, ModelPackage | ModelPackageError]:
    """Every package under ``models_dir``: a folder with a model.yaml is a model.

    Keys are folder names; a broken package maps to its :class:`ModelPackageError` so that one
    bad model never hides the good ones. The folder name must be a valid model id and equal the
    manifest's ``id``. Folders without a model.yaml (and hidden ones) are not models and are
    skipped. A missing ``models_dir`` raises.
    """
    root = Path(models_dir)
    if not root.is_dir():
        raise ModelPackageError(f"models_dir {root}: folder not found")
    found: dict[str, ModelPackage | ModelPackageError] = {}
    for child in sorted(root.iterdir()):
        if child.name.startswith(".") or not child.is_dir() or not (child / MANIFEST).is_file():
            continue
        if not is_valid_model_id(child.name):
            found[child.name] = ModelPackageError(
                _id_problem(child.name, f"{child}: the folder name") + " (the folder name is the model id)")
            continue
        try:
            found[child.name] = _load(child, child.name, check_onnx, check_frames, "the folder is named")
        except ModelPackageError as exc:
            found[child.name] = exc
    return found
