"""The worker's side of the broker protocol: one DEALER socket, a small executor pool.

The loop thread owns the socket (zmq sockets are not thread-safe). It registers (``ready``),
heartbeats, hands each ``request`` to one of ``credits`` executor threads, and sends what the
executors and the handler's event sink produce. Those threads never touch the socket: they
append finished messages to a deque and poke an inproc PUSH socket (guarded by a lock) whose
PULL end the loop polls next to the DEALER, so a reply leaves within microseconds of being
ready, with no polling delay. One deque for replies and events keeps them in the order they
happened (a ``loaded`` event goes out before the reply that caused the load).

If the broker falls silent for ``heartbeat_liveness`` intervals, or says ``disconnect``, the
loop opens a fresh socket and registers again, waiting longer each time (backoff), so a broker
restart is survived without restarting the worker.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import queue
import socket as _socket
import threading
import time
import traceback
from collections import deque
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import msgpack
import zmq

from ..common import vocab
from ..common.errors import InternalError, LipsyncError, RequestTimeout
# Lean multipart I/O and the bounded header decode shared with the broker (common/wire.py).
from ..common.wire import (MAX_BATCH_ITEMS, MAX_LEG_HEADER_BYTES, TAG, batch_frames, read_header, readable, tune,
                           unbatch)
from ..common.wire import recv_parts as _recv_parts, send_parts as _send_parts

log = logging.getLogger("lipsync_cluster.worker.loop")

_wake_ids = itertools.count()
RECV_BATCH = 256  # broker messages read per wake-up before the loop looks at its timers
# How long a socket the loop closes (a reconnect replacing it, or the shutdown) may still send what
# was already handed to it: replies and events flushed just before a reconnect, the `disconnect`.
CLOSE_LINGER_MS = 200


@runtime_checkable
class RequestHandler(Protocol):
    """What the loop drives. ``worker/service.py`` implements it for real; ``noop.py`` for tests."""

    def describe(self) -> dict:
        """``{"max_models", "max_memory_bytes", "loaded": [model_id...], "loaded_versions": {...}}``
        (optionally ``"loading": [...]``, and ``"mem_budget"``, ``"mem_used"``, ``"mem_free"`` in
        bytes, which heartbeats carry too); sent with ``ready`` and every heartbeat. Must be quick."""

    def handle(self, header: dict, payloads: list) -> tuple[dict, list]:
        """Serve one broker ``request`` (``header["client_op"]`` is infer / load_model / ...).

        Blocking; called from an executor thread, up to ``credits`` at once. Returns (reply
        fields, payload frames). Raises :class:`LipsyncError` for failures (its code goes to the
        client); any other exception becomes ``internal`` and the worker keeps serving."""

    def set_event_sink(self, sink: Callable[[dict], None]) -> None:
        """``sink(event)`` may be called from any thread: ``{"event": "loaded" | "loading" |
        "evicted" | "unloaded" | "idle_unloaded" | "load_failed", "model_id", "version",
        "memory_bytes", "load_ms", "reason", ...}``; each is sent, in order, at once."""

    def stats(self) -> dict:
        """Periodic snapshot: ``{"models": [{"model_id", ...}], "memory_bytes",
        "max_memory_bytes", "max_models", ...}``. Called from the loop thread; must be quick."""

    def tick(self) -> None:
        """Housekeeping (idle unload) about every second, from the loop thread."""

    def close(self) -> None:
        """Release everything; called once after the last request finished."""


class WorkerLoop:
    """Serve ``handler`` to the broker at ``backend`` until ``run``'s stop event is set."""

    def __init__(self, backend: str, handler: RequestHandler, *, name: str, credits: int = 2,
                 heartbeat_interval_s: float = 1.0, heartbeat_liveness: int = 3,
                 gpu: Optional[int] = None, ctx: Optional[zmq.Context] = None,
                 stats_interval_s: Optional[float] = None, tick_interval_s: float = 1.0,
                 drain_timeout_s: float = 30.0, reconnect_max_s: float = 30.0,
                 curve: Any = None, max_message_bytes: int = 0) -> None:
        if credits < 1:
            raise ValueError(f"credits must be at least 1, got {credits}")
        self.backend = backend
        self.handler = handler
        self.name = name
        self.credits = credits
        self.interval = heartbeat_interval_s
        self.liveness = heartbeat_liveness
        self.gpu = gpu
        self.stats_interval = stats_interval_s if stats_interval_s is not None else max(heartbeat_interval_s, 0.1)
        self.tick_interval = tick_interval_s
        self.drain_timeout = drain_timeout_s
        self.reconnect_max = max(reconnect_max_s, heartbeat_interval_s * heartbeat_liveness)
        self.curve = curve                            # common.security.CurveKeys, or None (loopback)
        self.max_message_bytes = max_message_bytes    # ZMQ_MAXMSGSIZE (per frame); 0 = no limit
        self._handshakes: Any = None                  # security.HandshakeWatch under CURVE
        self._own_ctx = ctx is None
        self.ctx = ctx if ctx is not None else zmq.Context()
        self._sock: Optional[zmq.Socket] = None
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._out: deque[tuple[bool, list]] = deque()  # (is_reply, frames), in production order
        self._wake_lock = threading.Lock()
        self._wake_addr = f"inproc://lsc-worker-wake-{os.getpid()}-{next(_wake_ids)}"
        self._wake_push: Optional[zmq.Socket] = None
        self._packer = msgpack.Packer(use_bin_type=True)  # loop thread only
        self._sleeping = False
        self._batches = False                         # this broker sends (so takes) batches (wire.py)
        self._poller: Optional[zmq.Poller] = None     # the DEALER and the wake-up PULL (run)
        self._silent_limit = heartbeat_interval_s * heartbeat_liveness
        self._backoff = self._silent_limit            # how long the broker may be silent now
        self._broker_deadline = 0.0                   # monotonic: reconnect if nothing came by then
        self._next_hb = 0.0
        self.in_flight = 0
        self.connects = 0             # how many times a socket was opened (1 + reconnects)
        self.served = 0
        self.draining = False

    # --- thread-safe output --------------------------------------------------------------

    def _emit(self, is_reply: bool, frames: list) -> None:
        """Queue a message for the socket thread and wake it (callable from any thread).

        The wake-up is skipped while the loop is awake: it looks at the deque before it sleeps.
        (``_sleeping`` is set before that last look, so a message appended after the look sees
        it set and wakes the poll.)
        """
        self._out.append((is_reply, frames))
        if self._sleeping:
            with self._wake_lock:
                if self._wake_push is not None:
                    try:
                        self._wake_push.send(b"", zmq.NOBLOCK)
                    except zmq.Again:
                        pass  # the pipe is full of wake-ups already

    def _event_sink(self, event: dict) -> None:
        if not isinstance(event, dict):
            log.warning("worker %s: handler emitted a non-map event %r; ignored", self.name, event)
            return
        body = {**event, "op": "event", "worker": self.name}
        try:
            packed = msgpack.packb(body, use_bin_type=True, default=str)
        except Exception as exc:
            log.warning("worker %s: cannot encode event %r: %s", self.name, event, exc)
            return
        self._emit(False, [TAG, packed])

    # --- executor ------------------------------------------------------------------------

    def _executor(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            header, payloads, expires = item
            self._emit(True, self._serve(header, payloads, expires))

    def _serve(self, header: dict, payloads: list, expires: Optional[float] = None) -> list:
        """Run one request through the handler; always returns a reply message.

        ``expires``: this host's monotonic time at which the request's deadline passes."""
        rid, cid = header.get("rid"), header.get("id")
        out_payloads: list = []
        try:
            if expires is not None and time.monotonic() >= expires:
                raise RequestTimeout("deadline passed before the worker started the request")
            fields, out_payloads = self.handler.handle(header, payloads)
            reply = {"ok": True, "worker": self.name, **fields}
        except LipsyncError as exc:
            reply = {"ok": False, "worker": self.name, "error": exc.to_wire()}
        except Exception as exc:
            log.error("worker %s: handler failed on %s for %s:\n%s", self.name,
                      header.get("client_op"), header.get("model_id"), traceback.format_exc())
            err = InternalError(f"{type(exc).__name__}: {exc}")
            reply = {"ok": False, "worker": self.name, "error": err.to_wire()}
        reply["op"] = "reply"
        reply["rid"] = rid
        reply["id"] = cid
        try:
            packed = msgpack.packb(reply, use_bin_type=True)
        except Exception as exc:  # a handler returned something msgpack cannot carry
            err = InternalError(f"reply header cannot be encoded: {exc}")
            packed = msgpack.packb({"op": "reply", "rid": rid, "id": cid, "ok": False,
                                    "worker": self.name, "error": err.to_wire()}, use_bin_type=True)
            out_payloads = []
        return [TAG, packed, *(out_payloads or ())]

    # --- socket --------------------------------------------------------------------------

    def _send(self, body: dict, payloads: Any = ()) -> None:
        try:
            _send_parts(self._sock, [TAG, self._packer.pack(body), *payloads])
        except zmq.Again:
            log.debug("worker %s: broker not reachable; %s dropped", self.name, body.get("op"))

    def _describe(self) -> dict:
        try:
            d = self.handler.describe()
            return d if isinstance(d, dict) else {}
        except Exception:
            log.exception("worker %s: handler.describe() failed", self.name)
            return {}

    def _connect(self) -> None:
        """Open a fresh DEALER (new identity) and register."""
        if self._handshakes is not None:
            self._handshakes.close()
            self._handshakes = None
        if self._sock is not None:
            self._sock.close(linger=CLOSE_LINGER_MS)  # flushed replies still leave (to a broker that may count them late)
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        tune(sock)  # the broker's queue and kernel buffer sizes (common/wire.py)
        if self.max_message_bytes:
            sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        if self.curve is not None:
            self.curve.apply(sock)  # a CURVE client of the broker; ZAP admits listed keys only
            from ..common.security import HandshakeWatch
            self._handshakes = HandshakeWatch(sock)
        sock.connect(self.backend)
        self._sock = sock
        self.connects += 1
        self._batches = False  # until this broker sends a batch: an older one would drop ours
        ready = {"op": "ready", "worker": self.name, "host": _socket.gethostname(), "pid": os.getpid(),
                 "gpu": self.gpu, "credits": self.credits, "batches": True, **self._describe()}
        self._send(ready)
        self._send_stats()

    def _heartbeat(self) -> None:
        d = self._describe()
        self._send({"op": "heartbeat", "worker": self.name, "loaded": d.get("loaded", []),
                    "loading": d.get("loading", []), "in_flight": self.in_flight,
                    "draining": self.draining,
                    # memory in bytes (budget, used, free), for placement by free memory
                    **{k: d[k] for k in vocab.MEM_REPORT if k in d}})

    def _send_stats(self) -> None:
        try:
            stats = self.handler.stats()
        except Exception:
            log.exception("worker %s: handler.stats() failed", self.name)
            return
        if isinstance(stats, dict):
            try:
                self._send({**stats, "op": "stats", "worker": self.name, "in_flight": self.in_flight,
                            "served": self.served})
            except (TypeError, ValueError) as exc:
                log.warning("worker %s: stats cannot be encoded: %s", self.name, exc)

    def _flush(self) -> None:
        """Send what the executors and the event sink produced, in order; replies next to each
        other go as one ``replies`` batch to a broker that sends batches."""
        out, sock = self._out, self._sock
        while out:
            is_reply, frames = out.popleft()
            replies = 1 if is_reply else 0
            if is_reply and self._batches and out and out[0][0]:
                items = [frames[1:]]
                while out and out[0][0] and len(items) < MAX_BATCH_ITEMS:
                    items.append(out.popleft()[1][1:])
                frames, replies = batch_frames("replies", items, self._packer), len(items)
            self.in_flight -= replies
            self.served += replies
            try:
                _send_parts(sock, frames)
            except zmq.Again:
                log.warning("worker %s: broker not reachable; %s dropped", self.name,
                            f"{replies} reply(ies)" if replies else "an event")

    def _on_broker(self, frames: list) -> str:
        try:
            header = read_header(frames, 0, MAX_LEG_HEADER_BYTES)  # size first, unpacked once
        except LipsyncError as exc:
            log.warning("worker %s: malformed message from the broker: %s", self.name, exc.message)
            return ""
        op = header.get("op")
        if op == "request":
            self._take(header, frames[2:])
        elif op == "requests":  # several legs in one message (common/wire.py)
            self._batches = True
            try:
                legs, skipped = unbatch(header, frames, 2, "request", MAX_LEG_HEADER_BYTES)
            except LipsyncError as exc:
                log.warning("worker %s: malformed message from the broker: %s", self.name, exc.message)
                return ""
            for why in skipped:
                log.warning("worker %s: a batched leg from the broker skipped: %s", self.name, why)
            for leg, payloads in legs:
                self._take(leg, payloads)
        elif op not in ("heartbeat", "disconnect"):
            log.warning("worker %s: unknown op %r from the broker; ignored", self.name, op)
        return op

    def _take(self, header: dict, payloads: list) -> None:
        """One leg to an executor. The broker sends the time left; it is counted on this host's
        clock from now."""
        left = header.get("deadline_left_ms")
        expires = (time.monotonic() + left / 1000.0
                   if type(left) in (int, float) and math.isfinite(left) else None)
        self.in_flight += 1
        self._work.put((header, payloads, expires))

    # --- main loop -----------------------------------------------------------------------

    def run(self, stop_event: threading.Event) -> None:
        """Serve until ``stop_event`` is set, then drain: finish in-flight, send disconnect, close."""
        pull = self._open_wakeups()
        self.handler.set_event_sink(self._event_sink)
        threads = [threading.Thread(target=self._executor, name=f"{self.name}-exec{i}", daemon=True)
                   for i in range(self.credits)]
        for t in threads:
            t.start()
        self._poller = zmq.Poller()
        self._poller.register(pull, zmq.POLLIN)
        self._backoff = self._silent_limit
        self._reconnect(None)
        now = time.monotonic()
        next_stats = now + self.stats_interval
        next_tick = now + self.tick_interval
        drain_until = None
        log.info("worker %s serving %s (credits %d, gpu %s)", self.name, self.backend, self.credits, self.gpu)
        try:
            while True:
                if stop_event.is_set() and not self.draining:
                    # Tell the broker to stop sending; what is already on its way is still served.
                    self.draining = True
                    drain_until = time.monotonic() + self.drain_timeout
                    self._heartbeat()
                if self.draining and ((self.in_flight <= 0 and not self._out)
                                      or time.monotonic() > drain_until):
                    break
                events = self._wait(pull, min(self._next_hb, next_stats, next_tick, self._broker_deadline))
                self._flush()
                if self._sock in events and self._read_broker() and not self.draining:
                    self._reconnect("the broker asked us to register again")
                now = time.monotonic()
                if now >= self._broker_deadline and not self.draining:
                    refused = self._handshakes.failure() if self._handshakes is not None else None
                    self._reconnect(f"no word from the broker for {now - self._broker_deadline + self._backoff:.1f} s"
                                    + (f" ({refused})" if refused else ""), silent=True, error=bool(refused))
                if now >= self._next_hb:
                    self._next_hb = now + self.interval
                    self._heartbeat()
                if now >= next_stats:
                    next_stats = now + self.stats_interval
                    self._send_stats()
                if now >= next_tick:
                    next_tick = now + self.tick_interval
                    try:
                        self.handler.tick()
                    except Exception:
                        log.exception("worker %s: handler.tick() failed", self.name)
        finally:
            self._close(pull, threads, drain_until)

    def _open_wakeups(self) -> zmq.Socket:
        """The inproc pair through which other threads wake the loop (see :meth:`_emit`)."""
        pull = self.ctx.socket(zmq.PULL)
        pull.bind(self._wake_addr)
        with self._wake_lock:
            self._wake_push = self.ctx.socket(zmq.PUSH)
            self._wake_push.setsockopt(zmq.SNDHWM, 0)
            self._wake_push.connect(self._wake_addr)
        return pull

    def _wait(self, pull: zmq.Socket, until: float) -> dict:
        """Sleep until a message, a wake-up or ``until`` (at most 50 ms); only when nothing waits."""
        self._sleeping = True  # before the last look at the deque (see _emit)
        if self._out or readable(self._sock):
            events = {self._sock: zmq.POLLIN}
        else:
            timeout = max(0.0, min(until - time.monotonic(), 0.05))
            events = dict(self._poller.poll(timeout * 1000.0))
        self._sleeping = False
        if pull in events:
            try:
                while True:
                    pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                pass
        return events

    def _read_broker(self) -> bool:
        """Handle what the broker sent (up to RECV_BATCH); True if it said ``disconnect``."""
        disconnect = False
        received = 0
        for _ in range(RECV_BATCH):
            try:
                frames = _recv_parts(self._sock)
            except zmq.Again:
                break
            received += 1
            if self._on_broker(frames) == "disconnect":
                disconnect = True
        if received:  # the broker is alive: the silence clock and the backoff start over
            self._broker_deadline = time.monotonic() + self._silent_limit
            self._backoff = self._silent_limit
        return disconnect

    def _reconnect(self, reason: Optional[str], *, silent: bool = False, error: bool = False) -> None:
        """Open a fresh socket and register (``reason`` None: the first connection).

        After a silence the next one is waited for twice as long (up to ``reconnect_max``)."""
        if reason is not None:
            log.log(logging.ERROR if error else logging.WARNING if silent else logging.INFO,
                    "worker %s: %s; reconnecting", self.name, reason)
            self._poller.unregister(self._sock)
        self._connect()
        self._poller.register(self._sock, zmq.POLLIN)
        now = time.monotonic()
        if silent:
            self._backoff = min(self._backoff * 2, self.reconnect_max)
            self._broker_deadline = now + self._backoff
        elif reason is None:
            self._broker_deadline = now + self._backoff
        self._next_hb = now + self.interval

    def _close(self, pull: zmq.Socket, threads: list, drain_until: Optional[float]) -> None:
        for _ in threads:
            self._work.put(None)
        try:
            if self._sock is not None:
                self._flush()
                self._send({"op": "disconnect", "worker": self.name})
        except zmq.ZMQError:
            pass
        for t in threads:
            t.join(timeout=max(0.0, drain_until - time.monotonic()) if drain_until else 1.0)
        with self._wake_lock:
            self._wake_push.close(linger=0)
            self._wake_push = None
        pull.close(linger=0)
        if self._handshakes is not None:
            self._handshakes.close()
            self._handshakes = None
        if self._sock is not None:
            self._sock.close(linger=CLOSE_LINGER_MS)  # the disconnect reaches the broker
            self._sock = None
        try:
            self.handler.close()
        except Exception:
            log.exception("worker %s: handler.close() failed", self.name)
        if self._own_ctx:
            self.ctx.term()
        log.info("worker %s stopped after %d request(s)", self.name, self.served)
