"""The WebSocket gateway against a real cluster: isolation, frame layout, freeing, slow browsers."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import time

import cv2
import numpy as np
import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp.test_utils import TestServer  # noqa: E402

from waiting import wait_until_async  # noqa: E402

from lipsync_cluster.client.stream import StreamFrame  # noqa: E402
from lipsync_cluster.gateway.server import FrameQueue, make_app, pack_frame, unpack_frame  # noqa: E402

SR = 16000


def speech(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(SR * seconds))) / SR
    voiced = sum(np.sin(2 * np.pi * f * t) / (k + 1) for k, f in enumerate((140, 280, 420, 700, 1100)))
    env = (np.sin(2 * np.pi * 1.5 * t) > 0).astype(np.float64)
    x = 0.3 * env * (voiced / 3 + 0.2 * rng.standard_normal(t.size))
    return np.round(x * 32767).astype("<i2")


def backgrounds(demo_dir, model_id):
    return [cv2.imread(str(p)) for p in sorted((demo_dir / model_id / "frames").glob("frame_*.jpg"))]


# --- pieces -----------------------------------------------------------------------------------


def test_frame_message_layout_round_trips():
    frame = StreamFrame(index=1234, pts=1234 / 25, background_index=7, model_id="demo_ada", model_version="v",
                        format="jpeg", image=b"\xff\xd8jpegbytes", rect=[1, 2, 3, 4], worker="w0", latency_ms=512.5)
    data = pack_frame(frame, drops=9)
    assert data[:4] == b"LSF1" and len(data) == 32 + len("demo_ada") + len(frame.image)
    assert struct.unpack_from("<I", data, 4)[0] == 1234 and struct.unpack_from("<d", data, 8)[0] == 1234 / 25
    assert unpack_frame(data) == {"index": 1234, "pts": 1234 / 25, "background_index": 7, "latency_ms": 512.5,
                                  "drops": 9, "model_id": "demo_ada", "format": "jpeg", "image": frame.image}


def test_frame_queue_drops_the_oldest_and_keeps_control_messages():
    async def run():
        q = FrameQueue(3)
        for i in range(5):
            q.put_frame(i)
        q.put_control({"type": "stats", "n": 1})
        q.put_control({"type": "error"})
        q.put_control({"type": "stats", "n": 2})
        got = [await q.get() for _ in range(5)]
        return got, q.drops

    got, drops = asyncio.run(run())
    assert drops == 2
    assert got == [{"type": "error"}, {"type": "stats", "n": 2}, 2, 3, 4], "control first, newest stats only"


# --- against a cluster ------------------------------------------------------------------------


async def _collect(ws, frames, controls, until_ended=True):
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.BINARY:
            frames.append(unpack_frame(msg.data))
        elif msg.type == aiohttp.WSMsgType.TEXT:
            body = json.loads(msg.data)
            controls.append(body)
            if body["type"] == "ended" and until_ended:
                return
            if body["type"] == "error":
                raise AssertionError(body)
        else:
            return


@pytest.mark.processes
def test_two_sockets_on_two_models_never_see_each_others_frames(make_cluster, demo_dir):
    sup = make_cluster()
    seconds = {"demo_ada": 3.0, "demo_ben": 2.6}

    async def one(http, server, model, seed):
        frames, controls = [], []
        async with http.ws_connect(server.make_url("/ws")) as ws:
            await ws.send_str(json.dumps({"type": "start", "model_id": model}))
            reader = asyncio.ensure_future(_collect(ws, frames, controls))
            pcm = speech(seconds[model], seed)
            for i in range(0, pcm.size, 3200):  # 200 ms messages, 4x real time
                await ws.send_bytes(pcm[i:i + 3200].tobytes())
                await asyncio.sleep(0.05)
            await ws.send_str(json.dumps({"type": "stop"}))
            await asyncio.wait_for(reader, 60)
        return frames, controls

    async def run():
        server = TestServer(make_app(sup.config.frontend, max_queue=1000))
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as http:
                models = await (await http.get(server.make_url("/api/models"))).json()
                assert {m["model_id"] for m in models["models"]} == {"demo_ada", "demo_ben", "demo_cleo"}
                html = await (await http.get(server.make_url("/"))).text()
                assert "AudioWorklet" in (await (await http.get(server.make_url("/static/app.js"))).text())
                assert "registerProcessor" in (await (await http.get(server.make_url("/static/pcm-worklet.js"))).text())
                assert "<canvas" in html
                return await asyncio.gather(one(http, server, "demo_ada", 1), one(http, server, "demo_ben", 2))
        finally:
            await server.close()

    (fa, ca), (fb, cb) = asyncio.run(run())
    bg = {m: backgrounds(demo_dir, m) for m in ("demo_ada", "demo_ben")}
    for model, frames, controls in (("demo_ada", fa, ca), ("demo_ben", fb, cb)):
        n = round(seconds[model] * 25)
        assert [f["index"] for f in frames] == list(range(n))
        assert {f["model_id"] for f in frames} == {model}, "a socket only ever gets its own model's frames"
        assert all(f["pts"] == f["index"] / 25 for f in frames)
        assert controls[0]["type"] == "hello" and any(c["type"] == "started" for c in controls)
        assert controls[-1]["type"] == "ended" and controls[-1]["frames"] == n
        other = "demo_ben" if model == "demo_ada" else "demo_ada"
        for f in frames[::10]:
            image = cv2.imdecode(np.frombuffer(f["image"], np.uint8), cv2.IMREAD_COLOR)
            own = np.abs(image[:120].astype(int) - bg[model][f["background_index"]][:120]).mean()
            theirs = np.abs(image[:120].astype(int) - bg[other][f["background_index"]][:120]).mean()
            assert own < 3 < 10 < theirs, "the pixels are the socket's own model's"


def ws_handshake(port: int, rcvbuf: int = 4096) -> socket.socket:
    """A raw WebSocket client socket with a tiny receive buffer, for a browser that never reads."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert b" 101 " in head.split(b"\r\n")[0]
    return s


def ws_send(s: socket.socket, payload: bytes, opcode: int) -> None:
    s.sendall(ws_frame(payload, opcode))


def ws_frame(payload: bytes, opcode: int) -> bytes:
    """One masked client frame."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if n < 4096 else \
        (np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)).tobytes()
    return head + mask + body


@pytest.mark.processes
def test_slow_browser_gets_oldest_frames_dropped_and_a_closed_socket_frees_its_session(make_cluster):
    sup = make_cluster()

    async def status(http, server):
        return await (await http.get(server.make_url("/api/status"))).json()

    async def run():
        server = TestServer(make_app(sup.config.frontend, max_queue=4, quality=95))
        await server.start_server()
        loop = asyncio.get_running_loop()
        try:
            async with aiohttp.ClientSession() as http:
                # a browser that never reads: the gateway must drop, not buffer
                s = await loop.run_in_executor(None, ws_handshake, server.port)
                ws_send(s, json.dumps({"type": "start", "model_id": "demo_cleo"}).encode(), 0x1)
                pcm = speech(8.0, 3)
                ws_send(s, pcm.tobytes(), 0x2)
                ws_send(s, json.dumps({"type": "stop"}).encode(), 0x1)
                async def dropped() -> bool:
                    st = (await status(http, server))["detail"]
                    return bool(st) and st[0]["frames"] == 200 and st[0]["drops"] > 0

                await wait_until_async(dropped, 60, "the slow socket's 200 frames, some dropped")
                (slow,) = (await status(http, server))["detail"]
                assert slow["frames"] == 200 and slow["drops"] > 0, slow
                assert slow["queued"] <= 4, "the per-socket queue stays bounded"
                assert slow["sent"] + slow["drops"] + slow["queued"] <= 200 + 1
                s.close()

                # a socket that closes mid-stream frees its session at once
                ws = await http.ws_connect(server.make_url("/ws"))
                await ws.send_str(json.dumps({"type": "start", "model_id": "demo_ada"}))
                await ws.send_bytes(speech(6.0, 4).tobytes())
                async def in_flight() -> list:
                    detail = (await status(http, server))["detail"]
                    return detail if any(d["in_flight"] for d in detail) else []

                detail = await wait_until_async(in_flight, 5, "work in flight before the socket closes")
                assert any(d["in_flight"] for d in detail), "work in flight when the socket closes"
                t0 = time.monotonic()
                await ws.close()

                async def freed() -> bool:
                    return not (await status(http, server))["sessions"]

                await wait_until_async(freed, 5, "the closed socket's session freed", interval=0.01)
                freed_after = time.monotonic() - t0
                final = await status(http, server)
                return freed_after, final
        finally:
            await server.close()

    freed_after, final = asyncio.run(run())
    assert final["sessions"] == 0 and final["closed_sessions"] == 2
    assert freed_after < 1.0, f"the session was freed {freed_after:.2f}s after the socket closed"


@pytest.mark.processes
def test_bad_control_messages_get_clear_errors(make_cluster):
    sup = make_cluster(cluster={"per_gpu": 1})

    async def run():
        server = TestServer(make_app(sup.config.frontend))
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(server.make_url("/ws")) as ws:
                    hello = await ws.receive_json(timeout=10)
                    out = [hello]
                    for msg in ("not json", json.dumps({"type": "start", "model_id": "nobody"}),
                                json.dumps({"type": "switch", "model_id": "demo_ben"}),
                                json.dumps({"type": "start", "model_id": "../x"})):
                        await ws.send_str(msg)
                        out.append(await ws.receive_json(timeout=10))
                    await ws.send_str(json.dumps({"type": "start", "model_id": "demo_ada"}))
                    out.append(await ws.receive_json(timeout=10))
                    await ws.send_bytes(b"\x00\x01\x02")
                    out.append(await ws.receive_json(timeout=10))
                    return out
        finally:
            await server.close()

    hello, junk, unknown, early, bad, started, odd = asyncio.run(run())
    assert hello["type"] == "hello" and hello["models"] == ["demo_ada", "demo_ben", "demo_cleo"]
    assert hello["sample_rate"] == 16000 and hello["fps"] == 25
    assert junk["type"] == "error" and junk["code"] == "bad_request"
    assert unknown["code"] == "unknown_model" and "nobody" in unknown["message"]
    assert early["code"] == "bad_request" and "before start" in early["message"]
    assert bad["code"] == "bad_request"
    assert started["type"] == "started" and started["model_id"] == "demo_ada"
    assert odd["code"] == "bad_request" and "16-bit" in odd["message"]


# --- browsers and sockets that attack (docs/SECURITY.md) ---------------------------------------


def test_origin_host_and_status_are_checked(tmp_path):
    """A page of another site (its Origin) cannot open a stream; a DNS-rebinding name (its Host)
    gets nothing; /api/status (peer addresses) answers loopback peers only. Real sockets, real
    aiohttp server; no cluster is needed for any of these answers."""
    from lipsync_cluster.gateway.server import host_allowed

    async def run():
        server = TestServer(make_app("tcp://127.0.0.1:9", request_timeout=0.5,
                                     allowed_origins=["https://app.example.com"], allowed_hosts=["avatar.lan"]))
        await server.start_server()
        own = f"http://127.0.0.1:{server.port}"
        try:
            async with aiohttp.ClientSession() as http:
                refused = await http.get(server.make_url("/ws"), headers={
                    "Origin": "https://evil.example", "Upgrade": "websocket", "Connection": "Upgrade",
                    "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(), "Sec-WebSocket-Version": "13"})
                assert refused.status == 403 and "origin" in (await refused.text())
                for origin in (own, "https://app.example.com", None):  # None: not a browser, no Origin
                    async with http.ws_connect(server.make_url("/ws"),
                                               headers={"Origin": origin} if origin else {}) as ws:
                        kinds = [(await ws.receive_json(timeout=10))["type"] for _ in range(2)]
                        assert "hello" in kinds, kinds
                rebound = await http.get(server.make_url("/api/status"), headers={"Host": f"evil.example:{server.port}"})
                assert rebound.status == 403 and "allow-host" in await rebound.text()
                page = await http.get(server.make_url("/"), headers={"Host": f"evil.example:{server.port}"})
                assert page.status == 403
                assert (await http.get(server.make_url("/"), headers={"Host": f"avatar.lan:{server.port}"})).status == 200
                assert (await http.get(server.make_url("/api/status"))).status == 200  # from loopback
        finally:
            await server.close()

    asyncio.run(run())
    assert host_allowed("127.0.0.1:8086") and host_allowed("[::1]:8086") and host_allowed("localhost")
    assert host_allowed("10.0.0.5") and not host_allowed("evil.example:8086") and not host_allowed("")
    # Status from another address: the gateway bound to a second loopback address sees a peer
    # that is not loopback only on a real network, so the rule is checked on the function itself.
    from lipsync_cluster.gateway.server import _is_loopback
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and not _is_loopback("10.0.0.7")
    assert not _is_loopback(None)


def test_a_socket_that_never_reads_is_closed_not_buffered():
    """A client sends pings (or bad messages) and never reads the answers: the gateway's control
    queue stays bounded and the socket is closed; memory does not follow the attacker."""
    async def run():
        server = TestServer(make_app("tcp://127.0.0.1:9", request_timeout=0.5))
        await server.start_server()
        loop = asyncio.get_running_loop()
        try:
            async with aiohttp.ClientSession() as http:
                s = await loop.run_in_executor(None, ws_handshake, server.port)
                s.settimeout(2.0)
                batch = b"".join(ws_frame(json.dumps({"type": "ping", "t": i}).encode() if i % 2 else b"not json", 0x1)
                                 for i in range(500))
                t0 = time.monotonic()
                for _ in range(400):  # up to 200,000 messages, each answered, none read
                    try:
                        await loop.run_in_executor(None, s.sendall, batch)
                    except socket.timeout:
                        continue  # the gateway is busy reading: go on
                    except OSError:
                        break  # the gateway hung up on us
                    status = await (await http.get(server.make_url("/api/status"))).json()
                    if status["closed_sessions"] == 1:
                        break
                # Still holding our end open: the gateway must have closed the session by itself.
                async def closed_by_itself() -> dict | None:
                    status = await (await http.get(server.make_url("/api/status"))).json()
                    return status if status["closed_sessions"] == 1 and status["sessions"] == 0 else None

                status = await wait_until_async(closed_by_itself, 10, "the gateway to close the socket that never reads")
                closed = status["closed_sessions"] == 1
                s.close()
                return closed, status, time.monotonic() - t0
        finally:
            await server.close()

    closed, status, took = asyncio.run(run())
    assert closed, f"the socket that never reads was not closed: {status}"
    assert status["sessions"] == 0 and status["closed_sessions"] == 1
