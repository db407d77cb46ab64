"""fp16 models (onnx.precision: fp16): the UNet and the audio encoder converted at load, held to a
stated error bound against fp32 on the mouth region, and served by a worker end to end.

ONNX Runtime's CPU provider runs the converted graphs (casting nodes without an fp16 kernel back to
float32), so the bound is checked here on the CPU; bench/gpu.py measures it again where fp16
arithmetic really runs in fp16."""
from __future__ import annotations

import uuid

import numpy as np
import onnxruntime as ort
import pytest

from lipsync_cluster.common import imageops
from lipsync_cluster.common.protocol import attach_arrays
from lipsync_cluster.config import ConfigError, load_config
from lipsync_cluster.worker.precision import FP16_BOUND, PrecisionError, mouth_error, to_fp16, within_bound
from lipsync_cluster.worker.service import WorkerService


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    from lipsync_cluster.demo.build import build_demo_models

    out = tmp_path_factory.mktemp("unet_demo")
    build_demo_models(out, count=1, kind="unet", frames=4, size=(640, 360), seed=3, progress=False)
    return out


def _session(model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def test_fp16_unet_is_within_the_stated_bound_of_fp32(unet_dir):
    """The real SyncTalk_2D topology (`unet` demo) on real face crops of its own frames."""
    import cv2

    from lipsync_cluster.common.model_package import bind_unet_io, load_package

    pkg = load_package(next(p for p in unet_dir.iterdir() if (p / "model.yaml").exists()))
    path = pkg.onnx_path
    data = to_fp16(path)
    fp32, fp16 = _session(str(path)), _session(data)
    # the converted graph keeps float32 inputs and outputs: the pipeline binds and feeds it unchanged
    assert bind_unet_io(fp16.get_inputs()) == bind_unet_io(fp32.get_inputs())
    assert [o.type for o in fp16.get_outputs()] == ["tensor(float)"]
    assert len(data) < 0.6 * path.stat().st_size  # float16 weights: about half the file
    frames = [cv2.imread(str(p)) for p in pkg.frame_paths[:2]]
    visual, _ = imageops.build_visual_batch(frames, pkg.crop_rects[:2])
    audio = np.random.default_rng(0).standard_normal((2, 32, 16, 16)).astype(np.float32)
    feeds = {fp32.get_inputs()[0].name: visual, fp32.get_inputs()[1].name: audio}
    ref, got = fp32.run(None, feeds)[0], fp16.run(None, feeds)[0]
    error = mouth_error(ref, got)
    assert error["max_abs"] > 0, "the fp16 model computed exactly what fp32 did: was it converted?"
    assert within_bound(error), (error, FP16_BOUND)


def test_fp16_audio_encoder_tracks_fp32(demo_dir):
    from lipsync_cluster.demo.audio_encoder import reference_audio_encoder

    path = demo_dir / "audio_encoder.onnx"
    fp16 = _session(to_fp16(path))
    mel = np.random.default_rng(2).uniform(-4, 4, (7, 1, 80, 16)).astype(np.float32)
    got = fp16.run(None, {fp16.get_inputs()[0].name: mel})[0]
    assert got.dtype == np.float32 and got.shape == (7, 512)
    np.testing.assert_allclose(got, reference_audio_encoder(mel), rtol=5e-3, atol=5e-3)


def test_mouth_error_measures_what_it_says():
    a = np.random.default_rng(0).uniform(0, 1, (1, 3, 320, 320)).astype(np.float32)
    assert mouth_error(a, a)["psnr_db"] == float("inf") and mouth_error(a, a)["max_abs_8bit"] == 0
    b = a.copy()
    b[..., 0:5, :] = 1 - b[..., 0:5, :]  # outside the redrawn rectangle: not counted
    assert mouth_error(a, b)["max_abs"] == 0
    b[..., 100, 100] = np.clip(b[..., 100, 100] + 0.5, 0, 1)
    worse = mouth_error(a, b)
    assert worse["max_abs_8bit"] > 50 and not within_bound(worse)
    with pytest.raises(ValueError, match="differ in shape"):
        mouth_error(a, a[:, :2])


def test_a_model_fp16_cannot_convert_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(PrecisionError, match="fp16 conversion of model.onnx failed"):
        to_fp16(bad)


def test_precision_is_checked_in_the_config():
    assert load_config({}).onnx.precision == "fp32"
    assert load_config({"onnx": {"precision": "FP16"}}).onnx.precision == "fp16"
    with pytest.raises(ConfigError, match=r"onnx.precision: 'fp8' is not one of fp32, fp16"):
        load_config({"onnx": {"precision": "fp8"}})


def _service(demo_dir, precision: str) -> WorkerService:
    cfg = load_config({"models_dir": str(demo_dir), "audio_encoder": str(demo_dir / "audio_encoder.onnx"),
                       "onnx": {"intra_op_threads": 1, "precision": precision}})
    return WorkerService(cfg, shm_namespace=f"test-{uuid.uuid4().hex[:8]}")


def test_a_worker_serves_fp16_models_close_to_fp32(demo_dir):
    """PCM in (the fp16 audio encoder), raw frames out: the same pixels outside the face, the
    redrawn mouth within the bound, and the worker says which precision it runs."""
    pcm = (0.3 * np.sin(np.arange(16000) * 2 * np.pi * 220 / 16000)).astype(np.float32)
    images = {}
    for precision in ("fp32", "fp16"):
        service = _service(demo_dir, precision)
        try:
            mid = sorted(service.catalog.packages())[0]
            header = {"client_op": "infer", "model_id": mid, "batch_size": 2, "start_frame_idx": 3,
                      "format": "raw", "audio_frame_offset": 0}
            reply, frames = service.handle(header, attach_arrays(header, {"audio_pcm": pcm}))
            stats = service.stats()
            assert stats["precision"] == precision and stats["engine"] == "cpu", stats
            images[precision] = [np.frombuffer(f, np.uint8).reshape(i["shape"]).copy()
                                 for f, i in zip(frames, reply["images"])]
            rects = [i["rect"] for i in reply["images"]]
        finally:
            service.close()
            service.cache.frame_store.cleanup()
    for (x1, y1, x2, y2), a, b in zip(rects, images["fp32"], images["fp16"]):
        outside = np.ones(a.shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        assert np.array_equal(a[outside], b[outside])
        diff = np.abs(a[~outside].astype(int) - b[~outside])
        mse = float(np.mean(diff.astype(float) ** 2))
        psnr = float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)
        assert diff.max() <= FP16_BOUND["max_abs_8bit"] + 2 and psnr >= FP16_BOUND["psnr_db"], (diff.max(), psnr)
