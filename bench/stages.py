"""Host CPU per frame outside the UNet, by stage, for one checkout of lipsync_cluster.

`bench/pipeline.py --stages` runs this once per checkout (``PYTHONPATH=<checkout>``, a child
process each) and prints the checkouts side by side; it can also run alone:

    PYTHONPATH=. python bench/stages.py --json        # this checkout, one JSON line

What it measures: the worker's own request path (``WorkerService.handle``: parse, features,
inputs, UNet, composite, encode, reply), one request at a time, for each format and batch size.
Each request carries what `StreamSession` sends: the PCM span of its batch
(``pcm_span_for_batch``) as float32, ``audio_frame_offset`` = the span's first frame, successive
``start_frame_idx``. ONNX Runtime runs with 1 intra-op thread and no spinning, so the process's
CPU time (``time.process_time``, every thread) is the work itself.

Stages are timed by wrapping the pipeline's own functions (no copy of them here): the audio
encoder callable, ``Pipeline.features`` (minus the encoder: "pcm features"), ``Pipeline.inputs``,
``Pipeline.unet``, and the module functions that paste (``imageops.paste_*``) and encode
(``imageops.encode_*``) on the composite threads (their ``time.thread_time``). "reply" is what is
left of the request: parsing, the composite thread pool's dispatch, the reply's image entries and
payload frames. The UNet runs for real on the first request of each batch size; later requests
reuse its output (the UNet is not what this measures, and it is 95 % of the time), so the
non-UNet stages see real outputs at a fraction of the run time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

STAGES = ("pcm_features", "audio_encoder", "inputs", "composite", "encode", "reply")


class _Meter:
    """CPU and wall seconds per stage, summed over threads (thread-safe)."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, cpu: float, wall: float) -> None:
        with self._lock:
            self.cpu[stage] = self.cpu.get(stage, 0.0) + cpu
            self.wall[stage] = self.wall.get(stage, 0.0) + wall

    def clear(self) -> None:
        self.cpu.clear()
        self.wall.clear()


_depth = threading.local()


def _timed(meter: _Meter, stage: str, fn, clock=time.thread_time):
    """``fn`` with its time added to ``stage``; a call inside another call of the same stage
    (paste_back calling paste_patch) counts once, in the outer one."""
    def wrapper(*args, **kwargs):
        active = _depth.__dict__.setdefault("stages", set())
        if stage in active:
            return fn(*args, **kwargs)
        active.add(stage)
        c0, w0 = clock(), time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            meter.add(stage, clock() - c0, time.perf_counter() - w0)
            active.discard(stage)
    wrapper.__wrapped__ = fn
    return wrapper


def measure(folder: Path, batches: list[int], formats: list[str], frames_per_cell: int) -> dict:
    """Per-frame CPU and wall ms by stage for each (format, batch), in this interpreter's checkout."""
    from lipsync_cluster.common import audio, imageops
    from lipsync_cluster.common.protocol import attach_arrays
    from lipsync_cluster.config import load_config
    from lipsync_cluster.worker.service import WorkerService

    cfg = load_config({"models_dir": str(folder), "audio_encoder": str(folder / "audio_encoder.onnx"),
                       "onnx": {"intra_op_threads": 1}})
    service = WorkerService(cfg, shm_namespace=f"stages-{uuid.uuid4().hex[:6]}")
    model_id = sorted(service.catalog.packages())[0]
    pipe = service.pipeline
    meter = _Meter()
    # Speech-like, never silent (a silent batch takes the idle cache's path): 10 s of noise.
    clip = np.clip(0.3 * np.random.default_rng(1).standard_normal(16000 * 10), -1, 1).astype(np.float32)
    clip_frames = audio.frames_covered(clip.size)

    # The encoder and the stage methods are looked up on the instance by Pipeline.run.
    if pipe.encoder is not None:
        pipe.encoder = _timed(meter, "audio_encoder", pipe.encoder, time.process_time)
    pipe.features = _timed(meter, "features_all", pipe.features, time.process_time)
    pipe.inputs = _timed(meter, "inputs", pipe.inputs, time.process_time)
    unet_real = pipe.unet
    unet_out: dict[int, tuple] = {}

    def unet_once(model, visual, feats):
        batch = len(visual)
        if batch not in unet_out:
            c0, w0 = time.process_time(), time.perf_counter()
            unet_out[batch] = unet_real(model, visual, feats)
            unet_out[f"cpu{batch}"] = (time.process_time() - c0, time.perf_counter() - w0)
        return unet_out[batch]

    pipe.unet = _timed(meter, "unet", unet_once, time.process_time)
    # Paste and encode run on the composite threads: wrap whatever the checkout has of them.
    for name in dir(imageops):
        if name.startswith(("paste_", "encode_", "jpeg_")) and callable(getattr(imageops, name)):
            stage = "composite" if name.startswith("paste_") else "encode"  # jpeg_*: joining rows
            setattr(imageops, name, _timed(meter, stage, getattr(imageops, name)))

    def request(batch: int, start: int, fmt: str) -> None:
        first, end = audio.pcm_span_for_batch(start, batch, clip_frames)
        pcm = clip[first * audio.SAMPLES_PER_FRAME:end * audio.SAMPLES_PER_FRAME]
        header = {"client_op": "infer", "model_id": model_id, "batch_size": batch, "start_frame_idx": start,
                  "format": fmt, "audio_frame_offset": first}
        payloads = attach_arrays(header, {"audio_pcm": pcm})
        c0, w0 = time.process_time(), time.perf_counter()
        reply, frames = service.handle(header, payloads)
        meter.add("request", time.process_time() - c0, time.perf_counter() - w0)
        assert len(frames) == batch and reply["idle_frames"] == 0

    import lipsync_cluster

    results: dict = {"cells": {}, "unet": {}, "checkout": str(Path(lipsync_cluster.__file__).parent.parent)}
    try:
        for batch in batches:
            for fmt in formats:
                request(batch, 0, fmt)  # load, warm, and the UNet's one real run
                # One pass over the model's backgrounds first, as a stream's first 2N-2 frames make:
                # jpeg frames then find each background's rows cached (the steady state; a frame of
                # a background not yet seen costs a whole-frame encode, as every frame did before).
                for k in range(0, len(service.cache.get(model_id).frames), batch):
                    request(batch, k, fmt)
                meter.clear()
                n = max(1, frames_per_cell // batch)
                for k in range(n):
                    start = 20 + (k * batch) % (clip_frames - 60)
                    request(batch, start, fmt)
                frames = n * batch
                cpu = {k: v * 1000 / frames for k, v in meter.cpu.items()}
                wall = {k: v * 1000 / frames for k, v in meter.wall.items()}
                cell = {}
                for kind, d in (("cpu", cpu), ("wall", wall)):
                    enc = d.get("audio_encoder", 0.0)
                    stages = {
                        "pcm_features": d.get("features_all", 0.0) - enc,
                        "audio_encoder": enc,
                        "inputs": d.get("inputs", 0.0),
                        "composite": d.get("composite", 0.0),
                        "encode": d.get("encode", 0.0),
                    }
                    # The rest of the request, outside the UNet (composite/encode sum over threads,
                    # so on wall this can come out below zero when they ran side by side: floor it).
                    rest = d.get("request", 0.0) - d.get("features_all", 0.0) - stages["inputs"] - d.get("unet", 0.0) \
                        - stages["composite"] - stages["encode"]
                    stages["reply"] = max(0.0, rest)
                    stages["total"] = sum(stages[s] for s in STAGES)
                    stages["request"] = d.get("request", 0.0)
                    cell[kind] = stages
                results["cells"][f"{fmt}/{batch}"] = cell
            cpu_s, wall_s = unet_out[f"cpu{batch}"]
            results["unet"][str(batch)] = {"cpu": cpu_s * 1000 / batch, "wall": wall_s * 1000 / batch}
    finally:
        service.close()
        service.cache.frame_store.cleanup()
    return results


def jpeg_encoders(folder: Path, quality: int = 85, repeats: int = 60, rounds: int = 3) -> dict:
    """CPU ms per 1280x720 JPEG of a real composited frame, per encoder in reach (4:2:0, as OpenCV's
    default; the encoders are libjpeg-turbo underneath): OpenCV ``cv2.imencode``, simplejpeg, and
    PyTurboJPEG (needs the system's libturbojpeg). Interleaved rounds, median; each also reports
    its bytes and its largest pixel difference from OpenCV's output after decoding."""
    import cv2

    frame = cv2.imread(str(sorted((folder / "demo_ada" / "frames").iterdir())[0]))
    encoders: dict = {"opencv": lambda im: cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()}
    missing: dict = {}
    try:
        import simplejpeg

        encoders["simplejpeg"] = lambda im: simplejpeg.encode_jpeg(im, quality, colorspace="BGR", colorsubsampling="420")
    except ImportError as exc:
        missing["simplejpeg"] = str(exc)
    try:
        from turbojpeg import TJPF_BGR, TJSAMP_420, TurboJPEG

        tj = TurboJPEG()
        encoders["pyturbojpeg"] = lambda im: tj.encode(im, quality=quality, pixel_format=TJPF_BGR,
                                                      jpeg_subsample=TJSAMP_420)
    except (ImportError, OSError, RuntimeError) as exc:
        missing["pyturbojpeg"] = str(exc).splitlines()[0]
    times: dict[str, list] = {k: [] for k in encoders}
    for _ in range(rounds):
        for name, enc in encoders.items():
            enc(frame)
            c0 = time.thread_time()
            for _ in range(repeats):
                enc(frame)
            times[name].append((time.thread_time() - c0) * 1000 / repeats)
    ref = cv2.imdecode(np.frombuffer(encoders["opencv"](frame), np.uint8), cv2.IMREAD_COLOR).astype(np.int16)
    out = {}
    for name, enc in encoders.items():
        data = enc(frame)
        dec = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).astype(np.int16)
        out[name] = {"cpu_ms": float(np.median(times[name])), "bytes": len(data),
                     "max_diff_vs_opencv": int(np.abs(dec - ref).max())}
    return {"encoders": out, "missing": missing, "shape": list(frame.shape), "quality": quality}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="a demo folder with a unet model (built if absent)")
    ap.add_argument("--batches", default="5,1")
    ap.add_argument("--formats", default="jpeg,raw,patch")
    ap.add_argument("--frames", type=int, default=100, help="frames per (format, batch) cell")
    ap.add_argument("--json", action="store_true", help="print one JSON line (for bench/pipeline.py --stages)")
    ap.add_argument("--jpeg", action="store_true", help="compare the JPEG encoders in reach instead")
    args = ap.parse_args()
    from lipsync_cluster.demo.build import build_demo_models

    folder = Path(args.models) if args.models else Path(os.environ.get("TMPDIR", "/tmp")) / "lipsync-bench-unet"
    build_demo_models(folder, count=1, kind="unet", frames=60, size=(1280, 720), progress=False)
    if args.jpeg:
        res = jpeg_encoders(folder)
        print(json.dumps(res) if args.json else json.dumps(res, indent=1))
        return
    res = measure(folder, [int(b) for b in args.batches.split(",")], args.formats.split(","), args.frames)
    if args.json:
        print(json.dumps(res))
        return
    print(res["checkout"])
    for cell, d in res["cells"].items():
        print(cell, " ".join(f"{k} {v:.2f}" for k, v in d["cpu"].items()))


if __name__ == "__main__":
    sys.exit(main())
