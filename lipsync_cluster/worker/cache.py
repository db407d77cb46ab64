"""The worker's model cache: load on first use, bounded by count and memory, LRU/LFU eviction,
idle unload, and never an eviction under a running request.

A *loaded model* is an ONNX Runtime session plus the model's background frames attached from
the host's shared-memory frame store. Every load, eviction and unload is a log line in the
earlier server's words (its log lines, so log searches keep working) and an event handed to ``event_sink`` (the worker loop forwards it to the broker).

Thread safety: several request threads use the cache at once. ``_lock`` guards the tables;
loading happens outside it, one loader per model (others wanting that model wait for it), so a
slow load never blocks requests for models that are already loaded.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from ..common import vocab
from ..common.errors import CapacityFull, LipsyncError, ModelLoadFailed
from ..common.frame_store import FrameStore, SharedFrames
from ..common.heat import LFU_HALF_LIFE_S, DecayedCount, check_policy
from ..common.load_backoff import LoadBackoff
from ..common.model_package import (SESSION_MEMORY_FACTOR, ModelPackage, ModelPackageError, bind_unet_io,
                                    public_reason)
from .binding import DeviceBuffers, UnetRunner, runner_mode
from .engine import EnginePlan, EngineState, session_matches
from .memory import WorkerMemory, process_rss
from .precision import model_source
from .sessions import SessionOptions, Workspace, make_session

log = logging.getLogger("lipsync_cluster.worker.cache")


class PackageChanged(ModelPackageError):
    """The package's files are no longer the ones its version was computed from."""


def _check_same_files(package: ModelPackage) -> None:
    if package.files and package.files_changed():
        raise PackageChanged(f"the files of model '{package.model_id}' changed since version {package.version} "
                             "was read (re-prepared?); try again", model_id=package.model_id)


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


@dataclass
class LoadedModel:
    package: ModelPackage
    session: Any
    visual_input: str
    audio_input: str
    frames: SharedFrames
    memory_bytes: int
    load_ms: float
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    usage_count: int = 0
    uses: DecayedCount = field(default_factory=DecayedCount)  # the LFU score (common/heat.py)
    total_inference_ms: float = 0.0
    in_use: int = 0
    retired: bool = False  # replaced by a new version or unloaded while in use: close when idle
    runner: Optional[UnetRunner] = None  # how its UNet runs (worker/binding.py); None: session.run

    @property
    def model_id(self) -> str:
        return self.package.model_id

    @property
    def version(self) -> str:
        return self.package.version

    def stats(self, now: Optional[float] = None) -> dict:
        now = time.time() if now is None else now
        return {
            "model_id": self.model_id,
            "version": self.version,
            "usage_count": self.usage_count,
            "last_used": self.last_used,
            "idle_s": round(now - self.last_used, 3),
            "loaded_at": self.loaded_at,
            "total_inference_ms": round(self.total_inference_ms, 3),
            "avg_inference_ms": round(self.total_inference_ms / self.usage_count, 3) if self.usage_count else 0.0,
            "memory_bytes": self.memory_bytes,
            "load_ms": round(self.load_ms, 3),
            "in_use": self.in_use,
            "runner": self.runner.mode if self.runner is not None else "plain",
            **({"runner_note": self.runner.note} if self.runner is not None and self.runner.note else {}),
        }

    def close(self) -> None:
        self.frames.close()
        self.session = None
        self.runner = None


class ModelCache:
    """Models held by one worker.

    ``resolve(model_id) -> ModelPackage`` finds the current package (raising UnknownModel);
    ``clock`` is wall time and injectable, so idle unload can be tested without waiting.
    """

    def __init__(
        self,
        resolve: Callable[[str], ModelPackage],
        frame_store: FrameStore,
        *,
        max_models: int,
        max_memory_bytes: int,
        policy: str = "lru",
        idle_unload_s: float = 0.0,
        session_options: SessionOptions = SessionOptions(),
        event_sink: Optional[Callable[[dict], None]] = None,
        log_operations: bool = True,
        clock: Callable[[], float] = time.time,
        load_backoff_s: float = 2.0,
        load_backoff_max_s: float = 300.0,
        meter: Optional[Callable[[], Optional[int]]] = None,
        engine: Optional[EngineState] = None,
        trt_cache_dir: Optional[str] = None,
        lfu_half_life_s: float = LFU_HALF_LIFE_S,
    ) -> None:
        check_policy(policy)
        self.resolve = resolve
        self.frame_store = frame_store
        self.max_models = max_models
        self.policy = policy
        self.lfu_half_life_s = lfu_half_life_s
        self.idle_unload_s = idle_unload_s
        self.session_options = session_options
        self.event_sink = event_sink or (lambda event: None)
        self.log_operations = log_operations
        self.clock = clock
        # A model that failed to load is not tried again at once (per model and version, doubling).
        self._backoff = LoadBackoff(load_backoff_s, max(load_backoff_s, load_backoff_max_s))
        self._lock = threading.Lock()
        self._models: dict[str, LoadedModel] = {}
        self._loading: dict[str, threading.Event] = {}
        self._reserved: dict[str, int] = {}  # bytes promised to loads in progress
        self._retired: list[LoadedModel] = []
        # The engine the UNets run on and its fallbacks (worker/engine.py); on a GPU their inputs
        # and outputs live in device buffers shared by every model (one UNet runs at a time).
        plain = "cuda" if session_options.uses_cuda else "cpu"
        self.engine = engine or EngineState(EnginePlan(plain), plain)
        self.device_buffers = DeviceBuffers(int(session_options.gpu)) if session_options.uses_cuda else None
        self.trt_cache_dir = trt_cache_dir
        # The one activation workspace of this worker, and the budget it shares with the models:
        # measured by ``meter`` (RSS on the CPU; the caller passes a GPU reading for CUDA).
        self.workspace = Workspace(session_options, keep_device_arena="cuda_graph" in self.engine.candidates())
        if meter is None:
            meter = process_rss if not session_options.uses_cuda else (lambda: None)
        self.memory = WorkerMemory(max_memory_bytes, self.workspace, meter)
        self.memory.resident = self._resident_bytes
        self.memory.evict_for = self._evict_for_workspace

    # --- queries -------------------------------------------------------------------------

    @property
    def max_memory_bytes(self) -> int:
        """The budget (one number, kept by :attr:`memory`)."""
        return self.memory.budget

    def loaded_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def loaded_versions(self) -> dict[str, str]:
        with self._lock:
            return {mid: m.version for mid, m in self._models.items()}

    def get(self, model_id: str) -> Optional[LoadedModel]:
        with self._lock:
            return self._models.get(model_id)

    def memory_bytes(self) -> int:
        with self._lock:
            return sum(m.memory_bytes for m in self._models.values())

    def _resident_bytes(self) -> int:
        """Models resident and promised to loads in progress (what the workspace cannot use)."""
        with self._lock:
            return sum(m.memory_bytes for m in self._models.values()) + sum(self._reserved.values())

    def stats(self) -> dict:
        now = self.clock()
        with self._lock:
            models = [m.stats(now) for m in self._models.values()]
        return {
            "models": models,
            "max_models": self.max_models,
            "loaded_models": len(models),
            "total_memory_bytes": sum(m["memory_bytes"] for m in models),
            "max_memory_bytes": self.max_memory_bytes,
            "eviction_policy": self.policy,
            **self.memory.snapshot(),
        }

    # --- use -----------------------------------------------------------------------------

    @contextmanager
    def use(self, model_id: str, evict_hint: Optional[str] = None) -> Iterator[tuple[LoadedModel, bool, float]]:
        """Hold ``model_id`` for one request: ``(model, loaded_now, load_ms)``.

        While held, the model is never evicted or closed. Picks up a new package version (a
        re-prepared model) on the way in; requests holding the old one finish on it.
        """
        model, loaded_now, load_ms = self._acquire(model_id, evict_hint)
        try:
            yield model, loaded_now, load_ms
        finally:
            with self._lock:
                model.in_use -= 1
                model.usage_count += 1
                model.last_used = self.clock()
                model.uses.add(model.last_used, self.lfu_half_life_s)
                close_now = model.retired and model.in_use == 0
            if close_now:
                self._close_retired(model)

    def _acquire(self, model_id: str, evict_hint: Optional[str]) -> tuple[LoadedModel, bool, float]:
        package = self.resolve(model_id)
        with self._lock:
            model = self._models.get(model_id)
            if model is not None and model.version == package.version:
                model.in_use += 1
                return model, False, 0.0
        model, load_ms = self.load(model_id, package=package, evict_hint=evict_hint, hold=True)
        return model, load_ms > 0, load_ms

    # --- load / unload ---------------------------------------------------------------------

    def load(self, model_id: str, force_reload: bool = False, *, package: Optional[ModelPackage] = None,
             evict_hint: Optional[str] = None, hold: bool = False) -> tuple[LoadedModel, float]:
        """Make ``model_id`` resident. Returns ``(model, load_ms)``; load_ms is 0 if it already was.

        ``hold`` marks the model in use under the same lock that publishes it (or finds it), so
        no other thread can evict, unload or replace-and-close it between loading and running.
        """
        package = package or self.resolve(model_id)
        while True:
            with self._lock:
                current = self._models.get(model_id)
                if current is not None and current.version == package.version and not force_reload:
                    if hold:
                        current.in_use += 1
                    return current, 0.0
                waiting = self._loading.get(model_id)
                if waiting is None and not force_reload:
                    self._backoff.check(model_id, package.version, time.monotonic())  # raises in the window
                if waiting is None:
                    done = threading.Event()
                    self._loading[model_id] = done
                    break
            waiting.wait()
            force_reload = False  # someone else just loaded it: that is the reload we wanted
        try:
            model = self._load_new(package, evict_hint, replacing=current, hold=hold)
        finally:
            with self._lock:
                self._loading.pop(model_id, None)
                self._reserved.pop(model_id, None)
            done.set()
        return model, model.load_ms

    def _load_new(self, package: ModelPackage, evict_hint: Optional[str], replacing: Optional[LoadedModel],
                  hold: bool = False) -> LoadedModel:
        model_id = package.model_id
        estimate = self._estimate_bytes(package)
        # room for its first run too: the warm-up measures its workspace in a shrunk arena
        self._make_room(model_id, estimate + self.memory.one_frame_guess(), evict_hint, replacing)
        self._emit(vocab.LOADING, model_id, version=package.version)
        if self.log_operations:
            log.info("📦 Loading model '%s' (version %s, %d frames)...", model_id, package.version, package.num_frames)
        started = time.perf_counter()
        frames = None
        try:
            _check_same_files(package)
            # Created, then run at batch 1 in a quiet workspace (no UNet runs meanwhile): what the
            # model itself holds, and its workspace per frame, measured.
            # fp16 is converted here, outside the measurement: the model is what the session holds
            source, _ = model_source(package.onnx_path, self.session_options.precision)
            runner, session_bytes = self.memory.measure_load(
                (model_id, package.version), lambda: self._open_unet(source), lambda r: r.warm_up())
            del source
            session, visual, audio = runner.session, runner.visual_name, runner.audio_name
            frames = self.frame_store.attach(model_id, package.version, package.frame_paths,
                                             expected_size=tuple(package.frame_size),
                                             check_source=lambda: _check_same_files(package))
            # The version is re-checked after everything was read: a re-prepare between resolving
            # the package and reading its files must not pair this version with the new files.
            _check_same_files(package)
        except Exception as exc:
            if frames is not None:
                frames.close()
            reason = exc.message if isinstance(exc, LipsyncError) else f"{type(exc).__name__}: {exc}"
            changed = isinstance(exc, PackageChanged)
            if not changed:  # a package caught mid re-prepare is not broken: no backoff
                with self._lock:
                    self._backoff.failed(model_id, package.version, public_reason(reason), time.monotonic())
            self._emit(vocab.LOAD_FAILED, model_id, version=package.version, reason=public_reason(reason))
            log.error("❌ Model '%s' failed to load: %s", model_id, reason)  # the details: here only
            raise ModelLoadFailed(f"model '{model_id}' failed to load: {public_reason(reason)}", model_id=model_id,
                                  version=package.version) from exc
        load_ms = (time.perf_counter() - started) * 1000
        if not session_bytes:  # unread (a GPU without NVML readings): estimated from the file
            session_bytes = int(os.path.getsize(package.onnx_path) * SESSION_MEMORY_FACTOR)
        memory = session_bytes + frames.nbytes
        if package.memory_estimate_mb:
            # A declared estimate is the operator's word; measured numbers only refine it upward.
            memory = max(memory, int(package.memory_estimate_mb * 1024 * 1024))
        if memory > estimate:
            # Measured above the estimate: the budget must still hold, so make room for the real
            # size (evicting idle models) or give the load up with the numbers.
            try:
                self._make_room(model_id, memory, evict_hint, replacing)
            except CapacityFull:
                frames.close()
                session = None
                raise
        # A held model is published already in use: an unload or another load's eviction that runs
        # the moment the lock is released must see the hold (an in-use model is never closed).
        model = LoadedModel(package=package, session=session, visual_input=visual, audio_input=audio,
                            frames=frames, memory_bytes=memory, load_ms=load_ms, loaded_at=self.clock(),
                            last_used=self.clock(), in_use=1 if hold else 0, runner=runner)
        with self._lock:
            self._backoff.succeeded(model_id)
            old = self._models.get(model_id)
            self._models[model_id] = model
            if old is not None:
                self._retire_locked(old)
        if old is not None and old.version != package.version:
            # The old shared copy is released once nobody on this host needs that version.
            self.frame_store.remove_other_versions(model_id, package.version)
        if self.log_operations:
            log.info("✅ Model '%s' loaded in %.2fs (memory: %.2f MB)", model_id, load_ms / 1000, memory / 2**20)
        self._emit(vocab.LOADED, model_id, version=package.version, memory_bytes=memory, load_ms=round(load_ms, 3))
        return model

    def _open_unet(self, source: Any) -> UnetRunner:
        """The UNet's session on the worker's engine, with its runner; an engine that fails (the
        session cannot open on it, or ONNX Runtime gave another provider) hands over to the next
        of the plan, for this load and the ones after. A model that is itself wrong fails on
        every engine: its error is the last one's."""
        candidates = self.engine.candidates()
        for position, engine in enumerate(candidates):
            try:
                session = make_session(source, self.session_options, engine=engine, trt_cache_dir=self.trt_cache_dir)
                if not session_matches(engine, session.get_providers()):
                    raise RuntimeError(f"ONNX Runtime gave {session.get_providers()[0]} instead")
                visual, audio = bind_unet_io(session.get_inputs())
                return UnetRunner(session, visual, audio, runner_mode(engine), buffers=self.device_buffers)
            except ModelPackageError:
                raise  # the model's inputs are wrong whatever runs it
            except Exception as exc:
                if position == len(candidates) - 1:
                    raise
                self.engine.fall_back(engine, f"{type(exc).__name__}: {exc}"[:300])
        raise AssertionError("unreachable: an engine plan is never empty")

    def _estimate_bytes(self, package: ModelPackage) -> int:
        if package.memory_estimate_mb:
            return int(package.memory_estimate_mb * 1024 * 1024)
        w, h = package.frame_size
        frames = package.num_frames * w * h * 3
        return int(os.path.getsize(package.onnx_path) * SESSION_MEMORY_FACTOR) + frames

    def _make_room(self, model_id: str, needed: int, evict_hint: Optional[str], replacing: Optional[LoadedModel]) -> None:
        """Evict until one more model of ``needed`` bytes fits, or raise CapacityFull.

        The budget holds the whole worker: the process itself and the shared workspace count
        next to the models; the workspace's idle memory is given back before any model is evicted.
        """
        if needed + self.memory.base > self.max_memory_bytes:
            raise CapacityFull(
                f"model '{model_id}' needs {needed / 2**20:.0f} MB, and the worker's budget of "
                f"{self.max_memory_bytes / 2**20:.0f} MB has {(self.max_memory_bytes - self.memory.base) / 2**20:.0f} MB "
                "besides the process itself", model_id=model_id, needed_bytes=needed,
                available_bytes=max(0, self.max_memory_bytes - self.memory.base),
                max_memory_bytes=self.max_memory_bytes)
        shrunk = cleared = False
        while True:
            reading = self.memory.measured()  # outside the lock: on a GPU it is an NVML call
            with self._lock:
                others = {mid: m for mid, m in self._models.items() if mid != model_id}
                replaced = replacing.memory_bytes if replacing is not None and model_id in self._models else 0
                count = len(others) + 1 + sum(1 for mid in self._loading if mid != model_id and mid not in self._models)
                reserved = sum(v for k, v in self._reserved.items() if k != model_id)
                counted = (sum(m.memory_bytes for m in self._models.values()) - replaced + reserved
                           + self.memory.cache_bytes())
                used = max(counted + self.memory.base + self.memory.held, (reading or 0) - replaced + reserved)
                if count <= self.max_models and used + needed <= self.max_memory_bytes:
                    self._reserved[model_id] = needed
                    return
                # the arena's idle memory goes back before any model does, then the idle frames
                shrink = not shrunk and self.memory.held > 0 and count <= self.max_models
                clear = (not shrink and not cleared and count <= self.max_models
                         and self.memory.cache_bytes() > 0)
                if not shrink and not clear:
                    candidates = [m for m in others.values() if m.in_use == 0]
                    if not others:
                        raise CapacityFull(
                            f"model '{model_id}' needs {needed / 2**20:.0f} MB and the worker's budget of "
                            f"{self.max_memory_bytes / 2**20:.0f} MB has {max(0, self.max_memory_bytes - used) / 2**20:.0f} MB "
                            f"free (the process {self.memory.base / 2**20:.0f} MB, its workspace "
                            f"{self.memory.held / 2**20:.0f} MB)", model_id=model_id, needed_bytes=needed,
                            used_bytes=used, available_bytes=max(0, self.max_memory_bytes - used),
                            max_memory_bytes=self.max_memory_bytes, loaded_models=0, max_models=self.max_models)
                    if not candidates:
                        raise CapacityFull(
                            f"capacity full and eviction failed: loading '{model_id}' needs {needed / 2**20:.0f} MB "
                            f"and a model slot; {len(others)}/{self.max_models} models loaded, "
                            f"{used / 2**20:.0f}/{self.max_memory_bytes / 2**20:.0f} MB used, and every loaded "
                            "model is serving a request", model_id=model_id, needed_bytes=needed, used_bytes=used,
                            available_bytes=max(0, self.max_memory_bytes - used), max_memory_bytes=self.max_memory_bytes,
                            loaded_models=len(others), max_models=self.max_models)
                    victim = self._choose_victim(candidates, evict_hint)
                    del self._models[victim.model_id]
            if shrink:
                with self.workspace.lock:
                    self.memory.shrink()
                shrunk = True
                continue
            if clear:
                self.memory.clear_caches()
                cleared = True
                continue
            self._evicted(victim, hinted=victim.model_id == evict_hint)

    def _evicted(self, victim: LoadedModel, hinted: bool = False) -> None:
        """Close an evicted model; its event says who chose it: ``evict_hint`` (the broker, which
        owns placement) or ``policy lru``/``policy lfu`` (this worker, when the broker gave no
        usable hint)."""
        reason = "evict_hint" if hinted else f"policy {self.policy}"
        self._log_eviction(victim, reason)
        self._emit(vocab.EVICTED, victim.model_id, version=victim.version, reason=reason,
                   usage_count=victim.usage_count, memory_bytes=victim.memory_bytes)
        victim.close()

    def _evict_for_workspace(self, model_id: str, needed: int) -> bool:
        """Evict idle models other than ``model_id`` until ``needed`` bytes are free for the
        workspace (the idle frames go first); False (having evicted nothing) when the idle
        models together cannot free what is still needed."""
        needed -= self.memory.clear_caches()
        if needed <= 0:
            return True
        with self._lock:
            idle = [m for mid, m in self._models.items() if mid != model_id and m.in_use == 0]
            if sum(m.memory_bytes for m in idle) < needed:
                return False
            freed, victims = 0, []
            while freed < needed:
                victim = self._choose_victim(idle, None)
                idle.remove(victim)
                del self._models[victim.model_id]
                victims.append(victim)
                freed += victim.memory_bytes
        for victim in victims:
            self._evicted(victim)
        return True

    def _choose_victim(self, candidates: list[LoadedModel], evict_hint: Optional[str]) -> LoadedModel:
        for m in candidates:
            if m.model_id == evict_hint:
                return m
        if self.policy == "lfu":  # the broker's score too: a decayed count of uses (common/heat.py)
            h = self.lfu_half_life_s
            return min(candidates, key=lambda m: (m.uses.key(h), m.last_used))
        return min(candidates, key=lambda m: m.last_used)

    def _log_eviction(self, victim: LoadedModel, reason: str) -> None:
        if self.log_operations:
            log.warning("⚠️  Evicting model '%s' (policy: %s, usage: %d, last used: %s)", victim.model_id,
                        reason.removeprefix("policy "), victim.usage_count, _ago(self.clock() - victim.last_used))

    def unload(self, model_id: str, reason: str = vocab.UNLOADED) -> bool:
        """Drop ``model_id``; a model serving a request is closed when that request ends."""
        with self._lock:
            model = self._models.pop(model_id, None)
            if model is None:
                return False
            close_now = model.in_use == 0
            if not close_now:
                self._retire_locked(model)
        now = self.clock()
        if self.log_operations:
            if reason == vocab.IDLE_UNLOADED:
                log.info("⏰ Auto-unloading idle model '%s' (idle for %s)", model_id, _ago(now - model.last_used))
            else:
                log.info("🗑️  Model '%s' unloaded (was active for %s, used %d times)", model_id,
                         _ago(now - model.loaded_at), model.usage_count)
        self._emit(reason, model_id, version=model.version, usage_count=model.usage_count,
                   memory_bytes=model.memory_bytes)
        if close_now:
            model.close()
        return True

    def unload_idle(self) -> list[str]:
        """Unload models unused for ``idle_unload_s`` (0 disables). Called about once a second."""
        if self.idle_unload_s <= 0:
            return []
        now = self.clock()
        with self._lock:
            idle = [mid for mid, m in self._models.items()
                    if m.in_use == 0 and now - m.last_used >= self.idle_unload_s]
        return [mid for mid in idle if self.unload(mid, reason=vocab.IDLE_UNLOADED)]

    def close(self) -> None:
        for mid in self.loaded_ids():
            self.unload(mid)

    # --- internals -------------------------------------------------------------------------

    def _retire_locked(self, model: LoadedModel) -> None:
        model.retired = True
        if model.in_use == 0:
            model.close()
        else:
            self._retired.append(model)

    def _close_retired(self, model: LoadedModel) -> None:
        with self._lock:
            if model in self._retired:
                self._retired.remove(model)
        model.close()

    def _emit(self, event: str, model_id: str, **fields: Any) -> None:
        payload = {"event": event, "model_id": model_id, "time": self.clock(), **fields}
        try:
            self.event_sink(payload)
        except Exception:  # an event must never break a load
            log.exception("event sink failed for %s", payload)
