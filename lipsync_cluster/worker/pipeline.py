"""One infer request to its reply: audio -> features -> visual inputs -> UNet -> composite -> encode.

Each stage is its own function with its own timing. Composite and encode run per frame on a
small thread pool: OpenCV's resize and encoders release the GIL, so they use the cores that the
UNet leaves idle and, with two requests in flight per worker, overlap the next batch's inference.
The host work around the UNet is kept small because on a GPU it is what caps the frames per second
(`bench/pipeline.py --stages` measures it by stage): OpenCV runs single-threaded under the pool,
encoded frames are composited in per-thread buffers, and a jpeg frame encodes only the rows of
16-pixel blocks its face touches (``_jpeg_frame``).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import numpy as np

from ..common import audio, imageops
from ..common.errors import BadRequest
from ..common.infer_request import InferRequest
from .cache import LoadedModel
from .memory import WorkerMemory
from .idle import BytesLRU, IdleCache, is_silent

DEFAULT_JPEG_QUALITY = 85
# The JPEG rows around each background's face strip (imageops.jpeg_outside_rows): ~25-60 KB per
# background frame and quality, so this holds the frames of a few models at 1280x720.
JPEG_ROWS_MAX_BYTES = 64 << 20


class AudioEncoder:
    """The shared audio encoder (mel [K,1,80,16] -> [K,512]), opened on first use."""

    def __init__(self, open_session: Callable[[], Any]) -> None:
        self._open = open_session
        self._session = None
        self._lock = threading.Lock()

    def __call__(self, mel_windows: np.ndarray) -> np.ndarray:
        if self._session is None:
            with self._lock:
                if self._session is None:
                    self._session = self._open()
        name = self._session.get_inputs()[0].name
        return self._session.run(None, {name: np.ascontiguousarray(mel_windows, dtype=np.float32)})[0]


class Pipeline:
    def __init__(self, encoder: Optional[AudioEncoder], threads: int = 2,
                 idle_cache: Optional[IdleCache] = None, memory: Optional[WorkerMemory] = None) -> None:
        self.encoder = encoder
        # silent PCM batches: the UNet output per background frame is cached (worker/idle.py)
        self.idle = idle_cache if idle_cache is not None else IdleCache()
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="composite")
        # The pool is the parallelism of crops, paste back and encoding; OpenCV's own threads on
        # top of it only busy-wait on cores the UNet needs.
        imageops.single_threaded_opencv()
        # One UNet run at a time per worker: it already uses every core (or the whole GPU) it was
        # given. Two requests in flight then pipeline: one's UNet runs while the other's
        # features, crops, paste-back and encoding use what the UNet leaves idle, instead of
        # two UNets fighting over the same cores. The runs share the worker's one activation
        # workspace (``memory``: its lock, and the chunk sizes that keep it in the budget).
        self.memory = memory
        self._unet_lock = memory.workspace.lock if memory is not None else threading.Lock()
        # jpeg frames: the encoded rows above and below the face, per background (see _jpeg_frame)
        self.jpeg_rows = BytesLRU(JPEG_ROWS_MAX_BYTES)
        if memory is not None:  # the caches count in the budget, and go before a model does
            memory.add_cache(self.idle)
            memory.add_cache(self.jpeg_rows)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self.memory is not None:
            self.memory.remove_cache(self.idle)
            self.memory.remove_cache(self.jpeg_rows)

    # --- stages ----------------------------------------------------------------------------

    def features(self, req: InferRequest) -> np.ndarray:
        if req.audio_features is not None:
            feats = req.audio_features
            if feats.ndim == 3:  # one window for the whole batch, as the earlier server's clients send
                feats = np.broadcast_to(feats, (req.batch_size, *feats.shape))
            return np.ascontiguousarray(feats, dtype=np.float32)
        if self.encoder is None:
            raise BadRequest("tensor 'audio_pcm' needs an audio encoder, and this cluster has none configured "
                             "(set 'audio_encoder' in the config); send 'audio_features' instead")
        pcm = audio.to_float_pcm(req.audio_pcm)
        return audio.features_from_pcm(pcm, self.encoder, req.audio_frame_offset, req.frame_indices)

    @staticmethod
    def background_indices(model: LoadedModel, req: InferRequest) -> np.ndarray:
        return imageops.pingpong_indices(req.start_frame_idx, req.batch_size, len(model.frames))

    @staticmethod
    def inputs(model: LoadedModel, bg: np.ndarray, visual_frames: Optional[np.ndarray]) -> tuple[np.ndarray, list]:
        rects = model.package.crop_rects
        frames = [model.frames[int(i)] for i in bg]
        batch, crops = imageops.build_visual_batch(frames, [rects[int(i)] for i in bg])
        if visual_frames is not None:
            batch = visual_frames  # the caller's own network input; crops still drive paste-back
        return batch, crops

    def unet(self, model: LoadedModel, visual: np.ndarray, feats: np.ndarray) -> tuple[np.ndarray, float, float]:
        """The UNet's output, the ms it ran, and the ms it waited for the other request's run.

        A batch whose workspace would not fit the worker's budget runs in equal chunks, one after
        the other (the same frames, in order); raises CapacityFull when one frame cannot fit."""
        asked = time.perf_counter()
        with self._unet_lock:
            started = time.perf_counter()
            batch = len(visual)
            if self.memory is None:
                out = self._run_unet(model, visual, feats)
            else:
                key = (model.model_id, model.version)
                chunk = self.memory.chunk_for(model.model_id, key, batch)
                parts = [self.memory.measure_run(key, min(chunk, batch - i),
                                                 lambda i=i: self._run_unet(model, visual[i:i + chunk], feats[i:i + chunk]))
                         for i in range(0, batch, chunk)]
                out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return out, (time.perf_counter() - started) * 1000, (started - asked) * 1000

    @staticmethod
    def _run_unet(model: LoadedModel, visual: np.ndarray, feats: np.ndarray) -> np.ndarray:
        if model.runner is not None:  # IO binding / CUDA graphs where the engine has them (worker/binding.py)
            return model.runner.run(visual, feats)
        return model.session.run(None, {model.visual_input: visual, model.audio_input: feats})[0]

    def composite_and_encode(self, model: LoadedModel, req: InferRequest, bg: np.ndarray, crops: list,
                             out: np.ndarray) -> tuple[list, list, float, float]:
        rects = model.package.crop_rects
        quality = req.quality
        if quality is None and req.format in ("jpeg", "patch"):
            quality = DEFAULT_JPEG_QUALITY

        def one(i: int) -> tuple[Any, float, float]:
            b = int(bg[i])
            if req.format == "jpeg":
                return self._jpeg_frame(model, b, crops[i], out[i], quality)
            t0 = time.perf_counter()
            if req.format == "patch":
                image = imageops.paste_patch(rects[b], crops[i], out[i])
            else:
                background = model.frames[b]
                # A frame that is encoded here is composited in this thread's reused buffer; a raw
                # frame is the reply itself, so it gets memory of its own (one full-frame copy).
                dst = None if req.format == "raw" else imageops.frame_scratch(background.shape)
                image = imageops.paste_back(background, rects[b], crops[i], out[i], dst=dst)
            t1 = time.perf_counter()
            if req.format == "raw":
                data: Any = image
            else:
                data = imageops.encode_image(image, "png" if req.format == "png" else "jpeg", quality)
            t2 = time.perf_counter()
            return data, (t1 - t0) * 1000, (t2 - t1) * 1000

        results = list(self._pool.map(one, range(req.batch_size)))
        composite_ms = sum(r[1] for r in results)
        encode_ms = sum(r[2] for r in results)
        images, payloads = [], []
        for i, (data, _, _) in enumerate(results):
            b = int(bg[i])
            info = {"frame": i, "index": req.start_frame_idx + i, "background_index": b,
                    "rect": [int(v) for v in rects[b]]}
            if isinstance(data, np.ndarray):
                info["shape"] = list(data.shape)
                payloads.append(memoryview(np.ascontiguousarray(data)).cast("B"))
            else:
                payloads.append(data)
            images.append(info)
        return images, payloads, composite_ms, encode_ms

    def _jpeg_frame(self, model: LoadedModel, b: int, crop: np.ndarray, out: np.ndarray,
                    quality: Optional[int]) -> tuple[bytes, float, float]:
        """One composited frame as JPEG, and the ms of paste and of encoding.

        The first frame of a background is composited and encoded whole; the rows above and below
        its face strip are kept (``jpeg_rows``). Every later frame of that background composites
        and encodes only the strip and joins it to them: the same bytes as encoding it whole."""
        background, rect = model.frames[b], model.package.crop_rects[b]
        rows = imageops.mcu_rows(rect, background.shape[0])
        key = (model.model_id, model.version, b, quality)
        outside = self.jpeg_rows.get(key)
        t0 = time.perf_counter()
        if outside is not None:
            strip = imageops.paste_strip(background, rect, crop, out, rows)
            t1 = time.perf_counter()
            data = imageops.jpeg_join_rows(outside, rows, imageops.encode_jpeg_rows(strip, quality))
            if data is not None:
                self.jpeg_rows.hits += 1  # a statistic: a lost update between threads only blurs it
                return data, (t1 - t0) * 1000, (time.perf_counter() - t1) * 1000
            t0 = time.perf_counter()  # not laid out by rows after all: the whole frame, below
        frame = imageops.paste_back(background, rect, crop, out, dst=imageops.frame_scratch(background.shape))
        t1 = time.perf_counter()
        data = imageops.encode_jpeg_rows(frame, quality)
        self.jpeg_rows.misses += 1
        if outside is None:
            parts = imageops.jpeg_outside_rows(data, rows, background.shape[0])
            if parts is not None:
                self.jpeg_rows.put(key, parts, len(parts[0]) + len(parts[1]))
        return data, (t1 - t0) * 1000, (time.perf_counter() - t1) * 1000

    def _reply(self, model: LoadedModel, req: InferRequest, bg: np.ndarray, frames: list, idle_frames: int,
               started: float, timings: dict) -> tuple[dict, list]:
        """A reply of already finished frames (the idle cache's), in the shape :meth:`run` gives."""
        rects = model.package.crop_rects
        images = [{"frame": i, "index": req.start_frame_idx + i, "background_index": int(b),
                   "rect": [int(v) for v in rects[int(b)]]} for i, b in enumerate(bg)]
        worker_ms = round((time.perf_counter() - started) * 1000, 3)
        zero = {k: 0.0 for k in ("features_ms", "inputs_ms", "inference_ms", "unet_wait_ms", "composite_ms",
                                 "encode_ms", "postprocess_wall_ms")}
        return {"model_id": model.model_id, "model_version": model.version, "format": req.format,
                "images": images, "idle_frames": idle_frames,
                "timings": {**zero, **timings, "worker_ms": worker_ms}}, list(frames)

    def _idle_applies(self, req: InferRequest) -> bool:
        """Silent PCM that covers the batch, the worker's own visual inputs, an encoder to fill the
        cache with: anything else takes the full path (which also reports what is wrong)."""
        if req.visual_frames is not None or req.audio_pcm is None or self.encoder is None:
            return False
        covered = audio.frames_covered(req.audio_pcm.shape[0])
        if not (req.audio_frame_offset <= req.start_frame_idx
                and req.start_frame_idx + req.batch_size <= req.audio_frame_offset + covered):
            return False
        return is_silent(req.audio_pcm)

    def _idle_outputs(self, model: LoadedModel, req: InferRequest,
                      bg: np.ndarray) -> tuple[np.ndarray, list, int, float, float]:
        """UNet outputs of a silent batch from the idle cache; the frames it lacks run the UNet."""
        rects = model.package.crop_rects
        crops = [imageops.crop_face(model.frames[int(i)], rects[int(i)]) for i in bg]
        ran = {"ms": 0.0, "wait": 0.0}

        def compute(positions: list[int]) -> np.ndarray:
            feats = self.features(req)[positions]
            visual = np.empty((len(positions), 6, imageops.NET_SIZE, imageops.NET_SIZE), np.float32)
            for j, i in enumerate(positions):
                imageops.visual_input(crops[i], out=visual[j])
            out, ran["ms"], ran["wait"] = self.unet(model, visual, np.ascontiguousarray(feats))
            return out

        out, hits = self.idle.outputs((model.model_id, model.version), bg, compute)
        return out, crops, hits, ran["ms"], ran["wait"]

    # --- the whole request -------------------------------------------------------------------

    def run(self, model: LoadedModel, req: InferRequest) -> tuple[dict, list]:
        """Run ``req`` on ``model``. Returns (reply fields, payload frames)."""
        started = time.perf_counter()
        req.check_values()
        t0 = time.perf_counter()
        idle_frames = 0
        idle = self._idle_applies(req)
        quality = req.quality
        if quality is None and req.format in ("jpeg", "patch"):
            quality = DEFAULT_JPEG_QUALITY
        key = (model.model_id, model.version)
        if idle and req.format != "raw":
            bg = self.background_indices(model, req)
            done = self.idle.encoded(key, bg, req.format, quality)
            if done is not None:  # every frame finished before: a lookup
                return self._reply(model, req, bg, done, len(done), started, {})
        if idle:
            t1 = t0
            bg = self.background_indices(model, req)
            out, crops, idle_frames, inference_ms, unet_wait_ms = self._idle_outputs(model, req, bg)
            t2 = t3 = time.perf_counter()
        else:
            feats = self.features(req)
            t1 = time.perf_counter()
            bg = self.background_indices(model, req)
            visual, crops = self.inputs(model, bg, req.visual_frames)
            t2 = time.perf_counter()
            out, inference_ms, unet_wait_ms = self.unet(model, visual, feats)
            t3 = time.perf_counter()
        images, payloads, composite_ms, encode_ms = self.composite_and_encode(model, req, bg, crops, out)
        if idle and req.format != "raw":
            self.idle.keep_encoded(key, bg, req.format, quality, payloads)
        t4 = time.perf_counter()
        # A float add under the GIL; a lost update between two threads only blurs a statistic.
        model.total_inference_ms += inference_ms
        reply = {
            "model_id": model.model_id,
            "model_version": model.version,
            "format": req.format,
            "images": images,
            "idle_frames": idle_frames,
            "timings": {
                "features_ms": round((t1 - t0) * 1000, 3),
                "inputs_ms": round((t2 - t1) * 1000, 3),
                "inference_ms": round(inference_ms, 3),
                "unet_wait_ms": round(unet_wait_ms, 3),
                "composite_ms": round(composite_ms, 3),
                "encode_ms": round(encode_ms, 3),
                "postprocess_wall_ms": round((t4 - t3) * 1000, 3),
                "worker_ms": round((t4 - started) * 1000, 3),
            },
        }
        return reply, payloads

