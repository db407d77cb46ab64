"""Broker-side counters, merged worker statistics, the published snapshot and the log report.

The broker sees every request, so it counts outcomes per model itself; the workers' periodic
``stats`` messages add what only a worker knows (memory, inference timings). Everything here is
plain data built on the broker's thread; nothing blocks.
"""
from __future__ import annotations

from bisect import bisect_left
from collections import deque
from typing import Any, Iterable, Optional

from ..common import vocab

LATENCY_SAMPLES = 2048  # per model; enough for a stable p99 at 1 Hz snapshots
# Histogram upper bounds (seconds) for the Prometheus exporter (broker/metrics.py).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                     10.0, 30.0, 60.0, 120.0)
LOAD_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RECENT_EVENTS = 50          # model/worker events kept for the snapshot (stats console)
RATE_WINDOW_S = 5.0         # requests/s and frames/s are measured over about this window


class Histogram:
    """Fixed-bucket counts (non-cumulative; the last bucket is +Inf) and a sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple = LATENCY_BUCKETS_S) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def export(self) -> dict:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}


class ModelCounters:
    __slots__ = ("requests", "ok", "errors", "frames", "shed", "retried", "latency_ms",
                 "service_s", "last_used", "request_h", "queue_h", "compute_h", "cold",
                 "loads", "evictions", "unloads", "load_failures", "load_ms_last", "load_ms_sum")

    def __init__(self) -> None:
        self.requests = 0          # admitted and answered or in progress
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.frames = 0
        self.shed = 0              # refused with `overloaded`
        self.retried = 0           # re-dispatched after a worker died
        self.latency_ms: deque[float] = deque(maxlen=LATENCY_SAMPLES)  # arrival -> reply
        self.service_s: Optional[float] = None  # EWMA of dispatch -> reply
        self.last_used: Optional[float] = None
        self.request_h = Histogram()   # arrival -> reply (successes)
        self.queue_h = Histogram()     # arrival -> dispatch (successes)
        self.compute_h = Histogram()   # dispatch -> reply minus the model load (successes)
        self.cold = 0                  # successes whose worker loaded the model for them
        self.loads = 0                 # worker events: loaded / evicted / (idle_)unloaded / load_failed
        self.evictions = 0
        self.unloads = 0
        self.load_failures = 0
        self.load_ms_last: Optional[float] = None
        self.load_ms_sum = 0.0

    def success(self, latency_s: float, queue_s: float, reply: dict, dispatched_s: float,
                frames: int, now: float) -> None:
        """Count one successful infer (``reply``: the worker's reply header)."""
        self.ok += 1
        self.frames += frames
        self.latency_ms.append(latency_s * 1000.0)
        self.last_used = now
        self.request_h.observe(latency_s)
        self.queue_h.observe(queue_s)
        load_ms = reply.get("model_load_ms")
        if not isinstance(load_ms, (int, float)):
            load_ms = 0.0
        if reply.get("model_loaded"):
            self.cold += 1
        self.compute_h.observe(max(0.0, dispatched_s - load_ms / 1000.0))


def percentile(values: Iterable[float], q: float) -> Optional[float]:
    data = sorted(values)
    if not data:
        return None
    k = min(len(data) - 1, max(0, int(round(q / 100.0 * (len(data) - 1)))))
    return data[k]


def _age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def merge_model_entries(entries: list[dict]) -> dict:
    """Merge one model's per-worker stats entries into one map.

    Counts add up; averages, timings and ratios (keys with ``avg``, ``_ms``, ``_ratio``, ``p50``,
    ``p99``) are averaged across workers; ``last_used_s`` takes the most recent; other values are
    taken from the first worker that has them.
    """
    merged: dict[str, Any] = {}
    means: dict[str, list[float]] = {}
    for entry in entries:
        for key, value in entry.items():
            if key in ("model_id", "worker"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                merged.setdefault(key, value)
            elif key == "last_used" or key.endswith("_at"):  # timestamps: the most recent
                merged[key] = max(merged.get(key, value), value)
            elif key.startswith("last_used") or key.endswith("_ago_s") or key == "idle_s":
                merged[key] = min(merged.get(key, value), value)
            elif any(t in key for t in ("avg", "_ms", "ratio", "p50", "p99", "mean")):
                means.setdefault(key, []).append(float(value))
            else:
                merged[key] = merged.get(key, 0) + value
    for key, values in means.items():
        merged[key] = sum(values) / len(values)
    return merged


class BrokerStats:
    def __init__(self, now: float) -> None:
        self.started = now
        self.models: dict[str, ModelCounters] = {}
        self.total_requests = 0
        self.total_ok = 0
        self.total_errors: dict[str, int] = {}
        self.shed = 0
        self.retried = 0
        self.late_replies = 0      # replies from dead/unknown workers or for answered requests
        self.undeliverable = 0     # replies to clients that went away
        self.legs = 0              # requests sent to workers ...
        self.leg_messages = 0      # ... in this many messages (batches, common/wire.py)
        self.bad_requests = 0
        self.load_h = Histogram(LOAD_BUCKETS_S)   # model load latency (worker `loaded` events)
        self.events: deque[dict] = deque(maxlen=RECENT_EVENTS)
        self.workers_seen: dict[str, dict] = {}   # name -> {pid, registrations, restarts, up}
        self._samples: deque[tuple] = deque()     # (time, ok, frames, {model: (ok, frames)})
        self._rates: dict[str, tuple[float, float]] = {}
        self._total_rates = (0.0, 0.0)

    def model(self, model: str) -> ModelCounters:
        c = self.models.get(model)
        if c is None:
            c = self.models[model] = ModelCounters()
        return c

    def arrival(self, model: Optional[str]) -> None:
        self.total_requests += 1
        if model is not None:
            self.model(model).requests += 1

    def outcome(self, model: Optional[str], code: Optional[str], latency_s: float,
                frames: int = 0, now: Optional[float] = None) -> None:
        """``code`` None means success."""
        c = self.model(model) if model is not None else None
        if code is None:
            self.total_ok += 1
            if c is not None:
                c.ok += 1
                c.frames += frames
                c.latency_ms.append(latency_s * 1000.0)
                c.request_h.observe(latency_s)
                if now is not None:
                    c.last_used = now
        else:
            self.total_errors[code] = self.total_errors.get(code, 0) + 1
            if c is not None:
                c.errors[code] = c.errors.get(code, 0) + 1
            if code == "overloaded":
                self.shed += 1
                if c is not None:
                    c.shed += 1
            elif code == "bad_request":
                self.bad_requests += 1

    def service(self, model: str, seconds: float) -> None:
        c = self.model(model)
        c.service_s = seconds if c.service_s is None else 0.8 * c.service_s + 0.2 * seconds

    def service_s(self, model: str) -> Optional[float]:
        c = self.models.get(model)
        return c.service_s if c is not None else None

    def retry(self, model: Optional[str]) -> None:
        self.retried += 1
        if model is not None:
            self.model(model).retried += 1

    def model_summary(self, model: str, now: float) -> dict:
        c = self.models.get(model)
        if c is None:
            return {"requests": 0, "ok": 0, "errors": {}, "frames": 0, "shed": 0, "retried": 0,
                    "requests_per_s": 0.0, "frames_per_s": 0.0, "cold_loads": 0, "loads": 0,
                    "evictions": 0, "unloads": 0, "load_failures": 0}
        lat = list(c.latency_ms)
        rps, fps = self._rates.get(model, (0.0, 0.0))
        out = {
            "requests": c.requests, "ok": c.ok, "errors": dict(c.errors), "frames": c.frames,
            "shed": c.shed, "retried": c.retried,
            "latency_p50_ms": percentile(lat, 50), "latency_p99_ms": percentile(lat, 99),
            "service_ms": None if c.service_s is None else c.service_s * 1000.0,
            "last_used_s": None if c.last_used is None else round(now - c.last_used, 3),
            "requests_per_s": rps, "frames_per_s": fps, "cold_loads": c.cold,
            "loads": c.loads, "evictions": c.evictions, "unloads": c.unloads,
            "load_failures": c.load_failures, "load_ms_last": c.load_ms_last,
            "load_ms_avg": c.load_ms_sum / c.loads if c.loads else None,
        }
        return out

    def totals(self, now: float) -> dict:
        models = self.models.values()
        return {
            "uptime_s": round(now - self.started, 3), "requests": self.total_requests,
            "ok": self.total_ok, "errors": dict(self.total_errors), "shed": self.shed,
            "retried": self.retried, "late_replies": self.late_replies,
            "undeliverable": self.undeliverable, "legs": self.legs, "leg_messages": self.leg_messages,
            "frames": sum(c.frames for c in models), "cold_loads": sum(c.cold for c in models),
            "loads": sum(c.loads for c in models), "evictions": sum(c.evictions for c in models),
            "requests_per_s": self._total_rates[0], "frames_per_s": self._total_rates[1],
        }

    # --- for the stats console and the Prometheus exporter -----------------------------------

    def sample(self, now: float) -> None:
        """Take a counter sample (about once a second) and update requests/s and frames/s."""
        frames = sum(c.frames for c in self.models.values())
        per_model = {m: (c.ok, c.frames) for m, c in self.models.items()}
        self._samples.append((now, self.total_ok, frames, per_model))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_S:
            self._samples.popleft()
        t0, ok0, frames0, models0 = self._samples[0]
        dt = now - t0
        if dt <= 0:
            return
        self._total_rates = ((self.total_ok - ok0) / dt, (frames - frames0) / dt)
        self._rates = {m: ((ok - models0.get(m, (0, 0))[0]) / dt, (fr - models0.get(m, (0, 0))[1]) / dt)
                       for m, (ok, fr) in per_model.items()}

    def load_s(self, model: str) -> Optional[float]:
        """Mean load time of ``model`` (seconds), else of every model, else None (nothing loaded yet)."""
        c = self.models.get(model)
        if c is not None and c.loads and c.load_ms_sum > 0:
            return c.load_ms_sum / c.loads / 1000.0
        count = sum(self.load_h.counts)
        return self.load_h.sum / count if count else None

    def record_event(self, body: dict) -> None:
        """Count a published ``event`` (worker model events, worker joined/left) and keep it."""
        self.events.append(dict(body))
        event, model = body.get("event"), body.get("model_id")
        if event in vocab.WORKER_EVENTS:
            name = body.get("worker")
            if isinstance(name, str):
                seen = self.workers_seen.setdefault(name, {"pid": None, "registrations": 0,
                                                           "restarts": 0, "up": False})
                seen["up"] = event == vocab.WORKER_JOINED
            return
        if not isinstance(model, str):
            return
        c = self.model(model)
        if event == vocab.LOADED:
            c.loads += 1
            load_ms = body.get("load_ms")
            if isinstance(load_ms, (int, float)) and not isinstance(load_ms, bool):
                c.load_ms_last = float(load_ms)
                c.load_ms_sum += float(load_ms)
                self.load_h.observe(load_ms / 1000.0)
        elif event == vocab.EVICTED:
            c.evictions += 1
        elif event in vocab.UNLOAD_EVENTS:
            c.unloads += 1
        elif event == vocab.LOAD_FAILED:
            c.load_failures += 1

    def registered(self, name: str, pid: Any) -> int:
        """A worker registered; returns its restarts (registrations under a new pid)."""
        seen = self.workers_seen.setdefault(name, {"pid": None, "registrations": 0,
                                                   "restarts": 0, "up": True})
        if seen["registrations"] and pid and pid != seen["pid"]:
            seen["restarts"] += 1
        seen["registrations"] += 1
        seen["pid"] = pid
        seen["up"] = True
        return seen["restarts"]

    def histograms(self) -> dict:
        """Copies of every histogram: ``{"models": {m: {request, queue, compute}}, "load": ...}``."""
        return {
            "models": {m: {"request": c.request_h.export(), "queue": c.queue_h.export(),
                           "compute": c.compute_h.export(), "cold": c.cold, "loads": c.loads,
                           "evictions": c.evictions, "unloads": c.unloads,
                           "load_failures": c.load_failures, "retried": c.retried}
                       for m, c in self.models.items()},
            "load": self.load_h.export(),
            "workers_seen": {n: dict(v) for n, v in self.workers_seen.items()},
            "errors_no_model": self._errors_without_model(),
        }

    def _errors_without_model(self) -> dict[str, int]:
        """Errors not counted against a model (bad requests, unknown ids, management ops)."""
        out = dict(self.total_errors)
        for c in self.models.values():
            for code, n in c.errors.items():
                out[code] = out.get(code, 0) - n
        return {code: n for code, n in out.items() if n > 0}


def format_report(models: list[dict], workers: list[dict]) -> list[str]:
    """The earlier server's "Model Statistics Report" (its log layout), cluster-wide.

    ``models``: list_models entries; ``workers``: model_stats' per-worker entries.
    """
    loaded = sum(w.get("loaded_models", 0) for w in workers)
    slots = sum(w.get("max_models", 0) for w in workers)
    memory = sum(w.get("total_memory_bytes", 0) or 0 for w in workers)
    lines = ["📊 Model Statistics Report:",
             f"   Workers: {len(workers)}",
             f"   Loaded models: {loaded}/{slots}",
             f"   Total memory: {memory / 2**20:.2f} MB"]
    for m in models:
        s = m.get("stats", {})
        avg = s.get("avg_inference_ms")
        if avg is None:
            avg = s.get("service_ms")
        where = ",".join(m.get("loaded_on", [])) or "-"
        lines.append(
            f"   • {m['model_id']}: usage={s.get('requests', 0)}, last={_age(s.get('last_used_s'))}, "
            f"avg_inference={'-' if avg is None else f'{avg:.2f}ms'}, on={where}")
    return lines
