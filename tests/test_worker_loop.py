"""WorkerLoop against a hand-driven broker ROUTER socket (real sockets, real threads)."""
from __future__ import annotations

import statistics
import threading
import time
from typing import Any, Optional

import msgpack
import pytest
import zmq

from lipsync_cluster.common import protocol
from lipsync_cluster.common.errors import CapacityFull
from lipsync_cluster.worker.loop import RequestHandler, WorkerLoop
from lipsync_cluster.worker.noop import NoopHandler
from waiting import wait_until

HB = 0.1


class FakeBroker:
    """A ROUTER the worker connects to; the test plays the broker."""

    def __init__(self) -> None:
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.identity: Optional[bytes] = None
        self.seen: list[dict] = []

    def recv(self, timeout: float = 3.0) -> tuple[dict, list]:
        if not self.sock.poll(int(timeout * 1000)):
            raise AssertionError(f"no message from the worker within {timeout} s")
        ident, *frames = self.sock.recv_multipart()
        header, payloads = protocol.decode(frames)
        self.identity = ident if header.get("op") == "ready" else self.identity
        self.seen.append(header)
        return header, payloads

    def next(self, op: str, timeout: float = 3.0) -> tuple[dict, list]:
        deadline = time.monotonic() + timeout
        while True:
            header, payloads = self.recv(max(0.01, deadline - time.monotonic()))
            if header.get("op") == op:
                return header, payloads

    def send(self, header: dict, payloads: list = ()) -> None:
        self.sock.send_multipart([self.identity, *protocol.encode(header, list(payloads))])

    def request(self, rid: int, client_op: str = "infer", model: str = "a", **fields: Any) -> None:
        self.send({"op": "request", "rid": rid, "id": f"c{rid}", "client_op": client_op,
                   "model_id": model, "deadline_left_ms": None, **fields})

    def close(self) -> None:
        self.sock.close(linger=0)


class Running:
    def __init__(self, endpoint: str, handler: Any, **kw: Any) -> None:
        kw.setdefault("heartbeat_interval_s", HB)
        kw.setdefault("drain_timeout_s", 5.0)
        self.loop = WorkerLoop(endpoint, handler, name=kw.pop("name", "wt"), **kw)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.loop.run, args=(self.stop_event,), daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive()


@pytest.fixture
def broker():
    b = FakeBroker()
    yield b
    b.close()


def test_noop_handler_satisfies_the_protocol():
    assert isinstance(NoopHandler(), RequestHandler)


def test_ready_heartbeats_and_stats(broker):
    w = Running(broker.endpoint, NoopHandler(max_models=2, preload=("x",)), name="w7", credits=3, gpu=1)
    try:
        ready, _ = broker.next("ready")
        assert ready["worker"] == "w7" and ready["credits"] == 3 and ready["gpu"] == 1
        assert ready["pid"] > 0 and ready["host"] and ready["max_models"] == 2 and ready["loaded"] == ["x"]
        stats, _ = broker.next("stats")
        assert stats["worker"] == "w7" and stats["max_models"] == 2 and stats["models"][0]["model_id"] == "x"
        t0 = time.monotonic()
        for _ in range(3):
            broker.send({"op": "heartbeat"})
            hb, _ = broker.next("heartbeat")
        assert hb["loaded"] == ["x"] and hb["in_flight"] == 0 and hb["draining"] is False
        assert time.monotonic() - t0 < 0.6
    finally:
        w.stop()


def test_runs_up_to_credits_requests_at_once(broker):
    w = Running(broker.endpoint, NoopHandler(sleep_s=0.3, preload=("a",)), credits=2)
    try:
        broker.next("ready")
        t0 = time.monotonic()
        for rid in (1, 2, 3):
            broker.request(rid)
        done = {}
        while len(done) < 3:
            header, _ = broker.next("reply")
            done[header["rid"]] = time.monotonic() - t0
            assert header["ok"] and header["id"] == f"c{header['rid']}" and header["worker"] == "wt"
        assert done[1] < 0.45 and done[2] < 0.45  # two at once...
        assert done[3] > 0.55                    # ...the third waits for a free executor
    finally:
        w.stop()


def test_events_are_forwarded_in_order_before_the_reply(broker):
    w = Running(broker.endpoint, NoopHandler(max_models=1, preload=("old",)))
    try:
        broker.next("ready")
        broker.request(1, model="new", evict_hint="old")
        ops = []
        while True:
            header, _ = broker.recv()
            if header["op"] == "event":
                ops.append((header["event"], header["model_id"], header["worker"]))
            if header["op"] == "reply":
                break
        assert ops == [("loading", "new", "wt"), ("evicted", "old", "wt"), ("loaded", "new", "wt")]
        assert header["ok"] and header["model_loaded"] is True
    finally:
        w.stop()


class Flaky(NoopHandler):
    def handle(self, header: dict, payloads: list):
        if header.get("model_id") == "crash":
            raise RuntimeError("kaboom")
        if header.get("model_id") == "full":
            raise CapacityFull("no room", needed_mb=10)
        return super().handle(header, payloads)


def test_handler_errors_become_error_replies_and_the_worker_keeps_serving(broker):
    w = Running(broker.endpoint, Flaky())
    try:
        broker.next("ready")
        broker.request(1, model="crash")
        r, _ = broker.next("reply")
        assert r["rid"] == 1 and r["ok"] is False and r["error"]["code"] == "internal"
        assert "kaboom" in r["error"]["message"]
        broker.request(2, model="full")
        r, _ = broker.next("reply")
        assert r["error"] == {"code": "capacity_full", "message": "no room", "details": {"needed_mb": 10}}
        broker.request(3, client_op="dance")
        r, _ = broker.next("reply")
        assert r["error"]["code"] == "bad_request" and "client_op" in r["error"]["message"]
        broker.request(4, deadline_left_ms=-1000)  # the time left, counted from arrival
        r, _ = broker.next("reply")
        assert r["error"]["code"] == "timeout"
        broker.send({"op": "nonsense"})
        broker.sock.send_multipart([broker.identity, b"JUNK", b"x"])
        broker.request(5, model="a")
        r, _ = broker.next("reply")
        assert r["rid"] == 5 and r["ok"]
    finally:
        w.stop()


def test_payloads_pass_through_and_replies_leave_without_polling_delay(broker):
    w = Running(broker.endpoint, NoopHandler(echo=True, preload=("a",)))
    try:
        broker.next("ready")
        blob = bytes(range(256)) * 4096  # 1 MB
        broker.send({"op": "request", "rid": 1, "id": "x", "client_op": "infer", "model_id": "a"}, [blob])
        r, payloads = broker.next("reply")
        assert r["sizes"] == [len(blob)] and payloads == [blob]
        rtts = []
        for rid in range(2, 202):
            t0 = time.perf_counter()
            broker.request(rid)
            broker.next("reply")
            rtts.append(time.perf_counter() - t0)
        # The loop polls at most every 50 ms; a reply must not wait for that.
        assert statistics.median(rtts) < 0.005, statistics.median(rtts)
    finally:
        w.stop()


def test_reconnects_with_backoff_when_the_broker_is_silent(broker):
    w = Running(broker.endpoint, NoopHandler(), heartbeat_liveness=2)
    try:
        first, _ = broker.next("ready")
        id1 = broker.identity
        t0 = time.monotonic()
        second, _ = broker.next("ready", timeout=2)  # silent for 2 x 0.1 s -> re-register
        id2 = broker.identity
        t1 = time.monotonic()
        broker.next("ready", timeout=3)
        t2 = time.monotonic()
        assert id1 != id2 and 0.1 < t1 - t0 < 0.6
        assert (t2 - t1) > 1.5 * (t1 - t0)  # waits longer each time
        # A live broker keeps it: heartbeats from us reset its clock; no new ready.
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:
            broker.send({"op": "heartbeat"})
            header, _ = broker.recv()
            assert header["op"] != "ready"
    finally:
        w.stop()


def test_disconnect_from_the_broker_means_register_again(broker):
    w = Running(broker.endpoint, NoopHandler())
    try:
        broker.next("ready")
        old = broker.identity
        broker.send({"op": "disconnect"})
        t0 = time.monotonic()
        broker.next("ready", timeout=1)
        assert broker.identity != old and time.monotonic() - t0 < 0.2
    finally:
        w.stop()


def test_stop_finishes_in_flight_work_then_says_disconnect(broker):
    w = Running(broker.endpoint, NoopHandler(sleep_s=0.3, preload=("a",)))
    broker.next("ready")
    broker.request(1)
    wait_until(lambda: w.loop.in_flight >= 1, 3, "request 1 in the worker's hands")
    w.stop_event.set()
    hb, _ = broker.next("heartbeat")
    assert hb["draining"] is True
    broker.request(2)  # already on its way when the broker learned: still served
    got = []
    while True:
        header, _ = broker.recv()
        if header["op"] == "reply":
            got.append(header["rid"])
        if header["op"] == "disconnect":
            break
    assert sorted(got) == [1, 2]
    w.thread.join(3)
    assert not w.thread.is_alive()


def test_replies_flushed_just_before_a_reconnect_still_leave_on_the_old_socket(broker):
    """A reconnect replaces the socket right after the loop handed it replies (a worker thawed from a
    freeze flushes its reply, then finds the broker silent): they must still go out, not be
    discarded with the old socket (the broker counts them late; it never loses track of work)."""
    loop = WorkerLoop(broker.endpoint, NoopHandler(), name="wr", credits=1)
    loop._connect()
    broker.next("ready")
    n = 300
    loop.in_flight = n
    for rid in range(n):
        loop._emit(True, [protocol.TAG, msgpack.packb({"op": "reply", "rid": rid, "id": rid, "ok": True}),
                          b"x" * 2000])
    loop._flush()
    loop._connect()  # the old socket closes now, its queue not yet written out
    try:
        rids = []
        while len(rids) < n:
            header, _ = broker.recv(5.0)
            if header["op"] == "reply":
                rids.append(header["rid"])
        assert rids == list(range(n))
    finally:
        loop._sock.close(linger=0)
