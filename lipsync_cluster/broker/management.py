"""Answers to the cluster-wide read-only ops (list_models, model_stats, health).

Pure functions over the catalog, the worker table, the queues and the counters: the broker
answers these itself from what it already knows (the workers' latest stats), without asking
any worker, so they stay fast while every worker is busy.
"""
from __future__ import annotations

from typing import Any, Optional

from ..common import vocab
from .queues import ModelQueues
from .stats import BrokerStats, merge_model_entries
from .workers import WorkerTable

# Per-worker GPU readings a worker's stats may carry (worker/gpu_monitor.py); numbers only.
GPU_STATS = ("gpu_memory_used_bytes", "gpu_device_memory_used_bytes", "gpu_memory_total_bytes", "gpu_utilization")
# The worker's memory as it measures it (worker/memory.py): budget, used, free, and the parts.
MEM_STATS = (*vocab.MEM_REPORT, *vocab.MEM_PARTS, "mem_chunked_batches")


def _worker_model_entries(table: WorkerTable) -> dict[str, list[dict]]:
    """model_id -> the per-model entries of every worker's latest stats."""
    out: dict[str, list[dict]] = {}
    for w in table.values():
        for entry in w.stats.get("models", ()) or ():
            if isinstance(entry, dict) and isinstance(entry.get("model_id"), str):
                out.setdefault(entry["model_id"], []).append({**entry, "worker": w.name,
                                                              "provider": w.stats.get("provider")})
    return out


def model_entry(model: str, info: dict, table: WorkerTable, queues: ModelQueues,
                stats: BrokerStats, now: float, per_worker: Optional[list[dict]] = None) -> dict:
    loaded_on = sorted(w.name for w in table.values() if w.has_loaded(model))
    loading_on = sorted(w.name for w in table.values() if w.is_loading(model) and not w.has_loaded(model))
    summary = stats.model_summary(model, now)
    per_worker = per_worker or []
    merged = merge_model_entries(per_worker) if per_worker else {}
    return {
        "model_id": model,
        "version": info.get("version"),
        "loaded": bool(loaded_on),
        "loaded_on": loaded_on,
        "loading_on": loading_on,
        "preload": bool(info.get("preload", False)),
        "num_frames": info.get("num_frames"),
        "memory_estimate_mb": info.get("memory_estimate_mb"),
        "queued": queues.depth(model),
        # Broker counters first; the workers' merged numbers add what only they know.
        "stats": {**merged, **summary, "workers": per_worker},
    }


def list_models(catalog: dict[str, dict], table: WorkerTable, queues: ModelQueues,
                stats: BrokerStats, now: float) -> list[dict]:
    entries = _worker_model_entries(table)
    return [model_entry(m, catalog[m], table, queues, stats, now, entries.get(m))
            for m in sorted(catalog)]


def worker_entry(w: Any) -> dict:
    s = w.stats or {}
    loaded = sorted(w.loaded)
    return {
        "worker": w.name, "host": w.host, "gpu": w.gpu, "pid": w.pid,
        "credits": w.credits, "in_flight": w.in_flight,
        "max_models": int(s.get("max_models", w.max_models) or w.max_models),
        "loaded_models": len(loaded), "loaded": loaded, "loading": sorted(w.loading),
        "total_memory_bytes": int(s.get("memory_bytes", 0) or 0),
        "max_memory_bytes": int(s.get("max_memory_bytes", w.max_memory_bytes) or 0),
        "draining": w.draining, "restarts": w.restarts,
        # What ONNX Runtime really gave the worker ("cuda", "cpu"), the device it is pinned to, and
        # its GPU readings (worker/gpu_monitor.py) when it has a GPU.
        "provider": s.get("provider"), "device": s.get("device"),
        # The UNets' engine the worker really uses (cpu, cuda, cuda_graph, tensorrt), why when it
        # is not the one asked for, and the precision its models run at (worker/engine.py).
        **{k: s[k][:500] for k in ("engine", "engine_requested", "engine_note", "precision")
           if isinstance(s.get(k), str)},
        **{k: s[k] for k in (*GPU_STATS, *MEM_STATS)
           if isinstance(s.get(k), (int, float)) and not isinstance(s.get(k), bool)},
    }


def model_stats(catalog: dict[str, dict], table: WorkerTable, queues: ModelQueues,
                stats: BrokerStats, now: float, model: Optional[str] = None) -> dict:
    entries = _worker_model_entries(table)
    names = [model] if model is not None else sorted(catalog)
    models = [model_entry(m, catalog.get(m, {}), table, queues, stats, now, entries.get(m)) for m in names]
    workers = sorted((worker_entry(w) for w in table.values()), key=lambda e: e["worker"])
    return {
        "models": models,
        "workers": workers,
        "max_models": sum(w["max_models"] for w in workers),
        "loaded_models": sum(w["loaded_models"] for w in workers),
        "total_memory_bytes": sum(w["total_memory_bytes"] for w in workers),
        "max_memory_bytes": sum(w["max_memory_bytes"] for w in workers),
        "queued": queues.total,
        "totals": stats.totals(now),
    }


def health(catalog: dict[str, dict], table: WorkerTable) -> dict:
    """Live always (we answered); ready when a worker is registered and every preload is loaded."""
    providers: dict[str, int] = {}
    engines: dict[str, int] = {}
    for w in table.values():  # what each worker's sessions really run on, as the worker measured it
        for key, counts in (("provider", providers), ("engine", engines)):
            name = w.stats.get(key)
            name = name[:64] if isinstance(name, str) else "unknown"
            counts[name] = counts.get(name, 0) + 1
    reply: dict[str, Any] = {"live": True, "workers": len(table), "providers": providers, "engines": engines}
    if not len(table):
        reply.update(ready=False, reason="no worker registered")
        return reply
    missing = sorted(m for m, info in catalog.items()
                     if info.get("preload") and not any(w.has_loaded(m) for w in table.values()))
    if missing:
        reply.update(ready=False, reason="preload model(s) not loaded yet: " + ", ".join(missing))
    else:
        reply["ready"] = True
    return reply
