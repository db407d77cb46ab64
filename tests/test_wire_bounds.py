"""Bounds at the wire: header size before unpacking, worker events, deadlines as time left.

Real sockets throughout: a broker thread with clients and hand-driven worker sockets, and a
WorkerLoop against a hand-driven broker socket.
"""
from __future__ import annotations

import struct
import threading
import time

import msgpack
import zmq

from lipsync_cluster.common import protocol
from lipsync_cluster.common.wire import MAX_HEADER_BYTES, MAX_LEG_HEADER_BYTES, MAX_WORKER_HEADER_BYTES
from lipsync_cluster.worker.loop import WorkerLoop
from lipsync_cluster.worker.noop import NoopHandler
from test_broker_support import BrokerThread, Client, catalog_of, features, wait_for

NIL_ARRAY_MB = 190


def nil_array(count: int) -> bytes:
    """A msgpack array32 of ``count`` nils: one byte per element, a huge list when unpacked."""
    return b"\xdd" + struct.pack(">I", count) + b"\xc0" * count


def test_a_huge_header_is_refused_before_unpacking_and_health_keeps_answering():
    with BrokerThread(catalog_of("a")) as b:
        attacker, prober = Client(b.frontend), Client(b.frontend)
        latencies: list[float] = []
        done = threading.Event()

        def probe() -> None:
            i = 0
            while not done.is_set():
                t0 = time.monotonic()
                reply = prober.call({"id": i, "op": "health"}, timeout=5)
                latencies.append(time.monotonic() - t0)
                assert reply["live"]
                i += 1
                time.sleep(0.02)

        prober_thread = threading.Thread(target=probe, daemon=True)
        try:
            assert prober.call({"id": "first", "op": "health"})["live"]
            prober_thread.start()
            header = nil_array(NIL_ARRAY_MB * 10**6)
            for _ in range(2):
                attacker.send_raw([protocol.TAG, header])
            for _ in range(2):
                reply, _ = attacker.recv(10)
                assert reply["ok"] is False and reply["error"]["code"] == "bad_request", reply
                assert "header" in reply["error"]["message"] and str(MAX_HEADER_BYTES) in reply["error"]["message"]
            del header
            wait_for(lambda: len(latencies) >= 5, 5, "health probes")
        finally:
            done.set()
            prober_thread.join(10)
            attacker.close()
            prober.close()
        assert max(latencies) < 1.0, f"health took {max(latencies):.2f} s while the big headers arrived"
        # A header just under the cap is unpacked once and refused for what it says.
        with_room = Client(b.frontend)
        try:
            big_but_allowed = msgpack.packb({"id": 1, "op": "health", "pad": "x" * (MAX_HEADER_BYTES - 100)})
            with_room.send_raw([protocol.TAG, big_but_allowed])
            assert with_room.recv()[0]["live"]
            with_room.send_raw([protocol.TAG, msgpack.packb([1, 2, 3])])
            reply, _ = with_room.recv()
            assert reply["error"]["code"] == "bad_request" and "map" in reply["error"]["message"]
        finally:
            with_room.close()


class HandBroker:
    """A ROUTER the worker connects to; the test plays the broker."""

    def __init__(self) -> None:
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.identity = b""

    def next(self, op: str, timeout: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(50):
                identity, *frames = self.sock.recv_multipart()
                header, _ = protocol.decode(frames)
                if header.get("op") == "ready":
                    self.identity = identity
                if header.get("op") == op:
                    return header
        raise AssertionError(f"no {op!r} from the worker within {timeout} s")

    def request(self, rid: int, **fields) -> None:
        header = {"op": "request", "client_op": "infer", "rid": rid, "id": rid, "model_id": "a",
                  "batch_size": 1, **fields}
        payloads = protocol.attach_arrays(header, features())
        self.sock.send_multipart([self.identity, *protocol.encode(header, payloads)])


def run_worker(endpoint: str) -> tuple[threading.Event, threading.Thread]:
    loop = WorkerLoop(endpoint, NoopHandler(), name="w", heartbeat_interval_s=0.1)
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    thread.start()
    return stop, thread


def test_the_worker_refuses_an_oversized_header_and_keeps_serving():
    broker = HandBroker()
    stop, thread = run_worker(broker.endpoint)
    try:
        broker.next("ready")
        broker.request(1, pad="x" * (MAX_LEG_HEADER_BYTES + 1))  # dropped unread, with a warning
        broker.sock.send_multipart([broker.identity, protocol.TAG, nil_array(10**6)])
        broker.request(2)
        reply = broker.next("reply")
        assert reply["rid"] == 2 and reply["ok"], reply
    finally:
        stop.set()
        thread.join(10)
        broker.sock.close(linger=0)


def test_deadlines_travel_as_the_time_left_not_a_wall_clock_instant():
    broker = HandBroker()
    stop, thread = run_worker(broker.endpoint)
    try:
        broker.next("ready")
        # A wall-clock instant from a host whose clock is an hour behind means nothing any more ...
        broker.request(1, deadline=time.time() - 3600, deadline_left_ms=5000)
        assert broker.next("reply")["ok"]
        # ... the time left, counted from arrival on this host's clock, is what counts.
        broker.request(2, deadline=time.time() + 3600, deadline_left_ms=0)
        reply = broker.next("reply")
        assert reply["rid"] == 2 and reply["error"]["code"] == "timeout", reply
    finally:
        stop.set()
        thread.join(10)
        broker.sock.close(linger=0)
    # The broker sends the time left, never its clock. (Slow heartbeats: the hand worker is silent.)
    with BrokerThread(catalog_of("a"), heartbeat_interval_s=2.0) as b:
        client = Client(b.frontend)
        worker = zmq.Context.instance().socket(zmq.DEALER)
        worker.setsockopt(zmq.LINGER, 0)
        worker.connect(b.backend)
        try:
            worker.send_multipart(protocol.encode({"op": "ready", "worker": "hand", "credits": 1, "max_models": 2,
                                                   "loaded": ["a"]}))
            wait_for(lambda: client.call({"id": "h", "op": "health"})["workers"] == 1, 5, "registration")
            client.send({"id": 1, "op": "infer", "model_id": "a", "batch_size": 1, "deadline_ms": 4000}, features())
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                assert worker.poll(5000)
                leg, _ = protocol.decode(worker.recv_multipart())
                if leg.get("op") == "request":
                    break
            assert "deadline" not in leg and 3000 < leg["deadline_left_ms"] <= 4000, leg
        finally:
            worker.close(linger=0)
            client.close()


def test_worker_events_are_checked_and_bounded_before_the_broker_keeps_them():
    with BrokerThread(catalog_of("a"), heartbeat_interval_s=2.0) as b:
        client = Client(b.frontend)
        worker = zmq.Context.instance().socket(zmq.DEALER)
        worker.setsockopt(zmq.LINGER, 0)
        worker.connect(b.backend)

        def send(header: dict) -> None:
            worker.send_multipart(protocol.encode(header))

        try:
            send({"op": "ready", "worker": "hand", "credits": 1, "max_models": 2, "loaded": []})
            wait_for(lambda: client.call({"id": "h", "op": "health"})["workers"] == 1, 5, "registration")
            junk = "j" * (MAX_WORKER_HEADER_BYTES // 5)  # four of them: just under the header cap
            for i in range(20):  # as large as a worker message may be, and full of what events never carry
                send({"op": "event", "event": "loaded", "model_id": "a", "version": junk, "reason": junk,
                      "load_ms": 12.5, "extra": junk, "loaded": ["a", "NOT_AN_ID", 7] * 100,
                      "nested": {"deep": [junk]}})
            send({"op": "event", "event": "loaded", "model_id": "a", "reason": "x" * (10 * 2**20)})  # over the cap
            send({"op": "event", "event": "exploded", "model_id": "a"})
            send({"op": "event", "event": "loaded", "model_id": "a\n"})
            send({"op": "event", "event": ["loaded"], "model_id": "a"})
            send({"op": "event", "event": "evicted", "model_id": "a", "time": float("nan"), "reason": "done"})
            events = wait_for(lambda: [e for e in list(b.broker.stats.events) if e.get("event") == "evicted"]
                              and list(b.broker.stats.events), 5, "the last event")
            model_events = [e for e in events if e.get("worker") == "hand" and "model_id" in e]
            assert len(model_events) == 21, [e.get("event") for e in model_events]
            assert [e["event"] for e in model_events] == ["loaded"] * 20 + ["evicted"]
            for e in model_events:
                assert set(e) <= {"event", "model_id", "version", "reason", "load_ms", "loaded", "worker", "time"}
                assert len(msgpack.packb(e)) < 4096, len(msgpack.packb(e))
            assert model_events[0]["loaded"] == ["a"] * 100 and model_events[0]["load_ms"] == 12.5
            assert isinstance(model_events[-1]["time"], float) and model_events[-1]["time"] == model_events[-1]["time"]
            assert client.call({"id": "h2", "op": "health"})["live"]
        finally:
            worker.close(linger=0)
            client.close()
