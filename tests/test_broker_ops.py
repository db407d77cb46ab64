"""Every client op through a real broker and NoopHandler workers; validation; catalog; stats."""
from __future__ import annotations

import socket
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from lipsync_cluster.broker import BindError, Broker, run_broker
from lipsync_cluster.common import protocol

try:
    from test_broker_support import (BrokerThread, Client, WorkerThread, call_infer, catalog_of,
                                     features, infer, loaded_on, make_config, wait_for, wait_workers)
except ImportError:  # tests/ imported as a package
    from tests.test_broker_support import (BrokerThread, Client, WorkerThread, call_infer, catalog_of,
                                           features, infer, loaded_on, make_config, wait_for,
                                           wait_workers)


@pytest.fixture
def cluster():
    """A broker with models a, b, c and two workers (w0 on GPU 0, w1 on GPU 1)."""
    with BrokerThread(catalog_of("a", "b", "c")) as b:
        with WorkerThread(b.backend, "w0", gpu=0), WorkerThread(b.backend, "w1", gpu=1, echo=True):
            client = Client(b.frontend)
            wait_workers(client, 2)
            yield b, client
            client.close()


def test_health_ready_only_with_workers_and_preloads():
    with BrokerThread(catalog_of("a", "p", preload=("p",))) as b:
        client = Client(b.frontend)
        h = client.call({"id": 1, "op": "health"})
        assert h["ok"] and h["live"] is True and h["ready"] is False and h["workers"] == 0
        assert "no worker" in h["reason"]
        with WorkerThread(b.backend, "w0"):
            # The broker places the preload model itself; then the cluster is ready.
            h = wait_for(lambda: (lambda r: r if r["ready"] else None)(client.call({"id": 2, "op": "health"})),
                         5, "ready")
            assert h["workers"] == 1 and "reason" not in h
            assert loaded_on(client, "p") == ["w0"] and loaded_on(client, "a") == []
        client.close()


def test_infer_reply_and_large_payload_pass_through(cluster):
    b, client = cluster
    r = call_infer(client, "a", rid="req-1")
    assert r["ok"] is True and r["id"] == "req-1" and r["worker"] in ("w0", "w1")
    assert r["model_id"] == "a" and r["model_version"] == "v-a" and r["sizes"] == [32 * 16 * 16 * 4]
    # 1 MB through the echoing worker w1, byte-identical.
    client.call({"id": "l", "op": "load_model", "model_id": "b", "worker": "w1"})
    blob = np.random.default_rng(0).integers(0, 255, 2**20, dtype=np.uint8)
    header = infer("b", "big", format="raw")
    client.send(header, features(), payloads=[blob])  # a frame no tensor names: forwarded as it is
    reply, payloads = client.recv()
    assert reply["ok"] and reply["worker"] == "w1" and reply["sizes"][1] == 2**20
    assert bytes(payloads[1]) == blob.tobytes()


def test_list_models_shows_every_catalog_model_and_merged_stats(cluster):
    b, client = cluster
    for i in range(3):
        call_infer(client, "a", rid=i)
    models = {m["model_id"]: m for m in client.call({"id": 1, "op": "list_models"})["models"]}
    assert set(models) == {"a", "b", "c"}
    a = models["a"]
    assert a["loaded"] and len(a["loaded_on"]) == 1 and a["version"] == "v-a" and a["num_frames"] == 10
    assert a["stats"]["requests"] == 3 and a["stats"]["ok"] == 3 and a["stats"]["frames"] == 3
    assert not models["b"]["loaded"] and models["b"]["loaded_on"] == []
    # The worker's own numbers arrive with its periodic stats and are merged in.
    wait_for(lambda: next(m for m in client.call({"id": 2, "op": "list_models"})["models"]
                          if m["model_id"] == "a")["stats"].get("usage") == 3, 3, "worker stats merged")


def test_load_model_targets_and_force_reload(cluster):
    b, client = cluster
    r = client.call({"id": 1, "op": "load_model", "model_id": "a", "worker": "w1"})
    assert r["ok"] and r["workers"] == ["w1"] and r["model_id"] == "a" and "load_ms" in r
    r = client.call({"id": 2, "op": "load_model", "model_id": "b", "gpu": 0})
    assert r["ok"] and r["workers"] == ["w0"]
    assert loaded_on(client, "a") == ["w1"] and loaded_on(client, "b") == ["w0"]
    r = client.call({"id": 3, "op": "load_model", "model_id": "a", "force_reload": True})
    assert r["ok"] and r["workers"] == ["w1"] and r["already_loaded"] is False
    r = client.call({"id": 4, "op": "load_model", "model_id": "a"})
    assert r["ok"] and r["already_loaded"] is True
    r = client.call({"id": 5, "op": "load_model", "model_id": "a", "worker": "nope"})
    assert r["error"]["code"] == "bad_request" and "'worker'" in r["error"]["message"]
    r = client.call({"id": 6, "op": "load_model", "model_id": "a", "gpu": 7})
    assert r["error"]["code"] == "bad_request" and "'gpu'" in r["error"]["message"]
    r = client.call({"id": 7, "op": "load_model", "model_id": "a", "force_reload": "yes"})
    assert r["error"]["code"] == "bad_request" and "'force_reload'" in r["error"]["message"]


def test_unload_model_fans_out_and_answers_once(cluster):
    b, client = cluster
    for i, w in enumerate(("w0", "w1")):
        assert client.call({"id": i, "op": "load_model", "model_id": "c", "worker": w})["ok"]
    assert loaded_on(client, "c") == ["w0", "w1"]
    r = client.call({"id": "u", "op": "unload_model", "model_id": "c"})
    assert r["ok"] and r["workers"] == ["w0", "w1"]
    assert client.nothing_within(0.2)  # one answer only
    wait_for(lambda: loaded_on(client, "c") == [], 2, "c unloaded everywhere")
    r = client.call({"id": "u2", "op": "unload_model", "model_id": "c"})
    assert r["ok"] and r["workers"] == []
    r = client.call({"id": "u3", "op": "unload_model", "model_id": "zzz"})
    assert r["error"]["code"] == "unknown_model"


def test_model_stats_per_worker_and_totals(cluster):
    b, client = cluster
    client.call({"id": 1, "op": "load_model", "model_id": "a", "worker": "w0"})
    client.call({"id": 2, "op": "load_model", "model_id": "b", "worker": "w1"})

    def settled():
        r = client.call({"id": 3, "op": "model_stats"})
        return r if r["total_memory_bytes"] == 2 * 100 * 2**20 else None

    r = wait_for(settled, 3, "worker stats")
    assert r["ok"] and r["max_models"] == 6 and r["loaded_models"] == 2
    assert r["max_memory_bytes"] == 2 * 8 * 2**30
    workers = {w["worker"]: w for w in r["workers"]}
    assert workers["w0"]["loaded_models"] == 1 and workers["w0"]["max_models"] == 3
    assert workers["w1"]["total_memory_bytes"] == 100 * 2**20 and workers["w1"]["gpu"] == 1
    assert [m["model_id"] for m in r["models"]] == ["a", "b", "c"]
    one = client.call({"id": 4, "op": "model_stats", "model_id": "a"})
    assert [m["model_id"] for m in one["models"]] == ["a"] and one["models"][0]["loaded_on"] == ["w0"]
    assert client.call({"id": 5, "op": "model_stats", "model_id": "nope"})["error"]["code"] == "unknown_model"


BAD = [
    ({"id": 1, "op": "fly"}, "'op'"),
    ({"op": "health"}, "'id'"),
    ({"id": 1, "op": "infer", "model_id": "Bad/Path", "batch_size": 1}, "'model_id'"),
    ({"id": 1, "op": "infer", "model_id": "a", "batch_size": 0}, "'batch_size'"),
    ({"id": 1, "op": "infer", "model_id": "a", "batch_size": 26}, "'batch_size'"),
    ({"id": 1, "op": "infer", "model_id": "a", "batch_size": 1, "format": "gif"}, "'format'"),
    ({"id": 1, "op": "infer", "model_id": "a", "batch_size": 1, "format": "jpeg", "quality": 0}, "'quality'"),
    ({"id": 1, "op": "infer", "model_id": "a", "batch_size": 1, "deadline_ms": -5}, "'deadline_ms'"),
    ({"id": 1, "op": "infer", "model_id": "a", "batch_size": 1, "start_frame_idx": -1}, "'start_frame_idx'"),
]


def test_bad_requests_name_the_field_and_the_broker_keeps_serving(cluster):
    b, client = cluster
    for header, field in BAD:
        arrays = features() if header.get("op") == "infer" else None
        client.send(dict(header), arrays)
        reply, _ = client.recv()
        assert reply["ok"] is False and reply["error"]["code"] == "bad_request", (header, reply)
        assert field in reply["error"]["message"], (field, reply)
    # Unknown model: its own code, at once.
    r = client.call(infer("nosuch", 2), features())
    assert r["error"]["code"] == "unknown_model"
    # Tensor problems: missing audio, wrong shape, wrong dtype, size mismatch.
    r = client.call(infer("a", 3))
    assert r["error"]["code"] == "bad_request" and "audio" in r["error"]["message"]
    r = client.call(infer("a", 4, batch=2), features(1))
    assert "tensors.audio_features.shape" in r["error"]["message"]
    r = client.call(infer("a", 5), {"audio_features": np.zeros((1, 32, 16, 16), np.float64)})
    assert "tensors.audio_features.dtype" in r["error"]["message"]
    header = infer("a", 6)
    header["tensors"] = {"audio_features": {"frame": 0, "dtype": "float32", "shape": [1, 32, 16, 16]}}
    client.send_raw([protocol.TAG, protocol.pack_header(header), b"\0" * 100])
    r, _ = client.recv()
    assert r["error"]["code"] == "bad_request" and "audio_features" in r["error"]["message"]
    assert "100 bytes" in r["error"]["message"]
    # Wire-level garbage: wrong tag, not msgpack, not a map, a lone frame.
    for frames, words in (([b"XXXX", protocol.pack_header({"id": 1, "op": "health"})], "tag"),
                          ([protocol.TAG, b"\xc1\xc1"], "msgpack"),
                          ([protocol.TAG, msgpack.packb([1, 2])], "map"),
                          ([protocol.TAG], "frame")):
        client.send_raw(frames)
        r, _ = client.recv()
        assert r["error"]["code"] == "bad_request" and words in r["error"]["message"], r
    assert b.broker.stats.bad_requests >= len(BAD) + 8
    assert call_infer(client, "a", rid="still")["ok"]


def test_catalog_changes_are_picked_up(cluster):
    b, client = cluster
    assert call_infer(client, "newcomer")["error"]["code"] == "unknown_model"
    b.catalog["newcomer"] = {"version": "1", "preload": False, "num_frames": 5, "memory_estimate_mb": None}
    # An unknown id waits for a fresh catalog read (started after it arrived), so the first
    # request after a package appears is served.
    r = call_infer(client, "newcomer")
    assert r["ok"] and r["model_id"] == "newcomer"
    del b.catalog["c"]
    wait_for(lambda: "c" not in {m["model_id"] for m in client.call({"id": 1, "op": "list_models"})["models"]},
             4, "c removed from the catalog")


def test_stats_and_events_are_published(cluster):
    b, client = cluster
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(b.stats)
    topics: dict[bytes, list] = {}

    def got_both():
        while sub.poll(50):
            topic, body = sub.recv_multipart()
            topics.setdefault(topic, []).append(msgpack.unpackb(body))
        if b"event" not in topics:
            call_infer(client, "b", rid="ev")  # (re)trigger a load event once subscribed
            client.call({"id": "un", "op": "unload_model", "model_id": "b"})
        return b"stats" in topics and b"event" in topics

    wait_for(got_both, 5, "stats and event messages")
    snap = topics[b"stats"][-1]
    assert {"models", "workers", "totals", "queues"} <= set(snap)
    adm = snap["admission"]  # what admission learned (broker/admission.py)
    assert adm["target"] == 0.8 and adm["margin"] >= 1.0 and adm["refused_from_queue"] == 0
    assert any(e.get("event") in ("loaded", "unloaded") and e.get("worker") for e in topics[b"event"])
    lines = b.broker.report_lines()
    assert lines[0].startswith("📊 Model Statistics Report") and any("Loaded models:" in l for l in lines)
    sub.close()


def test_bind_error_names_the_endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = make_config()
        cfg.cluster.frontend = f"tcp://127.0.0.1:{port}"
        broker = Broker(cfg, lambda: {})
        with pytest.raises(BindError, match=f"tcp://127.0.0.1:{port} is already in use"):
            broker.bind()
        with pytest.raises(BindError, match="already in use"):
            run_broker(cfg, lambda: {})


def test_run_broker_serves_until_stopped():
    cfg = make_config()
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    fe = port.getsockname()[1]
    port.close()
    cfg.cluster.frontend = f"tcp://127.0.0.1:{fe}"
    stop = threading.Event()
    t = threading.Thread(target=run_broker, args=(cfg, lambda: catalog_of("a"), stop), daemon=True)
    t.start()
    client = Client(cfg.cluster.frontend)
    assert client.call({"id": 1, "op": "health"})["live"] is True
    stop.set()
    t.join(5)
    assert not t.is_alive()
    client.close()


def test_a_slow_catalog_never_stalls_routing():
    catalog = catalog_of("a")
    slow = threading.Event()

    def read():
        if slow.is_set():
            time.sleep(1.5)  # e.g. hashing a large new package
        return dict(catalog)

    cfg = make_config()
    broker = Broker(cfg, read)
    broker.bind()
    stop = threading.Event()
    t = threading.Thread(target=broker.run, args=(stop,), daemon=True)
    t.start()
    try:
        with WorkerThread(broker.backend_endpoint, "w0"):
            client = Client(broker.frontend_endpoint)
            wait_workers(client, 1)
            slow.set()
            catalog["late"] = catalog["a"]
            client.send(infer("late", "parked"), features())  # waits for the slow read...
            t0 = time.monotonic()
            for i in range(5):  # ...while everything else is served at once
                assert call_infer(client, "a", i)["ok"]
                assert client.call({"id": "h", "op": "health"})["live"]
            assert time.monotonic() - t0 < 0.5
            r, _ = client.recv(5)
            assert r["id"] == "parked" and r["ok"] and r["model_id"] == "late"
            client.close()
    finally:
        stop.set()
        t.join(10)


def test_a_hung_catalog_does_not_hold_requests_forever(monkeypatch):
    import lipsync_cluster.broker.catalog_watch as catalog_watch

    monkeypatch.setattr(catalog_watch, "PARK_MAX_S", 0.3)
    hang = threading.Event()
    release = threading.Event()

    def read():
        if hang.is_set():
            release.wait(10)  # a catalog that does not come back
        return catalog_of("a")

    broker = Broker(make_config(), read)
    broker.bind()
    stop = threading.Event()
    t = threading.Thread(target=broker.run, args=(stop,), daemon=True)
    t.start()
    client = Client(broker.frontend_endpoint)
    try:
        assert client.call({"id": 0, "op": "health"})["live"]
        hang.set()
        t0 = time.monotonic()
        r = client.call(infer("ghost", "g"), features(), timeout=3)
        assert r["error"]["code"] == "unknown_model" and 0.2 < time.monotonic() - t0 < 1.5
    finally:
        release.set()
        stop.set()
        t.join(15)
        client.close()
