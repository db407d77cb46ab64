"""Admission that keeps its word (broker/admission.py): the learned distributions, the rule, the
re-check of queued requests with an injected clock (in-process, no sleeps), and one real broker
showing an early refusal when a model turns slow (marked `processes`)."""
from __future__ import annotations

import time

import pytest

from lipsync_cluster.broker.admission import (DEFAULT_LOAD_S, MARGIN_MAX, MARGIN_MIN_SAMPLES, SATURATED_S,
                                              Admission, Dist, QueueView)
from lipsync_cluster.broker.dispatch import Dispatcher
from lipsync_cluster.broker.queues import ModelQueues
from lipsync_cluster.broker.requests import ClientRequest
from lipsync_cluster.broker.stats import BrokerStats
from lipsync_cluster.broker.workers import Worker
from lipsync_cluster.common.errors import Overloaded

try:
    from test_broker_support import BrokerThread, Client, WorkerThread, catalog_of, features, infer, make_config, \
        wait_workers
except ImportError:  # tests/ imported as a package
    from tests.test_broker_support import BrokerThread, Client, WorkerThread, catalog_of, features, infer, \
        make_config, wait_workers


def view(**kw) -> QueueView:
    base = dict(credits=4, in_flight=0, queued=0, depth=0, holder_credits=2, saturated_s=0.0)
    return QueueView(**{**base, **kw})


# --- the learned distributions -------------------------------------------------------------------

def test_dist_learns_mean_and_spread_and_its_high_value_sits_above_the_mean():
    d = Dist(alpha=0.1)
    for i in range(400):
        d.observe(1.0 if i % 2 else 3.0)  # mean 2, standard deviation 1
    assert d.mean == pytest.approx(2.0, abs=0.15)
    assert d.sd == pytest.approx(1.0, abs=0.15)
    assert d.high() == pytest.approx(2.0 + 1.2816, abs=0.3)
    one = Dist()
    one.observe(0.5)  # one sample: never assumed exact (a floor on the spread)
    assert one.high() > 0.5


def test_dist_follows_a_change_within_a_few_dozen_samples():
    d = Dist(alpha=0.1)
    for _ in range(50):
        d.observe(0.1)
    for _ in range(40):
        d.observe(1.0)
    assert d.mean > 0.95


def test_service_excludes_the_load_and_each_has_its_own_distribution():
    a = Admission()
    assert a.service_mean("m") == pytest.approx(0.05) and a.load_high("m") == DEFAULT_LOAD_S  # nothing known
    a.served("m", 1.2, load_s=1.0)  # a cold request: 1 s of its 1.2 s was the load
    a.served("m", 0.2)
    assert a.service_mean("m") == pytest.approx(0.2)
    assert a.load_high("m") >= 1.0
    assert a.service_mean("other") == pytest.approx(0.2)  # a model not measured: every model's
    assert a.load_high("other") >= 1.0


# --- the rule at admission ----------------------------------------------------------------------

def test_admits_what_fits_in_the_target_share_of_the_deadline_and_refuses_the_rest():
    a = Admission(target=0.8)
    for _ in range(20):
        a.served("m", 0.5)
    # 6 requests of 0.5 s queued ahead and 2 running, through 4 credits: a wait of 1 s, then its
    # own 0.5 s (+ spread).
    assert a.check("m", 3.0, view(queued=6, in_flight=2)) == pytest.approx(1.0)
    assert a.check("m", 2.0, view(queued=6, in_flight=2)) == pytest.approx(1.0)  # about 1.56 s < 1.6 s
    with pytest.raises(Overloaded) as exc:
        a.check("m", 1.9, view(queued=6, in_flight=2))  # about 1.56 s > 0.8 x 1.9 s
    assert exc.value.details["queue"] == "wait" and exc.value.details["retry_after_ms"] >= 10
    assert "past 80% of the request's deadline" in exc.value.message


def test_its_own_model_queue_counts_when_longer_than_the_cluster_wide_wait():
    a = Admission()
    for _ in range(20):
        a.served("m", 0.5)
    # Nothing else queued, but 6 of its own wait for the 1 credit of its single copy: 3 s.
    assert a.check("m", 10.0, view(depth=6, holder_credits=1)) == pytest.approx(3.0)
    with pytest.raises(Overloaded):
        a.check("m", 4.0, view(depth=6, holder_credits=1))


def test_a_cold_model_counts_its_load_and_is_refused_while_the_cluster_stays_saturated():
    a = Admission()
    for _ in range(20):
        a.served("m", 0.2)
        a.served("x", 1.2, load_s=1.0)  # loads take 1 s
    a.check("cold", 2.0, view(holder_credits=0))  # 0.2 + 1.0 (+ spreads) < 1.6
    with pytest.raises(Overloaded, match="a load"):
        a.check("cold", 1.5, view(holder_credits=0))  # the same, held, would fit: a.check("m", 1.5, ...)
    a.check("m", 1.5, view())
    with pytest.raises(Overloaded, match="no worker holds model"):
        a.check("cold", 60.0, view(holder_credits=0, saturated_s=SATURATED_S + 0.1))


def test_the_margin_learns_that_the_queue_moves_slower_than_predicted():
    a = Admission()
    for _ in range(20):
        a.served("m", 0.5)
    busy = view(queued=12)  # a predicted wait of 1.5 s: finishes in about 2.1 s
    a.check("m", 3.0, busy)
    assert a.margin() == 1.0
    for _ in range(MARGIN_MIN_SAMPLES - 1):
        a.waited(1.5, 3.0)  # they really waited twice as long
    assert a.margin() == 1.0, "too few observations to count yet"
    for _ in range(30):
        a.waited(0.1, 5.0)  # predictions this short are noise: they teach nothing
    assert a.ratio.n == MARGIN_MIN_SAMPLES - 1
    for _ in range(30):
        a.waited(1.5, 3.0)
    assert 2.0 <= a.margin() <= MARGIN_MAX
    with pytest.raises(Overloaded, match="margin"):
        a.check("m", 3.0, busy)
    for _ in range(200):
        a.waited(1.5, 1.0)  # faster than predicted: the margin never goes below 1
    assert a.margin() == 1.0
    for _ in range(200):
        a.waited(0.5, 50.0)  # wildly off: clamped
    assert a.margin() == MARGIN_MAX


# --- the re-check ------------------------------------------------------------------------------

def test_the_same_estimate_serves_admission_and_the_recheck_from_where_a_request_stands():
    a = Admission(target=0.8)
    for _ in range(20):
        a.served("m", 0.5)
    high = a.service_high("m")
    # 3 ahead (all models) and 1 running over 2 credits: 1 s; its own queue (2 ahead, 1 credit): 1 s.
    wait, finish = a.expect("m", credits=2, in_flight=1, ahead=3, ahead_model=2, holder_credits=1)
    assert wait == pytest.approx(1.0) and finish == pytest.approx(1.0 + high)
    # Its own model's queue through its single copy is longer: that counts.
    wait, _ = a.expect("m", credits=2, in_flight=1, ahead=3, ahead_model=6, holder_credits=1)
    assert wait == pytest.approx(3.0)
    # A cold model: a p90 load on top.
    for _ in range(20):
        a.served("x", 2.5, load_s=2.0)
    _, cold = a.expect("m", credits=2, in_flight=1, ahead=3, ahead_model=0, holder_credits=0)
    assert cold == pytest.approx(1.0 + a.cold_high("m"))
    # The p90 of a load then a service: above both means, below the sum of both p90s.
    assert 2.0 + 0.5 < a.cold_high("m") < a.load_high("m") + high
    err = a.refusal("m", 3.0, 5.0, 4.0, 4.6)
    assert err.code == "overloaded" and err.details["queue"] == "recheck" and a.refused_late == 1
    assert "(80% of its deadline of 5.00 s)" in err.message


def test_start_finish_at_dispatch_counts_the_current_service_and_a_cold_load():
    a = Admission(target=0.8)
    for _ in range(20):
        a.served("m", 0.5, load_s=None)
        a.served("x", 1.5, load_s=1.0)
    due = a.due(100.0, 5.0)
    assert due == pytest.approx(104.0)
    assert a.start_finish("m", 103.0, cold=False) == pytest.approx(103.0 + a.service_high("m"))
    assert 103.5 < a.start_finish("m", 103.0, cold=False) < due
    assert a.start_finish("m", 103.0, cold=True) > due  # a 1 s load does not fit any more
    assert a.start_finish("m", 103.6, cold=False) > due


def test_queues_prune_late_removes_by_expected_finish_and_asks_only_requests_with_a_due_time():
    q = ModelQueues(100, 100)
    reqs = [ClientRequest(i, b"c", i, "infer", "a" if i < 4 else "b", {}, [], 0.0, 10.0) for i in range(6)]
    for p in reqs:
        p.due = 8.0
        q.push(p)
    reqs[5].due = float("inf")  # untimed: never asked, never late
    asked = []

    def finish(p, ahead):  # a: the i-th finishes at 7 + 0.6 i (the third and fourth pass 8); b: at 9
        asked.append(p.rid)
        return 7.0 + 0.6 * ahead if p.model == "a" else 9.0

    gone = q.prune_late(finish)
    assert [(p.rid, round(t, 1)) for p, t in gone] == [(2, 8.2), (3, 8.8), (4, 9.0)]
    assert 5 not in asked
    assert q.total == 3 and q.depth("a") == 2 and q.depth("b") == 1
    assert [p.rid for p in q.expire(10.0)] == [0, 1, 5] and q.total == 0


def test_queues_prune_late_with_slack_keeps_what_is_only_a_little_past_its_due_time():
    q = ModelQueues(100, 100)
    p = ClientRequest(1, b"c", 1, "infer", "a", {}, [], 100.0, 105.0)
    p.due = 104.0
    q.push(p)
    assert q.prune_late(lambda p, ahead: 104.3, slack=0.1) == []  # within 104 + 0.1 x 4 s
    assert [r.rid for r, _ in q.prune_late(lambda p, ahead: 104.5, slack=0.1)] == [1]


class _Clocked:
    """A Dispatcher with one worker (1 credit, model ``a`` loaded) and no sockets: what it sends
    is recorded; time is whatever the test says (``now`` arguments and request arrivals)."""

    def __init__(self) -> None:
        self.replies: list[dict] = []
        self.legs: list[list] = []
        cfg = make_config()
        self.d = Dispatcher(cfg, BrokerStats(0.0), lambda: catalog_of("a"),
                            send_client=lambda client, header, payloads=(): self.replies.append(header),
                            send_worker=lambda w, frames: self.legs.append(frames) or True,
                            default_deadline_s=120.0, lfu_half_life_s=300.0, no_worker_grace_s=10.0)
        self.w = Worker(b"w0", "w0", credits=1, max_models=1, loaded=("a",), now=0.0)
        self.d.table.add(self.w)
        self.d.no_workers_since = None
        self.rid = 0

    def request(self, arrival: float, deadline_s: float) -> ClientRequest:
        self.rid += 1
        p = ClientRequest(self.rid, b"client", self.rid, "infer", "a", infer("a", self.rid, deadline_ms=deadline_s * 1e3), [], arrival,
                          arrival + deadline_s)
        p.frames = 1
        self.d.admit(p)
        return p

    def reply(self, p: ClientRequest, now: float) -> None:
        """The worker answers ``p`` (as Dispatcher.replied does, at ``now``)."""
        assert self.w.finish(p.rid) is p
        self.d.admission.served(p.model, now - p.dispatched_at)
        p.finish(self.d, {"ok": True}, now=now)


def test_a_queued_request_is_refused_early_when_the_queue_moves_slower_than_admission_expected():
    c = _Clocked()
    adm = c.d.admission
    for _ in range(20):
        adm.served("a", 0.1)  # learned: 0.1 s per request
    first = c.request(100.0, 2.0)  # dispatched at once (the credit was free)
    queued = [c.request(100.0 + 0.01 * i, 2.0) for i in range(1, 4)]  # 3 queued: ~0.4 s, admitted
    assert len(c.legs) == 1 and c.d.queues.depth("a") == 3 and not c.replies
    assert all(p.expect_s >= 0 for p in queued)
    # The model turns slow: the first request takes 1.2 s where 0.1 s was expected.
    c.d.sweep(100.5)
    assert not c.replies, "nothing is late yet"
    c.reply(first, 101.2)
    assert c.d.admission.service_high("a") > 0.4  # learned at once: the spread widened
    c.d.sweep(101.2)  # the re-check, 0.8 s before their deadlines
    assert [r["id"] for r in c.replies if not r.get("ok")] == [p.rid for p in queued]
    for r in c.replies[1:]:
        err = r["error"]
        assert err["code"] == "overloaded" and err["details"]["queue"] == "recheck", r
        assert "(80% of its deadline of 2.00 s)" in err["message"]
    assert c.d.queues.total == 0 and adm.refused_late == 3
    assert adm.summary()["refused_from_queue"] == 3 and adm.summary()["target"] == 0.8
    # The margin learned from the one whose predicted wait (0.3 s) was long enough to count.
    assert adm.ratio.n == 1 and adm.ratio.mean > 0, "it waited longer than predicted"
    c.d.sweep(102.5)  # their deadlines pass: nothing is answered a second time (no `timeout`)
    assert len(c.replies) == 4


def test_a_queued_request_starts_when_its_latest_start_still_keeps_the_target():
    c = _Clocked()
    for _ in range(20):
        c.d.admission.served("a", 0.5)
    first = c.request(100.0, 5.0)
    second = c.request(100.0, 5.0)
    c.reply(first, 100.5)
    c.d.sweep(100.5)
    c.d.dispatch(100.5)
    assert second.worker == "w0" and len(c.legs) == 2 and not [r for r in c.replies if not r.get("ok")]
    c.reply(second, 101.0)
    third = c.request(101.0, 5.0)  # sent at once
    fourth = c.request(101.0, 5.0)  # queued: due at 105.0, so it must start by about 104.4
    assert third.worker == "w0" and fourth.worker is None
    c.reply(third, 104.5)  # far slower than expected
    c.d.dispatch(104.5)  # starting now misses the target: refused at dispatch, not sent
    assert fourth.worker is None and c.replies[-1]["error"]["details"]["queue"] == "recheck"


@pytest.mark.processes
def test_a_real_broker_refuses_early_a_request_that_can_no_longer_make_its_deadline():
    """A model that turns 10x slower than the broker learned: the requests admitted behind it
    are answered `overloaded` (re-check) before their deadline, none waits it out as `timeout`."""
    with BrokerThread(catalog_of("a")) as b:
        with WorkerThread(b.backend, "w0", credits=1, sleep_s=0.05) as w:
            client = Client(b.frontend)
            try:
                wait_workers(client, 1)
                for i in range(5):  # the broker learns about 0.05 s per request
                    assert client.call(infer("a", f"warm{i}"), features(), timeout=10)["ok"]
                w.handler.sleep_s = 0.6
                sent = {}
                for i in range(6):  # admitted: about 0.3 s of queue against a 3 s deadline
                    sent[i] = time.monotonic()
                    client.send(dict(infer("a", i), deadline_ms=3000), features())
                got = {}
                for _ in range(6):
                    reply, _ = client.recv(10)
                    got[reply["id"]] = (reply, time.monotonic())
                codes = [r["error"]["code"] if not r["ok"] else "ok" for r, _ in got.values()]
                assert "timeout" not in codes, codes
                early = [(i, r, t) for i, (r, t) in got.items()
                         if not r["ok"] and r["error"]["details"].get("queue") == "recheck"]
                assert early, codes  # at 0.6 s each, the last ones cannot start by 2.4 s - service
                for i, r, t in early:
                    assert r["error"]["code"] == "overloaded"
                    assert t - sent[i] < 3.0, "told before the deadline, not at it"
                assert got[0][0]["ok"], "the first was sent at once and is served"
            finally:
                client.close()


def test_a_cold_model_whose_load_cannot_fit_is_refused_at_once_not_sent():
    c = _Clocked()
    c.d.table.remove(b"w0")
    w = Worker(b"w1", "w1", credits=1, max_models=2, now=0.0)  # a free slot: "b" would be placed
    c.d.table.add(w)
    for _ in range(20):
        c.d.admission.served("x", 2.5, load_s=2.0)  # loads take about 2 s, service 0.5 s
    p = ClientRequest(1, b"client", 1, "infer", "b", infer("b", 1, deadline_ms=2500), [], 100.0, 102.5)
    c.d.admit(p)  # 2 s + 0.5 s (p90: more) > 0.8 x 2.5 s
    assert not c.legs and p.worker is None
    err = c.replies[-1]["error"]
    assert err["code"] == "overloaded" and err["details"]["queue"] == "wait" and "must be loaded first" in err["message"]
    q = ClientRequest(2, b"client", 2, "infer", "b", infer("b", 2, deadline_ms=5000), [], 100.0, 105.0)
    c.d.admit(q)  # fits 4 s: sent, the worker loads it
    assert q.worker == "w1" and len(c.legs) == 1

