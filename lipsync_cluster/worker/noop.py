"""A :class:`RequestHandler` that does no inference: for tests and the broker benchmark.

``infer`` answers at once (or after ``sleep_s`` / ``sleep_by_model[model]``) with the payload
sizes it received, optionally echoing the payload frames back unchanged (to measure pass-through
of large payloads). ``load_model`` / ``unload_model`` only track a set of model ids, honour the
broker's ``evict_hint`` (else evict by ``policy``, lru or lfu, scored as the broker and the model
cache score: ``common/heat.py``), respect ``max_models`` and emit the same events as the real model cache,
so routing and placement can be observed with small ``max_models``.

Run as a process: ``python -m lipsync_cluster.worker.noop --backend tcp://127.0.0.1:5556``.
"""
from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from typing import Callable, Optional

from ..common import vocab
from ..common.errors import BadRequest, ModelLoadFailed
from ..common.heat import LFU_HALF_LIFE_S, Heat


class NoopHandler:
    def __init__(self, *, max_models: int = 3, sleep_s: float = 0.0,
                 sleep_by_model: Optional[dict[str, float]] = None, echo: bool = False,
                 load_s: float = 0.0, memory_per_model: int = 100 * 2**20,
                 max_memory_bytes: int = 8 * 2**30, fail_load: tuple[str, ...] = (),
                 idle_unload_s: float = 0.0, preload: tuple[str, ...] = (), policy: str = "lru",
                 lfu_half_life_s: float = LFU_HALF_LIFE_S) -> None:
        self.max_models = max_models
        self.sleep_s = sleep_s
        self.sleep_by_model = dict(sleep_by_model or {})
        self.echo = echo
        self.load_s = load_s
        self.memory_per_model = memory_per_model
        self.max_memory_bytes = max_memory_bytes
        self.fail_load = set(fail_load)
        self.idle_unload_s = idle_unload_s
        self._lock = threading.Lock()
        self._loaded: dict[str, str] = {}     # model -> version
        self._loading: set[str] = set()
        self._uses: dict[str, int] = {}
        self._last: dict[str, float] = {}     # last use (or load): lru and idle unloading
        self._heat = Heat(policy, lfu_half_life_s)  # uses: lfu
        self._busy_s: dict[str, float] = {}
        self._sink: Callable[[dict], None] = lambda event: None
        self.handled = 0
        self.evictions: list[tuple[str, str]] = []  # (victim, reason), for tests
        for model in preload:
            self._loaded[model] = "noop"
            self._last[model] = time.monotonic()

    # --- RequestHandler ------------------------------------------------------------------

    def set_event_sink(self, sink: Callable[[dict], None]) -> None:
        self._sink = sink

    def describe(self) -> dict:
        with self._lock:
            return {"max_models": self.max_models, "max_memory_bytes": self.max_memory_bytes,
                    "loaded": sorted(self._loaded), "loading": sorted(self._loading),
                    "loaded_versions": dict(self._loaded)}

    def handle(self, header: dict, payloads: list) -> tuple[dict, list]:
        op = header.get("client_op")
        model = header.get("model_id")
        if op == "infer":
            loaded_now, load_ms = self._ensure(model, header.get("model_version"), header.get("evict_hint"))
            t0 = time.perf_counter()
            delay = self.sleep_by_model.get(model, self.sleep_s)
            if delay > 0:
                time.sleep(delay)
            infer_ms = (time.perf_counter() - t0) * 1000.0
            with self._lock:
                self.handled += 1
                self._uses[model] = self._uses.get(model, 0) + 1
                self._last[model] = time.monotonic()
                self._heat.touch(model, self._last[model])
                self._busy_s[model] = self._busy_s.get(model, 0.0) + infer_ms / 1000.0
            sizes = [memoryview(getattr(p, "buffer", p)).nbytes for p in payloads]
            reply = {"model_id": model, "model_version": self._loaded.get(model, "noop"),
                     "format": header.get("format", "png"), "images": [], "sizes": sizes,
                     "timings": {"inference_ms": infer_ms, "queue_ms": header.get("queue_ms", 0.0),
                                 "total_ms": infer_ms + load_ms},
                     "model_loaded": loaded_now, "model_load_ms": load_ms}
            return reply, (list(payloads) if self.echo else [])
        if op == "load_model":
            if header.get("force_reload"):
                self._unload(model, vocab.UNLOADED, "force_reload")
            loaded_now, load_ms = self._ensure(model, header.get("model_version"), header.get("evict_hint"))
            return {"model_id": model, "load_ms": load_ms, "already_loaded": not loaded_now}, []
        if op == "unload_model":
            return {"model_id": model, "unloaded": self._unload(model, vocab.UNLOADED, "requested")}, []
        if op == "model_stats":
            return self.stats(), []
        raise BadRequest(f"field 'client_op' is {op!r}; the noop worker serves infer, load_model, unload_model")

    def stats(self) -> dict:
        now = time.monotonic()
        with self._lock:
            models = [{"model_id": m, "version": v, "usage": self._uses.get(m, 0),
                       "last_used_s": round(now - self._last.get(m, now), 3),
                       "avg_inference_ms": (1000.0 * self._busy_s.get(m, 0.0) / self._uses[m])
                       if self._uses.get(m) else 0.0,
                       "memory_bytes": self.memory_per_model}
                      for m, v in sorted(self._loaded.items())]
            return {"models": models, "memory_bytes": len(self._loaded) * self.memory_per_model,
                    "max_memory_bytes": self.max_memory_bytes, "max_models": self.max_models,
                    "handled": self.handled}

    def tick(self) -> None:
        if self.idle_unload_s <= 0:
            return
        now = time.monotonic()
        with self._lock:
            idle = [m for m in self._loaded if now - self._last.get(m, now) > self.idle_unload_s]
        for m in idle:
            self._unload(m, vocab.IDLE_UNLOADED, f"idle for more than {self.idle_unload_s:g} s")

    def close(self) -> None:
        pass

    # --- the pretend model cache ---------------------------------------------------------

    def _ensure(self, model: str, version: Optional[str], hint: Optional[str]) -> tuple[bool, float]:
        """Make ``model`` loaded; returns (loaded by this call, load ms)."""
        version = version or "noop"
        with self._lock:
            if model in self._loaded:
                return False, 0.0
            self._loading.add(model)
            self._sink({"event": vocab.LOADING, "model_id": model, "version": version})
        t0 = time.perf_counter()
        if self.load_s > 0:
            time.sleep(self.load_s)
        load_ms = (time.perf_counter() - t0) * 1000.0
        with self._lock:
            self._loading.discard(model)
            if model in self.fail_load:
                self._sink({"event": vocab.LOAD_FAILED, "model_id": model, "version": version,
                            "reason": "configured to fail"})
                raise ModelLoadFailed(f"model {model!r} failed to load (noop worker configured to fail)")
            if model in self._loaded:  # another executor loaded it meanwhile
                return False, 0.0
            while len(self._loaded) >= self.max_models:
                if hint in self._loaded:
                    victim, reason = hint, "evict_hint"
                elif self._heat.policy == "lfu":
                    victim = min(self._loaded, key=lambda m: (self._heat.order_key(m), self._last.get(m, 0.0)))
                    reason = "lfu"
                else:
                    victim = min(self._loaded, key=lambda m: self._last.get(m, 0.0))
                    reason = "lru"
                del self._loaded[victim]
                self.evictions.append((victim, reason))
                self._sink({"event": vocab.EVICTED, "model_id": victim, "reason": reason,
                            "memory_bytes": self.memory_per_model, "loaded": sorted(self._loaded)})
            self._loaded[model] = version
            self._last[model] = time.monotonic()
            self._sink({"event": vocab.LOADED, "model_id": model, "version": version, "load_ms": load_ms,
                        "memory_bytes": self.memory_per_model, "loaded": sorted(self._loaded)})
        return True, load_ms

    def _unload(self, model: str, event: str, reason: str) -> bool:
        with self._lock:
            if model not in self._loaded:
                return False
            del self._loaded[model]
            self._sink({"event": event, "model_id": model, "reason": reason,
                        "memory_bytes": self.memory_per_model, "loaded": sorted(self._loaded)})
            return True


def main(argv: Optional[list[str]] = None) -> None:
    from .loop import WorkerLoop

    ap = argparse.ArgumentParser(description="Run a noop worker (no inference) against a broker.")
    ap.add_argument("--backend", default="tcp://127.0.0.1:5556")
    ap.add_argument("--name", default=None)
    ap.add_argument("--credits", type=int, default=2)
    ap.add_argument("--max-models", type=int, default=3)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per infer")
    ap.add_argument("--load", type=float, default=0.0, help="seconds per model load")
    ap.add_argument("--echo", action="store_true", help="send the payload frames back")
    ap.add_argument("--policy", choices=("lru", "lfu"), default="lru", help="eviction without a hint")
    ap.add_argument("--heartbeat", type=float, default=1.0)
    ap.add_argument("--liveness", type=int, default=3)
    ap.add_argument("--gpu", type=int, default=None)
    ap.add_argument("--log-level", default="warning")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import os

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    handler = NoopHandler(max_models=args.max_models, sleep_s=args.sleep, load_s=args.load, echo=args.echo,
                          policy=args.policy)
    WorkerLoop(args.backend, handler, name=args.name or f"noop-{os.getpid()}", credits=args.credits,
               heartbeat_interval_s=args.heartbeat, heartbeat_liveness=args.liveness,
               gpu=args.gpu).run(stop)


if __name__ == "__main__":
    main()
