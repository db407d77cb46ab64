"""Live updates without a restart: a re-prepared model is served in its new version on the next
requests (no request fails), a deleted package disappears, a new one becomes servable."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading

import cv2
import numpy as np
import pytest

from lipsync_cluster.client import Client, UnknownModel
from lipsync_cluster.common.frame_store import FrameStore
from lipsync_cluster.common.model_package import load_package
from lipsync_cluster.supervisor import shm_namespace

from waiting import wait_until

pytestmark = pytest.mark.processes  # a cluster each

SILENCE = np.zeros((32, 16, 16), np.float32)


def write_video(package_dir, path, frames=20):
    pkg = load_package(package_dir)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, tuple(pkg.frame_size))
    for p in pkg.frame_paths[:frames]:
        writer.write(cv2.imread(str(p)))
    writer.release()
    return [list(map(int, r)) for r in pkg.crop_rects[:frames]]


def test_reprepare_under_load_switches_version_without_failures(make_cluster, demo_dir, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(demo_dir / "demo_ada", models / "demo_ada")
    old_version = load_package(models / "demo_ada").version
    sup = make_cluster(models_dir=str(models), audio_encoder=str(demo_dir / "audio_encoder.onnx"))

    # the new version of demo_ada: re-prepared from a video (of another demo person) by `prepare`
    videos = tmp_path / "videos"
    videos.mkdir()
    rects = write_video(demo_dir / "demo_ben", videos / "demo_ada.mp4")
    (tmp_path / "rects.json").write_text(json.dumps(rects))

    replies, errors, stop = [], [], threading.Event()

    def hammer():
        with Client(sup.config.frontend, timeout=30) as client:
            i = 0
            while not stop.is_set():
                try:
                    r = client.infer("demo_ada", audio_features=SILENCE, start_frame_idx=i % 10, format="jpeg")
                    replies.append(r.model_version)
                except Exception as exc:  # any failure is a test failure; keep going to count them
                    errors.append(repr(exc))
                i += 1

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    [t.start() for t in threads]
    wait_until(lambda: len(replies) >= 6 or errors, 60, "six replies on the old version before the update")
    out = subprocess.run([sys.executable, "-m", "lipsync_cluster.cli", "prepare", str(videos), "demo_ada",
                          "--models-dir", str(models), "--onnx", str(demo_dir / "demo_ada" / "model.onnx"),
                          "--crop-rects", str(tmp_path / "rects.json"), "--force", "--workers", "1",
                          "--no-progress"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    new_version = load_package(models / "demo_ada").version
    assert new_version != old_version
    try:
        wait_until(lambda: replies[-6:].count(new_version) == 6 or errors, 30, "six replies in a row on the new version")
    finally:
        stop.set()
    [t.join() for t in threads]
    assert errors == [], f"requests failed during the update: {errors[:3]}"
    assert replies[0] == old_version and replies[-1] == new_version
    assert set(replies) == {old_version, new_version}
    # the broker's catalog follows within its refresh period (a stat of each package, every 2 s)
    with Client(sup.config.frontend) as client:
        def listed_new() -> dict | None:
            listed = {m["model_id"]: m for m in client.list_models()}
            return listed if listed["demo_ada"]["version"] == new_version else None

        listed = wait_until(listed_new, 10, "the broker's catalog to list demo_ada's new version")
    assert listed["demo_ada"]["version"] == new_version
    # the old version's shared frames are released once no worker needs them
    store = FrameStore(shm_namespace(sup.config))

    def old_released() -> bool:
        if not any(e["version"] == old_version for e in store.list()):
            return True
        with Client(sup.config.frontend) as client:  # the other worker drops its copy on its next request
            client.infer("demo_ada", audio_features=SILENCE)
        return False

    wait_until(old_released, 10, "the old version's shared frames to be released")
    assert [e["version"] for e in store.list() if e["model_id"] == "demo_ada"] == [new_version]


def test_deleted_package_disappears_and_new_one_is_servable(make_cluster, demo_dir, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for name in ("demo_ada", "demo_ben"):
        shutil.copytree(demo_dir / name, models / name)
    sup = make_cluster(models_dir=str(models), audio_encoder=str(demo_dir / "audio_encoder.onnx"))
    with Client(sup.config.frontend, timeout=30) as client:
        assert client.infer("demo_ben", audio_features=SILENCE).frames
        shutil.rmtree(models / "demo_ben")
        wait_until(lambda: "demo_ben" not in {m["model_id"] for m in client.list_models()}, 10,
                   "the deleted package to leave the catalog")
        assert "demo_ben" not in {m["model_id"] for m in client.list_models()}
        with pytest.raises(UnknownModel):
            client.infer("demo_ben", audio_features=SILENCE)
        assert client.infer("demo_ada", audio_features=SILENCE).frames, "other models are untouched"
        shutil.copytree(demo_dir / "demo_cleo", models / "demo_cleo")
        result = client.infer("demo_cleo", audio_features=SILENCE)  # no restart, no wait
        assert result.model_id == "demo_cleo" and result.model_loaded
