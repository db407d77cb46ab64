"""Demo models: synthetic people, the audio encoder, the light and SyncTalk_2D-topology UNets, the
package builder and the ``demo-models`` command. Real ONNX Runtime sessions throughout."""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from click.testing import CliRunner

from lipsync_cluster.common.model_package import compute_version
from lipsync_cluster.common.protocol import MODEL_ID_RE
from lipsync_cluster.config import load_config
from lipsync_cluster.demo import audio_encoder as ae
from lipsync_cluster.demo import light
from lipsync_cluster.demo.build import build_demo_models, build_demo_models_report, model_id
from lipsync_cluster.demo.cli import demo_models
from lipsync_cluster.demo.frames import PersonRenderer, render_person
from lipsync_cluster.demo.unet import build_synctalk_unet, count_parameters

MANIFEST_KEYS = ["id", "onnx", "frames", "crop_rects", "fps", "frame_count", "frame_size", "version", "kind",
                 "memory_estimate_mb", "preload"]
STANDARD_OPS = {"Conv", "Relu", "Add", "Sub", "Mul", "Concat", "Resize", "Sigmoid", "ReduceMean", "Slice", "Clip",
                "Reshape"}


def session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    # Idle intra-op threads sleep instead of spinning: the other xdist workers of make test-fast
    # need the cores (worker/sessions.py does the same for the worker processes).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def face_crop(frame: np.ndarray, rect) -> np.ndarray:
    """The SyncTalk_2D crop: rect -> 328 (cubic) -> [4:324, 4:324]."""
    x1, y1, x2, y2 = rect
    return cv2.resize(frame[y1:y2, x1:x2], (328, 328), interpolation=cv2.INTER_CUBIC)[4:324, 4:324]


def visual_input(crops) -> np.ndarray:
    """[B,6,320,320] float32: unmasked crops and masked copies, /255."""
    out = []
    for crop in crops:
        v = crop.transpose(2, 0, 1).astype(np.float32) / 255.0
        masked = v.copy()
        masked[:, 5:310, 5:315] = 0.0
        out.append(np.concatenate([v, masked]))
    return np.stack(out)


def to_uint8(chw: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(chw.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)


def lip_centroid(frame: np.ndarray, renderer: PersonRenderer, rect, tol: int = 20) -> tuple[float, float]:
    """Centre of the pixels drawn in the person's lip colours (upper lip, lower lip), searched in a
    region twice the size of ``rect`` around it (so a box that misses the face fails the checks)."""
    x1, y1, x2, y2 = rect
    w = x2 - x1
    ox, oy = max(0, x1 - w // 2), max(0, y1 - w // 2)
    lips = np.asarray(renderer.look.lips, np.int16)
    lower = np.clip(np.rint(lips * 1.1), 0, 255).astype(np.int16)
    img = frame[oy:y2 + w // 2, ox:x2 + w // 2].astype(np.int16)
    mask = (np.abs(img - lips).max(-1) <= tol) | (np.abs(img - lower).max(-1) <= tol)
    ys, xs = np.nonzero(mask)
    assert len(xs) > 200, "no lips found"
    return float(xs.mean()) + ox, float(ys.mean()) + oy


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo_onnx")
    return {
        "encoder": ae.build_audio_encoder(d / "audio_encoder.onnx"),
        "light": light.build_light_unet(d / "light.onnx"),
        "unet": build_synctalk_unet(d / "unet.onnx", seed=0),
    }


@pytest.fixture(scope="module")
def demo_crops():
    """Three demo faces' 320 crops (frame 0 of seeds 0, 1, 2)."""
    crops = []
    for seed in range(3):
        frames, rects = render_person(seed, 1)
        crops.append(face_crop(frames[0], rects[0]))
    return crops


# --- synthetic people ------------------------------------------------------------------------

def test_render_person_is_deterministic_and_seeds_differ():
    a_frames, a_rects = render_person(7, 4)
    b_frames, b_rects = render_person(7, 4)
    c_frames, _ = render_person(8, 4)
    assert a_rects == b_rects
    assert all(np.array_equal(a, b) for a, b in zip(a_frames, b_frames))
    assert np.abs(a_frames[0].astype(int) - c_frames[0].astype(int)).mean() > 10  # another person, another room
    for frame in a_frames:
        assert frame.shape == (720, 1280, 3) and frame.dtype == np.uint8


def test_rects_are_square_inside_and_follow_the_drawn_mouth():
    renderer = PersonRenderer(3)
    frames, rects = render_person(3, 60)
    for rect in rects:
        x1, y1, x2, y2 = rect
        assert all(isinstance(v, int) for v in rect)
        assert 0 <= x1 < x2 <= 1280 and 0 <= y1 < y2 <= 720
        assert x2 - x1 == y2 - y1 and 250 <= x2 - x1 <= 350
    assert len({tuple(r) for r in rects}) > 5, "the head should move"
    xs = [r[0] for r in rects]
    ys = [r[1] for r in rects]
    assert max(xs) - min(xs) >= 3 or max(ys) - min(ys) >= 3
    centroids = []
    for i in (0, 15, 30, 45, 59):
        x1, y1, x2, y2 = rects[i]
        cx, cy = lip_centroid(frames[i], renderer, rects[i])
        # the mouth sits at (0.5, 0.6) of the box (lips centroid a little above the line)
        assert abs(cx - (x1 + 0.5 * (x2 - x1))) < 3
        assert abs(cy - (y1 + 0.6 * (y2 - y1))) < 8
        centroids.append((cx, cy, x1 + 0.5 * (x2 - x1), y1 + 0.6 * (y2 - y1)))
    # the box moves with the drawn face
    c0 = centroids[0]
    for c in centroids[1:]:
        assert abs((c[0] - c0[0]) - (c[2] - c0[2])) < 3.0  # rects are whole pixels
        assert abs((c[1] - c0[1]) - (c[3] - c0[3])) < 3.0


def test_render_person_scales_with_the_frame_size():
    frames, rects = render_person(2, 2, size=(640, 360))
    assert frames[0].shape == (360, 640, 3)
    full = render_person(2, 1)[1][0]
    side, full_side = rects[0][2] - rects[0][0], full[2] - full[0]
    assert abs(side - full_side / 2) <= 2
    frames, rects = render_person(2, 2, size=(720, 1280))  # portrait
    x1, y1, x2, y2 = rects[1]
    assert 0 <= x1 < x2 <= 720 and 0 <= y1 < y2 <= 1280


# --- audio encoder ---------------------------------------------------------------------------

def test_audio_encoder_signature_and_reference(built):
    model = onnx.load(str(built["encoder"]))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    assert {n.op_type for n in model.graph.node} <= STANDARD_OPS
    sess = session(built["encoder"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert inp.name == "mel_spectrogram" and inp.shape[1:] == [1, 80, 16] and isinstance(inp.shape[0], str)
    assert out.name == "audio_features" and out.shape[1:] == [512]
    rng = np.random.RandomState(0)
    mel = rng.uniform(-4, 4, (7, 1, 80, 16)).astype(np.float32)
    got = sess.run(None, {"mel_spectrogram": mel})[0]
    assert got.shape == (7, 512) and got.dtype == np.float32
    np.testing.assert_allclose(got, ae.reference_audio_encoder(mel), rtol=1e-5, atol=1e-6)
    # the energy can be read back: mean over the 512 channels
    np.testing.assert_allclose(got.mean(axis=1), ae.reference_energy(mel), rtol=1e-5, atol=1e-6)
    assert (ae.channel_weights() > 0).all()


def test_audio_encoder_tracks_loudness(built):
    sess = session(built["encoder"])
    levels = [-4.0, -3.0, -2.0, -1.0, 0.5]
    rng = np.random.RandomState(1)
    mel = np.stack([np.clip(lv + rng.normal(0, 0.3, (1, 80, 16)), -4, 4) for lv in levels]).astype(np.float32)
    mel[0] = -4.0  # digital silence
    feats = sess.run(None, {"mel_spectrogram": mel})[0]
    energy = feats.mean(axis=1)
    assert np.abs(feats[0]).max() < 1e-6, "silence -> 0"
    assert 0.8 < energy[3] < 1.2, "loud speech (mean mel ~ -1) -> ~1"
    assert np.all(np.diff(energy) > 0.1), energy
    # only the frame's own columns (0..7) count
    late = np.full((1, 1, 80, 16), -4.0, np.float32)
    late[..., 8:] = 1.0
    assert sess.run(None, {"mel_spectrogram": late})[0].max() < 1e-6


# --- the light UNet --------------------------------------------------------------------------

def test_light_signature_and_reference(built, demo_crops):
    model = onnx.load(str(built["light"]))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    assert {n.op_type for n in model.graph.node} <= STANDARD_OPS
    sess = session(built["light"])
    ins = {i.name: i.shape for i in sess.get_inputs()}
    assert ins["input"][1:] == [6, 320, 320] and ins["audio"][1:] == [32, 16, 16]
    assert sess.get_outputs()[0].name == "output" and sess.get_outputs()[0].shape[1:] == [3, 320, 320]
    visual = visual_input(demo_crops)
    audio = light.loudness_window(np.array([0.0, 0.6, 1.0], np.float32))
    out = sess.run(None, {"input": visual, "audio": audio})[0]
    assert out.shape == (3, 3, 320, 320) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_allclose(out, light.reference_light_unet(visual, audio), atol=1e-5)


def test_light_silence_keeps_the_crop_and_speech_opens_the_mouth(built, demo_crops):
    sess = session(built["light"])
    visual = visual_input(demo_crops)
    silent = sess.run(None, {"input": visual, "audio": light.loudness_window(0.0, 3)})[0]
    assert np.abs(silent - visual[:, :3]).max() <= 1 / 255
    for crop, out in zip(demo_crops, silent):
        assert light.mouth_open_pixels(crop) == 0, "the drawn closed mouth must not count as open"
        assert light.mouth_open_pixels(to_uint8(out)) < 20
    loud = sess.run(None, {"input": visual, "audio": light.loudness_window(1.0, 3)})[0]
    for crop, out in zip(visual[:, :3], loud):
        img = to_uint8(out)
        assert light.mouth_open_pixels(img) > 2500
        # the dark interior is at the mouth centre
        cx, cy = int(round(light.MOUTH_CX)), int(round(light.MOUTH_CY))
        assert np.abs(img[cy + 5, cx].astype(int) - light.INTERIOR_BGR).max() < 10
        # outside the ellipse (with a few px of soft edge) the crop is untouched
        ys, xs = np.mgrid[0:320, 0:320]
        half_h = light.MAX_OPENING / 2
        outside = ((xs - light.MOUTH_CX) / (light.MOUTH_HALF_WIDTH + 5)) ** 2 + \
                  ((ys - light.MOUTH_CY) / (half_h + 5)) ** 2 > 1.0
        diff = np.abs(out - crop).max(axis=0)
        assert diff[outside].max() <= 1 / 255
        assert diff[~outside].max() > 0.3


def test_light_opening_grows_with_energy(built, demo_crops):
    sess = session(built["light"])
    levels = np.array([0.0, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0], np.float32)
    visual = visual_input([demo_crops[1]] * len(levels))
    out = sess.run(None, {"input": visual, "audio": light.loudness_window(levels)})[0]
    counts = [light.mouth_open_pixels(to_uint8(o)) for o in out]
    assert counts[0] < 20 and counts[1] < 20  # silence and room noise stay shut
    assert all(b > a + 200 for a, b in zip(counts[1:], counts[2:])), counts
    # the height of the opening follows opening_for_loudness
    for level, o in zip(levels[3:], out[3:]):
        column = to_uint8(o)[:, int(light.MOUTH_CX)]
        dark = np.abs(column.astype(int) - light.INTERIOR_BGR).max(axis=1) <= 40
        teeth = np.abs(column.astype(int) - light.TEETH_BGR).max(axis=1) <= 40
        height = int(dark.sum() + teeth.sum())
        assert abs(height - light.opening_for_loudness(level)) <= 4, (level, height)


def test_light_each_frame_follows_its_own_audio(built, demo_crops):
    sess = session(built["light"])
    levels = np.array([0.0, 1.0, 0.5, 0.8, 0.0], np.float32)
    visual = visual_input([demo_crops[i % 3] for i in range(5)])
    audio = light.loudness_window(levels)
    out = sess.run(None, {"input": visual, "audio": audio})[0]
    counts = [light.mouth_open_pixels(to_uint8(o)) for o in out]
    assert counts[0] < 20 and counts[4] < 20
    assert counts[1] > counts[3] > counts[2] > 200
    # swapping the audio rows swaps the mouths
    swapped = sess.run(None, {"input": visual, "audio": audio[[1, 0, 2, 3, 4]]})[0]
    assert light.mouth_open_pixels(to_uint8(swapped[0])) > 2500
    assert light.mouth_open_pixels(to_uint8(swapped[1])) < 20
    # only frame i's own features (window rows 16-17) matter, not its neighbours'
    neighbours = light.loudness_window(np.ones(1, np.float32))
    neighbours[:, 16:18] = 0.0
    own = np.zeros_like(neighbours)
    own[:, 16:18] = light.loudness_window(np.ones(1, np.float32))[:, 16:18]
    both = sess.run(None, {"input": visual[:2], "audio": np.concatenate([neighbours, own])})[0]
    assert light.mouth_open_pixels(to_uint8(both[0])) < 20
    assert light.mouth_open_pixels(to_uint8(both[1])) > 2500


def test_light_mouth_survives_paste_back_and_jpeg(built):
    """Composite the output into the 1280x720 frame, JPEG it, crop again: still measurable."""
    sess = session(built["light"])
    frames, rects = render_person(4, 1)
    frame, rect = frames[0], rects[0]
    x1, y1, x2, y2 = rect
    crop328 = cv2.resize(frame[y1:y2, x1:x2], (328, 328), interpolation=cv2.INTER_CUBIC)
    counts = []
    for level in (0.0, 1.0):
        out = sess.run(None, {"input": visual_input([crop328[4:324, 4:324]]),
                              "audio": light.loudness_window(level, 1)})[0][0]
        patch = crop328.copy()
        patch[4:324, 4:324] = to_uint8(out)
        composed = frame.copy()
        composed[y1:y2, x1:x2] = cv2.resize(patch, (x2 - x1, y2 - y1), interpolation=cv2.INTER_CUBIC)
        decoded = cv2.imdecode(cv2.imencode(".jpg", composed, [cv2.IMWRITE_JPEG_QUALITY, 85])[1], cv2.IMREAD_COLOR)
        counts.append(light.mouth_open_pixels(face_crop(decoded, rect)))
    assert counts[0] < 20 and counts[1] > 2000, counts


def test_light_is_cheap_by_construction(built):
    """Cheap by its graph, not by a stopwatch (its frames/s are bench/stream.py's): only
    elementwise ops and reductions, a few dozen of them, so its cost is a handful of passes over
    the crop whatever the machine. A convolution or matrix product here would make the demo
    model that stands in for a fast UNet no longer fast."""
    model = onnx.load(str(built["light"]))
    ops = {n.op_type for n in model.graph.node}
    assert ops <= {"Slice", "ReduceMean", "Sub", "Mul", "Add", "Clip", "Sigmoid"}, ops
    assert len(model.graph.node) <= 30, len(model.graph.node)
    params = count_parameters(model)
    assert params < 1_000_000, params  # the per-pixel maps, no weights to speak of


# --- the SyncTalk_2D-topology UNet ------------------------------------------------------------

def test_unet_signature_and_size(built):
    model = onnx.load(str(built["unet"]))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version == 17
    ops = {n.op_type for n in model.graph.node}
    assert ops <= STANDARD_OPS and {"Conv", "Resize", "Concat", "Sigmoid", "Add"} <= ops
    params = count_parameters(model)
    assert 10_000_000 <= params <= 14_000_000, params
    assert str(params) in model.doc_string
    assert 40e6 < built["unet"].stat().st_size < 60e6
    # depthwise 3x3 convs (inverted residual blocks) and bilinear x2 upsampling
    groups = [a.i for n in model.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"]
    assert sum(g > 1 for g in groups) >= 20
    sess = session(built["unet"])
    ins = {i.name: i.shape for i in sess.get_inputs()}
    assert ins["input"][1:] == [6, 320, 320] and ins["audio"][1:] == [32, 16, 16]
    assert sess.get_outputs()[0].name == "output" and sess.get_outputs()[0].shape[1:] == [3, 320, 320]


def test_unet_output_is_live(built, demo_crops):
    sess = session(built["unet"])
    visual = visual_input(demo_crops[:2])
    audio = light.loudness_window(np.array([0.2, 0.9], np.float32))
    out = sess.run(None, {"input": visual, "audio": audio})[0]
    assert out.shape == (2, 3, 320, 320) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    assert out.std() > 0.05, "activations vanished: output is ~constant"
    assert np.mean((out < 0.01) | (out > 0.99)) < 0.2, "output saturated"
    assert abs(float(out.mean()) - 0.5) < 0.25
    assert np.abs(out[0] - out[1]).mean() > 0.01, "different inputs, different outputs"
    noise = np.random.RandomState(3).randn(2, 32, 16, 16).astype(np.float32)
    other = sess.run(None, {"input": visual, "audio": noise})[0]
    assert np.abs(other - out).mean() > 1e-3, "the audio branch must reach the output"


def test_unet_build_is_deterministic(built, tmp_path):
    again = build_synctalk_unet(tmp_path / "again.onnx", seed=0)
    assert again.read_bytes() == built["unet"].read_bytes()


# --- packages --------------------------------------------------------------------------------

def test_model_ids():
    ids = [model_id(i) for i in range(40)]
    assert ids[:3] == ["demo_ada", "demo_ben", "demo_cleo"]
    assert len(set(ids)) == 40 and all(MODEL_ID_RE.match(i) for i in ids)
    assert model_id(39) == "demo_40"


def test_build_demo_models_writes_packages(tmp_path):
    out = tmp_path / "models"
    paths = build_demo_models(out, count=2, frames=8, progress=False)
    assert [p.name for p in paths] == ["demo_ada", "demo_ben"]
    assert (out / "audio_encoder.onnx").is_file()
    rects_seen = []
    for pkg in paths:
        text = (pkg / "model.yaml").read_text()
        manifest = yaml.safe_load(text)
        assert list(manifest) == MANIFEST_KEYS
        assert manifest["id"] == pkg.name and MODEL_ID_RE.match(manifest["id"])
        assert manifest["onnx"] == "model.onnx" and manifest["frames"] == "frames"
        assert manifest["crop_rects"] == "crop_rects.json"
        assert manifest["fps"] == 25 and manifest["frame_count"] == 8
        assert manifest["frame_size"] == [1280, 720] and manifest["kind"] == "light"
        assert manifest["preload"] is False
        frame_paths = sorted((pkg / "frames").glob("*.jpg"))
        assert [p.name for p in frame_paths] == [f"frame_{i:04d}.jpg" for i in range(8)]
        onnx_path, rects_path = pkg / "model.onnx", pkg / "crop_rects.json"
        assert manifest["version"] == compute_version(onnx_path, rects_path, frame_paths)
        expected_mb = math.ceil((onnx_path.stat().st_size + 8 * 1280 * 720 * 3) / 2**20)
        assert manifest["memory_estimate_mb"] == expected_mb
        rects = json.loads(rects_path.read_text())
        assert isinstance(rects, list) and len(rects) == 8
        assert len({tuple(r) for r in rects}) > 1, "the rect follows the head motion"
        for i, (path, rect) in enumerate(zip(frame_paths, rects)):
            frame = cv2.imread(str(path))
            assert frame.shape == (720, 1280, 3)
            x1, y1, x2, y2 = rect
            assert 0 <= x1 < x2 <= 1280 and 0 <= y1 < y2 <= 720 and x2 - x1 == y2 - y1
            if pkg.name == "demo_ada" and i in (0, 7):
                renderer = PersonRenderer(0)
                cx, cy = lip_centroid(frame, renderer, rect, tol=12)
                assert abs(cx - (x1 + 0.5 * (x2 - x1))) < 4 and abs(cy - (y1 + 0.6 * (y2 - y1))) < 9
        rects_seen.append(rects)
        # the package's model runs and opens the mouth on its own frames
        sess = session(onnx_path)
        crop = face_crop(cv2.imread(str(frame_paths[3])), rects[3])
        out_img = sess.run(None, {"input": visual_input([crop]), "audio": light.loudness_window(1.0, 1)})[0][0]
        assert light.mouth_open_pixels(to_uint8(out_img)) > 2000
    assert rects_seen[0] != rects_seen[1], "two people, two faces"
    a, b = paths[0] / "model.onnx", paths[1] / "model.onnx"
    assert a.samefile(b) or a.read_bytes() == b.read_bytes()

    cfg = load_config(out / "cluster.yaml")
    assert Path(cfg.models_dir) == out.resolve()
    assert Path(cfg.audio_encoder) == (out / "audio_encoder.onnx").resolve()
    assert (cfg.capacity.max_models, cfg.capacity.max_memory_gb, cfg.capacity.eviction_policy,
            cfg.capacity.idle_unload_minutes) == (3, 4.0, "lfu", 30.0)
    assert cfg.onnx.cuda_enabled is True and cfg.onnx.intra_op_threads == 1
    assert (cfg.cluster.gpus, cfg.cluster.per_gpu) == (0, 2)
    assert cfg.logging.level == "info" and cfg.logging.log_model_operations is True
    assert cfg.logging.stats_report_minutes == 1.0
    assert "#" in (out / "cluster.yaml").read_text()
    assert not (out / ".demo_build").exists()


def test_build_skips_current_packages_and_force_rebuilds(tmp_path):
    out = tmp_path / "m"
    first = build_demo_models_report(out, count=1, frames=3, progress=False)
    assert first.built == ["demo_ada"] and first.skipped == []
    stamp = (out / "demo_ada" / "model.yaml").stat().st_mtime_ns
    again = build_demo_models_report(out, count=2, frames=3, progress=False)
    assert again.skipped == ["demo_ada"] and again.built == ["demo_ben"]
    assert (out / "demo_ada" / "model.yaml").stat().st_mtime_ns == stamp
    other = build_demo_models_report(out, count=1, frames=4, progress=False)  # different parameters
    assert other.built == ["demo_ada"]
    assert yaml.safe_load((out / "demo_ada" / "model.yaml").read_text())["frame_count"] == 4
    forced = build_demo_models_report(out, count=1, frames=4, force=True, progress=False)
    assert forced.built == ["demo_ada"]
    # a damaged package is rebuilt
    (out / "demo_ada" / "frames" / "frame_0001.jpg").write_bytes(b"not a jpeg")
    assert build_demo_models_report(out, count=1, frames=4, progress=False).built == ["demo_ada"]


def test_build_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        build_demo_models(tmp_path, kind="huge", progress=False)
    with pytest.raises(ValueError):
        build_demo_models(tmp_path, count=0, progress=False)


# --- the command ----------------------------------------------------------------------------

def test_cli_help_and_bad_size(tmp_path):
    runner = CliRunner()
    result = runner.invoke(demo_models, ["--help"])
    assert result.exit_code == 0
    assert "Examples" in result.output and "lipsync-cluster demo-models" in result.output
    for bad in ("1280", "1280x", "axb", "1280*720"):
        result = runner.invoke(demo_models, [str(tmp_path / "x"), "--size", bad])
        assert result.exit_code == 2
        assert "--size must look like 1280x720" in result.output
    result = runner.invoke(demo_models, [str(tmp_path / "x"), "--kind", "giant"])
    assert result.exit_code == 2


def test_cli_writes_models_and_says_what_next(tmp_path):
    from lipsync_cluster.cli import main

    out = tmp_path / "cli_models"
    result = CliRunner().invoke(main, ["demo-models", str(out), "--count", "1", "--frames", "2", "--size", "640x360",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    assert "demo_ada" in result.output
    assert f"lipsync-cluster start --config {out / 'cluster.yaml'} --gpus 0 --per-gpu 2" in result.output
    manifest = yaml.safe_load((out / "demo_ada" / "model.yaml").read_text())
    assert manifest["frame_size"] == [640, 360] and manifest["frame_count"] == 2
    assert cv2.imread(str(out / "demo_ada" / "frames" / "frame_0001.jpg")).shape == (360, 640, 3)
