"""The browser gateway: one page, one WebSocket per viewer, one StreamSession per socket.

    lipsync-cluster gateway --port 8086 --broker tcp://127.0.0.1:5555

Routes: ``/`` the page, ``/static/*`` its script and AudioWorklet, ``/api/models`` (the broker's
``list_models``), ``/api/status`` (sessions, drops, latency), ``/ws`` the stream. The WebSocket
protocol (JSON control messages, binary PCM in, binary frames out) is in docs/STREAMING.md.

Isolation: each socket owns its own :class:`AsyncStreamSession`; its frames go to that socket's
queue only. A socket that closes cancels its session at once (in-flight requests are abandoned).
A slow browser does not grow memory: each socket's frame queue is bounded and drops the oldest
frame when full; the drop count travels in every frame header and stats message.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import struct
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

import numpy as np
from aiohttp import WSMsgType, web

from ..client.client import AsyncClient
from ..client.stream import MODEL_ID_RE, AsyncStreamSession, StreamFrame
from ..common.audio import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from ..common.errors import LipsyncError

log = logging.getLogger("lipsync_cluster.gateway")

STATIC = Path(__file__).resolve().parent / "static"
FRAME_MAGIC = b"LSF1"
# little endian: magic, index u32, pts f64, background u32, latency_ms f32, drops u32, model_len u16,
# format u8, reserved u8; then the model id (ASCII) and the image bytes.
FRAME_HEADER = struct.Struct("<4sIdIfIHBB")
FORMAT_CODES = {"jpeg": 1, "png": 2}
STATS_INTERVAL_S = 0.5
GATEWAY_KEY: "web.AppKey[Gateway]" = web.AppKey("gateway")
MAX_BACKLOG_S = 30.0  # audio that has arrived but could not be sent to the cluster yet
MODELS_TTL_S = 5.0


def pack_frame(frame: StreamFrame, drops: int) -> bytes:
    """The binary message of one frame (layout in docs/STREAMING.md)."""
    model = frame.model_id.encode("ascii")
    head = FRAME_HEADER.pack(FRAME_MAGIC, frame.index, frame.pts, frame.background_index,
                             float(frame.latency_ms), drops, len(model), FORMAT_CODES.get(frame.format, 0), 0)
    return b"".join((head, model, frame.image))


def unpack_frame(data: bytes) -> dict:
    """The inverse of :func:`pack_frame` (for tests and Python viewers)."""
    magic, index, pts, bg, latency, drops, mlen, fmt, _ = FRAME_HEADER.unpack_from(data)
    if magic != FRAME_MAGIC:
        raise ValueError(f"not a frame message (magic {magic!r})")
    start = FRAME_HEADER.size
    model = data[start:start + mlen].decode("ascii")
    fmt_name = {v: k for k, v in FORMAT_CODES.items()}.get(fmt, "unknown")
    return {"index": index, "pts": pts, "background_index": bg, "latency_ms": latency, "drops": drops,
            "model_id": model, "format": fmt_name, "image": bytes(data[start + mlen:])}


class FrameQueue:
    """Outgoing messages of one socket: control messages first, then frames in order.

    At most ``max_frames`` frames wait; one more drops the oldest waiting frame (``drops`` counts
    them). Messages that must follow the frames (``ended``) are queued in line with them with
    :meth:`put_in_order` and are never dropped.
    """

    def __init__(self, max_frames: int) -> None:
        self.max_frames = max(1, max_frames)
        self.frames: deque = deque()
        self.control: deque = deque()
        self.waiting = 0  # frames (not in-order messages) in `frames`
        self.drops = 0
        self._ready = asyncio.Event()

    def put_frame(self, item: Any) -> None:
        if self.waiting >= self.max_frames:
            for i, old in enumerate(self.frames):
                if not isinstance(old, dict):
                    del self.frames[i]
                    break
            self.waiting -= 1
            self.drops += 1
        self.frames.append(item)
        self.waiting += 1
        self._ready.set()

    def put_in_order(self, message: dict) -> None:
        self.frames.append(message)
        self._ready.set()

    def put_control(self, message: dict) -> None:
        if message.get("type") == "stats":  # only the newest stats matter
            self.control = deque(m for m in self.control if m.get("type") != "stats")
        self.control.append(message)
        self._ready.set()

    def clear_frames(self) -> None:
        self.frames.clear()
        self.waiting = 0

    async def get(self) -> Any:
        while not self.control and not self.frames:
            self._ready.clear()
            await self._ready.wait()
        if self.control:
            return self.control.popleft()
        item = self.frames.popleft()
        if not isinstance(item, dict):
            self.waiting -= 1
        return item


class SocketSession:
    """One WebSocket: control messages, PCM in, frames out."""

    def __init__(self, gateway: "Gateway", ws: web.WebSocketResponse, sid: str, peer: str) -> None:
        self.gateway, self.ws, self.id, self.peer = gateway, ws, sid, peer
        self.queue = FrameQueue(gateway.max_queue)
        self.stream: Optional[AsyncStreamSession] = None
        self.last_stream: Optional[AsyncStreamSession] = None  # the stream that ended last (for status)
        self.generation = 0  # a new start() begins a new stream; old frames are ignored
        self.sent = 0
        self.started_at = time.time()
        self._forward: Optional[asyncio.Task] = None
        self._sender: Optional[asyncio.Task] = None
        self._stats: Optional[asyncio.Task] = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        self._sender = asyncio.ensure_future(self._send_loop())
        self._stats = asyncio.ensure_future(self._stats_loop())
        self.queue.put_control({"type": "hello", "session": self.id, "fps": FPS, "sample_rate": SAMPLE_RATE,
                                "pcm": "s16le", "models": await self.gateway.model_ids(),
                                "max_queue": self.queue.max_frames})
        try:
            async for msg in self.ws:
                if msg.type == WSMsgType.BINARY:
                    self._on_pcm(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    await self._on_control(msg.data)
                elif msg.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
                    break
        finally:
            await self.close()

    async def close(self) -> None:
        """Free everything at once: the stream (in-flight requests abandoned) and the tasks."""
        await self._stop_stream()
        for task in (self._sender, self._stats):
            if task is not None:
                task.cancel()
        for task in (self._sender, self._stats):
            if task is not None:
                try:
                    await task
                except (asyncio.CancelledError, Exception):  # noqa: BLE001 - closing anyway
                    pass
        self._sender = self._stats = None

    async def _stop_stream(self) -> None:
        stream, forward = self.stream, self._forward
        self.stream, self._forward = None, None
        self.generation += 1
        if forward is not None:
            forward.cancel()
        if stream is not None:
            await stream.cancel()
        if forward is not None:
            try:
                await forward
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass

    # --- input ----------------------------------------------------------------------------------

    def _error(self, code: str, message: str) -> None:
        self.queue.put_control({"type": "error", "code": code, "message": message})

    def _on_pcm(self, data: bytes) -> None:
        if self.stream is None:
            return  # audio before start / after stop: nothing to animate
        if len(data) % 2:
            self._error("bad_request", f"PCM messages are 16-bit little-endian samples; got {len(data)} bytes")
            return
        if not data:
            return
        try:
            self.stream.push(np.frombuffer(data, "<i2"))
        except LipsyncError as exc:
            self._error(exc.code, exc.message)
            return
        if self.stream.backlog_frames > MAX_BACKLOG_S * FPS:
            self._error("overloaded", f"audio arrives faster than the cluster renders it (more than "
                                      f"{MAX_BACKLOG_S:.0f} s behind); the stream was stopped")
            asyncio.ensure_future(self._stop_stream())

    async def _on_control(self, text: str) -> None:
        try:
            msg = json.loads(text)
            kind = msg["type"]
        except (ValueError, KeyError, TypeError):
            self._error("bad_request", "control messages are JSON objects with a 'type'")
            return
        if kind == "start":
            await self._start(msg)
        elif kind == "switch":
            model = msg.get("model_id")
            if self.stream is None:
                self._error("bad_request", "switch before start")
            elif await self._check_model(model):
                self.stream.switch(model)
                self.queue.put_control({"type": "switched", "model_id": model})
        elif kind == "stop":
            if self.stream is not None:
                self.stream.close()  # the tail is flushed, then 'ended'
        elif kind == "ping":
            self.queue.put_control({"type": "pong", "t": msg.get("t"), "server_time": time.time()})
        else:
            self._error("bad_request", f"unknown control message type {kind!r}")

    async def _check_model(self, model: Any) -> bool:
        if not isinstance(model, str) or not MODEL_ID_RE.match(model):
            self._error("bad_request", f"model_id must match {MODEL_ID_RE.pattern}; got {model!r}")
            return False
        models = await self.gateway.model_ids()
        if model not in models:
            self._error("unknown_model", f"no model '{model}'; available: {', '.join(models) or 'none'}")
            return False
        return True

    async def _start(self, msg: dict) -> None:
        model = msg.get("model_id")
        if not await self._check_model(model):
            return
        await self._stop_stream()
        g = self.gateway
        self.stream = AsyncStreamSession(g.client, model, batch_size=g.batch_size, format=g.format,
                                         quality=g.quality, max_in_flight=g.max_in_flight,
                                         request_timeout=g.request_timeout)
        self._forward = asyncio.ensure_future(self._forward_loop(self.stream, self.generation))
        self.queue.clear_frames()
        self.queue.put_control({"type": "started", "model_id": model, "batch_size": g.batch_size,
                                "format": g.format, "generation": self.generation})
        log.info("session %s (%s): started on %s", self.id, self.peer, model)

    # --- output ---------------------------------------------------------------------------------

    async def _forward_loop(self, stream: AsyncStreamSession, generation: int) -> None:
        try:
            async for frame in stream.frames():
                if generation != self.generation:
                    return
                self.queue.put_frame((generation, frame))
            self.queue.put_in_order({"type": "ended", "frames": stream.total_frames,
                                    "latency": _short_latency(stream.latency(breakdown=False)),
                                    "drops": self.queue.drops})
        except LipsyncError as exc:
            self._error(exc.code, exc.message)
        if generation == self.generation:
            self.last_stream = stream
            self.stream = None
            self._forward = None

    async def _send_loop(self) -> None:
        while True:
            item = await self.queue.get()
            if isinstance(item, dict):
                await self.ws.send_str(json.dumps(item))
                continue
            generation, frame = item
            if generation != self.generation:
                continue
            await self.ws.send_bytes(pack_frame(frame, self.queue.drops))
            self.sent += 1

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            self.queue.put_control({"type": "stats", **self.status()})

    def status(self) -> dict:
        """This socket's counters; ``frames``/``latency`` are of the running stream, else the last one."""
        stream = self.stream or self.last_stream
        out = {"session": self.id, "peer": self.peer, "streaming": self.stream is not None, "sent": self.sent,
               "drops": self.queue.drops, "queued": self.queue.waiting, "model_id": None, "latency": None,
               "frames": 0, "audio_seconds": 0.0, "in_flight": 0}
        if stream is not None:
            st = stream.stats()
            out.update(model_id=stream.model_id,
                       latency=_short_latency(stream.latency(recent=LIVE_WINDOW, breakdown=False)),
                       frames=st["delivered"], audio_seconds=round(st["seconds"], 3), in_flight=st["in_flight"],
                       retries=st["retries"])
        return out


def _short_latency(lat: dict) -> dict:
    return {"p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"], "frames": lat["frames"]}


LIVE_WINDOW = 250  # frames (10 s) behind the live latency figures


class Gateway:
    """The aiohttp application's state: the broker client, the sessions, the settings."""

    def __init__(self, broker: str, *, batch_size: int = 5, format: str = "jpeg", quality: Optional[int] = 80,
                 max_queue: int = 10, max_in_flight: int = 3, max_sessions: int = 64,
                 request_timeout: float = 10.0) -> None:
        self.broker = broker
        self.batch_size, self.format, self.quality = batch_size, format, quality
        self.max_queue, self.max_in_flight, self.max_sessions = max_queue, max_in_flight, max_sessions
        self.request_timeout = request_timeout
        self.client: Optional[AsyncClient] = None
        self.sessions: dict[str, SocketSession] = {}
        self._ids = itertools.count(1)
        self._models: tuple[float, list[dict]] = (0.0, [])
        self.closed_sessions = 0

    async def models(self) -> list[dict]:
        at, models = self._models
        if time.monotonic() - at > MODELS_TTL_S or not models:
            models = await self.client.list_models()
            self._models = (time.monotonic(), models)
        return models

    async def model_ids(self) -> list[str]:
        try:
            return sorted(m["model_id"] for m in await self.models())
        except LipsyncError as exc:
            log.warning("list_models failed: %s", exc)
            return []

    # --- handlers -------------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def api_models(self, request: web.Request) -> web.Response:
        try:
            models = await self.models()
        except LipsyncError as exc:
            return web.json_response({"error": exc.to_wire()}, status=503)
        rows = [{"model_id": m["model_id"], "loaded": m.get("loaded", False), "num_frames": m.get("num_frames"),
                 "version": m.get("version")} for m in sorted(models, key=lambda m: m["model_id"])]
        return web.json_response({"models": rows})

    async def api_status(self, request: web.Request) -> web.Response:
        return web.json_response({"sessions": len(self.sessions), "closed_sessions": self.closed_sessions,
                                  "broker": self.broker,
                                  "detail": [s.status() for s in self.sessions.values()]})

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=1 << 20)
        await ws.prepare(request)
        if len(self.sessions) >= self.max_sessions:
            await ws.send_str(json.dumps({"type": "error", "code": "capacity_full",
                                          "message": f"this gateway serves at most {self.max_sessions} sessions"}))
            await ws.close()
            return ws
        sid = f"s{next(self._ids)}"
        session = SocketSession(self, ws, sid, request.remote or "?")
        self.sessions[sid] = session
        log.info("session %s opened from %s (%d open)", sid, session.peer, len(self.sessions))
        try:
            await session.run()
        finally:
            self.sessions.pop(sid, None)
            self.closed_sessions += 1
            log.info("session %s closed (%d sent, %d dropped; %d open)", sid, session.sent, session.queue.drops,
                     len(self.sessions))
        return ws

    # --- app -----------------------------------------------------------------------------------

    async def _startup(self, app: web.Application) -> None:
        self.client = AsyncClient(self.broker, timeout=self.request_timeout)

    async def _shutdown(self, app: web.Application) -> None:
        for session in list(self.sessions.values()):
            await session.close()
            try:  # a browser that does not read could hold the close handshake forever
                await asyncio.wait_for(session.ws.close(), 1.0)
            except (asyncio.TimeoutError, ConnectionError, RuntimeError):
                pass

    async def _cleanup(self, app: web.Application) -> None:
        if self.client is not None:
            await self.client.close()

    def app(self) -> web.Application:
        app = web.Application()
        app[GATEWAY_KEY] = self
        app.router.add_get("/", self.index)
        app.router.add_get("/api/models", self.api_models)
        app.router.add_get("/api/status", self.api_status)
        app.router.add_get("/ws", self.websocket)
        app.router.add_static("/static/", STATIC, show_index=False)
        app.on_startup.append(self._startup)
        app.on_shutdown.append(self._shutdown)
        app.on_cleanup.append(self._cleanup)
        return app


def make_app(broker: str, **settings: Any) -> web.Application:
    """The gateway as an aiohttp application (see :class:`Gateway` for the settings)."""
    return Gateway(broker, **settings).app()


__all__ = ["Gateway", "make_app", "pack_frame", "unpack_frame", "FrameQueue", "FRAME_HEADER", "FRAME_MAGIC",
           "SAMPLES_PER_FRAME"]
