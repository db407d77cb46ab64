"""Routing and placement through a real broker: affinity, free slots, eviction, copies, limits."""
from __future__ import annotations

import time

from waiting import wait_until

try:
    from test_broker_support import (BrokerThread, Client, WorkerThread, call_infer, catalog_of,
                                     features, infer, loaded_on, wait_workers)
except ImportError:  # tests/ imported as a package
    from tests.test_broker_support import (BrokerThread, Client, WorkerThread, call_infer, catalog_of,
                                           features, infer, loaded_on, wait_workers)


def collect(client: Client, n: int, timeout: float = 5.0) -> dict:
    out = {}
    for _ in range(n):
        reply, _ = client.recv(timeout)
        out[reply["id"]] = reply
    return out


def test_affinity_one_load_and_one_worker():
    with BrokerThread(catalog_of("a"), max_copies_per_model=1) as b:
        with WorkerThread(b.backend, "w0") as w0, WorkerThread(b.backend, "w1") as w1:
            client = Client(b.frontend)
            wait_workers(client, 2)
            for i in range(20):  # one at a time, default settings otherwise
                client.send(infer("a", i), features())
                client.recv()
            for i in range(200):  # pipelined: all queued at once
                client.send(infer("a", 100 + i), features())
            replies = collect(client, 200)
            assert all(r["ok"] for r in replies.values())
            workers = {r["worker"] for r in replies.values()}
            assert len(workers) == 1
            loads = [r for r in replies.values() if r["model_loaded"]]
            assert loads == []  # loaded once, by the first sequential request
            holders = [w for w in (w0, w1) if "a" in w.handler.describe()["loaded"]]
            assert len(holders) == 1 and holders[0].name in workers
            client.close()


def test_a_new_model_goes_to_a_free_worker_not_over_a_loaded_one():
    with BrokerThread(catalog_of("a", "b")) as b:
        with WorkerThread(b.backend, "w0", max_models=1) as w0, WorkerThread(b.backend, "w1", max_models=1) as w1:
            client = Client(b.frontend)
            wait_workers(client, 2)
            first = call_infer(client, "a", 1)["worker"]
            second = call_infer(client, "b", 2)["worker"]
            assert first != second
            assert w0.handler.evictions == [] and w1.handler.evictions == []
            client.close()


def _two_full_workers(b, policy_uses: dict[str, int], **kw):
    """w0/w1 with max_models=1; model a placed then b, each used policy_uses times."""
    w0 = WorkerThread(b.backend, "w0", max_models=1, **kw)
    w1 = WorkerThread(b.backend, "w1", max_models=1, **kw)
    client = Client(b.frontend)
    wait_workers(client, 2)
    where = {}
    for model in ("a", "b"):
        for i in range(policy_uses[model]):
            where[model] = call_infer(client, model, f"{model}{i}")["worker"]
    assert where["a"] != where["b"]
    return w0, w1, client, where


def test_lru_eviction_picks_the_coldest_model_across_workers():
    with BrokerThread(catalog_of("a", "b", "c")) as b:
        w0, w1, client, where = _two_full_workers(b, {"a": 1, "b": 1})
        try:
            r = call_infer(client, "c", "c")
            assert r["worker"] == where["a"]  # a was used least recently
            victim_worker = w0 if where["a"] == "w0" else w1
            assert victim_worker.handler.evictions == [("a", "evict_hint")]
            assert loaded_on(client, "b") == [where["b"]]
        finally:
            client.close(); w0.stop(); w1.stop()


def test_lfu_eviction_keeps_the_frequent_model():
    with BrokerThread(catalog_of("a", "b", "c"), eviction_policy="lfu") as b:
        # a: 6 uses, then b once (more recent, but rare) -> c must replace b.
        w0, w1, client, where = _two_full_workers(b, {"a": 6, "b": 1})
        try:
            assert call_infer(client, "c", "c")["worker"] == where["b"]
            assert loaded_on(client, "a") == [where["a"]]
        finally:
            client.close(); w0.stop(); w1.stop()


def test_eviction_never_takes_a_model_with_work_in_flight():
    with BrokerThread(catalog_of("a", "b", "c")) as b:
        w0, w1, client, where = _two_full_workers(b, {"a": 1, "b": 1}, sleep_by_model={"a": 1.0})
        try:
            # a's first request (the load) took 1 s; now a second a request keeps a busy...
            client.send(infer("a", "busy"), features())
            wait_until(lambda: any(w.name == where["a"] and w.in_flight for w in list(b.broker.table.values())), 5,
                       "the busy request in flight on a's worker")
            client.call(infer("b", "warm"), features())  # ...and b is the most recent.
            # a is the coldest by last use but has work in flight: b must go instead.
            r = call_infer(client, "c", "c")
            assert r["worker"] == where["b"]
            busy, _ = client.recv(3)
            assert busy["id"] == "busy" and busy["ok"] and busy["worker"] == where["a"]
        finally:
            client.close(); w0.stop(); w1.stop()


def test_a_waiting_queue_gets_a_second_copy():
    with BrokerThread(catalog_of("a")) as b:
        with WorkerThread(b.backend, "w0", credits=1, sleep_s=0.15), \
                WorkerThread(b.backend, "w1", credits=1, sleep_s=0.15):
            client = Client(b.frontend)
            wait_workers(client, 2)
            for i in range(10):
                client.send(infer("a", i), features())
            replies = collect(client, 10, timeout=5)
            assert all(r["ok"] for r in replies.values())
            assert {r["worker"] for r in replies.values()} == {"w0", "w1"}
            assert loaded_on(client, "a") == ["w0", "w1"]
            client.close()


def test_full_queue_answers_overloaded_at_once():
    with BrokerThread(catalog_of("a", "b"), queue_limit_per_model=2, queue_limit_total=3) as b:
        # b is loaded, so only the queue bounds decide (not the wait a model's load would add)
        with WorkerThread(b.backend, "w0", credits=1, sleep_s=0.4, preload=("b",)):
            client = Client(b.frontend)
            wait_workers(client, 1)
            for i in range(4):  # 1 in flight, 2 queued, 1 over the per-model bound
                client.send(infer("a", i), features())
            t0 = time.monotonic()
            r, _ = client.recv(1)
            assert r["id"] == 3 and r["error"]["code"] == "overloaded"
            assert time.monotonic() - t0 < 0.3 and r["error"]["details"]["retry_after_ms"] > 0
            client.send(infer("b", "b1"), features())  # total: 2 + 1 = 3 queued
            client.send(infer("b", "b2"), features())  # over the total bound
            r, _ = client.recv(1)
            assert r["id"] == "b2" and r["error"]["code"] == "overloaded"
            assert r["error"]["details"]["queue"] == "total"
            rest = collect(client, 4, timeout=5)
            assert all(x["ok"] for x in rest.values())
            model_stats = client.call({"id": "s", "op": "model_stats", "model_id": "a"})
            assert model_stats["models"][0]["stats"]["shed"] == 1
            client.close()


def test_deadlines_answer_timeout_queued_and_in_flight():
    with BrokerThread(catalog_of("a")) as b:
        with WorkerThread(b.backend, "w0", credits=1, sleep_s=0.5):
            client = Client(b.frontend)
            wait_workers(client, 1)
            client.send(infer("a", "slow"), features())
            # (no service time measured yet: admitted on the 50 ms guess; once it can no longer
            # start in time, the re-check refuses it before its deadline, never `timeout` at it:
            # the sweep answers a passed deadline before it re-checks, admission.py)
            client.send(infer("a", "queued", deadline_ms=300), features())
            r, _ = client.recv(2)
            assert r["id"] == "queued" and r["error"]["code"] == "overloaded", r
            assert r["error"]["details"]["queue"] == "recheck"
            r, _ = client.recv(2)
            assert r["id"] == "slow" and r["ok"]
            # In flight past its deadline: the client hears `timeout` at the deadline, once.
            client.send(infer("a", "inflight", deadline_ms=200), features())
            t0 = time.monotonic()
            r, _ = client.recv(2)
            assert r["id"] == "inflight" and r["error"]["code"] == "timeout"
            assert 0.15 < time.monotonic() - t0 < 0.45
            assert client.nothing_within(0.6)  # the worker's late success is discarded
            assert call_infer(client, "a", "after")["ok"]  # and its credit came back
            client.close()


def test_no_worker_means_unavailable_after_a_grace_period():
    with BrokerThread(catalog_of("a"), no_worker_grace_s=0.3) as b:
        client = Client(b.frontend)
        client.send(infer("a", 1), features())
        r, _ = client.recv(3)
        assert r["error"]["code"] == "unavailable" and "no worker" in r["error"]["message"]
        client.close()
