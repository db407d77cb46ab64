"""Failures and load: killed workers, late replies, broker restarts, many concurrent clients."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import zmq

from lipsync_cluster.broker import BindError
from lipsync_cluster.common import protocol
from waiting import wait_until

try:
    from test_broker_support import (BrokerThread, Client, WorkerThread, call_infer, catalog_of,
                                     features, free_port, infer, spawn_noop_process, wait_for,
                                     wait_workers, REPO)
except ImportError:  # tests/ imported as a package
    from tests.test_broker_support import (BrokerThread, Client, WorkerThread, call_infer, catalog_of,
                                           features, free_port, infer, spawn_noop_process, wait_for,
                                           wait_workers, REPO)


class FakeWorker:
    """A raw DEALER speaking the worker protocol by hand, so a test can make it misbehave."""

    def __init__(self, backend: str, name: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(backend)
        self.send({"op": "ready", "worker": name, "host": "fake", "pid": 0, "gpu": None, "credits": 1,
                   "max_models": 3, "max_memory_bytes": 0, "loaded": []})

    def send(self, header: dict) -> None:
        self.sock.send_multipart(protocol.encode(header))

    def next(self, op: str, timeout: float = 3.0, beat: bool = False) -> dict:
        """Wait for a message of kind ``op``; with ``beat``, stay alive (heartbeat) meanwhile."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if beat:
                self.send({"op": "heartbeat", "loaded": [], "in_flight": 0})
            if self.sock.poll(50):
                header, _ = protocol.decode(self.sock.recv_multipart())
                if header.get("op") == op:
                    return header
        raise AssertionError(f"fake worker got no {op!r} within {timeout} s")

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.mark.processes
def test_sigkilled_worker_request_is_redispatched_and_answered_once():
    with BrokerThread(catalog_of("a")) as b:
        client = Client(b.frontend)
        proc = spawn_noop_process(b.backend, "victim", "--sleep", "2.0", "--credits", "1")
        try:
            wait_workers(client, 1, timeout=10)
            client.send(infer("a", "r1"), features())
            wait_for(lambda: any(w.in_flight for w in list(b.broker.table.values())), 3, "request in flight")
            with WorkerThread(b.backend, "rescuer"):
                wait_workers(client, 2)
                os.kill(proc.pid, signal.SIGKILL)
                t0 = time.monotonic()
                r, _ = client.recv(3)
                assert r["id"] == "r1" and r["ok"] and r["worker"] == "rescuer"
                assert time.monotonic() - t0 < 1.5
                assert client.nothing_within(0.5)  # exactly once
                assert b.broker.stats.retried == 1
        finally:
            proc.kill()
            proc.wait(5)
            client.close()


def test_late_reply_from_a_dead_worker_is_discarded():
    with BrokerThread(catalog_of("a")) as b:
        client = Client(b.frontend)
        fake = FakeWorker(b.backend, "a-fake")
        try:
            wait_workers(client, 1)
            client.send(infer("a", "r1"), features())
            request = fake.next("request")
            assert request["client_op"] == "infer" and request["model_id"] == "a" and request["id"] == "r1"
            assert request["deadline_left_ms"] > 0 and request["model_version"] == "v-a"
            # The fake goes silent (no heartbeats): dead after 0.3 s; the request is retried.
            with WorkerThread(b.backend, "z-real"):
                r, _ = client.recv(3)
                assert r["id"] == "r1" and r["ok"] and r["worker"] == "z-real"
                fake.send({"op": "reply", "rid": request["rid"], "id": "r1", "ok": True, "worker": "a-fake"})
                assert fake.next("disconnect")["op"] == "disconnect"  # re-register, please
                assert client.nothing_within(0.4)
                assert b.broker.stats.late_replies >= 1
        finally:
            fake.close()
            client.close()


def test_a_request_is_retried_only_once():
    with BrokerThread(catalog_of("a")) as b:
        client = Client(b.frontend)
        f1 = FakeWorker(b.backend, "f1")
        try:
            wait_workers(client, 1)
            client.send(infer("a", "r1"), features())
            first = f1.next("request")
            f2 = FakeWorker(b.backend, "f2")  # alive until it gets the request, then silent
            second = f2.next("request", timeout=3, beat=True)
            assert second["rid"] == first["rid"]
            r, _ = client.recv(3)  # f2 dies too: unavailable, not a third try
            assert r["id"] == "r1" and r["error"]["code"] == "unavailable"
            f2.close()
        finally:
            f1.close()
            client.close()


def test_worker_reregisters_by_itself_after_a_broker_restart():
    ports = (free_port(), free_port(), free_port())
    first = BrokerThread(catalog_of("a"), ports=ports)
    client = Client(first.frontend)
    with WorkerThread(first.backend, "w0") as w:
        wait_workers(client, 1)
        assert call_infer(client, "a", 1)["ok"]
        first.stop()
        second = wait_until(lambda: BrokerThread(catalog_of("a"), ports=ports), 5,
                            "the first broker's ports to be free again", retry=(BindError,))
        try:
            wait_workers(client, 1, timeout=8)
            assert call_infer(client, "a", 2)["ok"]
            assert w.loop.connects >= 2
        finally:
            second.stop()
    client.close()


@pytest.mark.timeout(60)
def test_thousands_of_concurrent_requests_reach_the_right_clients():
    n_clients, per_client = 4, 1000
    with BrokerThread(catalog_of("a", "b"), queue_limit_per_model=4096, queue_limit_total=8192) as b:
        with WorkerThread(b.backend, "w0"), WorkerThread(b.backend, "w1"):
            ctx = zmq.Context.instance()
            clients = [Client(b.frontend, ctx) for _ in range(n_clients)]
            wait_workers(clients[0], 2)
            results: dict[int, list] = {}

            def run(k: int) -> None:
                c = clients[k]
                for i in range(per_client):
                    c.send(infer("ab"[i % 2], f"{k}-{i}"), features())
                got = []
                for _ in range(per_client):
                    reply, _ = c.recv(20)
                    got.append((reply["id"], reply["ok"]))
                results[k] = got

            threads = [threading.Thread(target=run, args=(k,)) for k in range(n_clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(40)
            for k in range(n_clients):
                ids = [rid for rid, ok in results[k] if ok]
                assert sorted(ids) == sorted(f"{k}-{i}" for i in range(per_client)), f"client {k}"
            assert clients[0].nothing_within(0.2)
            for c in clients:
                c.close()


BROKER_SCRIPT = """
import sys
from lipsync_cluster.broker import run_broker
from lipsync_cluster.config.schema import load_config
fe, be, st = sys.argv[1:4]
cfg = load_config({"cluster": {"frontend": fe, "backend": be, "stats": st,
                               "heartbeat_interval_s": 0.1, "heartbeat_liveness": 3}})
run_broker(cfg, lambda: {"a": {"version": "1", "preload": False, "num_frames": 1,
                               "memory_estimate_mb": None}})
"""


def _broker_process(ports):
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", BROKER_SCRIPT,
                             *(f"tcp://127.0.0.1:{p}" for p in ports)], env=env)


@pytest.mark.processes
def test_broker_process_killed_and_restarted_worker_comes_back():
    ports = (free_port(), free_port(), free_port())
    client = Client(f"tcp://127.0.0.1:{ports[0]}")
    first = _broker_process(ports)
    second = None
    try:
        with WorkerThread(f"tcp://127.0.0.1:{ports[1]}", "w0") as w:
            wait_workers(client, 1, timeout=10)
            assert call_infer(client, "a", 1)["ok"]
            first.kill()  # no goodbye: the worker must notice the silence itself
            first.wait(5)
            second = _broker_process(ports)
            wait_workers(client, 1, timeout=10)
            assert call_infer(client, "a", 2)["ok"]
            assert w.loop.connects >= 2
        second.send_signal(signal.SIGTERM)  # drains and exits cleanly
        assert second.wait(5) == 0
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(5)
        client.close()
