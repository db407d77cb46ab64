"""Shared helpers for the broker tests: a broker and NoopHandler workers on loopback, a client.

Everything here uses real sockets on random free ports and real threads/processes; every wait
has a timeout. (No tests in this file; pytest collects nothing from it.)
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import zmq

from lipsync_cluster.broker import Broker
from lipsync_cluster.common import protocol
from lipsync_cluster.config.schema import load_config
from lipsync_cluster.worker.loop import WorkerLoop
from lipsync_cluster.worker.noop import NoopHandler

from waiting import wait_until

HB = 0.1        # heartbeat interval used by every test
LIVENESS = 3    # -> a silent worker is dead after 0.3 s
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(ports: Optional[tuple[int, int, int]] = None, **cluster: Any):
    """A config on loopback; wildcard ports unless ``ports`` is given."""
    fe, be, st = (f"tcp://127.0.0.1:{p}" for p in ports) if ports else ("tcp://127.0.0.1:*",) * 3
    data = {"frontend": fe, "backend": be, "stats": st, "heartbeat_interval_s": HB,
            "heartbeat_liveness": LIVENESS, **cluster}
    return load_config({"cluster": data, "logging": {"stats_report_minutes": 0}})


def catalog_of(*models: str, preload: tuple[str, ...] = ()) -> dict[str, dict]:
    return {m: {"version": f"v-{m}", "preload": m in preload, "num_frames": 10,
                "memory_estimate_mb": 100.0} for m in models}


def wait_for(cond: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """The broker tests' name for tests/waiting.py's wait_until (kept: many tests import it)."""
    return wait_until(cond, timeout, what)


class BrokerThread:
    """A Broker running in a thread; ``catalog`` is a dict the test may mutate."""

    def __init__(self, catalog: dict, ports: Optional[tuple[int, int, int]] = None, **kw: Any) -> None:
        broker_kw = {k: kw.pop(k) for k in list(kw) if k in ("default_deadline_s", "lfu_half_life_s",
                                                             "no_worker_grace_s")}
        policy = kw.pop("eviction_policy", None)
        self.config = make_config(ports, **kw)
        if policy:
            self.config.capacity.eviction_policy = policy
        self.catalog = catalog
        self.broker = Broker(self.config, lambda: dict(self.catalog), **broker_kw)
        self.broker.bind()
        self.frontend = self.broker.frontend_endpoint
        self.backend = self.broker.backend_endpoint
        self.stats = self.broker.stats_endpoint
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.broker.run, args=(self.stop_event,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive(), "broker did not stop"

    def __enter__(self) -> "BrokerThread":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class WorkerThread:
    """A WorkerLoop + NoopHandler running in a thread."""

    def __init__(self, backend: str, name: str, credits: int = 2, gpu: Optional[int] = None,
                 **handler_kw: Any) -> None:
        self.handler = NoopHandler(**handler_kw)
        self.loop = WorkerLoop(backend, self.handler, name=name, credits=credits,
                               heartbeat_interval_s=HB, heartbeat_liveness=LIVENESS, gpu=gpu,
                               drain_timeout_s=5.0)
        self.name = name
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.loop.run, args=(self.stop_event,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=8)
        assert not self.thread.is_alive(), f"worker {self.name} did not stop"

    def __enter__(self) -> "WorkerThread":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def spawn_noop_process(backend: str, name: str, *extra: str) -> subprocess.Popen:
    """A noop worker as a real process (python -m lipsync_cluster.worker.noop)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "lipsync_cluster.worker.noop", "--backend", backend,
                             "--name", name, "--heartbeat", str(HB), "--liveness", str(LIVENESS), *extra],
                            env=env)


class Client:
    """A DEALER client speaking the wire protocol, with timeouts on every receive."""

    def __init__(self, endpoint: str, ctx: Optional[zmq.Context] = None) -> None:
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, header: dict, arrays: Optional[dict] = None, payloads: Optional[list] = None) -> None:
        extra = protocol.attach_arrays(header, arrays) if arrays else []
        self.sock.send_multipart(protocol.encode(header, [*extra, *(payloads or [])]))

    def send_raw(self, frames: list) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout: float = 5.0) -> tuple[dict, list]:
        if not self.sock.poll(int(timeout * 1000)):
            raise AssertionError(f"no reply within {timeout} s")
        return protocol.decode(self.sock.recv_multipart())

    def nothing_within(self, seconds: float) -> bool:
        return not self.sock.poll(int(seconds * 1000))

    def call(self, header: dict, arrays: Optional[dict] = None, payloads: Optional[list] = None,
             timeout: float = 5.0) -> dict:
        self.send(header, arrays, payloads)
        reply, _ = self.recv(timeout)
        assert reply.get("id") == header.get("id"), (reply, header)
        return reply

    def close(self) -> None:
        self.sock.close(linger=0)


def features(batch: int = 1) -> dict:
    return {"audio_features": np.zeros((batch, 32, 16, 16), np.float32)}


def infer(model: str, rid: Any = 1, batch: int = 1, **fields: Any) -> dict:
    return {"id": rid, "op": "infer", "model_id": model, "batch_size": batch, **fields}


def call_infer(client: Client, model: str, rid: Any = 1, timeout: float = 5.0, **fields: Any) -> dict:
    return client.call(infer(model, rid, **fields), features(fields.get("batch", 1)), timeout=timeout)


def wait_workers(client: Client, count: int, timeout: float = 5.0) -> None:
    wait_for(lambda: client.call({"id": "h", "op": "health"})["workers"] == count, timeout,
             f"{count} worker(s) registered")


def loaded_on(client: Client, model: str) -> list[str]:
    models = client.call({"id": "lm", "op": "list_models"})["models"]
    return next(m["loaded_on"] for m in models if m["model_id"] == model)
