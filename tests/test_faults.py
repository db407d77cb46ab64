"""Faults injected on purpose: frozen and killed workers, a killed broker, lost messages, broken
models, memory budgets, overload. Each test checks that every request gets exactly one answer.

(What test_broker_failures.py / test_cluster.py already prove is not repeated: SIGKILL of a noop
worker mid-request, a fake worker's late reply, a request retried only once, noop workers
re-registering after a broker restart, the supervisor restarting a SIGKILLed worker.)
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
import zmq

from lipsync_cluster.client import CapacityFull, Client, ModelLoadFailed
from lipsync_cluster.client.results import infer_request
from lipsync_cluster.client.transport import RetryPolicy
from lipsync_cluster.common import protocol
from lipsync_cluster.common.errors import CapacityFull as CapacityFullError
from lipsync_cluster.common.frame_store import FrameStore
from lipsync_cluster.worker.loop import WorkerLoop
from lipsync_cluster.worker.noop import NoopHandler

from test_broker_support import (HB, LIVENESS, REPO, BrokerThread, WorkerThread, catalog_of, features,
                                 free_port, infer, spawn_noop_process, wait_for, wait_workers)
from test_broker_support import Client as RawClient
from waiting import holds_for, wait_until

SILENCE = np.zeros((32, 16, 16), np.float32)


def _workers_named(client: RawClient) -> set[str]:
    return {w["worker"] for w in client.call({"id": "ms", "op": "model_stats"})["workers"]}


# --- frozen workers ---------------------------------------------------------------------------


@pytest.mark.processes
def test_sigstopped_worker_is_declared_dead_and_its_late_reply_is_never_delivered():
    with BrokerThread(catalog_of("a")) as b:
        client = RawClient(b.frontend)
        frozen = spawn_noop_process(b.backend, "frozen", "--sleep", "0.6", "--credits", "1")
        try:
            wait_workers(client, 1, timeout=10)
            client.send(infer("a", "r1"), features())
            wait_for(lambda: any(w.in_flight for w in list(b.broker.table.values())), 3, "request in flight")
            os.kill(frozen.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            with WorkerThread(b.backend, "rescuer"):
                r, _ = client.recv(5)
                assert r["id"] == "r1" and r["ok"] and r["worker"] == "rescuer"
                # declared dead after liveness x interval (0.3 s here) of silence, not before; the
                # silence began with its last heartbeat, up to one interval before the SIGSTOP
                assert HB * LIVENESS * 0.9 - HB <= time.monotonic() - t0 < 3.0
                assert b.broker.stats.retried == 1
                os.kill(frozen.pid, signal.SIGCONT)  # it wakes up, finishes r1 and replies: too late
                wait_for(lambda: b.broker.stats.late_replies >= 1, 5, "the late reply reached the broker")
                assert client.nothing_within(0.8), "the client never hears about r1 twice"
                # The thawed worker notices it was dropped and registers again by itself.
                wait_for(lambda: _workers_named(client) == {"frozen", "rescuer"}, 5, "frozen worker back")
                for i in range(6):
                    client.send(infer("a", f"after-{i}"), features())
                got = sorted(client.recv(5)[0]["id"] for _ in range(6))
                assert got == sorted(f"after-{i}" for i in range(6)) and client.nothing_within(0.3)
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
            frozen.kill()
            frozen.wait(5)
            client.close()


def test_worker_does_not_start_a_request_whose_deadline_passed():
    """Deadlines are honoured at the worker too: a request that waited out its time is not run."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    handler = NoopHandler()
    loop = WorkerLoop(f"tcp://127.0.0.1:{port}", handler, name="w", heartbeat_interval_s=HB)
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert router.poll(3000)
        identity, *frames = router.recv_multipart()
        assert protocol.decode(frames)[0]["op"] == "ready"
        header = {"op": "request", "client_op": "infer", "rid": 7, "id": "late", "model_id": "a",
                  "batch_size": 1, "deadline_left_ms": -10}
        arrays = features()
        payloads = protocol.attach_arrays(header, arrays)
        router.send_multipart([identity, *protocol.encode(header, payloads)])
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert router.poll(3000)
            _, *frames = router.recv_multipart()
            reply, _ = protocol.decode(frames)
            if reply.get("op") == "reply":
                break
        assert reply["rid"] == 7 and reply["error"]["code"] == "timeout"
        assert handler.handled == 0
    finally:
        stop.set()
        thread.join(5)
        router.close(0)


# --- the client's retries (Lazy Pirate) -------------------------------------------------------


class SilentThenHelpfulBroker:
    """A fake frontend: swallows everything from the first connection (a broker that lost the
    requests and says nothing), answers infer and health on any later connection."""

    def __init__(self) -> None:
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.seen: list[tuple[bytes, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        first = None
        while not self._stop.is_set():
            if not self.sock.poll(20):
                continue
            identity, *frames = self.sock.recv_multipart()
            header, _ = protocol.decode(frames)
            self.seen.append((identity, header))
            first = first or identity
            if identity != first:
                self.sock.send_multipart([identity, *protocol.encode({"id": header["id"], "ok": True,
                                                                      "live": True, "echo": header})])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close(0)


def test_client_resends_on_a_fresh_socket_when_the_broker_falls_silent():
    fake = SilentThenHelpfulBroker()
    policy = RetryPolicy(per_try_s=0.3, probe_s=0.3, heartbeat_s=0)
    try:
        with Client(f"tcp://127.0.0.1:{fake.port}", timeout=5, retry=policy) as client:
            header, payloads = infer_request("a", audio_features=SILENCE, deadline_ms=4000)
            t0 = time.monotonic()
            reply, _ = client.request(header, payloads)
            assert reply["ok"] and time.monotonic() - t0 < 3
            infers = [(i, h) for i, h in fake.seen if h["op"] == "infer"]
            assert len(infers) == 2 and infers[0][0] != infers[1][0], "resent on a new connection"
            assert infers[0][1]["id"] == infers[1][1]["id"] == reply["id"], "same id: replies dedupe"
            assert infers[1][1]["deadline_ms"] < 4000, "a retry keeps the original deadline"
            assert any(h["op"] == "health" for _, h in fake.seen), "it asked before giving up on the socket"
            c = client._transport.counters
            assert c["reconnects"] == 1 and c["resent"] == 1 and c["duplicates"] == 0
    finally:
        fake.close()


def test_client_does_not_resend_while_the_broker_is_alive_and_working():
    with BrokerThread(catalog_of("a")) as b, WorkerThread(b.backend, "slow", sleep_s=1.2) as w:
        policy = RetryPolicy(per_try_s=0.25, probe_s=0.25)
        with Client(b.frontend, timeout=10, retry=policy) as client:
            wait_for(lambda: client.health()["workers"] == 1, 5, "worker")
            header, payloads = infer_request("a", audio_features=SILENCE)
            assert client.request(header, payloads)[0]["ok"]
            assert w.handler.handled == 1, "a slow answer is waited for, not duplicated"
            assert client._transport.counters["resent"] == 0


def test_client_gives_up_at_its_timeout_with_a_clear_error():
    port = free_port()  # nothing listens here
    with Client(f"tcp://127.0.0.1:{port}", timeout=0.6,
                retry=RetryPolicy(per_try_s=0.1, probe_s=0.1, heartbeat_s=0)) as client:
        t0 = time.monotonic()
        with pytest.raises(Exception, match="no reply to 'health'.*within 0.6s"):
            client.health()
        assert time.monotonic() - t0 < 1.5
        wait_for(lambda: not client._transport._pending, 1.0, "nothing left behind")


def test_requests_made_before_the_broker_is_up_are_sent_when_it_comes(monkeypatch):
    from lipsync_cluster.client.transport import Transport

    monkeypatch.setattr(Transport, "SNDHWM", 2)  # the socket holds 2; the rest wait in the client
    ports = (free_port(), free_port(), free_port())
    with Client(f"tcp://127.0.0.1:{ports[0]}", timeout=20) as client:
        header, payloads = infer_request("a", audio_features=SILENCE)
        futures = [client.submit(header, payloads) for _ in range(10)]
        holds_for(lambda: not any(f.done() for f in futures), 0.5, "no request answered while no broker runs")
        with BrokerThread(catalog_of("a"), ports=ports) as b, WorkerThread(b.backend, "w0"):
            replies = [client.wait(f)[0] for f in futures]
    assert all(r["ok"] for r in replies) and len({r["id"] for r in replies}) == 10
    assert client._transport.counters["duplicates"] == 0


# --- the broker killed and restarted, real workers and clients untouched ----------------------


@pytest.mark.processes
def test_killed_broker_is_restarted_and_in_flight_requests_are_answered_once(make_cluster):
    sup = make_cluster(cluster={"restart_backoff_s": 0.2})
    broker = sup.children[0]
    workers = {c.name: c.proc.pid for c in sup.children[1:]}
    with Client(sup.config.frontend, timeout=40) as client:
        client.load_model("demo_ada")
        feats = np.full((4, 32, 16, 16), 0.5, np.float32)
        futures = []
        for i in range(8):
            header, payloads = infer_request("demo_ada", audio_features=feats, start_frame_idx=i, format="jpeg")
            futures.append(client.submit(header, payloads))
        wait_until(lambda: any(w["in_flight"] for w in client.model_stats()["workers"]), 20,
                   "requests in flight on the workers")
        assert not all(f.done() for f in futures), "every request was answered before the broker could be killed"
        old = broker.proc.pid
        os.kill(old, signal.SIGKILL)
        replies = [client.wait(f, timeout=40)[0] for f in futures]
        assert all(r["ok"] for r in replies)
        assert len({r["id"] for r in replies}) == 8
        assert broker.proc.pid != old and broker.restarts == 1, "the supervisor restarted the broker"
        assert {c.name: c.proc.pid for c in sup.children[1:]} == workers, "no worker was restarted"
        counters = client._transport.counters
        assert counters["reconnects"] >= 1 and counters["resent"] >= 1 and counters["duplicates"] == 0
        assert client.infer("demo_ben", audio_features=SILENCE).worker in workers
        assert client.health()["workers"] == len(workers)


# --- broken models ---------------------------------------------------------------------------------


def _broken_models(demo_dir: Path, root: Path) -> Path:
    """demo_ada (fine); bad_onnx (garbage UNet) and no_frames (half the frames gone), which the
    catalog already refuses; bad_frame (a middle frame corrupt), which only fails when loaded."""
    models = root / "models"
    models.mkdir()
    shutil.copytree(demo_dir / "demo_ada", models / "demo_ada")
    for name in ("bad_onnx", "no_frames", "bad_frame"):
        shutil.copytree(demo_dir / "demo_ben", models / name)
        manifest = models / name / "model.yaml"
        data = yaml.safe_load(manifest.read_text())
        data["id"] = name
        data.pop("version", None)
        manifest.write_text(yaml.safe_dump(data))
    (models / "bad_onnx" / "model.onnx").write_bytes(b"this is not an ONNX model" * 100)
    frames = sorted((models / "no_frames" / "frames").iterdir())
    for f in frames[len(frames) // 2:]:
        f.unlink()
    middle = sorted((models / "bad_frame" / "frames").iterdir())[5]
    middle.write_bytes(b"\xff\xd8 not really a jpeg" * 50)
    return models


def _load_failed_events(sub) -> list[dict]:
    import msgpack

    out = []
    while sub.poll(100):
        _, body = sub.recv_multipart()
        event = msgpack.unpackb(body)
        if event.get("event") == "load_failed":
            out.append(event)
    return out


@pytest.mark.processes
def test_a_model_that_fails_to_load_backs_off_and_never_takes_a_worker_down(make_cluster, demo_dir, tmp_path):
    models = _broken_models(demo_dir, tmp_path)
    sup = make_cluster(models_dir=str(models), cluster={"per_gpu": 1, "load_failure_backoff_s": 1.5})
    pid = sup.children[1].proc.pid
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"event")
    sub.setsockopt(zmq.SUBSCRIBE, b"stats")  # the ~1 s snapshots: the first one says the subscription is live
    sub.connect(sup.config.stats_endpoint)
    wait_until(lambda: sub.poll(100) and sub.recv_multipart()[0] == b"stats", 10, "the first stats snapshot")
    sub.setsockopt(zmq.UNSUBSCRIBE, b"stats")
    with Client(sup.config.frontend, timeout=30) as client:
        # Broken on disk: the catalog already knows why; answered at once, no worker bothered.
        with pytest.raises(ModelLoadFailed, match="bad_onnx.*ONNX"):
            client.infer("bad_onnx", audio_features=SILENCE)
        with pytest.raises(ModelLoadFailed, match="no_frames.*frames"):
            client.infer("no_frames", audio_features=SILENCE)
        # Broken only when loaded: the first request gets the reason from the worker...
        with pytest.raises(ModelLoadFailed) as first:
            client.infer("bad_frame", audio_features=SILENCE)
        assert "bad_frame" in first.value.message and "frame_0005" in first.value.message
        # ...and a burst inside the backoff window the same answer at once, no new attempt.
        t0 = time.monotonic()
        futures = [client.submit(*infer_request("bad_frame", audio_features=SILENCE)) for _ in range(20)]
        for f in futures:
            with pytest.raises(ModelLoadFailed, match="frame_0005") as again:
                client.wait(f)
            assert again.value.details["retry_after_ms"] > 0 and again.value.details["failures"] == 1
        assert time.monotonic() - t0 < 1.0
        # The worker is the same process and serves a good model.
        assert client.infer("demo_ada", audio_features=SILENCE).worker
        assert sup.children[1].proc.pid == pid and sup.children[1].restarts == 0
        # The window closes when the last refusal said it would (its retry_after_ms, not a guessed pause:
        # no event marks the end); the next request then tries again, and fails again.
        time.sleep(again.value.details["retry_after_ms"] / 1000.0 + 0.05)
        with pytest.raises(ModelLoadFailed):
            client.infer("bad_frame", audio_features=SILENCE)
        with pytest.raises(ModelLoadFailed) as backoff:
            client.infer("bad_frame", audio_features=SILENCE)
        assert backoff.value.details["failures"] == 2 and backoff.value.details["retry_after_ms"] > 1500, \
            "the window doubles after a second failure"
        assert client.health()["workers"] == 1 and sup.children[1].proc.pid == pid
    failed = [e for e in _load_failed_events(sub) if e.get("model_id") == "bad_frame"]
    sub.close(0)
    assert len(failed) == 2, f"two load attempts in all, not one per request: {failed}"


@pytest.mark.processes
def test_fixing_a_broken_model_clears_its_backoff(make_cluster, demo_dir, tmp_path):
    models = _broken_models(demo_dir, tmp_path)
    sup = make_cluster(models_dir=str(models), cluster={"per_gpu": 1, "load_failure_backoff_s": 60.0})
    with Client(sup.config.frontend, timeout=30) as client:
        with pytest.raises(ModelLoadFailed):
            client.infer("bad_frame", audio_features=SILENCE)
        with pytest.raises(ModelLoadFailed, match="not retried"):
            client.infer("bad_frame", audio_features=SILENCE)
        good = sorted((demo_dir / "demo_ben" / "frames").iterdir())[5]
        shutil.copyfile(good, models / "bad_frame" / "frames" / good.name)
        os.utime(models / "bad_frame" / "model.yaml")  # the catalog re-reads a changed package
        # a new version (once the catalog re-reads it): the 60 s backoff of the old one no longer applies
        result = wait_until(lambda: client.infer("bad_frame", audio_features=SILENCE), 15,
                            "the fixed package to be tried", retry=(ModelLoadFailed,))
        assert result.model_loaded


# --- memory budget ---------------------------------------------------------------------------------


@pytest.mark.processes
def test_a_model_that_cannot_fit_answers_capacity_full_with_the_numbers(make_cluster):
    sup = make_cluster(capacity={"max_memory_gb": 0.01}, cluster={"per_gpu": 1})
    pid = sup.children[1].proc.pid
    with Client(sup.config.frontend, timeout=30) as client:
        with pytest.raises(CapacityFull) as info:
            client.infer("demo_ada", audio_features=SILENCE)
        d = info.value.details
        assert d["needed_bytes"] > d["max_memory_bytes"] == int(0.01 * 2**30)
        assert "MB" in info.value.message and "budget" in info.value.message
        stats = client.model_stats()
        assert stats["loaded_models"] == 0 and stats["total_memory_bytes"] == 0
    assert sup.children[1].proc.pid == pid


def test_the_cache_never_holds_more_than_its_budget_even_when_estimates_are_low(demo_dir, monkeypatch):
    from lipsync_cluster.common.catalog import Catalog
    from lipsync_cluster.worker.cache import ModelCache
    from lipsync_cluster.worker.memory import process_rss
    from lipsync_cluster.worker.sessions import SessionOptions

    catalog = Catalog(str(demo_dir))
    ids = sorted(catalog.packages())
    store = FrameStore(f"faults-{os.getpid()}-{time.monotonic_ns()}")
    events: list[dict] = []
    one = catalog.resolve(ids[0])
    frames_bytes = one.num_frames * one.frame_size[0] * one.frame_size[1] * 3
    cache = ModelCache(catalog.resolve, store, max_models=3, max_memory_bytes=2**40,
                       session_options=SessionOptions(intra_op_threads=1), event_sink=events.append)
    # the process as the cache measured it, a `light` model's workspace (under 16 MB), two
    # models' frames, not three
    budget = cache.memory.budget = cache.memory.base + 16 * 2**20 + int(frames_bytes * 2.5)
    monkeypatch.setattr(cache, "_estimate_bytes", lambda package: 1024)  # a wildly low estimate
    try:
        for model_id in ids + ids[:1]:
            with cache.use(model_id):
                assert cache.memory.used() <= budget
            assert cache.memory.used() <= budget
        assert any(e["event"] == "evicted" for e in events), "the real size made room by evicting"
        small = ModelCache(catalog.resolve, store, max_models=3, max_memory_bytes=process_rss() + frames_bytes // 2,
                           session_options=SessionOptions(intra_op_threads=1))
        monkeypatch.setattr(small, "_estimate_bytes", lambda package: 1024)
        with pytest.raises(CapacityFullError, match="budget") as info:
            small.load(ids[0])
        assert info.value.details["needed_bytes"] > info.value.details["available_bytes"]
        assert small.loaded_ids() == [] and small.memory_bytes() == 0
    finally:
        cache.close()
        store.cleanup()


# --- overload --------------------------------------------------------------------------------------

BROKER_PROCESS = """
import sys
from lipsync_cluster.broker import run_broker
from lipsync_cluster.config.schema import load_config
fe, be, st = sys.argv[1:4]
cfg = load_config({"cluster": {"frontend": fe, "backend": be, "stats": st, "heartbeat_interval_s": 0.2,
                               "queue_limit_per_model": 64, "queue_limit_total": 128},
                   "logging": {"stats_report_minutes": 0, "level": "warning"}})
run_broker(cfg, lambda: {m: {"version": "1", "preload": False, "num_frames": 1, "memory_estimate_mb": None}
                         for m in ("a", "b")})
"""


@pytest.mark.processes
def test_far_above_capacity_the_broker_sheds_at_once_and_keeps_memory_and_latency_flat():
    ports = [free_port() for _ in range(3)]
    # The broker's allocator set so that RSS follows live memory: each 16 KB message buffer is
    # its own mapping, given back when freed, and the heap is trimmed. With glibc's defaults what
    # it keeps of a burst swung RSS by +-10 MB from run to run, which could hide or fake a leak;
    # set like this it reads the same after every round (32 MB here).
    env = dict(os.environ, PYTHONPATH=str(REPO), MALLOC_MMAP_THRESHOLD_="8192",
               MALLOC_TRIM_THRESHOLD_="65536", MALLOC_ARENA_MAX="1")
    broker = subprocess.Popen([sys.executable, "-c", BROKER_PROCESS, *(f"tcp://127.0.0.1:{p}" for p in ports)],
                              env=env)
    workers = [spawn_noop_process(f"tcp://127.0.0.1:{ports[1]}", f"n{i}", "--sleep", "0.005", "--credits", "2")
               for i in range(2)]
    client = RawClient(f"tcp://127.0.0.1:{ports[0]}")
    try:
        wait_workers(client, 2, timeout=15)
        proc = psutil.Process(broker.pid)
        payload = features(2)  # 16 KB per request
        rss, shed_seen, codes = [], 0, {}
        latencies: list[float] = []
        def take(reply: dict, round_: int) -> None:
            nonlocal shed_seen
            code = "ok" if reply["ok"] else reply["error"]["code"]
            codes[code] = codes.get(code, 0) + 1
            if code == "overloaded":
                shed_seen += 1
                assert reply["error"]["details"]["retry_after_ms"] > 0
                assert reply["error"]["details"]["queue"] in ("model", "total")
            elif code == "ok" and round_:
                latencies.append(time.monotonic() - sent_at[reply["id"]])

        sent_at: dict[str, float] = {}
        for round_ in range(6):
            n, got = 3000, 0
            for i in range(n):  # ~20-50x what two workers serve, without waiting for answers
                rid = f"{round_}-{i}"
                sent_at[rid] = time.monotonic()
                client.send(infer("ab"[i % 2], rid, batch=2), payload)
                while i % 200 == 199 and client.sock.poll(0):  # read what is there, never wait
                    take(client.recv(1)[0], round_)
                    got += 1
            while got < n:
                take(client.recv(20)[0], round_)
                got += 1
            assert client.nothing_within(0.05)
            rss.append(proc.memory_info().rss)
        print("codes", codes, "rss MB", [r // 2**20 for r in rss], "p99", sorted(latencies)[int(len(latencies) * 0.99)] if latencies else None)
        totals = client.call({"id": "s", "op": "model_stats"})["totals"]
        assert totals["shed"] == shed_seen == codes["overloaded"] > 6 * 3000 // 2, codes
        assert set(codes) <= {"ok", "overloaded"}, codes
        # Memory: the same burst again and again does not make the broker grow (medians of the
        # first and last three rounds; a leak of 1 KB per request would move them by 9 MB).
        mb = [r // 2**20 for r in rss]
        assert sorted(rss[3:])[1] - sorted(rss[:3])[1] < 8 * 2**20 and max(rss) < 160 * 2**20, mb
        # Latency of accepted requests: bounded by the queue limit, not by the flood.
        latencies.sort()
        assert latencies[int(len(latencies) * 0.99)] < 2.0, latencies[-5:]
    finally:
        client.close()
        for p in workers:
            p.kill()
        broker.kill()
        for p in (*workers, broker):
            p.wait(5)


# --- chaos: everything at once, under load ---------------------------------------------------------


@pytest.mark.processes
def test_chaos_quick_nothing_lost_nothing_duplicated(demo_dir):
    """bench/chaos.py --quick in short: kill, freeze and restart workers and the broker under load."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("chaos", REPO / "bench" / "chaos.py")
    chaos = importlib.util.module_from_spec(spec)
    sys.modules["chaos"] = chaos  # dataclasses look their module up
    spec.loader.exec_module(chaos)
    r = chaos.run_chaos(demo_dir, workers=3, clients=3, in_flight=2, duration=20.0, quick=True)
    s = chaos.summarize(r)
    print(chaos.table(s, r.events))
    assert len(r.events) == 5 and not any("skip" in e for e in r.events), r.events
    assert s["lost"] == 0 and s["duplicated"] == 0, s
    assert set(s["errors"]) <= {"unavailable", "timeout"}, s["errors"]
    assert s["ok"] >= 0.97 * s["sent"] and s["ok"] > 100, s
    assert s["client_resent"] > 0 and s["broker_retried"] > 0, "the faults did hit requests in flight"
