"""The placement refinements measured by bench/routing.py: redundant copies go first, a copy waits a
load time, optional patience for a colder busy worker; and the bench's offline optimum."""
from __future__ import annotations

import sys
from pathlib import Path

from lipsync_cluster.broker.queues import Pending
from lipsync_cluster.broker.routing import PLACE, WAIT, Demand, copy_threshold_s, route
from lipsync_cluster.broker.workers import Worker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.routing import belady, sim_affinity, zipf_trace  # noqa: E402

_rid = iter(range(1, 10**9))


def worker(name, loaded=(), credits=2, max_models=2, busy=None):
    w = Worker(name.encode(), name, credits=credits, max_models=max_models, loaded=loaded, now=0.0)
    for model, n in (busy or {}).items():
        for _ in range(n):
            w.start(Pending(next(_rid), b"c", 1, "infer", model, {}, [], 0.0, None), 0.0)
    return w


def test_a_redundant_copy_is_evicted_before_any_only_copy():
    a = worker("a", loaded=["hot", "cold"])
    b = worker("b", loaded=["hot", "warm"], credits=1, busy={"hot": 1})
    value = {"hot": 100.0, "warm": 10.0, "cold": 1.0}.get
    d = route("m", [a, b], value=value)
    assert (d.action, d.worker, d.evict) == (PLACE, a, "hot")  # hot stays loaded on b: no reload


def test_a_copy_waits_at_least_one_load_time():
    assert copy_threshold_s(0.01) == 0.05
    assert copy_threshold_s(0.01, load_s=2.0) == 2.0
    assert copy_threshold_s(0.5, load_s=0.2) == 0.2  # the wait is compared with the load alone


def test_patience_waits_for_a_busy_worker_holding_a_colder_model():
    idle = worker("a", loaded=["x", "y"])                       # only valuable models
    busy = worker("b", loaded=["z"], credits=1, busy={"s": 1})  # s: a one-off being loaded
    value = {"x": 50.0, "y": 40.0, "z": 30.0, "s": 1.0, "m": 2.0}.get
    assert route("m", [idle, busy], value=value).evict == "y"   # default: no patience
    d = route("m", [idle, busy], Demand(head_wait_s=0.1, patience_s=0.5), value=value)
    assert d.action == WAIT and "colder" in d.reason
    d = route("m", [idle, busy], Demand(head_wait_s=0.6, patience_s=0.5), value=value)
    assert (d.action, d.evict) == (PLACE, "y")                  # waited long enough


def test_belady_is_a_lower_bound_and_lfu_beats_lru():
    trace = zipf_trace(2000, 30, 1.0, seed=1)
    opt = belady(trace, 6)
    assert len(set(trace)) <= opt < len(trace)
    lru, lfu = sim_affinity(trace, "lru", 2, 3), sim_affinity(trace, "lfu", 2, 3)
    assert opt < lfu < lru
    assert lfu / opt < 1.5 < lru / opt
    assert belady(["a", "b", "a", "c", "a", "b"], 2) == 4


def test_a_model_still_loading_gets_a_copy_when_more_wait_than_its_copies_take():
    # No service time measured yet (its first request is still loading on a): the ski-rental rule
    # cannot price the wait, but requests beyond a's credits would wait for a's load and a
    # service; a copy started now is ready about when a is.
    a = worker("a", busy={"m": 1})  # dispatched to a, not loaded: a is loading m
    idle = worker("b")
    d = route("m", [a, idle], Demand(depth=3))
    assert (d.action, d.worker, d.evict) == (PLACE, idle, None) and "loading" in d.reason
    assert route("m", [a, idle], Demand(depth=2)).action == WAIT  # a's two credits take them
    # Into a free slot only: never evicts another model for a copy it cannot price.
    full = worker("c", loaded=["x", "y"])
    assert route("m", [a, full], Demand(depth=3)).action == WAIT
    # Once a copy is loaded the usual rule decides (here: no service time, so wait for the first).
    loaded = worker("a", loaded=["m"], busy={"m": 2})
    assert route("m", [loaded, idle], Demand(depth=3)).action == WAIT
    # And once a service time is measured, it prices the wait as before: a short one waits.
    assert route("m", [a, idle], Demand(depth=3, service_s=0.01, load_s=1.0)).action == WAIT
