"""Hostile input against a running broker and a real worker (one cluster for the module).

Targeted cases first (each broken field gets ``bad_request`` naming it, from the broker or, for
what only the worker checks, from the worker), then a hypothesis fuzz that throws thousands of
random and mutated messages at the frontend and the backend over raw DEALER sockets and checks
that every client message got exactly one answer, that both processes are alive, that a normal
request still works, and that neither process's memory grew beyond a small bound.
"""
from __future__ import annotations

import math
import os
import shutil
import time

import msgpack
import numpy as np
import psutil
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zmq.utils.monitor import recv_monitor_message

from lipsync_cluster.common import protocol
from lipsync_cluster.common.security import CurveKeys, write_key_pair

from test_broker_support import Client as RawClient
from waiting import wait_until

pytestmark = pytest.mark.processes  # one cluster for the module

MAX_MB = 4
SILENCE = np.zeros((32, 16, 16), np.float32)
MODEL = "demo_ada"


@pytest.fixture(scope="module")
def cluster(demo_dir, tmp_path_factory):
    from conftest import cluster_config
    from lipsync_cluster.config import load_config
    from lipsync_cluster.supervisor import Supervisor

    path = cluster_config(demo_dir, tmp_path_factory.mktemp("fuzz"),
                          server={"max_message_size_mb": MAX_MB},
                          cluster={"per_gpu": 1, "heartbeat_interval_s": 0.25},
                          logging={"level": "error", "stats_report_minutes": 0, "log_model_operations": False})
    cfg = load_config(path)
    sup = Supervisor(cfg, 0, 1)
    # A fixed mmap threshold: glibc otherwise raises it after large frees and then keeps freed
    # image buffers on its heap, which makes memory readings swing by tens of MB without any leak.
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    try:
        sup.start()  # the children take this environment (restarts too)
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    try:
        sup.wait_ready(timeout_s=120)
        client = RawClient(cfg.frontend)
        reply = client.call(*valid_infer("warm"), timeout=60)
        assert reply["ok"], reply
        yield sup, client
        client.close()
    finally:
        sup.stop(drain_timeout_s=10)


def valid_infer(rid, batch: int = 1, **fields):
    header = {"id": rid, "op": "infer", "model_id": MODEL, "batch_size": batch, "format": "jpeg", **fields}
    return header, {"audio_features": np.zeros((batch, 32, 16, 16), np.float32)}


def expect_bad(client: RawClient, frames: list, *words: str, code: str = "bad_request") -> dict:
    client.send_raw(frames)
    reply, _ = client.recv(30)
    assert reply["ok"] is False and reply["error"]["code"] == code, reply
    for w in words:
        assert w in reply["error"]["message"], (w, reply["error"]["message"])
    return reply


def frames_of(header: dict, arrays: dict | None = None, extra: list | None = None) -> list:
    payloads = protocol.attach_arrays(header, arrays) if arrays else []
    return protocol.encode(header, [*payloads, *(extra or [])])


# --- every frame of every message is checked, and the answer names the field --------------------


def test_wire_and_header_problems_name_what_is_wrong(cluster):
    _, client = cluster
    h = protocol.pack_header
    expect_bad(client, [b"LSC2", h({"id": 1, "op": "health"})], "tag")
    expect_bad(client, [protocol.TAG, b"\x93\x01"], "msgpack")
    expect_bad(client, [protocol.TAG, msgpack.packb("a string")], "map")
    expect_bad(client, [protocol.TAG, h({"op": "health"})], "'id'")
    expect_bad(client, [protocol.TAG, h({"id": [1, 2], "op": "health"})], "'id'")
    expect_bad(client, [protocol.TAG, h({"id": 1, "op": "explode"})], "'op'")
    expect_bad(client, [protocol.TAG, h({"id": 1, "op": 5})], "'op'")
    expect_bad(client, [protocol.TAG, h({"id": 1, "op": {"a": 1}})], "'op'")
    expect_bad(client, [protocol.TAG, h({"id": 1, "op": ["infer"]})], "'op'")
    expect_bad(client, [protocol.TAG, h({"id": 1, "op": "infer", "model_id": "../etc"})], "'model_id'")
    expect_bad(client, [protocol.TAG, h({"id": 1, "op": "load_model", "model_id": MODEL, "force_reload": "yes"})],
               "'force_reload'")
    expect_bad(client, [protocol.TAG, h({"id": 1, "op": "load_model", "model_id": MODEL, "gpu": -1})], "'gpu'")


@pytest.mark.parametrize("fields, arrays, words", [
    ({"batch_size": 0}, None, ["'batch_size'"]),
    ({"batch_size": 26}, None, ["'batch_size'"]),
    ({"batch_size": "3"}, None, ["'batch_size'"]),
    ({"batch_size": True}, None, ["'batch_size'"]),
    ({"start_frame_idx": 2**31}, None, ["'start_frame_idx'"]),
    ({"start_frame_idx": -1}, None, ["'start_frame_idx'"]),
    ({"audio_frame_offset": 2**40}, None, ["'audio_frame_offset'"]),
    ({"format": "bmp"}, None, ["'format'"]),
    ({"format": {"a": 1}}, None, ["'format'"]),
    ({"format": ["png"]}, None, ["'format'"]),
    ({"quality": 101}, None, ["'quality'"]),
    ({"deadline_ms": 0}, None, ["'deadline_ms'"]),
    ({"deadline_ms": float("nan")}, None, ["'deadline_ms'"]),
    ({"deadline_ms": float("inf")}, None, ["'deadline_ms'"]),
    ({}, {"audio_features": np.zeros((2, 32, 16, 16), np.float32)}, ["tensors.audio_features.shape"]),
    ({}, {"audio_features": np.zeros((1, 32, 16, 16), np.float64)}, ["tensors.audio_features.dtype"]),
    ({}, {"audio_pcm": np.zeros((2, 100), np.float32)}, ["audio"]),
    ({}, {"audio_features": SILENCE[None], "audio_pcm": np.zeros(100, np.float32)}, ["exactly one"]),
    ({}, {"audio_features": SILENCE[None], "visual_frames": np.zeros((1, 3, 320, 320), np.float32)},
     ["tensors.visual_frames.shape"]),
])
def test_infer_field_problems_are_named_by_the_broker(cluster, fields, arrays, words):
    _, client = cluster
    header, default = valid_infer("f")
    header.update(fields)
    expect_bad(client, frames_of(header, arrays or default), *words)


def test_tensor_descriptors_and_payload_sizes_are_checked(cluster):
    _, client = cluster
    base = {"id": 1, "op": "infer", "model_id": MODEL, "batch_size": 1}
    good = SILENCE[None].tobytes()
    for desc, payloads, words in (
            ({"frame": 1, "dtype": "float32", "shape": [1, 32, 16, 16]}, [good], ["tensors.audio_features.frame"]),
            ({"frame": -1, "dtype": "float32", "shape": [1, 32, 16, 16]}, [good], ["tensors.audio_features.frame"]),
            ({"frame": 0, "dtype": "object", "shape": [1, 32, 16, 16]}, [good], ["tensors.audio_features.dtype"]),
            ({"frame": 0, "dtype": "float32", "shape": [1, 32, 16, -16]}, [good], ["tensors.audio_features.shape"]),
            ({"frame": 0, "dtype": "float32", "shape": [1] * 9}, [good], ["tensors.audio_features.shape"]),
            ({"frame": 0, "dtype": "float32", "shape": [1, 32, 16, 16]}, [good[:-4]], ["audio_features", "bytes"]),
            ({"frame": 0, "dtype": "float32", "shape": [1, 32, 16, 16]}, [good + b"\0"], ["audio_features", "bytes"]),
            ({"frame": 0, "dtype": "float32", "shape": [2**30, 2**30]}, [good], ["audio_features", "bytes"]),
            ("not a map", [good], ["tensors.audio_features"])):
        header = {**base, "tensors": {"audio_features": desc}}
        expect_bad(client, protocol.encode(header, payloads), *words)
    expect_bad(client, protocol.encode({**base, "tensors": [1, 2]}, [good]), "'tensors'")


def test_values_the_worker_checks_nan_inf_and_ranges(cluster):
    _, client = cluster
    for name, array in (("audio_features", np.full((1, 32, 16, 16), np.nan, np.float32)),
                        ("audio_features", np.full((32, 16, 16), np.inf, np.float32))):
        header, _ = valid_infer("nan")
        expect_bad(client, frames_of(header, {name: array}), name, "NaN")
    header, arrays = valid_infer("vis")
    visual = np.zeros((1, 6, 320, 320), np.float32)
    visual[0, 3, 100, 100] = -np.inf
    expect_bad(client, frames_of(header, {**arrays, "visual_frames": visual}), "visual_frames", "NaN")
    header, _ = valid_infer("pcm")
    expect_bad(client, frames_of(header, {"audio_pcm": np.full(4000, np.nan, np.float32)}), "audio_pcm")
    header, _ = valid_infer("long-pcm")
    expect_bad(client, frames_of(header, {"audio_pcm": np.zeros(16000 * 61, np.int16)}), "audio_pcm", "samples")
    header, arrays = valid_infer("offset", audio_frame_offset=-3)
    expect_bad(client, frames_of(header, {"audio_pcm": np.zeros(8000, np.int16)}), "audio_frame_offset")
    header, arrays = valid_infer("extra")
    expect_bad(client, frames_of(header, {**arrays, "weights": np.zeros(4, np.float32)}), "weights")
    # and the worker that said all this is still there and serving
    assert client.call(*valid_infer("after-values"), timeout=30)["ok"]


def test_message_size_limits(cluster):
    sup, client = cluster
    limit = MAX_MB * 2**20
    # Frames each under ZMQ_MAXMSGSIZE but more than the limit together: refused by name.
    chunk = b"\0" * (limit // 2)
    header = {"id": "big", "op": "infer", "model_id": MODEL, "batch_size": 1}
    reply = expect_bad(client, protocol.encode(header, [chunk, chunk, chunk]), "max_message_size_mb", "bytes")
    assert reply["id"] == "big" and reply["error"]["details"]["limit"] == limit
    # One frame over the limit: ZeroMQ drops that connection before the broker sees a byte.
    rogue = RawClient(sup.config.frontend)
    rogue.send_raw([protocol.TAG, protocol.pack_header({"id": "huge", "op": "health"}), b"\0" * (limit + 1)])
    assert rogue.nothing_within(1.0)
    rogue.close()
    assert client.call({"id": "still", "op": "health"})["live"]


# --- the fuzz ----------------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.binary(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
FIELDS = ["id", "op", "model_id", "batch_size", "start_frame_idx", "audio_frame_offset", "format", "quality",
          "deadline_ms", "tensors", "force_reload", "worker", "gpu"]
OPS = list(protocol.CLIENT_OPS) + ["ready", "reply", "heartbeat", "x"]


@st.composite
def mutated_request(draw) -> list:
    """A valid request of some op, then a few mutations of its fields, tensors and payloads."""
    op = draw(st.sampled_from(protocol.CLIENT_OPS))
    batch = draw(st.integers(1, 2))
    header: dict = {"id": draw(scalars), "op": op, "model_id": draw(st.sampled_from([MODEL, "demo_ben", "nosuch"]))}
    payloads: list = []
    if op == "infer":
        header.update(batch_size=batch, format=draw(st.sampled_from(["jpeg", "png", "patch"])))
        source = draw(st.sampled_from(["features", "pcm"]))
        if source == "features":
            array = np.zeros((batch, 32, 16, 16), np.float32)
            if draw(st.booleans()):
                array.flat[draw(st.integers(0, array.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e38]))
            payloads = protocol.attach_arrays(header, {"audio_features": array})
        else:
            n = draw(st.integers(0, 9000))
            payloads = protocol.attach_arrays(header, {"audio_pcm": np.zeros(n, draw(st.sampled_from(
                [np.int16, np.float32, np.float64, np.uint8])))})
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.integers(0, 6))
        if kind == 0 and header:
            header.pop(draw(st.sampled_from(sorted(header))), None)
        elif kind == 1:
            header[draw(st.sampled_from(FIELDS))] = draw(values)
        elif kind == 2 and isinstance(header.get("tensors"), dict) and header["tensors"]:
            name = draw(st.sampled_from(sorted(header["tensors"])))
            if isinstance(header["tensors"][name], dict):
                header["tensors"][name][draw(st.sampled_from(["frame", "dtype", "shape", "x"]))] = draw(values)
        elif kind == 3 and payloads:
            raw = bytes(payloads[0])
            cut = draw(st.integers(0, len(raw)))
            payloads[0] = raw[:cut] if draw(st.booleans()) else raw + draw(st.binary(max_size=16))
        elif kind == 4:
            payloads.append(draw(st.binary(max_size=64)))
        elif kind == 5:
            header["op"] = draw(st.sampled_from(OPS))
        elif kind == 6:
            header[draw(st.text(max_size=8))] = draw(values)
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        packed = draw(st.binary(max_size=32))
    return [protocol.TAG, packed, *payloads]


garbage = st.one_of(
    st.lists(st.binary(max_size=48), min_size=1, max_size=4),
    st.tuples(st.sampled_from([protocol.TAG, b"LSC", b"", b"LSC1\0"]), st.binary(max_size=48)).map(list),
    values.map(lambda v: [protocol.TAG, msgpack.packb(v, use_bin_type=True)]),
)
client_messages = st.one_of(mutated_request(), mutated_request(), garbage)


@st.composite
def worker_message(draw) -> list:
    op = draw(st.sampled_from(["ready", "heartbeat", "reply", "replies", "event", "stats", "disconnect", "x", None]))
    header = draw(st.dictionaries(st.sampled_from(["worker", "rid", "id", "ok", "credits", "loaded", "loading",
                                                   "models", "event", "model_id", "max_models", "error",
                                                   "memory_bytes", "draining", "gpu", "pid", "frames",
                                                   "batches"]),
                                  values, max_size=6))
    if op is not None:
        header["op"] = op
    if op == "ready" and draw(st.booleans()):
        header["worker"] = "fuzz-" + draw(st.text("abc", min_size=1, max_size=3))
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        packed = b"\xc1"
    return [protocol.TAG, packed, *draw(st.lists(st.binary(max_size=32), max_size=2))]


def _rss(proc: psutil.Process) -> int:
    """Memory the process holds alone (USS): the shared frame store's pages, mapped read-only and
    touched as frames get used, are the host's, not a leak of this process."""
    return proc.memory_full_info().uss


def test_fuzz_thousands_of_hostile_messages(cluster):
    sup, client = cluster
    broker = psutil.Process(sup.children[0].proc.pid)
    worker = psutil.Process(sup.children[1].proc.pid)
    ctx = zmq.Context.instance()
    front = ctx.socket(zmq.DEALER)
    front.setsockopt(zmq.LINGER, 0)
    front.connect(sup.config.frontend)
    state = {"sent": 0, "replies": 0}

    def drain(timeout_ms: int = 0) -> None:
        while front.poll(timeout_ms):
            front.recv_multipart()
            state["replies"] += 1
            timeout_ms = 0

    def alive() -> None:
        assert broker.is_running() and broker.status() != psutil.STATUS_ZOMBIE, "the broker died"
        assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE, "the worker died"

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(client_messages, min_size=8, max_size=20))  # >= 1,200 a round, >= 10,800 in all
    def fuzz_frontend(messages):
        for frames in messages:
            front.send_multipart(frames)
            state["sent"] += 1
        drain()
        alive()

    # Workers authenticate even on loopback: the hostile peers get a key of their own that the
    # broker admits (added to the allow-list `start` made), so their messages reach the parser.
    fuzz_keys = sup.worker_keys_dir.parent / "fuzz-keys"
    fuzz_keys.mkdir(mode=0o700)
    write_key_pair(fuzz_keys, "fuzzer")
    shutil.copyfile(fuzz_keys / "fuzzer.key", sup.worker_keys_dir / "allowed_workers" / "fuzzer.key")
    fuzz_curve = CurveKeys.load(fuzz_keys / "fuzzer.key_secret", sup.worker_keys_dir / "broker.key")

    def admitted() -> bool:  # a peer with the new key completes its handshake (it then vanishes, saying nothing)
        probe = ctx.socket(zmq.DEALER)
        probe.setsockopt(zmq.LINGER, 0)
        fuzz_curve.apply(probe)
        monitor = probe.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        probe.connect(sup.config.backend)
        try:
            return bool(monitor.poll(2000)) and recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
        finally:
            probe.disable_monitor()
            monitor.close(0)
            probe.close(0)

    # the broker re-reads its allow-list at most once a second
    wait_until(admitted, 10, "the broker to admit the fuzzer's key")

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(worker_message(), min_size=1, max_size=8))
    def fuzz_backend(messages):
        fake = ctx.socket(zmq.DEALER)  # a new peer each time: registered or not, it then vanishes
        fake.setsockopt(zmq.LINGER, 0)
        fuzz_curve.apply(fake)
        fake.connect(sup.config.backend)
        for frames in messages:
            fake.send_multipart(frames)
        time.sleep(0.002)
        fake.close(0)
        alive()

    def settle(timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while state["replies"] < state["sent"] and time.monotonic() < deadline:
            drain(200)
        drain(300)

    t0 = time.monotonic()
    for i, model in enumerate((MODEL, "demo_ben")):  # both models resident: their arenas sized
        assert client.call(*valid_infer(f"warm-{i}", batch=2, model_id=model), timeout=60)["ok"]
    samples: list[tuple[int, int]] = []
    for round_ in range(9):  # ~1,400 messages a round; three to warm up, then six measured
        fuzz_frontend()
        if round_ == 6:
            fuzz_backend()
        settle()
        if round_ >= 3:  # the same last requests before each sample: the same residue in buffers
            for model in (MODEL, "demo_ben"):
                assert client.call(*valid_infer("same", batch=2, model_id=model), timeout=60)["ok"]
            samples.append((_rss(broker), _rss(worker)))
    elapsed = time.monotonic() - t0
    front.close(0)
    mb = [(b >> 20, w >> 20) for b, w in samples]
    print(f"fuzz: {state['sent']} client messages (+ backend fuzz), {state['replies']} replies, "
          f"{elapsed:.1f} s; USS MB (broker, worker) per round: {mb}")
    assert state["sent"] >= 10_000, "at least 10,000 hostile client messages"
    assert state["replies"] == state["sent"], "every client message got exactly one answer"
    alive()
    # The cluster still serves normally, with the same processes.
    reply = client.call(*valid_infer("after-fuzz", batch=2), timeout=60)
    assert reply["ok"] and len(reply["images"]) == 2
    assert client.call({"id": "h", "op": "health"})["workers"] == 1
    assert sup.children[0].restarts == 0 and sup.children[1].restarts == 0
    # Memory: no trend. Each sample follows the same two requests (the same residue in buffers and
    # arenas); the medians of the first and last three rounds are compared.
    def median(values: list[int]) -> int:
        return sorted(values)[len(values) // 2]

    for k, (name, bound) in enumerate((("broker", 8), ("worker", 16))):
        first, last = median([s[k] for s in samples[:3]]), median([s[k] for s in samples[3:]])
        assert last - first < bound * 2**20, f"{name} memory grew: {mb}"
    stats = client.call({"id": "s", "op": "model_stats"})
    assert stats["totals"]["errors"].get("bad_request", 0) > 1000
    assert "internal" not in stats["totals"]["errors"], "no message reached a code path that was not ready for it"
    assert not math.isnan(stats["totals"]["uptime_s"])
