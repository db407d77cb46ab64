"""The placement index stays equal to a brute-force scan of the workers, whatever happens to them."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from lipsync_cluster.broker.queues import Pending
from lipsync_cluster.broker.workers import Worker, WorkerTable

MODELS = ["a", "b", "c", "d", "e"]
VALUE = {"a": 5.0, "b": 1.0, "c": 3.0, "d": 2.0, "e": 4.0}
_rid = iter(range(1, 10**9))

op = st.one_of(
    st.tuples(st.just("start"), st.integers(0, 3), st.sampled_from(MODELS), st.sampled_from([None] + MODELS)),
    st.tuples(st.just("finish"), st.integers(0, 3)),
    st.tuples(st.just("event"), st.integers(0, 3), st.sampled_from(["loading", "loaded", "evicted"]),
              st.sampled_from(MODELS)),
    st.tuples(st.just("report"), st.integers(0, 3), st.sets(st.sampled_from(MODELS), max_size=3)),
    st.tuples(st.just("drain"), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("max_models"), st.integers(0, 3), st.integers(1, 3)),
    st.tuples(st.just("rejoin"), st.integers(0, 3)),
)


def brute_victim(model, workers, busy):
    """The victim by a scan of every worker (the rule before the index existed)."""
    active = [w for w in workers if not w.draining]
    copies = {m: sum(1 for w in active if w.has_loaded(m)) for m in MODELS}
    best = None
    for w in workers:
        if w.free <= 0 or w.holds(model):
            continue
        for m in w.evictable(busy):
            key = (copies[m] <= 1, VALUE[m], m, w.in_flight, w.name)
            if best is None or key < best[0]:
                best = (key, w, m)
    return None if best is None else (best[1], best[2])


def check(table: WorkerTable) -> None:
    index = table.index
    workers = list(table.values())
    active = [w for w in workers if not w.draining]
    assert set(index.free) == {w for w in workers if w.free > 0}
    assert index.credits == sum(w.credits for w in active)
    assert index.in_flight == sum(w.in_flight for w in workers)
    for m in MODELS:
        assert set(index.holders.get(m, ())) == {w for w in active if w.holds(m)}
        assert index.holder_credits.get(m, 0) == sum(w.credits for w in active if w.holds(m))
        assert index.loading.get(m, 0) == sum(1 for w in active if w.is_loading(m))
        assert index.copies.get(m, 0) == sum(1 for w in active if w.has_loaded(m))
        assert set(index.evictable.get(m, ())) == {w for w in active if m in w.evictable(())}
        ready = {(lvl, w) for lvl, ws in index.ready.get(m, {}).items() for w in ws}
        assert all(index.ready.get(m, {1: 1}).values()), "an empty level (pick_loaded's min would land on it)"
        assert ready == {(w.in_flight, w) for w in workers if w.free > 0 and w.has_loaded(m)}
        hit = index.pick_loaded(m)
        candidates = [w for w in workers if w.free > 0 and w.has_loaded(m)]
        assert (hit is None) == (not candidates)
        if hit is not None:
            assert hit.in_flight == min(w.in_flight for w in candidates)
        for busy in (set(), {"a", "c"}):
            assert index.pick_victim(m, busy, lambda w, v: True) == brute_victim(m, workers, busy)
    room = {(k, w) for k, ws in index.room.items() for w in ws}
    assert room == {((w.slots_used, w.in_flight), w) for w in workers
                    if w.free > 0 and w.slots_used < w.max_models}


@settings(max_examples=150, deadline=None)
@given(st.lists(op, max_size=40))
def test_index_matches_a_scan(ops):
    table = WorkerTable(VALUE.__getitem__)
    workers = [Worker(f"{i}".encode(), f"w{i}", credits=1 + i % 2, max_models=2, now=0.0) for i in range(4)]
    for w in workers:
        table.add(w)
    for step in ops:
        w = workers[step[1]]
        if step[0] == "start" and w.free > 0:
            p = Pending(next(_rid), b"c", 1, "infer", step[2], {}, [], 0.0, None)
            p.evict_hint = step[3] if step[3] != step[2] else None
            w.start(p, 0.0)
        elif step[0] == "finish" and w.sent:
            w.finish(next(iter(w.sent)))
        elif step[0] == "event":
            w.apply_event(step[2], step[3])
        elif step[0] == "report":
            w.apply_report(sorted(step[2]), [])
        elif step[0] == "drain":
            w.draining = step[2]
        elif step[0] == "max_models":
            w.max_models = step[2]
        elif step[0] == "rejoin":  # the same name registers again: the old entry goes
            fresh = Worker(w.identity + b"'", w.name, credits=w.credits, max_models=2, now=0.0)
            table.add(fresh)
            assert w.index is None
            workers[step[1]] = fresh
        check(table)
