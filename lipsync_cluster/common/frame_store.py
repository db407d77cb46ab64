"""Background frames decoded once per host into shared memory, attached read-only by every worker.

A model's frames (500 x 1280x720x3 is 1.4 GB) would cost that much in *every* worker process
that serves it if each decoded its own copy. Instead the first worker on a host decodes them
into a file on tmpfs (``/dev/shm``) and every worker maps that file read-only: the kernel keeps
one copy in memory however many processes map it.

Plain files + ``np.memmap`` rather than ``multiprocessing.shared_memory``: the latter's resource
tracker unlinks a segment when the process that created it exits, so one crashed worker would
take every other worker's frames with it. A file on tmpfs lives until someone removes it: a
worker's crash leaves the copy usable, the supervisor's :meth:`FrameStore.cleanup` (at a clean
stop, and at start for what a crash left) removes it.

File layout: one private directory per namespace (cluster), one file per (model id, version)::

    {root}/lsc-{namespace}/                  owned by this user, mode 0700 (checked with lstat)
        {model_id}-{version}.frames
            bytes 0..4095     header: b"LSCFRAMES1\\n" + UTF-8 JSON + zero padding
                              {"shape": [N, H, W, 3], "dtype": "uint8", "model_id", "version",
                               "namespace", "frames": N, "created_by": pid, "created_at": unix time}
            bytes 4096..      the frames, raw uint8 BGR, C order [N, H, W, 3]
        {model_id}-{version}.lock            flock, serialises creators
        {model_id}-{version}.frames.tmp-PID  being decoded (renamed when done)

The header lives in the same file so that one ``rename`` publishes shape and data together; it
is one page long so that the data stays page-aligned for the mapping. In the file name a ``-``
of the version is written ``~`` (model ids have no ``-``), so a name splits back into its model
id and version at its first ``-``.

Other local users (docs/SECURITY.md): ``/dev/shm`` is writable by everyone and the names are
predictable, so nothing is trusted by name. The directory is created 0700 and, when it already
exists, used only if ``lstat`` shows a real directory (not a symlink) owned by us that nobody
else can enter; files are created with ``O_EXCL|O_NOFOLLOW`` (the lock file with ``O_NOFOLLOW``)
and a copy is mapped only if it is a regular file we own that nobody else can write. Otherwise
a planted file could hand a worker another picture, or be truncated under its mapping (SIGBUS).

Creation is atomic and happens once: creators take an ``flock`` on the ``.lock`` file, look
again, decode into ``.tmp-PID`` with a thread pool (OpenCV's decoders release the GIL) and
``rename`` it into place; eight workers asking at once decode once, the other seven wait and
attach. The space is reserved with ``posix_fallocate`` first, so a full ``/dev/shm`` is a clear
error instead of a SIGBUS while writing.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from .errors import CapacityFull
from .model_package import VERSION_RE, ModelPackageError, frame_too_big, image_size
from .protocol import MODEL_ID_RE

HEADER_SIZE = 4096
MAGIC = b"LSCFRAMES1\n"
PREFIX = "lsc-"
FRAMES_SUFFIX = ".frames"
LOCK_SUFFIX = ".lock"
TMP_MARK = ".frames.tmp-"
NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
DEFAULT_DECODE_THREADS = min(8, os.cpu_count() or 1)


def _file_version(version: str) -> str:
    # '~' is not allowed in versions, so this is reversible and keeps '-' out of the field.
    return version.replace("-", "~")


def _split_name(name: str) -> Optional[tuple[str, str, str]]:
    """(model_id, version, kind) of one of our file names (inside a namespace's directory), or None."""
    if TMP_MARK in name:
        stem, kind = name.split(TMP_MARK, 1)[0], "tmp"
    elif name.endswith(FRAMES_SUFFIX):
        stem, kind = name[: -len(FRAMES_SUFFIX)], "frames"
    elif name.endswith(LOCK_SUFFIX):
        stem, kind = name[: -len(LOCK_SUFFIX)], "lock"
    else:
        return None
    parts = stem.split("-", 1)
    if len(parts) != 2 or not MODEL_ID_RE.fullmatch(parts[0]) or not parts[1]:
        return None
    return parts[0], parts[1].replace("~", "-"), kind


class UnsafeStoreError(OSError):
    """The store's directory or a file in it is not what this user made (a symlink, another
    owner, writable by others): refused, never used."""


def _check_private(st: os.stat_result, what: Path, kind: str) -> None:
    """Raise UnsafeStoreError unless ``st`` (from lstat/fstat) is a ``kind`` ("dir" or "file")
    owned by this user that nobody else can write (a directory: nobody else can even enter)."""
    is_kind = stat.S_ISDIR(st.st_mode) if kind == "dir" else stat.S_ISREG(st.st_mode)
    others = 0o077 if kind == "dir" else 0o022
    if not is_kind:
        raise UnsafeStoreError(f"{what} is not a {'directory' if kind == 'dir' else 'regular file'} "
                               "(a symlink or something planted there?)")
    if st.st_uid != os.geteuid():
        raise UnsafeStoreError(f"{what} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})")
    if st.st_mode & others:
        raise UnsafeStoreError(f"{what} has mode {stat.S_IMODE(st.st_mode):o}: other users can "
                               f"{'enter' if kind == 'dir' else 'write'} it")


_OPEN_FLAGS = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _read_header(fd: int) -> dict:
    raw = os.pread(fd, HEADER_SIZE, 0)
    if len(raw) < HEADER_SIZE or not raw.startswith(MAGIC):
        raise ValueError("not a frame store file (bad magic)")
    header = json.loads(raw[len(MAGIC):].split(b"\0", 1)[0].decode())
    shape = header.get("shape")
    if header.get("dtype") != "uint8" or not (isinstance(shape, list) and len(shape) == 4 and shape[3] == 3):
        raise ValueError(f"unsupported frame store header {header!r}")
    size = os.fstat(fd).st_size
    expected = HEADER_SIZE + int(np.prod(shape, dtype=np.int64))
    if size != expected:
        raise ValueError(f"file has {size} bytes; its header's shape {shape} needs {expected}")
    return header


class SharedFrames:
    """One process's read-only view of a model's shared frames [N, H, W, 3] uint8 (BGR)."""

    def __init__(self, path: Path, array: np.memmap, header: dict, created: bool, inode: int) -> None:
        self._array: Optional[np.memmap] = array
        # Plain-ndarray view for indexing: the pipeline's copies and slices should be ordinary
        # arrays, not memmap objects that pretend to own a file.
        self._plain: Optional[np.ndarray] = array.view(np.ndarray)
        self.path = path
        self.header = header
        self.created = created  # True when this call decoded the frames (once per host)
        self.inode = inode  # the same for every process that shares the copy
        self.shape: tuple[int, int, int, int] = tuple(array.shape)  # type: ignore[assignment]
        self.nbytes = int(array.nbytes)

    @property
    def array(self) -> np.memmap:
        """The frames; read-only (assignment raises ValueError)."""
        if self._array is None:
            raise ValueError(f"{self.path}: these shared frames were closed")
        return self._array

    @property
    def model_id(self) -> str:
        return self.header["model_id"]

    @property
    def version(self) -> str:
        return self.header["version"]

    @property
    def frame_size(self) -> tuple[int, int]:
        """(w, h) of every frame."""
        return self.shape[2], self.shape[1]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        """Frame(s) as read-only plain ndarray views of the shared copy (no pixels are copied)."""
        self.array  # raises when closed
        return self._plain[index]  # type: ignore[index]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def close(self) -> None:
        """Drop this handle's mapping. Views handed out earlier stay valid: the pages are unmapped
        when the last view is garbage-collected, never under a reader's feet.

        (Calling ``mmap.close()`` here would be wrong: numpy does not hold a buffer export on the
        mmap, so the close would succeed and a request still compositing from a frame of an
        evicted model would segfault.)
        """
        self._array = None
        self._plain = None

    def __enter__(self) -> "SharedFrames":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SharedFrames({self.path}, shape={self.shape}, created={self.created})"


class FrameStore:
    """Shared-memory frame copies of one cluster (``namespace``) on this host."""

    def __init__(self, namespace: str, root: str | os.PathLike = "/dev/shm", *,
                 decode_threads: int = DEFAULT_DECODE_THREADS, lock_timeout_s: float = 600.0) -> None:
        if not isinstance(namespace, str) or not NAMESPACE_RE.match(namespace):
            raise ValueError(f"frame store namespace {namespace!r} must be 1-64 of A-Z a-z 0-9 _ -")
        self.namespace = namespace
        self.root = Path(root)
        self.dir = self.root / f"{PREFIX}{namespace}"  # private: see the module's docstring
        self.decode_threads = max(1, int(decode_threads))
        self.lock_timeout_s = lock_timeout_s

    # --- names ------------------------------------------------------------------------

    def _stem(self, model_id: str, version: str) -> str:
        if not isinstance(model_id, str) or not MODEL_ID_RE.fullmatch(model_id):
            raise ValueError(f"model id {model_id!r} is not valid ({MODEL_ID_RE.pattern})")
        if not isinstance(version, str) or not VERSION_RE.match(version):
            raise ValueError(f"version {version!r} of model '{model_id}' must be 1-64 of A-Z a-z 0-9 _ . -")
        return f"{model_id}-{_file_version(version)}"

    def path_for(self, model_id: str, version: str) -> Path:
        return self.dir / (self._stem(model_id, version) + FRAMES_SUFFIX)

    def _lock_path(self, model_id: str, version: str) -> Path:
        return self.dir / (self._stem(model_id, version) + LOCK_SUFFIX)

    def _private_dir(self) -> Path:
        """The namespace's directory, made 0700 if absent; raises UnsafeStoreError when what is
        there is not a directory of ours that only we can enter (another user made it first)."""
        try:
            os.mkdir(self.dir, 0o700)
        except FileExistsError:
            pass
        try:
            _check_private(os.lstat(self.dir), self.dir, "dir")
        except UnsafeStoreError as exc:
            raise UnsafeStoreError(f"refusing the shared frame store: {exc}; remove it (it is not this "
                                   "cluster's) or run the cluster on other ports") from None
        return self.dir

    def _existing_dir(self, strict: bool = False) -> Optional[Path]:
        """The namespace's directory if it exists and is ours, else None. Queries and removals
        never create it and never look into (or delete through) someone else's; with ``strict``
        one that is not ours raises UnsafeStoreError instead."""
        try:
            _check_private(os.lstat(self.dir), self.dir, "dir")
        except FileNotFoundError:
            return None
        except UnsafeStoreError:
            if strict:
                raise
            return None
        return self.dir

    def _own_files(self, strict: bool = False) -> Iterator[tuple[Path, str, str, str]]:
        """(path, model_id, version, kind) of every file of this namespace."""
        folder = self._existing_dir(strict)
        if folder is None:
            return
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return
        for name in names:
            parsed = _split_name(name)
            if parsed is not None:
                yield folder / name, parsed[0], parsed[1], parsed[2]

    # --- attach -----------------------------------------------------------------------

    def attach(self, model_id: str, version: str, frame_paths: Sequence[str | os.PathLike],
               expected_size: Optional[Sequence[int]] = None,
               check_source: Optional[Callable[[], None]] = None) -> SharedFrames:
        """Map the model's frames read-only, decoding them into shared memory first if absent.

        ``expected_size``: (w, h) every frame must have (default: the first frame's size).
        Unreadable or missing frames and size mismatches raise :class:`ModelPackageError` naming
        the file; a full ``/dev/shm`` raises :class:`CapacityFull`. ``check_source`` is called
        after decoding and before the copy is published (it raises when the frame files are no
        longer the version's, e.g. re-prepared meanwhile): a copy never pairs a version with
        another version's pictures.
        """
        path = self.path_for(model_id, version)
        size = None if expected_size is None else (int(expected_size[0]), int(expected_size[1]))
        self._private_dir()
        frames = self._open(path, len(frame_paths), size, created=False)
        if frames is not None:
            return frames
        lock_fd = self._lock(self._lock_path(model_id, version))
        try:
            # Someone may have finished while we waited for the lock: look again first.
            frames = self._open(path, len(frame_paths), size, created=False)
            if frames is not None:
                return frames
            self._remove_stale(path)
            self._create(path, model_id, version, [Path(p) for p in frame_paths], expected_size, check_source)
            frames = self._open(path, len(frame_paths), size, created=True)
            if frames is None:  # pragma: no cover - we just wrote it under the lock
                raise ModelPackageError(f"{path}: frames vanished right after they were created")
            return frames
        finally:
            os.close(lock_fd)  # closing the descriptor releases the flock

    def _open(self, path: Path, n_frames: int, size: Optional[tuple[int, int]],
              created: bool) -> Optional[SharedFrames]:
        """The mapping of a complete file, or None when there is none (or it is not usable)."""
        try:
            fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return None  # a symlink: never followed; the creator path removes it under the lock
            raise
        try:
            try:
                # Only a file we own and nobody else can write is mapped: another user could
                # otherwise change the pictures or truncate the file under the mapping (SIGBUS).
                _check_private(os.fstat(fd), path, "file")
                header = _read_header(fd)
            except (ValueError, OSError):
                return None  # corrupt or foreign: the creator path replaces it under the lock
            n, h, w, _ = header["shape"]
            if (n_frames and n != n_frames) or (size is not None and size != (w, h)):
                return None  # same version string, different frames: rebuild under the lock
            inode = os.fstat(fd).st_ino
            # Map the descriptor whose header we read, not the path again: a rebuild may rename
            # a new file into place in between.
            with open(fd, "rb", closefd=False) as f:
                array = np.memmap(f, dtype=np.uint8, mode="r", offset=HEADER_SIZE, shape=tuple(header["shape"]))
        finally:
            os.close(fd)
        return SharedFrames(path, array, header, created, inode)

    def _lock(self, lock_path: Path) -> int:
        deadline = time.monotonic() + self.lock_timeout_s
        while True:
            self._private_dir()  # cleanup() may have removed it since attach() made it
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o600)
            try:
                _check_private(os.fstat(fd), lock_path, "file")
            except UnsafeStoreError:
                os.close(fd)
                raise
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        os.close(fd)
                        raise ModelPackageError(
                            f"{lock_path}: waited {self.lock_timeout_s:.0f}s for another process to "
                            "finish decoding these frames") from None
                    time.sleep(0.01)
            # remove()/cleanup() may have unlinked the lock file while we waited; a lock on an
            # unlinked inode excludes nobody, so take it again on the file that is there now.
            try:
                same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def _remove_stale(self, path: Path) -> None:
        # Called under the lock, so no live creator of this key exists: any leftover tmp file
        # (a creator killed mid-decode) or unusable final file is garbage.
        prefix = path.name + ".tmp-"
        for name in os.listdir(path.parent):
            if name.startswith(prefix):
                _unlink(path.parent / name)
        _unlink(path)

    def _create(self, path: Path, model_id: str, version: str, frame_paths: list[Path],
                expected_size: Optional[Sequence[int]], check_source: Optional[Callable[[], None]] = None) -> None:
        import cv2  # noqa: PLC0415 - only the creating process needs the decoder

        if not frame_paths:
            raise ModelPackageError(f"model '{model_id}': no frames to decode")

        def decode(p: Path) -> np.ndarray:
            if not p.is_file():  # asked first: cv2.imread would only log a warning and say None
                raise ModelPackageError(f"{p}: file not found")
            size = image_size(p)  # from the header: a bomb is refused before it is decoded
            if size is not None and frame_too_big(size):
                raise ModelPackageError(f"{p} {frame_too_big(size)}")
            img = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if img is None:
                raise ModelPackageError(f"{p}: cannot be decoded as an image")
            return img

        first = decode(frame_paths[0])
        h, w = first.shape[:2]
        if expected_size is not None:
            ew, eh = (int(v) for v in expected_size)
            if (w, h) != (ew, eh):
                raise ModelPackageError(f"{frame_paths[0]} is {w}x{h} but the model's frame_size is {ew}x{eh}")
        shape = (len(frame_paths), h, w, 3)
        nbytes = int(np.prod(shape, dtype=np.int64))
        self.check_room(model_id, nbytes)
        header = {"shape": list(shape), "dtype": "uint8", "model_id": model_id, "version": version,
                  "namespace": self.namespace, "frames": len(frame_paths), "created_by": os.getpid(),
                  "created_at": time.time()}
        blob = MAGIC + json.dumps(header).encode()
        assert len(blob) < HEADER_SIZE, "header grew past one page"
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, HEADER_SIZE + nbytes)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EFBIG):
                    raise
                raise self._no_room(model_id, nbytes) from None
            os.pwrite(fd, blob.ljust(HEADER_SIZE, b"\0"), 0)
            with open(fd, "r+b", closefd=False) as f:  # the file we created, not the path again
                out = np.memmap(f, dtype=np.uint8, mode="r+", offset=HEADER_SIZE, shape=shape)
            out[0] = first
            failed = threading.Event()

            def fill(i: int) -> None:
                if failed.is_set():
                    return
                try:
                    img = decode(frame_paths[i])
                    if img.shape != (h, w, 3):
                        raise ModelPackageError(
                            f"{frame_paths[i]} is {img.shape[1]}x{img.shape[0]} but frame "
                            f"{frame_paths[0].name} is {w}x{h}; every frame must have the same size")
                    out[i] = img
                except BaseException:
                    failed.set()
                    raise

            if len(frame_paths) > 1:
                with ThreadPoolExecutor(min(self.decode_threads, len(frame_paths) - 1),
                                        thread_name_prefix="frame-decode") as pool:
                    for future in [pool.submit(fill, i) for i in range(1, len(frame_paths))]:
                        future.result()  # the first failure (in frame order) is raised
            del out  # unmap before publishing; tmpfs pages are already the shared copy
            if check_source is not None:
                check_source()
            os.rename(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise
        finally:
            os.close(fd)

    def check_room(self, model_id: str, nbytes: int) -> None:
        """Raise :class:`CapacityFull` unless ``nbytes`` fit both in the store's free space and in
        the host's available memory.

        tmpfs pages are RAM, and /dev/shm is usually sized at half or all of it: filling it does
        not end in a clean ENOSPC but in the kernel's OOM killer picking some process on the host.
        So a copy must also fit in MemAvailable, keeping 10% of it (at least 256 MB) for
        everything else.
        """
        free = _free_bytes(self.root)
        available = _mem_available()
        if available is not None:
            free = min(free, available - max(available // 10, 256 * 2**20))
        if nbytes + HEADER_SIZE > free:
            raise self._no_room(model_id, nbytes, free)

    def _no_room(self, model_id: str, nbytes: int, free: Optional[int] = None) -> CapacityFull:
        free = _free_bytes(self.root) if free is None else free
        return CapacityFull(
            f"{self.root} has room for {max(free, 0) / 2**20:.0f} MB (free space and available "
            f"memory); the frames of model '{model_id}' need {nbytes / 2**20:.0f} MB",
            model_id=model_id, needed_bytes=nbytes)

    # --- management -------------------------------------------------------------------

    def exists(self, model_id: str, version: str) -> bool:
        if self._existing_dir() is None:
            return False
        try:
            return stat.S_ISREG(os.lstat(self.path_for(model_id, version)).st_mode)
        except FileNotFoundError:
            return False

    def remove(self, model_id: str, version: str) -> bool:
        """Remove one copy. Processes that have it mapped keep their view; the memory is freed
        when the last of them closes it. Returns whether a copy was there."""
        if self._existing_dir() is None:
            return False
        _unlink(self._lock_path(model_id, version))
        return _unlink(self.path_for(model_id, version))

    def remove_other_versions(self, model_id: str, keep_version: str) -> int:
        """Remove every copy of ``model_id`` but ``keep_version``; returns how many copies."""
        removed = 0
        for path, mid, version, kind in list(self._own_files()):
            if mid == model_id and version != keep_version and kind in ("frames", "lock"):
                if _unlink(path) and kind == "frames":
                    removed += 1
        return removed

    def cleanup(self) -> int:
        """Remove every file of this namespace (copies, locks, half-written files) and its
        directory; returns the number of files removed. A directory that is not ours is left
        alone (UnsafeStoreError)."""
        removed = sum(1 for path, *_ in list(self._own_files(strict=True)) if _unlink(path))
        try:
            os.rmdir(self.dir)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:  # a file that is not ours stays, and so does the folder
                raise
        return removed

    def list(self) -> list[dict]:
        """The copies of this namespace: model_id, version, bytes (the file's size), frames,
        shape, path."""
        out = []
        for path, model_id, version, kind in sorted(self._own_files()):
            if kind != "frames":
                continue
            entry: dict[str, Any] = {"model_id": model_id, "version": version, "path": str(path)}
            try:
                fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
            except FileNotFoundError:
                continue
            try:
                entry["bytes"] = os.fstat(fd).st_size
                try:
                    header = _read_header(fd)
                    entry.update(frames=header["shape"][0], shape=header["shape"],
                                 version=header.get("version", version))
                except (ValueError, OSError) as exc:
                    entry["error"] = str(exc)
            finally:
                os.close(fd)
            out.append(entry)
        return out


def _unlink(path: Path) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _free_bytes(root: Path) -> int:
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize


def _mem_available() -> Optional[int]:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
