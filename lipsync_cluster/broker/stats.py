"""Broker-side counters, merged worker statistics, the published snapshot and the log report.

The broker sees every request, so it counts outcomes per model itself; the workers' periodic
``stats`` messages add what only a worker knows (memory, inference timings). Everything here is
plain data built on the broker's thread; nothing blocks.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Iterable, Optional

LATENCY_SAMPLES = 2048  # per model; enough for a stable p99 at 1 Hz snapshots


class ModelCounters:
    __slots__ = ("requests", "ok", "errors", "frames", "shed", "retried", "latency_ms",
                 "service_s", "last_used")

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
        self.bad_requests = 0

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
            return {"requests": 0, "ok": 0, "errors": {}, "frames": 0, "shed": 0, "retried": 0}
        lat = list(c.latency_ms)
        out = {
            "requests": c.requests, "ok": c.ok, "errors": dict(c.errors), "frames": c.frames,
            "shed": c.shed, "retried": c.retried,
            "latency_p50_ms": percentile(lat, 50), "latency_p99_ms": percentile(lat, 99),
            "service_ms": None if c.service_s is None else c.service_s * 1000.0,
            "last_used_s": None if c.last_used is None else round(now - c.last_used, 3),
        }
        return out

    def totals(self, now: float) -> dict:
        return {
            "uptime_s": round(now - self.started, 3), "requests": self.total_requests,
            "ok": self.total_ok, "errors": dict(self.total_errors), "shed": self.shed,
            "retried": self.retried, "late_replies": self.late_replies,
            "undeliverable": self.undeliverable,
        }


def format_report(models: list[dict], workers: list[dict]) -> list[str]:
    """The seeds' "Model Statistics Report", cluster-wide.

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
