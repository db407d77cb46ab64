"""Several worker legs (or replies) in one message (common/wire.py), with real sockets: a broker
thread and hand-driven worker sockets, and a WorkerLoop against a hand-driven broker socket."""
from __future__ import annotations

import msgpack
import pytest
import zmq

from lipsync_cluster.common import protocol
from lipsync_cluster.common.errors import BadRequest
from lipsync_cluster.common.wire import MAX_BATCH_ITEMS, TAG, batch_frames, split_batch, unbatch
from lipsync_cluster.worker.loop import WorkerLoop
from lipsync_cluster.worker.noop import NoopHandler
from test_broker_support import BrokerThread, Client, catalog_of, features, infer, wait_for
from test_worker_loop import FakeBroker, Running

PACKER = msgpack.Packer(use_bin_type=True)


def test_a_batch_splits_back_into_its_items_and_bad_counts_are_refused():
    items = [[b"h1"], [b"h2", b"p2a", b"p2b"], [b"h3", b"p3"]]
    frames = batch_frames("requests", items, PACKER)
    assert frames[0] == TAG
    header = msgpack.unpackb(frames[1])
    assert header == {"op": "requests", "frames": [1, 3, 2]}
    assert split_batch(header, frames, 2) == items
    for counts, why in (([1, 3, 1], "beyond"), ([1, 3, 3], "do not match"), ([0, 4, 2], "do not match"),
                        ([], "1 to"), ("3", "1 to"), ([1] * (MAX_BATCH_ITEMS + 1), "1 to"),
                        ([1, 3.0, 2], "do not match")):
        with pytest.raises(BadRequest, match=why) as err:
            split_batch({"op": "requests", "frames": counts}, frames, 2)
        assert "'frames'" in err.value.message or "frames" in err.value.message


def test_unbatch_serves_the_well_formed_items_and_says_why_it_skips_the_others():
    good = PACKER.pack({"op": "reply", "rid": 1})
    items = [[good, b"payload"], [b"\xc1"], [PACKER.pack({"op": "ready"})], [PACKER.pack({"op": "reply", "x": "y" * 300})]]
    frames = batch_frames("replies", items, PACKER)
    kept, skipped = unbatch(msgpack.unpackb(frames[1]), frames, 2, "reply", 256)
    assert kept == [({"op": "reply", "rid": 1}, [b"payload"])]
    assert len(skipped) == 3
    assert "item 1's header is not valid msgpack" in skipped[0]
    assert skipped[1] == "item 2 is op 'ready', not 'reply'"
    assert "item 3's header is" in skipped[2] and "the limit is 256 bytes" in skipped[2]


def _hand_worker(backend: str, name: str, credits: int, batches: bool) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(backend)
    ready = {"op": "ready", "worker": name, "credits": credits, "max_models": 2, "loaded": ["a"]}
    if batches:
        ready["batches"] = True
    sock.send_multipart(protocol.encode(ready))
    return sock


def _next_leg_message(sock: zmq.Socket) -> tuple[dict, list]:
    """The next ``request``/``requests`` message (heartbeats skipped)."""
    def leg():
        while sock.poll(0):
            frames = sock.recv_multipart()
            header = msgpack.unpackb(frames[1])
            if header["op"] in ("request", "requests"):
                return header, frames
        return None
    return wait_for(leg, 5, "a leg from the broker")


@pytest.mark.parametrize("batches", [True, False])
def test_legs_of_one_turn_go_as_one_message_to_a_worker_that_takes_batches(batches):
    """Requests queued before any worker are sent in one dispatch turn: one ``requests`` message to
    a worker that announced ``batches``, one ``request`` message each to one that did not; replies
    batched back reach each client with its own payload."""
    with BrokerThread(catalog_of("a"), heartbeat_interval_s=2.0) as b:
        client = Client(b.frontend)
        worker = None
        try:
            for i in range(3):
                client.send(infer("a", rid=i), features())
            wait_for(lambda: b.broker.queues.total == 3, 5, "three queued requests")
            worker = _hand_worker(b.backend, "hand", credits=3, batches=batches)
            header, frames = _next_leg_message(worker)
            if batches:
                assert header["op"] == "requests" and header["frames"] == [2, 2, 2], header
                legs = [msgpack.unpackb(item[0]) for item in split_batch(header, frames, 2)]
            else:
                legs = [header] + [_next_leg_message(worker)[0] for _ in range(2)]
                assert all(leg["op"] == "request" for leg in legs)
            assert sorted(leg["id"] for leg in legs) == [0, 1, 2]
            # Counted for /metrics: legs and the messages that carried them.
            assert (b.broker.stats.legs, b.broker.stats.leg_messages) == (3, 1 if batches else 3)
            replies = [[PACKER.pack({"op": "reply", "rid": leg["rid"], "id": leg["id"], "ok": True,
                                     "worker": "hand"}), f"payload-{leg['id']}".encode()] for leg in legs]
            if batches:
                worker.send_multipart(batch_frames("replies", replies, PACKER))
            else:
                for item in replies:
                    worker.send_multipart([TAG, *item])
            answers = {}
            for _ in range(3):
                reply, payloads = client.recv()
                answers[reply["id"]] = (reply["ok"], [bytes(p) for p in payloads])
            assert answers == {i: (True, [f"payload-{i}".encode()]) for i in range(3)}
            assert client.nothing_within(0.2)  # each answered once
        finally:
            client.close()
            if worker is not None:
                worker.close(linger=0)


def test_a_malformed_replies_batch_is_dropped_and_the_broker_keeps_serving():
    with BrokerThread(catalog_of("a"), heartbeat_interval_s=2.0) as b:
        client = Client(b.frontend)
        worker = _hand_worker(b.backend, "hand", credits=2, batches=True)
        try:
            wait_for(lambda: client.call({"id": "h", "op": "health"})["workers"] == 1, 5, "registration")
            client.send(infer("a", rid="x"), features())
            leg, _ = _next_leg_message(worker)
            good = PACKER.pack({"op": "reply", "rid": leg["rid"], "id": "x", "ok": True, "worker": "hand"})
            # Counts that do not match the frames, then an item that is not a reply: both dropped.
            worker.send_multipart([TAG, PACKER.pack({"op": "replies", "frames": [1, 5]}), good])
            worker.send_multipart(batch_frames("replies", [[PACKER.pack({"op": "ready"})]], PACKER))
            assert client.nothing_within(0.3)
            assert client.call({"id": "h2", "op": "health"})["workers"] == 1  # still serving
            worker.send_multipart(batch_frames("replies", [[good]], PACKER))
            reply, _ = client.recv()
            assert reply["id"] == "x" and reply["ok"], reply
        finally:
            client.close()
            worker.close(linger=0)


def test_the_worker_serves_each_leg_of_a_batch_and_batches_replies_only_to_a_broker_that_does():
    broker = FakeBroker()
    w = Running(broker.endpoint, NoopHandler(preload=("a",)), name="wb", credits=4, heartbeat_interval_s=2.0)
    try:
        ready, _ = broker.next("ready")
        assert ready["batches"] is True and w.loop._batches is False
        legs = [[PACKER.pack({"op": "request", "rid": r, "id": f"c{r}", "client_op": "infer", "model_id": "a",
                              "deadline_left_ms": None})] for r in (1, 2, 3)]
        legs.append([b"\x93not a map"])  # a malformed leg is skipped, the others served
        broker.sock.send_multipart([broker.identity, *batch_frames("requests", legs, PACKER)])
        replied: dict = {}
        while len(replied) < 3:
            header, payloads = broker.recv(2.0)
            if header["op"] == "reply":
                replied[header["rid"]] = replied.get(header["rid"], 0) + 1
            elif header["op"] == "replies":
                for item in split_batch(header, payloads, 0):
                    r = msgpack.unpackb(item[0])
                    assert r["op"] == "reply" and r["id"] == f"c{r['rid']}" and r["ok"], r
                    replied[r["rid"]] = replied.get(r["rid"], 0) + 1
        assert replied == {1: 1, 2: 1, 3: 1}
        assert w.loop._batches is True  # this broker sends batches, so it takes them
    finally:
        w.stop()
        broker.close()


@pytest.mark.parametrize("batches", [True, False])
def test_replies_ready_together_leave_as_one_batch_only_to_a_broker_that_sends_batches(batches):
    """The loop's flush, driven directly over a real DEALER/ROUTER pair: three replies and an event
    waiting together go as one ``replies`` batch then the event (order kept), or as four messages
    to a broker that never sent a batch (an older broker would drop a batch)."""
    broker = FakeBroker()
    loop = WorkerLoop(broker.endpoint, NoopHandler(), name="wf", credits=4)
    loop._sock = zmq.Context.instance().socket(zmq.DEALER)
    loop._sock.setsockopt(zmq.LINGER, 0)
    loop._sock.connect(broker.endpoint)
    try:
        loop._batches = batches
        loop.in_flight = 3
        for rid in (1, 2, 3):
            loop._emit(True, [TAG, PACKER.pack({"op": "reply", "rid": rid, "id": rid, "ok": True})])
        loop._emit(False, [TAG, PACKER.pack({"op": "event", "event": "loaded", "model_id": "a"})])
        loop._flush()
        got = [(header["op"], header.get("frames"), header.get("rid"))
               for header, _ in (broker.recv(2.0) for _ in range(2 if batches else 4))]
        assert not broker.sock.poll(100)  # nothing else
        if batches:
            assert got == [("replies", [1, 1, 1], None), ("event", None, None)]
        else:
            assert got == [("reply", None, 1), ("reply", None, 2), ("reply", None, 3), ("event", None, None)]
        assert loop.in_flight == 0 and loop.served == 3
    finally:
        loop._sock.close(linger=0)
        broker.close()
