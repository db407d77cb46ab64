"""A worker's reports (ready, heartbeat, event, stats) are parsed once, in broker/workers.py, into
typed reports; the dispatcher applies them to the worker table through its verbs."""
from __future__ import annotations

import pytest

from lipsync_cluster.broker.workers import (Heartbeat, Holdings, ModelEvent, Registration, ReportError,
                                            StatsReport, Worker)


def test_ready_is_typed_with_bounds_and_defaults():
    r = Registration.parse({"op": "ready", "worker": "w1", "host": "h", "pid": 7, "gpu": True,
                            "credits": 500, "max_models": 0, "max_memory_bytes": -5,
                            "loaded": ["a", 3, "b"], "loading": "x", "mem_free": 1024})
    assert (r.name, r.host, r.pid, r.gpu, r.credits, r.max_models, r.max_memory_bytes) == \
        ("w1", "h", 7, None, 64, 1, 0)  # a bool is no GPU index; credits capped; bad numbers: defaults
    assert r.holdings == Holdings(frozenset({"a", "b"}), None, 1024)
    w = Worker.register(b"id", r)
    assert w.loaded == {"a", "b"} and w.loading == set() and w.mem_free == 1024
    with pytest.raises(ReportError, match="'worker' name"):
        Registration.parse({"op": "ready", "worker": ""})


def test_heartbeat_takes_what_is_said_and_keeps_the_rest():
    w = Worker(b"id", "w", loaded=["a"], loading=["b"])
    w.mem_free = 10
    w.apply_heartbeat(Heartbeat.parse({"loaded": ["c"], "mem_free": -1, "draining": 1}))
    assert (w.loaded, w.loading, w.mem_free, w.draining) == ({"c"}, {"b"}, 10, False)  # only `true` drains
    w.apply_heartbeat(Heartbeat.parse({"draining": True}))
    assert w.draining and w.loaded == {"c"}


def test_an_event_is_cleaned_and_applied():
    e = ModelEvent.parse({"op": "event", "event": "loaded", "model_id": "m", "load_ms": 12.5,
                          "junk": "x" * 10_000, "loaded": ["m", "n"]})
    assert (e.event, e.model) == ("loaded", "m") and "junk" not in e.body
    w = Worker(b"id", "w", loading=["m"])
    w.apply_model_event(e)
    assert w.loaded == {"m", "n"} and w.loading == set()
    for bad in ({"event": "exploded", "model_id": "m"}, {"event": "loaded", "model_id": "../x"}):
        with pytest.raises(ReportError):
            ModelEvent.parse(bad)


def test_stats_carry_measured_sizes_and_max_models():
    s = StatsReport.parse({"op": "stats", "max_models": 3, "models": [
        {"model_id": "a", "memory_bytes": 100}, {"model_id": "b", "memory_bytes": 0},
        {"model_id": "c", "memory_bytes": 1.5}, {"model_id": "../bad", "memory_bytes": 9}]})
    assert s.sizes == {"a": 100} and s.max_models == 3 and "op" not in s.body
    assert StatsReport.parse({"max_models": True}).max_models is None
    w = Worker(b"id", "w", max_models=1)
    w.apply_stats(s)
    assert w.max_models == 3 and w.stats is s.body
