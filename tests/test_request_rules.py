"""One set of request rules: the broker and the worker give every header the same verdict.

``common/infer_request.py`` owns the rules. The broker checks a request from its header and frame
sizes alone (``check_model`` + ``check_infer``); the worker reads the arrays (``parse_infer``).
A table of good and bad requests goes through both and must get the same verdict; the cases that
once drifted (a deadline over an hour, more than 60 s of PCM, a model id with a trailing newline)
are refused by a running broker before any routing: no request reaches a worker, nothing loads,
nothing is evicted. Fields only the broker sets are never forwarded from a client.
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from lipsync_cluster.broker.validate import check_model
from lipsync_cluster.common import protocol
from lipsync_cluster.common.errors import BadRequest
from lipsync_cluster.common.infer_request import (BROKER_FIELDS, MAX_DEADLINE_MS, MAX_FRAME_INDEX,
                                                  MAX_PCM_SAMPLES, check_infer, is_model_id,
                                                  parse_infer, strip_broker_fields)
from lipsync_cluster.worker.loop import WorkerLoop
from lipsync_cluster.worker.noop import NoopHandler
from test_broker_support import HB, LIVENESS, BrokerThread, Client, catalog_of, wait_workers

F1 = {"audio_features": np.zeros((1, 32, 16, 16), np.float32)}


def pcm(samples: int, dtype: Any = np.int16) -> dict:
    return {"audio_pcm": np.zeros(samples, dtype)}


# (fields over {"model_id": "a", "batch_size": 1}, arrays, expected: True = accepted)
TABLE = [
    ({}, F1, True),
    ({"batch_size": 3}, {"audio_features": np.zeros((32, 16, 16), np.float32)}, True),
    ({"batch_size": 25}, {"audio_features": np.zeros((25, 32, 16, 16), np.float32)}, True),
    ({"audio_frame_offset": 7}, pcm(16000, np.float32), True),
    ({}, pcm(MAX_PCM_SAMPLES), True),
    ({}, {**F1, "visual_frames": np.zeros((1, 6, 320, 320), np.float32)}, True),
    ({"format": "jpeg", "quality": 100}, F1, True),
    ({"format": "png", "quality": 9}, F1, True),
    ({"format": "raw"}, F1, True),
    ({"format": "patch", "quality": 1}, F1, True),
    ({"deadline_ms": MAX_DEADLINE_MS}, F1, True),
    ({"deadline_ms": 1.5}, F1, True),
    ({"start_frame_idx": MAX_FRAME_INDEX}, F1, True),
    # the three cases that drifted apart
    ({"deadline_ms": MAX_DEADLINE_MS + 1}, F1, False),
    ({}, pcm(MAX_PCM_SAMPLES + 1), False),
    ({"model_id": "a\n"}, F1, False),
    # model ids
    ({"model_id": "Bad"}, F1, False),
    ({"model_id": ""}, F1, False),
    ({"model_id": "a" * 65}, F1, False),
    ({"model_id": "../etc"}, F1, False),
    ({"model_id": 5}, F1, False),
    ({"model_id": None}, F1, False),
    # fields
    ({"batch_size": 0}, F1, False),
    ({"batch_size": 26}, F1, False),
    ({"batch_size": True}, F1, False),
    ({"batch_size": "1"}, F1, False),
    ({"deadline_ms": 0}, F1, False),
    ({"deadline_ms": float("nan")}, F1, False),
    ({"deadline_ms": float("inf")}, F1, False),
    ({"deadline_ms": True}, F1, False),
    ({"deadline_ms": "5"}, F1, False),
    ({"start_frame_idx": -1}, F1, False),
    ({"start_frame_idx": MAX_FRAME_INDEX + 1}, F1, False),
    ({"audio_frame_offset": -1}, F1, False),
    ({"audio_frame_offset": 2**40}, pcm(100), False),
    ({"format": "bmp"}, F1, False),
    ({"format": ["png"]}, F1, False),
    ({"format": "jpeg", "quality": 101}, F1, False),
    ({"format": "png", "quality": 10}, F1, False),
    ({"quality": 3.0}, F1, False),
    # tensors
    ({}, {}, False),
    ({}, {**F1, **pcm(100)}, False),
    ({}, pcm(0), False),
    ({}, {"audio_pcm": np.zeros((2, 100), np.float32)}, False),
    ({}, pcm(100, np.float64), False),
    ({}, {"audio_features": np.zeros((2, 32, 16, 16), np.float32)}, False),
    ({}, {"audio_features": np.zeros((1, 32, 16, 16), np.float64)}, False),
    ({}, {**F1, "visual_frames": np.zeros((1, 3, 320, 320), np.float32)}, False),
    ({}, {**F1, "extra": np.zeros(4, np.float32)}, False),
    ({"tensors": {"extra": {"frame": 0, "dtype": "float32", "shape": [5]}}}, F1, False),
    ({"tensors": []}, {}, False),
    ({"tensors": {"audio_features": {"frame": 1, "dtype": "float32", "shape": [1, 32, 16, 16]}}}, F1, False),
    ({"tensors": {"audio_features": {"frame": 0, "dtype": "float32", "shape": [1, 32, 16, 15]}}}, F1, False),
    ({"tensors": {"audio_features": {"frame": 0, "dtype": "object", "shape": [1, 32, 16, 16]}}}, F1, False),
    ({"tensors": {"audio_features": {"frame": 0, "dtype": "float32", "shape": [1, 32, 16, -16]}}}, F1, False),
]


def build(fields: dict, arrays: dict) -> tuple[dict, list]:
    header = {"model_id": "a", "batch_size": 1}
    payloads = protocol.attach_arrays(header, arrays) if arrays else []
    header.update(fields)  # after attach: a row may replace the tensors map
    return header, payloads


def broker_verdict(header: dict, payloads: list) -> bool:
    try:
        check_model(header, lambda model: True)  # the broker's order: the id, then the rest
        check_infer(header, payloads, 25)
        return True
    except BadRequest:
        return False


def worker_verdict(header: dict, payloads: list) -> bool:
    try:
        parse_infer(header, payloads, 25).check_values()
        return True
    except BadRequest:
        return False


@pytest.mark.parametrize("fields, arrays, accepted", TABLE)
def test_broker_and_worker_agree(fields, arrays, accepted):
    header, payloads = build(fields, arrays)
    assert broker_verdict(dict(header), payloads) is accepted, (fields, "broker")
    assert worker_verdict(dict(header), payloads) is accepted, (fields, "worker")


def test_a_model_id_is_the_whole_string():
    assert is_model_id("demo_ada") and not is_model_id("demo_ada\n") and not is_model_id("demo_ada\nx")
    with pytest.raises(BadRequest, match="'model_id'"):
        protocol.require_model_id({"model_id": "demo_ada\n"})


def test_broker_fields_are_stripped_from_a_client_header():
    header = {"id": 1, "op": "infer", "model_id": "a", "evict_hint": "b", "deadline": 1e12,
              "model_version": "x", "rid": 7, "queue_ms": 0, "client_op": "load_model", "quality": 3}
    strip_broker_fields(header)
    assert header == {"id": 1, "op": "infer", "model_id": "a", "quality": 3}
    assert BROKER_FIELDS.isdisjoint(header)


class RecordingHandler(NoopHandler):
    """A noop worker that keeps every request header it is handed."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.headers: list[dict] = []
        self._headers_lock = threading.Lock()

    def handle(self, header: dict, payloads: list) -> tuple[dict, list]:
        with self._headers_lock:
            self.headers.append(dict(header))
        return super().handle(header, payloads)


class RecordingWorker:
    """A WorkerLoop serving a :class:`RecordingHandler` in a thread."""

    def __init__(self, backend: str, max_models: int) -> None:
        self.handler = RecordingHandler(max_models=max_models)
        loop = WorkerLoop(backend, self.handler, name="w0", credits=2, heartbeat_interval_s=HB,
                          heartbeat_liveness=LIVENESS, drain_timeout_s=5.0)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=loop.run, args=(self.stop_event,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=8)
        assert not self.thread.is_alive(), "worker did not stop"


def test_drift_cases_are_refused_by_the_broker_before_any_routing():
    with BrokerThread(catalog_of("a", "b")) as b:
        client = Client(b.frontend)
        worker = RecordingWorker(b.backend, max_models=1)
        handler = worker.handler
        try:
            wait_workers(client, 1)
            ok = client.call({"id": "warm", "op": "infer", "model_id": "a", "batch_size": 1}, F1)
            assert ok["ok"] and ok["model_loaded"], ok  # its `loaded` event reached the broker first
            seen = len(handler.headers)
            drift = [({"deadline_ms": MAX_DEADLINE_MS + 1}, F1, "'deadline_ms'"),
                     ({}, pcm(MAX_PCM_SAMPLES + 1), "audio_pcm"),
                     ({"model_id": "b\n"}, F1, "'model_id'")]
            for i, (fields, arrays, named) in enumerate(drift):
                header = {"id": i, "op": "infer", "model_id": "b", "batch_size": 1, **fields}
                reply = client.call(header, arrays)
                assert reply["ok"] is False and reply["error"]["code"] == "bad_request", reply
                assert named in reply["error"]["message"], reply
            # Nothing reached the worker, nothing loaded or was evicted, and a good request still works.
            assert len(handler.headers) == seen and handler.evictions == []
            models = {m["model_id"]: m for m in client.call({"id": "l", "op": "list_models"})["models"]}
            assert models["a"]["loaded_on"] == ["w0"] and not models["b"]["loaded_on"] and not models["b"]["loading_on"]
            assert b.broker.stats.models.get("b") is None or b.broker.stats.models["b"].loads == 0
            assert client.call({"id": "again", "op": "infer", "model_id": "a", "batch_size": 1}, F1)["ok"]
        finally:
            worker.stop()
            client.close()


def test_a_client_cannot_set_the_fields_the_broker_sets():
    with BrokerThread(catalog_of("a", "b")) as b:
        client = Client(b.frontend)
        worker = RecordingWorker(b.backend, max_models=2)
        handler = worker.handler
        try:
            wait_workers(client, 1)
            assert client.call({"id": 0, "op": "infer", "model_id": "b", "batch_size": 1}, F1)["ok"]
            forged = {"id": 1, "op": "infer", "model_id": "a", "batch_size": 1, "evict_hint": "b",
                      "model_version": "forged", "client_op": "unload_model", "rid": 999, "deadline": 0}
            reply = client.call(forged, F1)
            assert reply["ok"], reply
            got = handler.headers[-1]
            assert "evict_hint" not in got and got["model_version"] == "v-a" and got["client_op"] == "infer"
            assert got["rid"] != 999 and handler.evictions == []
        finally:
            worker.stop()
            client.close()
