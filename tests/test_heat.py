"""One LFU score (common/heat.py) for the broker's Heat, the worker's model cache and the noop worker:
a decayed count of uses, ordered the same by its clock-free key as by its value."""
from __future__ import annotations

import pytest

from lipsync_cluster.common.heat import DecayedCount, Heat
from lipsync_cluster.worker.noop import NoopHandler


def test_the_clock_free_key_orders_as_the_decayed_value():
    h = 10.0
    uses = {"a": [0.0, 1.0, 2.0, 3.0], "b": [25.0, 26.0], "c": [30.0], "d": []}
    counts = {m: DecayedCount() for m in uses}
    for m, times in uses.items():
        for t in times:
            counts[m].add(t, h)
    for now in (30.0, 60.0, 300.0):
        by_value = sorted(uses, key=lambda m: counts[m].value(now, h))
        by_key = sorted(uses, key=lambda m: counts[m].key(h))
        assert by_value == by_key
    assert counts["d"].value(5.0, h) == 0.0 and counts["d"].key(h) == float("-inf")
    # 4 uses 27-30 s before 30 s decay below 2 uses 4-5 s before: the frequent-long-ago one is colder.
    assert counts["a"].value(30.0, h) < counts["b"].value(30.0, h)


def test_the_broker_heat_is_that_score():
    heat, count = Heat("lfu", half_life_s=10.0), DecayedCount()
    for t in (0.0, 3.0, 7.0):
        heat.touch("m", t)
        count.add(t, 10.0)
    assert heat.value("m", 12.0) == pytest.approx(count.value(12.0, 10.0))
    assert heat.order_key("m") == pytest.approx(count.key(10.0))


def _load(handler: NoopHandler, model: str) -> None:
    handler.handle({"client_op": "infer", "model_id": model}, [])


def test_the_noop_worker_evicts_by_the_same_score(monkeypatch):
    now = [1000.0]  # the noop worker's clock (time.monotonic), under the test's control
    monkeypatch.setattr("lipsync_cluster.worker.noop.time.monotonic", lambda: now[0])
    lfu = NoopHandler(max_models=2, policy="lfu", lfu_half_life_s=10.0)
    for _ in range(4):
        _load(lfu, "old")      # frequent, long ago
    now[0] += 60.0             # six half-lives: 4 uses are worth 4/64 now
    _load(lfu, "new")
    now[0] += 1.0
    _load(lfu, "third")
    assert lfu.evictions == [("old", "lfu")]
    # With no decay in sight (a long half-life) the frequent one stays and the once-used one goes.
    now[0] = 1000.0
    plain = NoopHandler(max_models=2, policy="lfu", lfu_half_life_s=1e9)
    for _ in range(4):
        _load(plain, "old")
    now[0] += 60.0
    _load(plain, "new")
    now[0] += 1.0
    _load(plain, "third")
    assert plain.evictions == [("new", "lfu")]
    with pytest.raises(ValueError):
        NoopHandler(policy="mru")
