"""The pure parts of the broker: routing decisions, model heat, queues, the worker view."""
from __future__ import annotations

import math

import pytest

from lipsync_cluster.broker.queues import ModelQueues, Pending
from lipsync_cluster.broker.routing import (DISPATCH, PLACE, WAIT, Demand, Heat, copy_threshold_s, route)
from lipsync_cluster.broker.workers import Worker, WorkerTable
from lipsync_cluster.common.errors import Overloaded

_rid = iter(range(1, 10**9))


def worker(name: str, loaded=(), credits: int = 2, max_models: int = 2, busy: dict | None = None) -> Worker:
    """A worker with ``busy`` = {model: in-flight count}."""
    w = Worker(name.encode(), name, credits=credits, max_models=max_models, loaded=loaded, now=0.0)
    for model, n in (busy or {}).items():
        for _ in range(n):
            w.start(pending(model), 0.0)
    return w


def pending(model: str, arrival: float = 0.0, deadline: float | None = None) -> Pending:
    return Pending(next(_rid), b"c", 1, "infer", model, {}, [], arrival, deadline)


def lru(last: dict[str, float]):
    return lambda m: last.get(m, -math.inf)


def test_demand_is_typed_and_built_only_on_a_miss():
    asked = []

    def demand() -> Demand:
        asked.append(1)
        return Demand(depth=3, service_s=0.1, load_s=0.5)

    hit = worker("a", loaded=["m"])
    assert route("m", [hit], demand).action == DISPATCH and not asked  # a hit builds no demand
    assert route("n", [hit], demand).action == PLACE and asked == [1]
    with pytest.raises(TypeError):
        Demand(dept=3)  # a misspelt input fails where it is written, not as a silent default
    with pytest.raises(TypeError, match="not a Demand"):
        route("n", [hit], lambda: {"depth": 3})


def test_dispatch_to_loaded_worker_with_fewest_in_flight():
    a = worker("a", loaded=["m"], busy={"m": 1})
    b = worker("b", loaded=["m"])
    c = worker("c", loaded=["x"])
    d = route("m", [a, b, c])
    assert (d.action, d.worker) == (DISPATCH, b)


def test_busy_holder_means_wait_while_the_expected_wait_is_shorter_than_a_load():
    a = worker("a", loaded=["m"], credits=1, busy={"m": 1})
    free = worker("b")
    # 3 waiting x 0.1 s / 1 credit = 0.3 s < a 0.5 s load: wait for the copy there is.
    d = route("m", [a, free], Demand(depth=3, service_s=0.1, load_s=0.5))
    assert d.action == WAIT and d.reason == "busy"
    assert route("m", [a, free], Demand(depth=3, service_s=None, load_s=0.5)).action == WAIT  # unknown: wait


def test_loading_anywhere_means_wait():
    loading = worker("a", credits=2, busy={"m": 1})  # a request for m in flight, m not loaded yet
    assert loading.is_loading("m") and not loading.has_loaded("m")
    free = worker("b")
    d = route("m", [loading, free], Demand(depth=3, service_s=0.1, load_s=1.0))
    assert d.action == WAIT and d.reason == "loading"
    reported = worker("c")
    reported.loading.add("m")
    assert route("m", [reported, worker("d")]).action == WAIT


def test_place_on_a_free_slot_prefers_fewest_models():
    full = worker("a", loaded=["x", "y"])
    one = worker("b", loaded=["x"])
    empty = worker("c")
    d = route("m", [full, one, empty])
    assert (d.action, d.worker, d.evict) == (PLACE, empty, None)
    no_credit = worker("d", credits=1, busy={"x": 1})
    assert route("m", [no_credit]).action == WAIT


def test_evict_the_coldest_model_cluster_wide_lru():
    a = worker("a", loaded=["old", "mid"], max_models=2)
    b = worker("b", loaded=["new", "newer"], max_models=2)
    value = lru({"old": 1.0, "mid": 5.0, "new": 8.0, "newer": 9.0})
    d = route("m", [a, b], value=value)
    assert (d.action, d.worker, d.evict) == (PLACE, a, "old")


def test_never_evict_a_model_with_work_in_flight_or_queued():
    # "old" is the coldest but has a request in flight on a; "mid" is queued in the broker.
    a = worker("a", loaded=["old"], max_models=1, busy={"old": 1})
    b = worker("b", loaded=["mid"], max_models=1)
    c = worker("c", loaded=["warm"], max_models=1)
    value = lru({"old": 1.0, "mid": 2.0, "warm": 3.0})
    d = route("m", [a, b, c], Demand(busy_models={"mid"}), value=value)
    assert (d.worker, d.evict) == (c, "warm")
    d = route("m", [a, b], Demand(busy_models={"mid"}), value=value)
    assert d.action == WAIT


def test_no_evict_requests_only_take_free_slots():
    a = worker("a", loaded=["x"], max_models=1)
    assert route("m", [a], allow_evict=False).action == WAIT
    assert route("m", [a], allow_evict=True).evict == "x"


def test_lfu_evicts_the_least_frequent_even_if_more_recent():
    heat = Heat("lfu", half_life_s=100.0)
    for t in range(10):
        heat.touch("hot", float(t))
    heat.touch("rare", 20.0)  # more recent, but once
    a = worker("a", loaded=["hot"], max_models=1)
    b = worker("b", loaded=["rare"], max_models=1)
    d = route("m", [a, b], value=heat.valuer(20.0))
    assert (d.worker, d.evict) == (b, "rare")
    # Under LRU the same history evicts "hot" (older last use).
    heat_lru = Heat("lru")
    for t in range(10):
        heat_lru.touch("hot", float(t))
    heat_lru.touch("rare", 20.0)
    d = route("m", [a, b], value=heat_lru.valuer(20.0))
    assert (d.worker, d.evict) == (a, "hot")


def test_lfu_frequency_decays_and_covers_unloaded_models():
    heat = Heat("lfu", half_life_s=10.0)
    for _ in range(8):
        heat.touch("m", 0.0)
    assert heat.value("m", 0.0) == pytest.approx(8.0)
    assert heat.value("m", 10.0) == pytest.approx(4.0)
    assert heat.value("m", 30.0) == pytest.approx(1.0)
    assert heat.value("never", 5.0) == 0.0
    heat.touch("m", 10.0)
    assert heat.value("m", 10.0) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        Heat("mru")


def test_another_copy_once_the_expected_wait_exceeds_a_load():
    a = worker("a", loaded=["m"], credits=1, busy={"m": 1})
    b = worker("b", loaded=["x"], max_models=2)
    assert copy_threshold_s(0.02) == pytest.approx(0.05)            # no load measured: 2 services,
    assert copy_threshold_s(0.2) == pytest.approx(0.4)              # at least 50 ms
    assert copy_threshold_s(0.2, load_s=1.5) == pytest.approx(1.5)  # else one load (ski rental)
    assert route("m", [a, b], Demand(depth=10, service_s=0.1, load_s=1.0)).action == WAIT    # 1.0 s: not longer
    d = route("m", [a, b], Demand(depth=11, service_s=0.1, load_s=1.0))                       # 1.1 s > 1.0 s
    assert (d.action, d.worker) == (PLACE, b) and d.reason.startswith("another copy")
    # Even while a copy is still loading, a queue long enough gets a further copy.
    loading = worker("c", credits=1, busy={"m": 1})
    c = worker("d")
    assert route("m", [a, loading, c], Demand(depth=30, service_s=0.1, load_s=1.0)).worker is c
    # The operator's cap: wait.
    d = route("m", [a, b], Demand(depth=100, service_s=0.1, load_s=1.0), max_copies=1)
    assert d.action == WAIT and "max_copies" in d.reason


def test_a_model_is_placed_where_it_fits_in_free_memory():
    small = worker("a", max_models=4)
    small.mem_free = 100
    big = worker("b", loaded=["x"], max_models=4)
    big.mem_free = 1000
    d = route("m", [small, big], Demand(size=500))
    assert (d.action, d.worker) == (PLACE, big)  # fewer models on a, but m does not fit there
    busy_big = worker("d", loaded=["x"], credits=1, max_models=4, busy={"x": 1})
    busy_big.mem_free = 1000
    assert route("m", [small, busy_big], Demand(size=500)).action == WAIT  # wait for the one it fits on
    full = worker("c", loaded=["old"], max_models=1)
    full.mem_free = 50
    d = route("m", [full], Demand(size=500), size_of={"old": 600}.get)  # fits once "old" is gone
    assert (d.worker, d.evict) == (full, "old")
    # Fits on no worker at all: placed as if memory were unknown; the worker makes room (it may
    # evict more than one model) or answers capacity_full -- no waiting for a fit that never comes.
    d = route("m", [full], Demand(size=500), size_of={"old": 100}.get)
    assert (d.action, d.worker, d.evict) == (PLACE, full, "old") and "bytes free" in d.reason
    d = route("m", [small], Demand(size=500))
    assert (d.action, d.worker) == (PLACE, small)


def test_worker_view_hides_hinted_victims_and_counts_in_flight_loads():
    w = worker("a", loaded=["x", "y"], max_models=2)
    p = pending("m")
    p.evict_hint = "x"
    w.start(p, 0.0)
    assert not w.has_loaded("x") and w.is_loading("m") and w.slots_used == 2
    assert w.evictable(()) == ["y"]
    w.finish(p.rid)
    assert w.has_loaded("x") and not w.is_loading("m")
    w.apply_event("loaded", "m")
    w.apply_event("evicted", "x")
    assert w.loaded == {"m", "y"}
    assert w.finish(12345) is None  # unknown rid: nothing happens


def test_table_replaces_a_stale_entry_with_the_same_name():
    table = WorkerTable()
    old = Worker(b"1", "w0")
    table.add(old)
    stale = table.add(Worker(b"2", "w0"))
    assert stale == [old] and len(table) == 1 and table.by_name("w0").identity == b"2"
    assert table.get(b"1") is None


def test_queues_bounds_order_and_expiry():
    q = ModelQueues(per_model_limit=2, total_limit=3)
    a1, a2, b1 = pending("a", 1.0), pending("a", 2.0, deadline=5.0), pending("b", 0.5)
    q.push(a1)
    q.push(a2)
    with pytest.raises(Overloaded) as info:
        q.push(pending("a", 3.0), retry_after_ms=40)
    assert info.value.details["retry_after_ms"] == 40
    q.push(b1)
    with pytest.raises(Overloaded):
        q.push(pending("c"))
    assert q.by_head_age() == ["b", "a"]
    retried = pending("a", 0.1)
    q.push_front(retried)  # a retry ignores the bounds and goes first
    assert q.head("a") is retried and q.total == 4
    assert q.expire(6.0) == [a2]
    assert q.depths() == {"a": 2, "b": 1} and "a" in q.busy_models()
    assert q.pop("a") is retried and q.total == 2


def test_a_draining_worker_is_not_a_holder():
    draining = worker("a", loaded=["m"])
    draining.draining = True
    fresh = worker("b")
    assert draining.free == 0
    d = route("m", [draining, fresh])
    assert (d.action, d.worker) == (PLACE, fresh)
