"""The words broker and workers share: event names and memory keys (docs/PROTOCOL.md).

One place, so that a misspelt name is an ``AttributeError`` where it is written instead of an
event nobody counts. Workers emit the model events (``worker/cache.py``, ``worker/noop.py``); the
broker checks them (``broker/hardening.py``), applies them (``broker/workers.py``), counts them
(``broker/stats.py``) and republishes them with its own worker events on the PUB socket, where the
console (``tools/console.py``) and exporters read them.
"""
from __future__ import annotations

# --- model events: worker -> broker (op ``event``), republished on PUB -------------------------
LOADING = "loading"               # a load started
LOADED = "loaded"                 # a load finished: the model serves
EVICTED = "evicted"               # dropped to make room (reason: evict_hint or the worker's policy)
UNLOADED = "unloaded"             # dropped on request (unload_model, force_reload)
IDLE_UNLOADED = "idle_unloaded"   # dropped after capacity.idle_unload_minutes unused
LOAD_FAILED = "load_failed"       # a load failed (reason says why)

MODEL_EVENTS = frozenset((LOADING, LOADED, EVICTED, UNLOADED, IDLE_UNLOADED, LOAD_FAILED))
GONE_EVENTS = frozenset((EVICTED, UNLOADED, IDLE_UNLOADED, LOAD_FAILED))  # the model left the worker
UNLOAD_EVENTS = frozenset((UNLOADED, IDLE_UNLOADED))                      # counted as unloads

# --- the broker's own events on PUB ----------------------------------------------------------
WORKER_JOINED = "worker_joined"
WORKER_LEFT = "worker_left"
WORKER_EVENTS = frozenset((WORKER_JOINED, WORKER_LEFT))

# --- a worker's measured memory (worker/memory.py), in bytes -----------------------------------
MEM_BUDGET = "mem_budget"         # the worker's whole budget (capacity.max_memory_gb)
MEM_USED = "mem_used"             # measured: process RSS (or GPU use) now
MEM_FREE = "mem_free"             # budget - used, >= 0: what placement fits a model into
# What ``ready`` and heartbeats carry (placement reads MEM_FREE).
MEM_REPORT = (MEM_BUDGET, MEM_USED, MEM_FREE)
# The parts a worker's ``stats`` add (shown by management answers and /metrics).
MEM_PARTS = ("mem_process_bytes", "mem_workspace_bytes", "mem_idle_cache_bytes")
# Every memory key of ``stats``: byte counts (and one count), whole and >= 0 when kept.
MEM_STATS = MEM_REPORT + MEM_PARTS + ("mem_measured_bytes", "mem_chunked_batches")
