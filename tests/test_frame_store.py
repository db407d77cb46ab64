"""The shared-memory frame store: one copy per host, survives a worker's crash, leaves nothing.

These tests use the real /dev/shm with a unique namespace each, and real processes (spawn).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest

from lipsync_cluster.common.errors import CapacityFull
import json
import shutil
import subprocess

from lipsync_cluster.common.frame_store import HEADER_SIZE, MAGIC, FrameStore, SharedFrames, UnsafeStoreError
from lipsync_cluster.common.model_package import ModelPackageError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.isdir("/dev/shm"),
                                reason="the frame store lives on Linux tmpfs (/dev/shm)")

W, H = 320, 240
SHM = Path("/dev/shm")


def write_frames(folder: Path, n: int, size: tuple = (W, H), ext: str = "jpg") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    paths = []
    for i in range(n):
        img = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        cv2.putText(img, str(i), (20, 80), cv2.FONT_HERSHEY_SIMPLEX, 2, (255, 255, 255), 3)
        path = folder / f"frame_{i:04d}.{ext}"
        assert cv2.imwrite(str(path), img)
        paths.append(path)
    return paths


def ns_files(namespace: str) -> list[Path]:
    """Files of exactly this namespace: lsc-{ns}/{model}-{version}.{suffix}."""
    folder = SHM / f"lsc-{namespace}"
    return sorted(folder.iterdir()) if folder.is_dir() else []


@pytest.fixture
def store():
    fs = FrameStore(f"t{uuid.uuid4().hex[:12]}")
    yield fs
    fs.cleanup()


# --- processes (top level so that spawn can import them) -------------------------------


def _mapping_usage(path: str) -> dict:
    """Rss and Pss (bytes) of this process's mapping(s) of ``path``, from /proc/self/smaps."""
    usage = {"rss": 0, "pss": 0}
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:  # a VMA's first line
                inside = len(fields) >= 6 and fields[5] == path
            elif inside and fields[0] in ("Rss:", "Pss:"):
                usage[fields[0][:-1].lower()] += int(fields[1]) * 1024
    return usage


def _attach_and_measure(namespace: str, model_id: str, version: str, paths: list, size: tuple,
                        barrier, results) -> None:
    store = FrameStore(namespace)
    barrier.wait(timeout=120)  # all start together, so that creators really race for the lock
    frames = store.attach(model_id, version, paths, size)
    checksum = int(frames.array.sum(dtype=np.uint64))  # reads every page of the copy
    barrier.wait(timeout=120)  # every process maps the copy now, so PSS shares it among all
    usage = _mapping_usage(str(frames.path))
    results.put({"pid": os.getpid(), "created": frames.created, "inode": frames.inode,
                 "checksum": checksum, "nbytes": frames.nbytes, **usage})
    barrier.wait(timeout=120)  # nobody unmaps before everyone has measured
    frames.close()


def _attach_and_hang(namespace: str, model_id: str, version: str, paths: list, ready) -> None:
    frames = FrameStore(namespace).attach(model_id, version, paths)
    frames.array.sum(dtype=np.uint64)
    ready.put((frames.created, frames.inode))
    time.sleep(600)  # killed by the test


# --- tests -----------------------------------------------------------------------------


def test_attach_decodes_once_and_maps_read_only(store, tmp_path):
    paths = write_frames(tmp_path / "frames", 6, ext="png")
    frames = store.attach("alice", "v1", paths, expected_size=(W, H))
    assert isinstance(frames, SharedFrames) and frames.created
    assert frames.path == SHM / f"lsc-{store.namespace}" / "alice-v1.frames"
    assert len(frames) == 6 and frames.shape == (6, H, W, 3) and frames.frame_size == (W, H)
    assert frames.nbytes == 6 * H * W * 3 and isinstance(frames.array, np.memmap)
    for i, p in enumerate(paths):
        assert np.array_equal(frames[i], cv2.imread(str(p)))  # png: lossless, exact
    assert type(frames[0]) is np.ndarray and not frames[0].flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        frames.array[0, 0, 0] = 1
    with pytest.raises(ValueError, match="read-only"):
        frames[2][:] = 0
    assert os.path.getsize(frames.path) == HEADER_SIZE + frames.nbytes
    again = store.attach("alice", "v1", paths, expected_size=(W, H))
    assert not again.created and again.inode == frames.inode
    assert store.exists("alice", "v1") and not store.exists("alice", "v2")
    [entry] = store.list()
    assert entry["model_id"] == "alice" and entry["version"] == "v1" and entry["frames"] == 6
    assert entry["bytes"] == HEADER_SIZE + frames.nbytes
    view = frames[1]
    frames.close()
    with pytest.raises(ValueError, match="closed"):
        frames.array
    assert view.sum() > 0  # a view handed out before close() stays valid
    again.close()


@pytest.mark.processes
def test_eight_workers_hold_one_copy_not_eight(store, tmp_path):
    n_procs, n_frames = 8, 24
    paths = [str(p) for p in write_frames(tmp_path / "frames", n_frames)]
    expected_sum = int(sum(cv2.imread(p).sum(dtype=np.uint64) for p in paths))
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(n_procs), ctx.Queue()
    procs = [ctx.Process(target=_attach_and_measure,
                         args=(store.namespace, "bob", "abc123", paths, (W, H), barrier, results))
             for _ in range(n_procs)]
    for p in procs:
        p.start()
    reports = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    nbytes = reports[0]["nbytes"]
    assert nbytes == n_frames * H * W * 3
    assert sum(r["created"] for r in reports) == 1, "the frames must be decoded exactly once"
    assert len({r["inode"] for r in reports}) == 1, "every worker must map the same file"
    assert all(r["checksum"] == expected_sum for r in reports)
    # One copy on the host: the namespace's files hold one array (plus the header page).
    files = ns_files(store.namespace)
    assert sum(f.stat().st_size for f in files) == nbytes + HEADER_SIZE
    assert sum(f.stat().st_blocks * 512 for f in files) <= nbytes + HEADER_SIZE + 4096
    # Each process has all pages resident but is charged 1/8 of them (proportional set size).
    pss = [r["pss"] for r in reports]
    print(f"\none copy: {nbytes} bytes; per-process mapping Rss {reports[0]['rss']} bytes, "
          f"Pss {min(pss)}..{max(pss)} bytes (nbytes/8 = {nbytes // n_procs}), sum of Pss {sum(pss)}")
    assert all(r["rss"] == nbytes for r in reports)
    for value in pss:
        assert abs(value - nbytes / n_procs) <= 0.02 * nbytes / n_procs
    assert abs(sum(pss) - nbytes) <= 0.02 * nbytes


@pytest.mark.processes
def test_a_killed_worker_leaves_the_copy_usable(store, tmp_path):
    paths = [str(p) for p in write_frames(tmp_path / "frames", 5)]
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    victim = ctx.Process(target=_attach_and_hang, args=(store.namespace, "carol", "v1", paths, ready))
    victim.start()
    created, inode = ready.get(timeout=120)
    assert created
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(timeout=30)
    assert victim.exitcode == -signal.SIGKILL
    # A fresh process attaches the same copy without decoding again, and the data is intact.
    barrier, results = ctx.Barrier(1), ctx.Queue()
    fresh = ctx.Process(target=_attach_and_measure,
                        args=(store.namespace, "carol", "v1", paths, (W, H), barrier, results))
    fresh.start()
    report = results.get(timeout=120)
    fresh.join(timeout=60)
    assert not report["created"] and report["inode"] == inode
    assert report["checksum"] == int(sum(cv2.imread(p).sum(dtype=np.uint64) for p in paths))


def test_bad_frames_raise_naming_the_file_and_leave_nothing(store, tmp_path):
    paths = write_frames(tmp_path / "frames", 6)
    paths[3].write_bytes(b"garbage")
    with pytest.raises(ModelPackageError, match=r"frame_0003.jpg: cannot be decoded as an image"):
        store.attach("dave", "v1", paths)
    paths = write_frames(tmp_path / "frames", 6)
    paths[4].unlink()
    with pytest.raises(ModelPackageError, match=r"frame_0004.jpg: file not found"):
        store.attach("dave", "v1", paths)
    paths = write_frames(tmp_path / "frames", 6)
    cv2.imwrite(str(paths[5]), np.zeros((120, 160, 3), np.uint8))
    with pytest.raises(ModelPackageError, match=r"frame_0005.jpg is 160x120 but frame frame_0000.jpg is 320x240"):
        store.attach("dave", "v1", paths)
    paths = write_frames(tmp_path / "frames", 6)
    with pytest.raises(ModelPackageError, match=r"frame_0000.jpg is 320x240 but the model's frame_size is 1280x720"):
        store.attach("dave", "v1", paths, expected_size=(1280, 720))
    # Failed creations leave no copy and no half-written file behind (only the lock file).
    assert [p.name.split(".", 1)[1] for p in ns_files(store.namespace)] == ["lock"]
    assert store.attach("dave", "v1", paths).created


def test_stale_and_corrupt_files_are_replaced(store, tmp_path):
    paths = write_frames(tmp_path / "frames", 3)
    store.dir.mkdir(mode=0o700)
    final = store.path_for("erin", "v1")
    stale_tmp = final.with_name(final.name + ".tmp-999999999")
    stale_tmp.write_bytes(b"half written by a creator that was killed")
    final.write_bytes(b"not a frame store file")
    frames = store.attach("erin", "v1", paths)
    assert frames.created and not stale_tmp.exists()
    assert np.array_equal(frames[2], cv2.imread(str(paths[2])))


def test_remove_versions_and_cleanup(store, tmp_path):
    paths = write_frames(tmp_path / "frames", 3)
    neighbour = FrameStore(store.namespace + "-x")  # shares the name prefix, must stay untouched
    try:
        held = store.attach("frank", "v1", paths)
        store.attach("frank", "v2-beta", paths)
        store.attach("gina", "v1", paths)
        neighbour.attach("frank", "v1", paths)
        assert store.path_for("frank", "v2-beta").name == "frank-v2~beta.frames"
        assert sorted((e["model_id"], e["version"]) for e in store.list()) == [
            ("frank", "v1"), ("frank", "v2-beta"), ("gina", "v1")]
        assert store.remove_other_versions("frank", "v2-beta") == 1
        assert not store.exists("frank", "v1") and store.exists("frank", "v2-beta")
        assert held[0].sum() > 0  # removed from the store, still mapped by its holder
        assert store.remove("gina", "v1") and not store.remove("gina", "v1")
        assert [e["model_id"] for e in store.list()] == ["frank"]
        assert store.cleanup() >= 1
        assert ns_files(store.namespace) == [] and store.list() == [] and store.cleanup() == 0
        assert not store.dir.exists(), "a stopped cluster leaves nothing behind, not even the folder"
        assert neighbour.exists("frank", "v1") and len(neighbour.list()) == 1
        held.close()
    finally:
        neighbour.cleanup()
    assert ns_files(neighbour.namespace) == []


def test_a_copy_that_cannot_fit_is_refused_before_anything_is_allocated(store, tmp_path):
    # tmpfs pages are RAM: a copy larger than the free space / available memory must be refused
    # up front (CapacityFull), not discovered by the OOM killer halfway through the decode.
    paths = write_frames(tmp_path / "frames", 1)
    st = os.statvfs(SHM)
    too_many = (st.f_bavail * st.f_frsize) // (W * H * 3) + 10
    with pytest.raises(CapacityFull, match=r"/dev/shm has room for \d+ MB .*the frames of model 'hugo' need \d+ MB"):
        store.attach("hugo", "v1", paths * too_many)
    assert [p.name.split(".", 1)[1] for p in ns_files(store.namespace)] == ["lock"]


def test_names_are_checked():
    with pytest.raises(ValueError, match="namespace"):
        FrameStore("bad/ns")
    store = FrameStore("ok")
    with pytest.raises(ValueError, match="model id 'Bad'"):
        store.path_for("Bad", "v1")
    with pytest.raises(ValueError, match="version '../x'"):
        store.path_for("good", "../x")


# --- other local users (docs/SECURITY.md: "Local users") ----------------------------------

NOBODY = 65534


def as_nobody(code: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """Run Python ``code`` as an unprivileged user (uid/gid 65534, no groups) via setpriv."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv (util-linux) to act as another local user")
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
    return subprocess.run([setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", python, "-c", code],
                          input=stdin, capture_output=True, timeout=60, cwd="/", env={"PATH": "/usr/bin:/bin"})


def red_copy(n: int, model_id: str, version: str, namespace: str) -> bytes:
    """A complete frame-store file whose every pixel is red, as an attacker would forge one."""
    header = {"shape": [n, H, W, 3], "dtype": "uint8", "model_id": model_id, "version": version,
              "namespace": namespace, "frames": n, "created_by": 1, "created_at": 0}
    pixels = np.zeros((n, H, W, 3), np.uint8)
    pixels[..., 2] = 255
    return (MAGIC + json.dumps(header).encode()).ljust(HEADER_SIZE, b"\0") + pixels.tobytes()


@pytest.mark.processes
def test_another_user_cannot_plant_frames_for_the_cluster(store, tmp_path):
    """A local user pre-creates the copy the workers will look for (red pixels, open to all, so
    that it can also truncate it later for a SIGBUS): in the namespace's folder, made first and
    open to everyone, and under the older flat name. The store maps none of it: a folder that is
    not ours is refused with the reason, and nothing else is looked at."""
    paths = write_frames(tmp_path / "frames", 3)
    flat = SHM / f"lsc-{store.namespace}-mallory-v1.frames"
    inner = store.dir / "mallory-v1.frames"
    planted = as_nobody(f"""
import os, sys
blob = sys.stdin.buffer.read()
os.mkdir({str(store.dir)!r}); os.chmod({str(store.dir)!r}, 0o777)
for p in ({str(flat)!r}, {str(inner)!r}):
    with open(p, "wb") as f:
        f.write(blob)
    os.chmod(p, 0o666)
""", stdin=red_copy(3, "mallory", "v1", store.namespace))
    assert planted.returncode == 0, planted.stderr.decode()
    try:
        try:
            frames = store.attach("mallory", "v1", paths)
        except UnsafeStoreError as exc:
            assert f"belongs to uid {NOBODY}" in str(exc) and "refusing" in str(exc)
        else:
            red = (frames[0][..., 2] == 255).all() and (frames[0][..., :2] == 0).all()
            pytest.fail(f"attached a copy another user made (red pixels: {bool(red)}): {frames.path}")
        assert store.list() == [] and not store.exists("mallory", "v1")
        assert store.remove("mallory", "v1") is False and inner.exists(), "nothing deleted through their folder"
        with pytest.raises(UnsafeStoreError):
            store.cleanup()
    finally:
        shutil.rmtree(store.dir, ignore_errors=True)
        flat.unlink(missing_ok=True)


@pytest.mark.processes
def test_planted_symlinks_make_the_worker_create_nothing(store, tmp_path):
    """Symlinks planted by another user where the lock and temporary files used to be created
    (and a copy) are never followed: the worker creates no file of the attacker's choosing."""
    paths = write_frames(tmp_path / "frames", 3)
    target = tmp_path.parent / f"chosen-by-attacker-{uuid.uuid4().hex[:6]}"
    stem = SHM / f"lsc-{store.namespace}-oscar-v1"
    links = [Path(f"{stem}.lock"), Path(f"{stem}.frames.tmp-{os.getpid()}")]
    planted = as_nobody(f"""
import os
for link in {[str(p) for p in links]!r}:
    os.symlink({str(target)!r}, link)
""")
    assert planted.returncode == 0, planted.stderr.decode()
    try:
        frames = store.attach("oscar", "v1", paths)
        assert np.array_equal(frames[1], cv2.imread(str(paths[1])))
        assert not target.exists(), "a planted symlink made the worker create a file"
    finally:
        for link in links:
            link.unlink(missing_ok=True)
    # Inside the private folder a symlink (however it got there) is not followed either: the copy
    # is rebuilt in place and the link's target is untouched.
    outside = tmp_path / "outside.frames"
    outside.write_bytes(red_copy(3, "pia", "v1", store.namespace))
    store.path_for("pia", "v1").symlink_to(outside)
    frames = store.attach("pia", "v1", paths)
    assert frames.created and not frames.path.is_symlink()
    assert np.array_equal(frames[2], cv2.imread(str(paths[2])))
    assert outside.read_bytes() == red_copy(3, "pia", "v1", store.namespace)
    # A copy of ours that others could write (mode 0666) is not mapped but rebuilt.
    loose = store.path_for("quin", "v1")
    loose.write_bytes(red_copy(3, "quin", "v1", store.namespace))
    loose.chmod(0o666)
    frames = store.attach("quin", "v1", paths)
    assert frames.created and np.array_equal(frames[0], cv2.imread(str(paths[0])))
    assert (os.stat(frames.path).st_mode & 0o077) == 0


@pytest.mark.processes
def test_the_store_folder_is_private(store, tmp_path):
    """0700 and ours: another user can neither list it nor create, write or truncate a file in it."""
    frames = store.attach("rita", "v1", write_frames(tmp_path / "frames", 3))
    st = os.lstat(store.dir)
    assert (st.st_mode & 0o777) == 0o700 and st.st_uid == os.geteuid()
    probe = as_nobody(f"""
import os
for attempt in (lambda: os.listdir({str(store.dir)!r}), lambda: os.truncate({str(frames.path)!r}, 4096),
                lambda: open({str(store.dir / "x.frames")!r}, "wb")):
    try:
        attempt()
        print("allowed")
    except PermissionError:
        print("refused")
""")
    assert probe.stdout.decode().split() == ["refused"] * 3, probe
    assert frames[0].sum() > 0


def test_a_copy_is_published_only_if_its_source_still_holds(store, tmp_path):
    """``check_source`` runs after decoding and before the copy is renamed into place: when it
    raises (the package was re-prepared while decoding), nothing is published."""
    paths = write_frames(tmp_path / "frames", 3)

    def changed() -> None:
        raise ModelPackageError("the files changed while they were decoded")

    with pytest.raises(ModelPackageError, match="changed while"):
        store.attach("sam", "v1", paths, check_source=changed)
    assert not store.exists("sam", "v1") and [p.name for p in ns_files(store.namespace)] == ["sam-v1.lock"]
    assert store.attach("sam", "v1", paths, check_source=lambda: None).created


def test_a_frame_bomb_is_refused_before_decoding(store, tmp_path):
    from test_model_package import png_bomb

    paths = write_frames(tmp_path / "frames", 2, ext="png")
    png_bomb(paths[1], 8000, 8000)
    with pytest.raises(ModelPackageError, match=r"frame_0001.png is 8000x8000 .* at most"):
        store.attach("tom", "v1", paths)
