"""`prepare` and `check-model`: real footage with camera motion, resampling, failures, skip/force, workers."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from click.testing import CliRunner, Result

from lipsync_cluster.common.model_package import compute_version, load_package, read_package, validate_package
from lipsync_cluster.prepare import faces
from lipsync_cluster.prepare.cli import check_model, prepare
from lipsync_cluster.prepare.video import Letterbox, output_count, parse_size, source_index

ASTRO_FRAMES, ASTRO_FPS, ASTRO_SIZE = 75, 25, 512  # 3 s of camera motion at 25 fps


# --- footage ---------------------------------------------------------------------------------


def astronaut_bgr() -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data")  # a real photograph shipped inside scikit-image
    return cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2BGR)


def camera(t: float) -> np.ndarray:
    """The camera's 2x3 affine at t in [0, 1]: zoom 1 -> 1.25 -> 1 about the centre, pan +-40 px, tilt 50 px."""
    zoom = 1.0 + 0.25 * np.sin(np.pi * t)
    m = cv2.getRotationMatrix2D((ASTRO_SIZE / 2, ASTRO_SIZE / 2), 0, zoom)
    m[0, 2] += 40 * np.sin(2 * np.pi * t)
    m[1, 2] += 50 * (t - 0.5)
    return m


def write_video(path: Path, frames, fps: float, size: tuple[int, int]) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


@pytest.fixture(scope="module")
def astro_video(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("astro_videos")
    return write_video(folder / "astronaut.mp4", astro_frames(), ASTRO_FPS, (ASTRO_SIZE, ASTRO_SIZE))


def astro_frames(occluded=()):
    photo = astronaut_bgr()
    for i in range(ASTRO_FRAMES):
        frame = cv2.warpAffine(photo, camera(i / (ASTRO_FRAMES - 1)), (ASTRO_SIZE, ASTRO_SIZE),
                               flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        if i in occluded:  # a hand in front of the face
            cv2.rectangle(frame, (120, 40), (360, 300), (60, 90, 160), -1)
        yield frame


@pytest.fixture(scope="module")
def unet(tmp_path_factory) -> Path:
    from lipsync_cluster.demo.light import build_light_unet

    return build_light_unet(tmp_path_factory.mktemp("unet") / "unet.onnx")


SYN_W, SYN_H = 160, 120
BITS = 9  # frame numbers up to 511, as black/white 16 px squares along the top


def numbered_frames(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SYN_H, 0:SYN_W]
    base = np.stack([xx * 255 // SYN_W, yy * 255 // SYN_H, np.full_like(xx, 90)], axis=-1).astype(np.uint8)
    for j in range(n):
        img = base.copy()
        img[40:] = np.clip(img[40:].astype(int) + rng.integers(-10, 10, img[40:].shape), 0, 255).astype(np.uint8)
        for b in range(BITS):
            img[0:16, b * 16:(b + 1) * 16] = 255 if (j >> b) & 1 else 0
        yield img


def frame_number(img: np.ndarray) -> int:
    return sum(1 << b for b in range(BITS) if img[8, b * 16 + 8].mean() > 128)


def synthetic_video(path: Path, n: int, fps: float, seed: int = 0) -> Path:
    return write_video(path, numbered_frames(n, seed), fps, (SYN_W, SYN_H))


def rects_file(path: Path, n: int) -> Path:
    path.write_text(json.dumps([[40, 30, 104, 94]] * n))
    return path


def run(*args) -> Result:
    return CliRunner().invoke(prepare, [str(a) for a in args], catch_exceptions=False)


def rect_centre(r) -> np.ndarray:
    return np.array([(r[0] + r[2]) / 2, (r[1] + r[3]) / 2], float)


# --- real footage -------------------------------------------------------------------------------


def test_astronaut_with_camera_motion_is_tracked_and_serves(astro_video, unet, tmp_path):
    models = tmp_path / "models"
    started = time.perf_counter()
    res = run(astro_video.parent, "--models-dir", models, "--size", f"{ASTRO_SIZE}x{ASTRO_SIZE}", "--onnx", unet,
              "--workers", 1, "--output-json", tmp_path / "stats.json")
    elapsed = time.perf_counter() - started
    assert res.exit_code == 0, res.output
    assert "✅ astronaut: prepared 75 frames" in res.output
    package = models / "astronaut"
    record = json.loads((package / "prepare.json").read_text())
    assert record["face"]["detected"] == ASTRO_FRAMES and record["face"]["filled"] == 0  # a face in every frame

    rects = np.array(json.loads((package / "crop_rects.json").read_text()), float)
    assert rects.shape == (ASTRO_FRAMES, 4)
    sides = rects[:, 2] - rects[:, 0]
    assert np.array_equal(sides, rects[:, 3] - rects[:, 1])  # square
    assert (rects[:, :2] >= 0).all() and (rects[:, 2:] <= ASTRO_SIZE).all()

    # Where the box must be: the same detector on the unmoved photograph, carried by the known camera.
    photo = astronaut_bgr()
    tracker = faces.FaceTracker()
    first = tracker.detect(photo)  # whole-frame search
    box = tracker.detect(photo)  # the local search every later frame uses
    ref = faces.face_to_rect(box[0] + box[2] / 2, box[1] + box[2] / 2, box[2], (ASTRO_SIZE, ASTRO_SIZE))
    # ... and, independently, the whole-frame detection at full resolution.
    ref_full = faces.face_to_rect(first[0] + first[2] / 2, first[1] + first[2] / 2, first[2], (ASTRO_SIZE,) * 2)
    errors, errors_full, size_errors = [], [], []
    for i, rect in enumerate(rects):
        m = camera(i / (ASTRO_FRAMES - 1))
        zoom = float(np.hypot(m[0, 0], m[1, 0]))
        for r0, out in ((ref, errors), (ref_full, errors_full)):
            expected = m[:, :2] @ rect_centre(r0) + m[:, 2]
            out.append(float(np.hypot(*(rect_centre(rect) - expected))))
        size_errors.append(abs(sides[i] / ((ref[2] - ref[0]) * zoom) - 1))
    print(f"\nastronaut: max centre error {max(errors):.2f} px (mean {np.mean(errors):.2f}), "
          f"vs full-res detection {max(errors_full):.2f} px, max size error {max(size_errors):.1%}, "
          f"prepare {elapsed:.2f} s")
    assert max(errors) <= 3.0  # the box follows the pan/zoom within a few pixels
    assert max(errors_full) <= 6.0
    assert max(size_errors) <= 0.05
    # and moves with the camera: 80 px of pan and 50 px of tilt must show
    assert np.ptp(rects[:, 0]) > 40 and np.ptp(rects[:, 1]) > 30

    manifest = yaml.safe_load((package / "model.yaml").read_text())
    assert manifest["id"] == "astronaut" and manifest["kind"] == "prepared" and manifest["preload"] is False
    assert manifest["frame_count"] == ASTRO_FRAMES and manifest["frame_size"] == [ASTRO_SIZE, ASTRO_SIZE]
    assert manifest["fps"] == 25.0 and manifest["memory_estimate_mb"] > 0
    pkg = load_package(package, "astronaut")
    assert validate_package(pkg) == []
    assert pkg.version == manifest["version"] == compute_version(pkg.onnx_path, pkg.crop_rects_path, pkg.frame_paths)
    assert pkg.num_frames == ASTRO_FRAMES and pkg.frame_size == (ASTRO_SIZE, ASTRO_SIZE)
    assert np.array_equal(pkg.crop_rects, rects.astype(np.int32))

    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["totals"]["successful"] == 1 and stats["models"][0]["servable"] is True
    assert not (models / ".prepare-tmp").exists()

    # The crop the UNet sees: the lower face, the same person in every frame.
    from lipsync_cluster.common.imageops import crop_face

    crops = [crop_face(cv2.imread(str(p)), r) for p, r in zip(pkg.frame_paths[::15], pkg.crop_rects[::15])]
    for crop in crops[1:]:
        assert np.abs(crop.astype(float) - crops[0]).mean() < 20

    # Served: the UNet on the prepared frames and boxes, pasted back (the worker's pipeline steps).
    import onnxruntime as ort

    from lipsync_cluster.common.imageops import build_visual_batch, paste_back

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # share the cores (make test-fast)
    session = ort.InferenceSession(str(pkg.onnx_path), opts, providers=["CPUExecutionProvider"])
    backgrounds = [cv2.imread(str(pkg.frame_paths[i])) for i in (0, 40)]
    visual, crops = build_visual_batch(backgrounds, pkg.crop_rects[[0, 40]])
    out = session.run(None, {"input": visual, "audio": np.zeros((2, 32, 16, 16), np.float32)})[0]
    for background, rect, crop, pred in zip(backgrounds, pkg.crop_rects[[0, 40]], crops, out):
        frame = paste_back(background, rect, crop, pred)
        x1, y1, x2, y2 = rect
        outside = np.ones(frame.shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        assert np.array_equal(frame[outside], background[outside])

    check = CliRunner().invoke(check_model, [str(package)])
    assert check.exit_code == 0, check.output
    assert "is servable" in check.output and "[B,6,320,320]" in check.output and "-> visual" in check.output
    assert "75 at 512x512, 25 fps" in check.output


def test_frames_where_the_face_is_hidden_are_filled_from_their_neighbours(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    hidden = set(range(20, 24)) | set(range(50, 54))
    write_video(videos / "astro_hidden.mp4", astro_frames(hidden), ASTRO_FPS, (ASTRO_SIZE, ASTRO_SIZE))
    res = run(videos, "--models-dir", tmp_path / "models", "--size", f"{ASTRO_SIZE}x{ASTRO_SIZE}", "--workers", 1)
    assert res.exit_code == 0, res.output
    package = tmp_path / "models" / "astro_hidden"
    face = json.loads((package / "prepare.json").read_text())["face"]
    assert face["filled"] == len(hidden) and face["detected"] == ASTRO_FRAMES - len(hidden)
    rects = np.array(json.loads((package / "crop_rects.json").read_text()), float)
    photo = astronaut_bgr()
    tracker = faces.FaceTracker()
    tracker.detect(photo)
    box = tracker.detect(photo)
    ref = faces.face_to_rect(box[0] + box[2] / 2, box[1] + box[2] / 2, box[2], (ASTRO_SIZE, ASTRO_SIZE))
    for i in sorted(hidden):
        m = camera(i / (ASTRO_FRAMES - 1))
        assert np.hypot(*(rect_centre(rects[i]) - (m[:, :2] @ rect_centre(ref) + m[:, 2]))) <= 4.0


# --- frame rate and size -------------------------------------------------------------------------


def test_ten_seconds_at_30fps_become_250_frames_at_25fps(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    synthetic_video(videos / "clip.mp4", 300, 30)
    res = run(videos, "--models-dir", tmp_path / "models", "--size", f"{SYN_W}x{SYN_H}", "--workers", 1,
              "--crop-rects", rects_file(tmp_path / "rects.json", 250))
    assert res.exit_code == 0, res.output
    frames = sorted((tmp_path / "models" / "clip" / "frames").iterdir())
    assert len(frames) == 250 and frames[0].name == "frame_0000.jpg" and frames[-1].name == "frame_0249.jpg"
    # frame i shows the source frame on screen at time i/25: source floor(i * 30 / 25)
    shown = [frame_number(cv2.imread(str(p))) for p in frames]
    assert shown == [i * 30 // 25 for i in range(250)]
    manifest = yaml.safe_load((tmp_path / "models" / "clip" / "model.yaml").read_text())
    assert manifest["frame_count"] == 250 and manifest["fps"] == 25.0
    assert "version" not in manifest  # no UNet yet: the cluster hashes the files once one is added
    assert "not servable: no UNet (pass --onnx)" in res.output

    # the wrong number of rects is refused with both counts
    res = run(videos, "--models-dir", tmp_path / "models2", "--size", f"{SYN_W}x{SYN_H}", "--workers", 1,
              "--crop-rects", rects_file(tmp_path / "rects300.json", 300))
    assert res.exit_code == 1
    assert "has 300 rects but the video gives 250 frames at 25 fps (300 source frames at 30 fps)" in res.output


def test_resampling_arithmetic():
    from fractions import Fraction

    assert output_count(300, Fraction(30), Fraction(25)) == 250
    assert output_count(301, Fraction(30), Fraction(25)) == 251
    assert output_count(150, Fraction(15), Fraction(25)) == 250  # 15 fps shown at 25: frames repeat
    assert [source_index(i, Fraction(15), Fraction(25)) for i in range(6)] == [0, 0, 1, 1, 2, 3]
    ntsc = Fraction(30000, 1001)
    assert output_count(300, ntsc, Fraction(25)) == 251  # 10.01 s


def test_letterbox_keeps_aspect_and_pads_black():
    assert parse_size("1280x720") == (1280, 720) and parse_size("source") is None
    with pytest.raises(ValueError):
        parse_size("1280")
    box = Letterbox.fit((SYN_W, SYN_H), (320, 180))  # 4:3 into 16:9: pillarbox
    assert (box.scale, box.inner, box.ox, box.oy) == (1.5, (240, 180), 40, 0)
    frame = next(numbered_frames(1))
    out = box.apply(frame)
    assert out.shape == (180, 320, 3)
    assert not out[:, :40].any() and not out[:, 280:].any() and out[:, 40:280].any()


# --- failures --------------------------------------------------------------------------------


def test_corrupt_video_fails_clearly_and_others_continue(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    synthetic_video(videos / "good.mp4", 25, 25)
    (videos / "broken.mp4").write_bytes(os.urandom(5000))
    rects = tmp_path / "rects"
    rects.mkdir()
    rects_file(rects / "good.json", 25)
    rects_file(rects / "broken.json", 25)
    res = run(videos, "--models-dir", tmp_path / "models", "--size", f"{SYN_W}x{SYN_H}", "--workers", 1,
              "--crop-rects", rects, "--output-json", tmp_path / "stats.json")
    assert res.exit_code == 1
    assert "❌ broken: broken.mp4: OpenCV cannot open it as a video" in res.output
    assert "✅ good: prepared 25 frames" in res.output
    stats = json.loads((tmp_path / "stats.json").read_text())
    by_model = {m["model"]: m for m in stats["models"]}
    assert by_model["broken"]["status"] == "failed" and by_model["good"]["status"] == "prepared"
    assert stats["totals"]["failed"] == 1 and stats["totals"]["successful"] == 1
    assert not (tmp_path / "models" / "broken").exists()
    assert (tmp_path / "models" / "good" / "model.yaml").is_file()


def test_video_without_a_face_fails_naming_the_fraction(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    synthetic_video(videos / "wall.mp4", 25, 25)
    res = run(videos, "--models-dir", tmp_path / "models", "--size", f"{SYN_W}x{SYN_H}", "--workers", 1)
    assert res.exit_code == 1
    assert "❌ wall: no face found in 25 of 25 frames (100% without a usable face; at most 20% may be missing)" \
        in res.output
    assert not (tmp_path / "models" / "wall").exists()


def test_stabilise_fills_gaps_rejects_outliers_and_counts_missing():
    raw = [[100 + i, 50, 80] for i in range(50)]
    raw[10] = None
    raw[11] = None
    raw[30] = [400, 300, 30]  # a false positive elsewhere
    track = faces.stabilise(raw, 25)
    assert track.detected == 47 and track.missing == 3 and track.rejected == 1
    assert np.allclose(track.boxes[:, 0], [140 + i for i in range(50)], atol=0.01)  # centre x = x + 40
    assert np.allclose(track.boxes[:, 2], 80)
    with pytest.raises(faces.FaceError, match=r"no face found in 11 of 50 frames \(22% without"):
        faces.stabilise([None if i % 5 == 0 or i < 2 else [10, 10, 40] for i in range(50)], 25)


def test_face_rect_is_square_below_the_eyes_and_inside_the_frame():
    assert faces.face_to_rect(200, 100, 100, (640, 360)) == [150, 95, 250, 195]  # top = 50 + 0.45 * 100
    assert faces.face_to_rect(20, 330, 100, (640, 360)) == [0, 260, 100, 360]  # moved inside, not cut
    assert faces.face_to_rect(100, 100, 500, (320, 240)) == [0, 0, 240, 240]  # larger than the frame


def test_bad_names_are_rejected_before_any_work(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    synthetic_video(videos / "Person 1.mp4", 5, 25)
    synthetic_video(videos / "ok_name.mp4", 5, 25)
    res = CliRunner().invoke(prepare, [str(videos), "--models-dir", str(tmp_path / "models")])
    assert res.exit_code == 2
    assert "'Person 1' is not a valid model id; try 'person_1'" in res.output
    assert "nothing was prepared" in res.output
    assert not (tmp_path / "models").exists()
    res = CliRunner().invoke(prepare, [str(videos), "--models-dir", str(tmp_path / "models"), "Model-A", "nobody"])
    assert res.exit_code == 2
    assert "'Model-A' is not a valid model id; try 'model_a'" in res.output
    assert "no video for 'nobody'" in res.output


# --- skip, force, update ------------------------------------------------------------------------


def test_skip_when_up_to_date_force_and_updates(tmp_path, unet):
    videos = tmp_path / "videos"
    videos.mkdir()
    video = synthetic_video(videos / "anna.mp4", 25, 25)
    rects = rects_file(tmp_path / "rects.json", 25)
    args = [videos, "--models-dir", tmp_path / "models", "--size", f"{SYN_W}x{SYN_H}", "--workers", 1,
            "--crop-rects", rects]
    package = tmp_path / "models" / "anna"
    assert run(*args).exit_code == 0
    first = (package / "model.yaml").stat().st_mtime_ns

    res = run(*args)
    assert res.exit_code == 0 and "⏭️  anna: up to date" in res.output and "Successful: 1 (1 up to date)" in res.output
    assert (package / "model.yaml").stat().st_mtime_ns == first

    res = run(*args, "--force")
    assert res.exit_code == 0 and "✅ anna: prepared" in res.output
    assert (package / "model.yaml").stat().st_mtime_ns != first

    # Adding the UNet later reuses the frames and makes the package servable.
    res = run(*args, "--onnx", unet)
    assert res.exit_code == 0 and "✅ anna: prepared" in res.output and "not servable" not in res.output
    record = json.loads((package / "prepare.json").read_text())
    version = yaml.safe_load((package / "model.yaml").read_text())["version"]
    assert record["version"] == version and load_package(package).version == version

    # A new video (same name) is picked up without --force, and the UNet stays.
    synthetic_video(video, 25, 25, seed=1)
    res = run(*args)
    assert res.exit_code == 0 and "✅ anna: prepared" in res.output
    assert (package / "model.onnx").is_file() and validate_package(read_package(package)) == []
    assert yaml.safe_load((package / "model.yaml").read_text())["version"] != version

    # A failing re-prepare leaves the package that was there.
    good = (package / "model.yaml").read_text()
    video.write_bytes(b"not a video")
    res = run(*args)
    assert res.exit_code == 1 and "❌ anna" in res.output
    assert (package / "model.yaml").read_text() == good and validate_package(read_package(package)) == []
    assert not (tmp_path / "models" / ".prepare-tmp").exists()


def test_refuses_to_replace_a_package_it_did_not_make(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    synthetic_video(videos / "hand_made.mp4", 5, 25)
    (tmp_path / "models" / "hand_made").mkdir(parents=True)
    (tmp_path / "models" / "hand_made" / "model.yaml").write_text("id: hand_made\n")
    args = [videos, "--models-dir", tmp_path / "models", "--size", f"{SYN_W}x{SYN_H}", "--workers", 1,
            "--crop-rects", rects_file(tmp_path / "r.json", 5)]
    res = run(*args)
    assert res.exit_code == 1 and "was not made by prepare (no prepare.json); pass --force" in res.output
    assert run(*args, "--force").exit_code == 0


def test_swap_in_replaces_a_package_in_one_step(tmp_path):
    from lipsync_cluster.prepare.build import swap_in

    old, new = tmp_path / "models" / "m", tmp_path / "models" / ".prepare-tmp" / "m.1.x"
    for folder, text in ((old, "old"), (new, "new")):
        folder.mkdir(parents=True)
        (folder / "model.yaml").write_text(text)
    swap_in(new, old)
    assert (old / "model.yaml").read_text() == "new" and not new.exists()
    fresh = tmp_path / "models" / ".prepare-tmp" / "n.1.x"
    fresh.mkdir()
    swap_in(fresh, tmp_path / "models" / "n")
    assert (tmp_path / "models" / "n").is_dir() and not fresh.exists()


# --- parallel -----------------------------------------------------------------------------------


@pytest.mark.processes
def test_two_workers_prepare_two_videos(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    rects = tmp_path / "rects"
    rects.mkdir()
    for k, name in enumerate(("ada", "bob")):
        synthetic_video(videos / f"{name}.mp4", 50, 25, seed=k)
        rects_file(rects / f"{name}.json", 50)
    res = run(videos, "--models-dir", tmp_path / "models", "--size", f"{SYN_W}x{SYN_H}", "--workers", 2,
              "--crop-rects", rects, "--output-json", tmp_path / "out" / "stats.json")
    assert res.exit_code == 0, res.output
    assert "with 2 worker(s)" in res.output
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert [m["model"] for m in stats["models"]] == ["ada", "bob"]
    assert all(m["status"] == "prepared" and m["frames"] == 50 for m in stats["models"])
    assert stats["totals"]["frames"] == 100 and stats["totals"]["size_bytes"] > 0
    for name in ("ada", "bob"):
        assert len(read_package(tmp_path / "models" / name).frame_paths) == 50


# --- check-model ----------------------------------------------------------------------------------


def test_check_model_reports_every_problem(tmp_path, unet):
    videos = tmp_path / "videos"
    videos.mkdir()
    synthetic_video(videos / "carl.mp4", 10, 25)
    res = run(videos, "--models-dir", tmp_path / "models", "--size", f"{SYN_W}x{SYN_H}", "--workers", 1,
              "--crop-rects", rects_file(tmp_path / "r.json", 10), "--onnx", unet)
    assert res.exit_code == 0, res.output
    package = tmp_path / "models" / "carl"
    good = CliRunner().invoke(check_model, [str(package), "--json"])
    assert good.exit_code == 0
    info = json.loads(good.output)
    assert info["ok"] and info["model"]["frame_count"] == 10 and info["model"]["frame_size"] == [SYN_W, SYN_H]
    assert {i["role"] for i in info["model"]["unet"]["inputs"]} == {"visual", "audio"}

    (package / "frames" / "frame_0004.jpg").unlink()
    (package / "crop_rects.json").write_text(json.dumps([[40, 30, 104, 94]] * 9 + [[150, 100, 200, 150]]))
    (package / "model.onnx").write_bytes(b"garbage")
    bad = CliRunner().invoke(check_model, [str(package)])
    assert bad.exit_code == 1
    assert "problem(s)" in bad.output
    assert "model.onnx: not a loadable ONNX model" in bad.output
    assert "frames/ has no frame 4" in bad.output
    assert "lies outside the 160x120 frame" in bad.output

    missing = CliRunner().invoke(check_model, [str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "not found" in missing.output
