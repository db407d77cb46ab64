"""The real request handler a worker runs: model cache + pipeline behind the worker loop.

``WorkerService`` implements ``worker.loop.RequestHandler``: the loop owns the socket and the
threads; this owns what a request means.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable, Optional

import onnxruntime as ort

from ..common.catalog import Catalog
from ..common.errors import BadRequest
from ..common.frame_store import FrameStore
from ..common.infer_request import parse_infer
from ..common.protocol import require_model_id
from ..config import Config
from .cache import ModelCache
from .gpu_monitor import GpuMonitor
from .pipeline import AudioEncoder, Pipeline
from .engine import EngineState, plan_engine
from .sessions import SessionOptions, make_session, probe_provider

log = logging.getLogger("lipsync_cluster.worker")


def default_threads(workers_on_host: int) -> int:
    """CPU workers share the host's cores: each gets an equal share (at least one)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers_on_host))


class WorkerService:
    def __init__(self, config: Config, *, gpu: Optional[int] = None, device: Optional[str] = None,
                 shm_namespace: str = "default", workers_on_host: int = 1, catalog: Optional[Catalog] = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.gpu = gpu
        self.device = device  # the CUDA_VISIBLE_DEVICES entry this worker is pinned to (a UUID or index)
        threads = config.onnx.intra_op_threads or default_threads(workers_on_host)
        self.session_options = SessionOptions(
            gpu=0 if gpu is not None else None,  # CUDA_VISIBLE_DEVICES pins the worker: device 0 is its GPU
            intra_op_threads=threads,
            inter_op_threads=config.onnx.inter_op_threads,
            gpu_mem_limit_bytes=config.max_memory_bytes if gpu is not None else None,
            precision=config.onnx.precision,
        )
        # What ONNX Runtime really gives, not what was asked: a worker whose CUDA provider cannot
        # start says so once and runs (and reports) the CPU provider, instead of a fallback per load.
        self.provider = probe_provider(self.session_options)
        if self.session_options.uses_cuda and self.provider != "cuda":
            log.error("CUDA was asked for on GPU %s (CUDA_VISIBLE_DEVICES=%s) but ONNX Runtime gave the %s "
                      "provider; this worker runs on the CPU (is the 'gpu' extra installed and the GPU visible?)",
                      gpu, device, self.provider)
            self.session_options = dataclasses.replace(self.session_options, gpu=None, gpu_mem_limit_bytes=None)
        self.gpu_monitor = GpuMonitor(device if self.session_options.uses_cuda else None)
        # The UNets' engine: what was asked (onnx.gpu_engine) against what this runtime has.
        self.engine = EngineState(plan_engine(config.onnx.gpu_engine, self.session_options.uses_cuda,
                                              ort.get_available_providers(), ort.__version__),
                                  config.onnx.gpu_engine)
        self.catalog = catalog or Catalog(config.models_dir, config.models)
        self._sink: Callable[[dict], None] = lambda event: None
        self.cache = ModelCache(
            self.catalog.resolve,
            FrameStore(shm_namespace),
            max_models=config.capacity.max_models,
            max_memory_bytes=config.max_memory_bytes,
            policy=config.capacity.eviction_policy,
            idle_unload_s=config.capacity.idle_unload_minutes * 60,
            session_options=self.session_options,
            event_sink=lambda event: self._sink(event),
            log_operations=config.logging.log_model_operations,
            clock=clock,
            load_backoff_s=config.cluster.load_failure_backoff_s,
            load_backoff_max_s=config.cluster.load_failure_backoff_max_s,
            # On a GPU the budget holds the process's GPU memory, read through NVML (None: unread).
            meter=(lambda: self.gpu_monitor.read().get("gpu_memory_used_bytes"))
            if self.session_options.uses_cuda else None,
            engine=self.engine,
            trt_cache_dir=config.onnx.tensorrt_cache_dir,
        )
        encoder_path = config.audio_encoder
        encoder = AudioEncoder(lambda: make_session(encoder_path, self.session_options)) if encoder_path else None
        self.pipeline = Pipeline(encoder, threads=max(2, threads), memory=self.cache.memory)
        self.max_batch_size = config.cluster.max_batch_size

    # --- RequestHandler ------------------------------------------------------------------

    def set_event_sink(self, sink: Callable[[dict], None]) -> None:
        self._sink = sink

    def describe(self) -> dict:
        return {
            "max_models": self.cache.max_models,
            "max_memory_bytes": self.cache.max_memory_bytes,
            "loaded": self.cache.loaded_ids(),
            "loaded_versions": self.cache.loaded_versions(),
            "eviction_policy": self.cache.policy,
            "provider": self.provider,
            "device": self.device,
            **self.cache.memory.free(),  # mem_budget, mem_used, mem_free: the broker places by them
        }

    def stats(self) -> dict:
        return {**self.cache.stats(), "memory_bytes": self.cache.memory_bytes(), "provider": self.provider,
                "device": self.device, "precision": self.session_options.precision, **self.engine.stats(),
                **self.gpu_monitor.read()}

    def tick(self) -> None:
        self.cache.unload_idle()

    def close(self) -> None:
        self.cache.close()
        self.pipeline.close()

    def preload(self, share: tuple[int, int] = (0, 1)) -> None:
        """Load the ``preload: true`` models at start.

        ``share = (k, n)``: the k-th of n workers on a host takes every n-th preload model, so
        together they hold each one once instead of each worker holding all of them.
        """
        index, total = share
        wanted = [mid for mid, p in sorted(self.catalog.packages().items()) if p.preload]
        for position, model_id in enumerate(wanted):
            if position % max(1, total) == index % max(1, total):
                log.info("📦 Preloading model '%s'...", model_id)
                try:
                    self.cache.load(model_id)
                except Exception as exc:  # one broken model must not keep the worker down
                    log.error("preload of '%s' failed: %s", model_id, exc)

    def handle(self, header: dict, payloads: list) -> tuple[dict, list]:
        op = header.get("client_op")
        want, mid = header.get("model_version"), header.get("model_id")
        if isinstance(want, str) and isinstance(mid, str):
            known = self.catalog.packages().get(mid)
            if known is None or known.version != want:  # the broker has seen a newer package: read it now
                self.catalog.packages(max_age_s=0)
        if op == "infer":
            return self._infer(header, payloads)
        if op == "load_model":
            model_id = require_model_id(header)
            force = bool(header.get("force_reload", False))
            model, load_ms = self.cache.load(model_id, force_reload=force, evict_hint=header.get("evict_hint"))
            return {"model_id": model_id, "version": model.version, "load_ms": round(load_ms, 3),
                    "loaded": load_ms > 0}, []
        if op == "unload_model":
            model_id = require_model_id(header)
            return {"model_id": model_id, "unloaded": self.cache.unload(model_id)}, []
        if op == "model_stats":
            return self.stats(), []
        raise BadRequest(f"field 'client_op' is {op!r}; a worker serves infer, load_model, unload_model, model_stats")

    def _infer(self, header: dict, payloads: list) -> tuple[dict, list]:
        started = time.perf_counter()
        req = parse_infer(header, payloads, self.max_batch_size)
        with self.cache.use(req.model_id, header.get("evict_hint")) as (model, loaded_now, load_ms):
            reply, frames = self.pipeline.run(model, req)
        reply["model_loaded"] = loaded_now
        reply["model_load_ms"] = round(load_ms, 3)
        reply["timings"]["worker_ms"] = round((time.perf_counter() - started) * 1000, 3)
        return reply, frames

