"""The worker's pipeline end to end, in process: a request header + payloads in, frames out.

Uses the real demo `light` model (its mouth opens with audio energy) and real ONNX Runtime.
"""
from __future__ import annotations

import uuid

import cv2
import numpy as np
import pytest

from lipsync_cluster.common import imageops
from lipsync_cluster.common.errors import BadRequest, UnknownModel
from lipsync_cluster.common.protocol import attach_arrays
from lipsync_cluster.config import load_config
from lipsync_cluster.demo.light import mouth_open_pixels
from lipsync_cluster.worker.service import WorkerService


@pytest.fixture
def service(demo_dir):
    cfg = load_config({"models_dir": str(demo_dir), "audio_encoder": str(demo_dir / "audio_encoder.onnx"),
                       "onnx": {"intra_op_threads": 1}})
    svc = WorkerService(cfg, shm_namespace=f"test-{uuid.uuid4().hex[:8]}")
    yield svc
    svc.close()
    svc.cache.frame_store.cleanup()


def model_ids(service):
    return sorted(service.catalog.packages())


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """A speech-like signal: voiced bursts (harmonics + noise) at syllable rate."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    voiced = sum(np.sin(2 * np.pi * f * t) / (k + 1) for k, f in enumerate((140, 280, 420, 700, 1100)))
    envelope = (np.sin(2 * np.pi * 4 * t) > -0.2).astype(np.float32)
    return (0.3 * envelope * (voiced / 3 + 0.2 * rng.standard_normal(t.size))).astype(np.float32)


def infer(service, model_id, *, batch=3, start=0, fmt="png", quality=None, offset=None, **arrays):
    header = {"client_op": "infer", "model_id": model_id, "batch_size": batch, "start_frame_idx": start, "format": fmt}
    if offset is not None:
        header["audio_frame_offset"] = offset
    if quality is not None:
        header["quality"] = quality
    payloads = attach_arrays(header, arrays)
    return service.handle(header, payloads)


def test_png_is_full_frame_and_differs_only_inside_the_face_rect(service):
    mid = model_ids(service)[0]
    feats = np.full((3, 32, 16, 16), 0.9, np.float32)  # loud: the mouth opens
    reply, frames = infer(service, mid, batch=3, start=4, audio_features=feats)
    model = service.cache.get(mid)
    assert reply["model_loaded"] is True and reply["model_version"] == model.version
    assert [i["index"] for i in reply["images"]] == [4, 5, 6]
    for info, data in zip(reply["images"], frames):
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (720, 1280, 3)
        background = np.asarray(model.frames[info["background_index"]])
        x1, y1, x2, y2 = info["rect"]
        outside = np.ones(image.shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        assert np.array_equal(image[outside], background[outside]), "pixels outside the rect must be untouched"
        assert np.abs(image[~outside].astype(int) - background[~outside]).mean() > 1, "the mouth was redrawn"
    timings = reply["timings"]
    assert all(timings[k] >= 0 for k in ("features_ms", "inputs_ms", "inference_ms", "composite_ms", "encode_ms"))


def test_raw_format_equals_an_independent_paste_back(service):
    mid = model_ids(service)[1]
    feats = np.random.default_rng(1).uniform(0, 1, (2, 32, 16, 16)).astype(np.float32)
    reply, frames = infer(service, mid, batch=2, start=0, fmt="raw", audio_features=feats)
    model = service.cache.get(mid)
    for i, (info, data) in enumerate(zip(reply["images"], frames)):
        got = np.frombuffer(data, np.uint8).reshape(info["shape"])
        bg = np.asarray(model.frames[info["background_index"]])
        rect = model.package.crop_rects[info["background_index"]]
        crop = imageops.crop_face(bg, rect)
        out = model.session.run(None, {model.visual_input: imageops.visual_input(crop)[None],
                                       model.audio_input: feats[i:i + 1]})[0][0]
        assert np.array_equal(got, imageops.paste_back(bg, rect, crop, out))


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_encoded_frames_equal_an_independent_paste_back_and_encode(service, fmt):
    """jpeg/png frames are composited in the composite threads' reused buffers, and a jpeg frame
    of a background seen before is its face strip joined to that background's cached rows: every
    frame of successive batches is byte-identical to encoding an independent paste back whole."""
    mid = model_ids(service)[1]
    model = None
    encode = (lambda im: imageops.encode_jpeg_rows(im)) if fmt == "jpeg" else (lambda im: imageops.encode_image(im, fmt))
    starts = (0, 5, 0, 5) if fmt == "jpeg" else (0, 5)  # the second pass meets backgrounds seen before
    for start in starts:
        feats = np.random.default_rng(start).uniform(0, 1, (5, 32, 16, 16)).astype(np.float32)
        reply, frames = infer(service, mid, batch=5, start=start, fmt=fmt, audio_features=feats)
        model = model or service.cache.get(mid)
        for i, (info, data) in enumerate(zip(reply["images"], frames)):
            bg = np.asarray(model.frames[info["background_index"]])
            rect = model.package.crop_rects[info["background_index"]]
            crop = imageops.crop_face(bg, rect)
            out = model.session.run(None, {model.visual_input: imageops.visual_input(crop)[None],
                                           model.audio_input: feats[i:i + 1]})[0][0]
            assert bytes(data) == encode(imageops.paste_back(bg, rect, crop, out))
    if fmt == "jpeg":
        assert service.pipeline.jpeg_rows.hits >= 10 and len(service.pipeline.jpeg_rows) >= 5


def test_patch_format_is_the_rect_only(service):
    mid = model_ids(service)[0]
    reply, frames = infer(service, mid, batch=1, fmt="patch", audio_features=np.zeros((32, 16, 16), np.float32))
    x1, y1, x2, y2 = reply["images"][0]["rect"]
    patch = cv2.imdecode(np.frombuffer(frames[0], np.uint8), cv2.IMREAD_COLOR)
    assert patch.shape == (y2 - y1, x2 - x1, 3)


def test_pingpong_background_indices(service):
    mid = model_ids(service)[0]
    n = service.catalog.resolve(mid).num_frames
    reply, _ = infer(service, mid, batch=5, start=n - 2, fmt="jpeg", audio_features=np.zeros((32, 16, 16), np.float32))
    assert [i["background_index"] for i in reply["images"]] == [n - 2, n - 1, n - 2, n - 3, n - 4]


def test_pcm_each_frame_gets_its_own_window_and_mouth_follows_audio(service):
    mid = model_ids(service)[0]
    # 1 s of silence then 1 s of speech: frames 0..24 silent, 25..49 speech
    pcm = np.concatenate([np.zeros(16000, np.float32), speech(1.0)])
    quiet, q_frames = infer(service, mid, batch=5, start=5, fmt="raw", audio_pcm=pcm, offset=0)
    # frames 26..28 fall in the first voiced burst (the envelope is on for t in [0, 0.14) s)
    loud, l_frames = infer(service, mid, batch=3, start=26, fmt="raw", audio_pcm=pcm, offset=0)

    def opening(reply, frames):
        out = []
        for info, data in zip(reply["images"], frames):
            image = np.frombuffer(data, np.uint8).reshape(info["shape"])
            crop = imageops.crop_face(image, info["rect"])[4:324, 4:324]
            out.append(mouth_open_pixels(crop))
        return out

    assert max(opening(quiet, q_frames)) < 50
    loud_open = opening(loud, l_frames)
    assert min(loud_open) > 200
    assert len(set(loud_open)) > 1, "each frame follows its own audio window"
    # the same PCM sent as if it started at frame 26 puts silence under these frames: shut
    shifted, s_frames = infer(service, mid, batch=3, start=26, fmt="raw", audio_pcm=pcm, offset=26)
    assert max(opening(shifted, s_frames)) < 50


@pytest.mark.parametrize("change, field", [
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 26}, "batch_size"),
    ({"start_frame_idx": -1}, "start_frame_idx"),
    ({"format": "gif"}, "format"),
    ({"model_id": "../etc/passwd"}, "model_id"),
    ({"quality": 101, "format": "jpeg"}, "quality"),
])
def test_bad_fields_name_the_field(service, change, field):
    mid = model_ids(service)[0]
    header = {"client_op": "infer", "model_id": mid, "batch_size": 2, "start_frame_idx": 0, "format": "png"}
    payloads = attach_arrays(header, {"audio_features": np.zeros((2, 32, 16, 16), np.float32)})
    header.update(change)
    with pytest.raises(BadRequest, match=field):
        service.handle(header, payloads)


def test_bad_tensors_are_refused(service):
    mid = model_ids(service)[0]
    bad = np.zeros((2, 32, 16, 16), np.float32)
    bad[1, 3, 4, 5] = np.nan
    with pytest.raises(BadRequest, match="audio_features.*NaN"):
        infer(service, mid, batch=2, audio_features=bad)
    with pytest.raises(BadRequest, match=r"audio_features.*\[2, 32, 16, 16\]"):
        infer(service, mid, batch=2, audio_features=np.zeros((3, 32, 16, 16), np.float32))
    with pytest.raises(BadRequest, match="exactly one audio source"):
        infer(service, mid, batch=2)
    with pytest.raises(BadRequest, match="visual_frames"):
        infer(service, mid, batch=2, audio_features=np.zeros((32, 16, 16), np.float32),
              visual_frames=np.zeros((2, 6, 320, 321), np.float32))
    with pytest.raises(UnknownModel):
        infer(service, "nobody_here", batch=1, audio_features=np.zeros((32, 16, 16), np.float32))
    # and the worker still serves
    reply, frames = infer(service, mid, batch=1, audio_features=np.zeros((32, 16, 16), np.float32))
    assert len(frames) == 1


def test_visual_frames_from_the_request_are_used(service):
    mid = model_ids(service)[0]
    visual = np.zeros((1, 6, 320, 320), np.float32)  # an all-black face
    reply, frames = infer(service, mid, batch=1, fmt="raw", visual_frames=visual,
                          audio_features=np.zeros((32, 16, 16), np.float32))
    image = np.frombuffer(frames[0], np.uint8).reshape(reply["images"][0]["shape"])
    x1, y1, x2, y2 = reply["images"][0]["rect"]
    centre = image[(y1 + y2) // 2 - 10:(y1 + y2) // 2 + 10, (x1 + x2) // 2 - 10:(x1 + x2) // 2 + 10]
    assert centre.mean() < 20, "the light model echoes the given face crop, here black"
