"""The browser gateway: one page, one WebSocket per viewer, one StreamSession per socket.

    lipsync-cluster gateway --port 8086 --broker tcp://127.0.0.1:5555

Routes: ``/`` the page, ``/static/*`` its script and AudioWorklet, ``/api/models`` (the broker's
``list_models``), ``/api/status`` (sessions, drops, latency), ``/ws`` the stream. The WebSocket
protocol (JSON control messages, binary PCM in, binary frames out) is in docs/STREAMING.md.

Isolation: each socket owns its own :class:`AsyncStreamSession`; its frames go to that socket's
queue only. A socket that closes cancels its session at once (in-flight requests are abandoned).
A slow browser does not grow memory: each socket's frame queue is bounded and drops the oldest
frame when full; the drop count travels in every frame header and stats message. Control
messages cannot be dropped, so their queue is bounded too: a socket that lets more than
:data:`MAX_CONTROL` of them wait (it sends but never reads) is closed (code 1008).

Browsers (docs/SECURITY.md): every request's ``Host`` must be an IP address, ``localhost`` or a
name given with ``allowed_hosts`` (a DNS-rebinding page cannot reach the gateway under its own
name), and a WebSocket whose ``Origin`` is not the page's own origin (or in ``allowed_origins``)
is refused before the upgrade: another site open in the same browser cannot drive a stream.
``/api/status`` (every session's peer address) answers loopback peers only.
"""
from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import logging
import struct
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
from aiohttp import WSMsgType, web

from ..client.client import AsyncClient
from ..client.stream import AsyncStreamSession, StreamFrame
from ..common.audio import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, SPAN_AFTER
from ..common.errors import LipsyncError
from ..common.infer_request import MODEL_ID_RE, is_model_id

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
MAX_CONTROL = 64  # control (and in-order) messages waiting for one socket before it is closed


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

    def __init__(self, max_frames: int, max_control: int = MAX_CONTROL,
                 on_overflow: Optional[Callable[[], None]] = None) -> None:
        self.max_frames = max(1, max_frames)
        self.max_control = max(1, max_control)
        self.on_overflow = on_overflow  # called once when control messages exceed max_control
        self.overflowed = False
        self.frames: deque = deque()
        self.control: deque = deque()
        self.waiting = 0  # frames (not in-order messages) in `frames`
        self.drops = 0
        self._ready = asyncio.Event()

    def _room_for_control(self, waiting: int) -> bool:
        """False (once calling ``on_overflow``) when ``waiting`` messages already wait: they are
        never dropped, so the socket that does not read them must go."""
        if waiting < self.max_control and not self.overflowed:
            return True
        if not self.overflowed:
            self.overflowed = True
            if self.on_overflow is not None:
                self.on_overflow()
        return False

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
        if not self._room_for_control(len(self.frames) - self.waiting):
            return
        self.frames.append(message)
        self._ready.set()

    def put_control(self, message: dict) -> None:
        if message.get("type") == "stats":  # only the newest stats matter
            self.control = deque(m for m in self.control if m.get("type") != "stats")
        if not self._room_for_control(len(self.control)):
            return
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


class StreamControl:
    """A viewer's control messages and PCM, whatever carries them: the one place that handles
    ``switch``, ``interrupt``, ``listen``, ``ping`` and pushed audio, for the WebSocket
    (:class:`SocketSession`) and the WebRTC data channel (``gateway/webrtc.py``) alike.

    A subclass sets ``gateway`` and ``stream`` (anything with the :class:`AsyncStreamSession`
    calls used here) and says how a message goes out (:meth:`put_control`), what ``start`` and
    ``stop`` do and how a stream that must go is stopped.
    """

    gateway: "Gateway"
    stream: Any = None
    id: str = "?"
    peer: str = "?"

    def put_control(self, message: dict) -> None:
        raise NotImplementedError

    async def _start(self, msg: dict) -> None:
        raise NotImplementedError

    def _stop(self) -> None:
        """``stop``: the end of the audio (the tail is flushed)."""
        raise NotImplementedError

    async def _stop_stream(self) -> None:
        raise NotImplementedError

    def _error(self, code: str, message: str) -> None:
        self.put_control({"type": "error", "code": code, "message": message})

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
                self._call(lambda s: {"type": "switched", "model_id": model,
                                      "at_frame": s.switch(model, msg.get("at_frame"))})
        elif kind in ("interrupt", "listen"):
            if self.stream is None:
                self._error("bad_request", f"{kind} before start")
            elif kind == "interrupt":
                self._call(lambda s: {"type": "interrupted", "cut": s.interrupt(),
                                      "samples": s.stats()["samples"]})
            elif not isinstance(msg.get("on"), bool):
                self._error("bad_request", "listen needs 'on': true or false")
            else:
                self._call(lambda s: (s.set_listening(msg["on"]),
                                      {"type": "listening", "on": msg["on"], "samples": s.stats()["samples"]})[1])
        elif kind == "stop":
            if self.stream is not None:
                self._stop()
        elif kind == "ping":
            t = msg.get("t")  # echoed only as a number: a pong is never bigger than its ping's header
            t = t if isinstance(t, (int, float)) and not isinstance(t, bool) else None
            self.put_control({"type": "pong", "t": t, "server_time": time.time()})
        else:
            self._error("bad_request", f"unknown control message type {kind!r}")

    def _call(self, action) -> None:
        """Run a stream control (switch, interrupt, listen) and queue its answer; a refusal is an error."""
        try:
            self.put_control(action(self.stream))
        except LipsyncError as exc:
            self._error(exc.code, exc.message)

    async def _check_model(self, model: Any) -> bool:
        problem = await self.gateway.model_problem(model)
        if problem is not None:
            self._error(*problem)
            return False
        return True


class SocketSession(StreamControl):
    """One WebSocket: control messages, PCM in, frames out."""

    def __init__(self, gateway: "Gateway", ws: web.WebSocketResponse, sid: str, peer: str,
                 transport: Any = None) -> None:
        self.gateway, self.ws, self.id, self.peer = gateway, ws, sid, peer
        self._transport = transport
        self.queue = FrameQueue(gateway.max_queue, on_overflow=self._overflowed)
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

    def _overflowed(self) -> None:
        log.warning("session %s (%s): more than %d messages wait for a socket that does not read; closing it",
                    self.id, self.peer, self.queue.max_control)
        asyncio.ensure_future(self._close_socket())

    async def _close_socket(self) -> None:
        await self._stop_stream()
        try:  # a peer that does not read may never take the close frame either
            await asyncio.wait_for(self.ws.close(code=1008, message=b"not reading its messages"), 1.0)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            pass
        if self._transport is not None and not self.ws.closed:
            self._transport.abort()
        elif self._transport is not None:
            self._transport.close()

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

    # --- input (StreamControl) ---------------------------------------------------------------

    def put_control(self, message: dict) -> None:
        self.queue.put_control(message)

    def _stop(self) -> None:
        self.stream.close()  # the tail is flushed, then 'ended'

    async def _start(self, msg: dict) -> None:
        model = msg.get("model_id")
        if not await self._check_model(model):
            return
        await self._stop_stream()
        g = self.gateway
        lookahead = msg.get("lookahead_frames", g.lookahead_frames)
        try:
            stream = AsyncStreamSession(g.client, model, batch_size=g.batch_size, format=g.format,
                                        quality=g.quality, max_in_flight=g.max_in_flight,
                                        request_timeout=g.request_timeout, lookahead_frames=lookahead)
        except LipsyncError as exc:
            self._error(exc.code, exc.message)
            return
        self.stream = stream
        self._forward = asyncio.ensure_future(self._forward_loop(self.stream, self.generation))
        self.queue.clear_frames()
        self.queue.put_control({"type": "started", "model_id": model, "batch_size": g.batch_size,
                                "format": g.format, "generation": self.generation, "lookahead_frames": lookahead})
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
                       retries=st["retries"], listening=st["listening"], idle_frames=st["idle_frames"],
                       interrupts=[i["cut"] for i in st["interrupts"]][-10:])
        return out


def _short_latency(lat: dict) -> dict:
    return {"p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"], "frames": lat["frames"]}


WEBRTC_BATCHING = ("adaptive", "fixed")
LIVE_WINDOW = 250  # frames (10 s) behind the live latency figures


class Gateway:
    """The aiohttp application's state: the broker client, the sessions, the settings."""

    def __init__(self, broker: str, *, batch_size: int = 5, format: str = "jpeg", quality: Optional[int] = 80,
                 max_queue: int = 10, max_in_flight: int = 3, max_sessions: int = 64,
                 request_timeout: float = 10.0, allowed_hosts: Iterable[str] = (),
                 allowed_origins: Iterable[str] = (), lookahead_frames: int = SPAN_AFTER,
                 ice_servers: Iterable[Any] = (), webrtc_stamp: bool = False,
                 webrtc_peer_timeout_s: float = 10.0, webrtc_video_kbps: int = 1500,
                 webrtc_batching: str = "adaptive") -> None:
        if webrtc_batching not in WEBRTC_BATCHING:
            raise ValueError(f"webrtc_batching must be one of {', '.join(WEBRTC_BATCHING)}; got {webrtc_batching!r}")
        self.broker = broker
        self.allowed_hosts = {h.lower().strip("[]") for h in allowed_hosts}
        self.allowed_origins = {o.lower().rstrip("/") for o in allowed_origins}
        self.batch_size, self.format, self.quality = batch_size, format, quality
        self.max_queue, self.max_in_flight, self.max_sessions = max_queue, max_in_flight, max_sessions
        self.request_timeout = request_timeout
        self.lookahead_frames = lookahead_frames
        self.ice_servers = tuple(ice_servers)  # aiortc RTCIceServer (none: host candidates, LAN/loopback)
        self.webrtc_stamp = webrtc_stamp  # draw each frame's index into its WebRTC picture (tests, bench)
        self.webrtc_peer_timeout_s = webrtc_peer_timeout_s  # no RTCP from a peer this long: it is gone
        self.webrtc_video_kbps = webrtc_video_kbps
        # WebRTC is conversation: its sessions batch adaptively (StreamCore ``adaptive``); "fixed"
        # is the batch grid of the WebSocket path (the old behaviour, kept to measure against).
        self.webrtc_batching = webrtc_batching
        self.client: Optional[AsyncClient] = None
        self.sessions: dict[str, Any] = {}  # WebSocket (SocketSession) and WebRTC (PeerSession) viewers
        self._ids = itertools.count(1)
        self._models: tuple[float, list[dict]] = (0.0, [])
        self.closed_sessions = 0

    async def models(self) -> list[dict]:
        at, models = self._models
        if time.monotonic() - at > MODELS_TTL_S or not models:
            models = await self.client.list_models()
            self._models = (time.monotonic(), models)
        return models

    def new_session_id(self, prefix: str = "s") -> str:
        return f"{prefix}{next(self._ids)}"

    def session_ended(self, sid: str) -> None:
        """A WebSocket or WebRTC session is over: it leaves the table and counts as closed."""
        self.sessions.pop(sid, None)
        self.closed_sessions += 1

    async def model_problem(self, model: Any) -> Optional[tuple[str, str]]:
        """None when ``model`` is a model the cluster serves, else ``(code, message)``."""
        if not is_model_id(model):
            return "bad_request", f"model_id must match {MODEL_ID_RE.pattern}; got {model!r}"
        models = await self.model_ids()
        if model not in models:
            return "unknown_model", f"no model '{model}'; available: {', '.join(models) or 'none'}"
        return None

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
        if not _is_loopback(request.remote):  # peer addresses of every session: local/admin use only
            return web.json_response({"error": {"code": "unauthorized", "message": "/api/status answers "
                                                "requests from this host only"}}, status=403)
        return web.json_response({"sessions": len(self.sessions), "closed_sessions": self.closed_sessions,
                                  "broker": self.broker,
                                  "detail": [s.status() for s in self.sessions.values()]})

    def origin_allowed(self, request: web.Request) -> bool:
        """A browser's WebSocket must come from the page's own origin (or an allowed one); a
        client that sends no Origin is not a browser (a browser always sends it)."""
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        origin = origin.lower().rstrip("/")
        return origin == f"{request.scheme}://{request.host}".lower() or origin in self.allowed_origins

    @web.middleware
    async def check_host(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        if not host_allowed(request.host, self.allowed_hosts):
            log.warning("refused a request for Host %r from %s", request.host, request.remote)
            return web.Response(status=403, text=f"Host {request.host!r} is not served here (an IP address, "
                                                 "localhost or a name given with --allow-host)\n")
        return await handler(request)

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        if not self.origin_allowed(request):
            log.warning("refused a WebSocket from Origin %r (%s)", request.headers.get("Origin"), request.remote)
            return web.Response(status=403, text="this page's origin may not open streams here "
                                                 "(the gateway's own page, or --allow-origin)\n")
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=1 << 20)
        await ws.prepare(request)
        if len(self.sessions) >= self.max_sessions:
            await ws.send_str(json.dumps({"type": "error", "code": "capacity_full",
                                          "message": f"this gateway serves at most {self.max_sessions} sessions"}))
            await ws.close()
            return ws
        sid = self.new_session_id()
        session = SocketSession(self, ws, sid, request.remote or "?", request.transport)
        self.sessions[sid] = session
        log.info("session %s opened from %s (%d open)", sid, session.peer, len(self.sessions))
        try:
            await session.run()
        finally:
            self.session_ended(sid)
            log.info("session %s closed (%d sent, %d dropped; %d open)", sid, session.sent, session.queue.drops,
                     len(self.sessions))
        return ws

    async def webrtc_offer(self, request: web.Request) -> web.Response:
        """``POST /webrtc/offer`` (gateway/webrtc.py; needs the ``webrtc`` extra, loaded on first use)."""
        if not self.origin_allowed(request):
            log.warning("refused a WebRTC offer from Origin %r (%s)", request.headers.get("Origin"), request.remote)
            return _error_response(403, "unauthorized", "this page's origin may not open streams here "
                                                        "(the gateway's own page, or --allow-origin)")
        try:
            from . import webrtc
        except ImportError as exc:
            return _error_response(501, "unavailable", str(exc))
        try:
            return await webrtc.offer(self, request)
        except webrtc.OfferError as exc:
            log.info("refused a WebRTC offer from %s: %s", request.remote, exc.message)
            return _error_response(exc.status, exc.code, exc.message)

    # --- app -----------------------------------------------------------------------------------

    async def _startup(self, app: web.Application) -> None:
        self.client = AsyncClient(self.broker, timeout=self.request_timeout)

    async def _shutdown(self, app: web.Application) -> None:
        for session in list(self.sessions.values()):
            await session.close()
            if not isinstance(session, SocketSession):
                continue
            try:  # a browser that does not read could hold the close handshake forever
                await asyncio.wait_for(session.ws.close(), 1.0)
            except (asyncio.TimeoutError, ConnectionError, RuntimeError):
                pass

    async def _cleanup(self, app: web.Application) -> None:
        if self.client is not None:
            await self.client.close()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.check_host])
        app[GATEWAY_KEY] = self
        app.router.add_get("/", self.index)
        app.router.add_get("/api/models", self.api_models)
        app.router.add_get("/api/status", self.api_status)
        app.router.add_get("/ws", self.websocket)
        app.router.add_post("/webrtc/offer", self.webrtc_offer)
        app.router.add_static("/static/", STATIC, show_index=False)
        app.on_startup.append(self._startup)
        app.on_shutdown.append(self._shutdown)
        app.on_cleanup.append(self._cleanup)
        return app


def _error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _is_loopback(address: Optional[str]) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def host_allowed(host: Optional[str], allowed: Iterable[str] = ()) -> bool:
    """Whether a request's Host names this gateway safely: an IP address (a rebinding page cannot
    use one of ours), ``localhost``, or a name the operator allowed."""
    if not host:
        return False
    name = host.strip()
    if name.startswith("["):  # [v6]:port
        name = name[1:name.find("]")] if "]" in name else ""
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    name = name.lower().rstrip(".")
    if not name:
        return False
    if name == "localhost" or name in allowed:
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def make_app(broker: str, **settings: Any) -> web.Application:
    """The gateway as an aiohttp application (see :class:`Gateway` for the settings)."""
    return Gateway(broker, **settings).app()


__all__ = ["Gateway", "make_app", "pack_frame", "unpack_frame", "FrameQueue", "FRAME_HEADER", "FRAME_MAGIC",
           "SAMPLES_PER_FRAME"]
