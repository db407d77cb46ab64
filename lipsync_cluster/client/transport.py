"""The clients' connection to the broker: one DEALER owned by an I/O thread, with retries.

Any thread may :meth:`Transport.submit` a request; the I/O thread sends it and resolves its
future with the reply whose ``id`` matches. Replies are deduplicated by ``id``: a request is
answered once, whatever arrives later.

Retries (Lazy Pirate, adapted to a DEALER that may have many requests in flight): every client op
is idempotent (``infer`` is a pure function; the management ops read, or converge to the same
state), so a request whose answer can no longer come is sent again, until its overall timeout:

* the connection to the broker drops (the broker was killed or restarted, or ZMTP heartbeats
  found it frozen or unreachable): the socket is replaced by a fresh one (a new identity, nothing
  left in the old pipe) and everything in flight is resent on it at once;
* a request has had no reply for its per-try timeout (growing by ``backoff`` each try): if the
  broker is evidently alive (something arrived lately, or a ``health`` probe is answered) the
  request is still being worked on and waits; if the broker stays silent, the socket is replaced
  and everything in flight is resent.

A resent request keeps its original deadline (``deadline_ms`` is lowered to what is left), so the
broker never works on it past the time its caller stops caring. A ``load_model`` with
``force_reload`` is sent once: a second forced reload is work nobody asked for.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Optional

import zmq

from ..common.errors import LipsyncError, RequestTimeout, Unauthorized, Unavailable
from ..common.protocol import decode, encode
from ..common.security import HandshakeDiagnosis, read_monitor
from ..common.wire import HWM

log = logging.getLogger("lipsync_cluster.client")

RECENT = 65536            # resolved ids remembered to count duplicate replies
# What a request with no reply advises (client.py says the same): how to get a cluster running.
NOT_RUNNING_HINT = ("is the cluster running? (start one: lipsync-cluster start --config cluster.yaml "
                    "--gpus 0 --per-gpu 2, or make run)")


@dataclass(frozen=True)
class RetryPolicy:
    """How a client retries (see the module docstring). ``Client(..., retry=None)`` sends once."""

    per_try_s: float = 10.0         # no reply for this long: is the broker still there?
    backoff: float = 2.0            # each further try waits this many times longer
    max_per_try_s: float = 60.0
    probe_s: float = 2.0            # a `health` probe unanswered this long: replace the socket
    heartbeat_s: float = 1.0        # ZMTP PING interval on the connection (0 = off)
    heartbeat_timeout_s: float = 4.0  # no PONG within this: the connection is dropped
    reconnect_min_s: float = 0.05   # socket replacements back off from this...
    reconnect_max_s: float = 2.0    # ...to this, while no reply arrives

    def per_try(self, tries: int) -> float:
        return min(self.max_per_try_s, self.per_try_s * self.backoff ** max(0, tries - 1))


DEFAULT_RETRY = RetryPolicy()


class _Req:
    __slots__ = ("id", "future", "header", "payloads", "what", "timeout", "give_up_at", "deadline_at",
                 "next_try_at", "event_at", "tries", "sent_at", "retryable", "created", "unsent")

    def __init__(self, rid: int, future: Future, header: dict, payloads: list, timeout: float,
                 now: float, retryable: bool) -> None:
        self.id = rid
        self.future = future
        self.header = header
        self.payloads = payloads
        self.what = str(header.get("op", "request"))
        self.timeout = timeout
        self.created = now
        self.give_up_at = now + timeout
        ms = header.get("deadline_ms")
        self.deadline_at = now + ms / 1000.0 if isinstance(ms, (int, float)) and not isinstance(ms, bool) \
            and math.isfinite(ms) and ms > 0 else None
        self.next_try_at = math.inf
        self.event_at = math.inf
        self.tries = 0
        self.sent_at = -math.inf
        self.retryable = retryable
        self.unsent = False                 # the socket's queue was full: send when the timer fires


def _resolve(future: Future, result: Any = None, exc: Optional[BaseException] = None) -> None:
    if future.done():
        return
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled by its waiter meanwhile
        pass


class Transport:
    """A DEALER socket owned by one I/O thread; any thread may ``submit`` a request."""

    SNDHWM = HWM  # requests queued on the socket while the broker is away; past it they wait here

    def __init__(self, endpoint: str, ctx: zmq.Context, *, retry: Optional[RetryPolicy] = DEFAULT_RETRY,
                 curve: Any = None, timeout: float = 30.0) -> None:
        self.endpoint = endpoint
        self.retry = retry
        self.curve = curve              # common.security.CurveKeys or None
        self.timeout = timeout
        self._ctx = ctx
        self._ids = itertools.count(1)
        self._probe_ids = itertools.count(1)
        self._pending: dict[int, _Req] = {}
        self._new: deque[_Req] = deque()
        self._timers: list[tuple[float, int, int]] = []
        self._timer_seq = itertools.count()
        self._lock = threading.Lock()
        self._wake_addr = f"inproc://lsc-client-{uuid.uuid4().hex}"
        self._inbox = ctx.socket(zmq.PULL)
        self._inbox.bind(self._wake_addr)
        self._outbox = ctx.socket(zmq.PUSH)
        self._outbox.setsockopt(zmq.SNDHWM, 0)  # wake-ups are never refused
        self._outbox.connect(self._wake_addr)
        self._closed = False
        self._dealer: Optional[zmq.Socket] = None
        self._monitor: Optional[zmq.Socket] = None
        self._poller = zmq.Poller()
        self._last_rx = -math.inf
        self._probe_at: Optional[float] = None
        self._reconnect_gap = retry.reconnect_min_s if retry else 0.0
        self._reconnect_after = 0.0
        self._reconnect_wanted: Optional[str] = None
        self._handshake = HandshakeDiagnosis("client", curve=curve is not None)
        self._recent: "OrderedDict[int, list[int]]" = OrderedDict()  # id -> [sends, replies]
        self.counters = {"sent": 0, "resent": 0, "reconnects": 0, "replies": 0, "late_replies": 0,
                         "duplicates": 0, "gave_up": 0}
        self._thread = threading.Thread(target=self._run, name="lipsync-client-io", daemon=True)
        self._thread.start()

    # --- any thread ---------------------------------------------------------------------------

    def submit(self, header: dict, payloads: list, timeout: Optional[float] = None) -> Future:
        """Send ``header`` (its ``id`` is set here) and ``payloads``; the future resolves to
        ``(reply header, payload frames)``, or fails with :class:`Unavailable` after ``timeout``."""
        future: Future = Future()
        timeout = self.timeout if timeout is None else timeout
        retryable = not (header.get("op") == "load_model" and header.get("force_reload"))
        with self._lock:
            if self._closed:
                raise Unavailable("the client is closed")
            rid = next(self._ids)
            header["id"] = rid
            self._new.append(_Req(rid, future, header, payloads, timeout, time.monotonic(), retryable))
            self._outbox.send(b"", zmq.NOBLOCK)
        return future

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._outbox.send(b"STOP")
        self._thread.join(timeout=5)
        self._outbox.close(0)
        self._inbox.close(0)
        gone = Unavailable("the client was closed before the reply arrived")
        for req in list(self._pending.values()) + list(self._new):
            _resolve(req.future, exc=gone)
        self._pending.clear()
        self._new.clear()

    # --- the I/O thread ---------------------------------------------------------------------------

    def _open(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.SNDHWM)
        sock.setsockopt(zmq.RCVHWM, HWM)
        r = self.retry
        if r is not None and r.heartbeat_s > 0:
            # ZMTP PING/PONG: a broker that is frozen or unreachable drops the connection, which
            # is the signal to resend (a crash drops it at once anyway).
            sock.setsockopt(zmq.HEARTBEAT_IVL, int(r.heartbeat_s * 1000))
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(r.heartbeat_timeout_s * 1000))
            sock.setsockopt(zmq.HEARTBEAT_TTL, int(r.heartbeat_timeout_s * 1000))
        if self.curve is not None:
            self.curve.apply(sock)
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | HandshakeDiagnosis.EVENTS)
        sock.connect(self.endpoint)
        self._dealer = sock
        self._poller = zmq.Poller()
        for s in (self._inbox, sock, self._monitor):
            self._poller.register(s, zmq.POLLIN)

    def _close_socket(self) -> None:
        if self._dealer is not None:
            try:
                self._dealer.disable_monitor()
            except zmq.ZMQError:
                pass
            self._dealer.close(0)
            self._dealer = None
        if self._monitor is not None:
            self._monitor.close(0)
            self._monitor = None

    def _run(self) -> None:
        self._open()
        try:
            while True:
                now = time.monotonic()
                wait = 1.0
                if self._timers:
                    wait = min(wait, max(0.0, self._timers[0][0] - now))
                if self._reconnect_wanted is not None:
                    wait = min(wait, max(0.0, self._reconnect_after - now))
                events = dict(self._poller.poll(wait * 1000.0))
                if self._inbox in events and self._read_inbox():
                    return
                if self._new:
                    self._send_new()
                    if self._handshake.refused is not None:  # the broker said no before these were made
                        self._fail_all(Unauthorized(self._handshake.refused, endpoint=self.endpoint))
                if self._dealer in events:
                    self._read_replies()
                if self._monitor is not None and self._monitor in events:
                    self._read_monitor()
                now = time.monotonic()
                if self._reconnect_wanted is not None and now >= self._reconnect_after:
                    self._reconnect(self._reconnect_wanted, now)
                self._run_timers(now)
        except Exception:  # a bug here would hang every caller: fail them loudly instead
            log.exception("client I/O thread failed")
            err = Unavailable("the client's I/O thread failed; see the log")
            for req in list(self._pending.values()):
                _resolve(req.future, exc=err)
            self._pending.clear()
            with self._lock:
                self._closed = True
        finally:
            self._close_socket()

    def _read_inbox(self) -> bool:
        while True:
            try:
                frames = self._inbox.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return False
            if frames[0] == b"STOP":
                return True

    def _send_new(self) -> None:
        now = time.monotonic()
        while self._new:
            req = self._new.popleft()
            self._pending[req.id] = req
            self._send(req, now)

    def _send(self, req: _Req, now: float) -> None:
        """Send one try of ``req`` on the current socket and set its timers."""
        header = req.header
        if req.tries and req.deadline_at is not None:
            left_ms = int((req.deadline_at - now) * 1000.0)
            if left_ms < 1:
                self._finish(req, exc=RequestTimeout(
                    f"the deadline of this '{req.what}' passed before a retry could be sent "
                    f"(broker at {self.endpoint} lost it)", tries=req.tries))
                return
            header = {**header, "deadline_ms": left_ms}
        try:
            self._dealer.send_multipart(encode(header, req.payloads), zmq.NOBLOCK, copy=False)
        except zmq.Again:
            # The socket's queue is full (a broker that has been away long): try again shortly.
            req.unsent = True
            req.next_try_at = now + 0.05
            self._schedule(req)
            return
        req.unsent = False
        self.counters["sent" if not req.tries else "resent"] += 1
        req.tries += 1
        req.sent_at = now
        req.next_try_at = now + (self.retry.per_try(req.tries) if self.retry is not None else math.inf)
        self._schedule(req)

    def _schedule(self, req: _Req) -> None:
        req.event_at = min(req.give_up_at, req.next_try_at)
        if req.event_at < math.inf:
            heapq.heappush(self._timers, (req.event_at, next(self._timer_seq), req.id))

    def _finish(self, req: _Req, result: Any = None, exc: Optional[BaseException] = None) -> None:
        self._pending.pop(req.id, None)
        req.future.tries = req.tries  # how many times it was sent (1 = never resent)
        if exc is None:
            self._recent[req.id] = [req.tries, 1]
            if len(self._recent) > RECENT:
                self._recent.popitem(last=False)
        _resolve(req.future, result, exc)

    def _read_replies(self) -> None:
        for _ in range(1024):
            try:
                frames = self._dealer.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            now = time.monotonic()
            self._last_rx = now
            if self.retry is not None:
                self._reconnect_gap = self.retry.reconnect_min_s
            try:
                header, payloads = decode(frames)
            except LipsyncError:
                continue  # not a reply we can read; its waiter times out with a clear message
            rid = header.get("id")
            if isinstance(rid, str) and rid.startswith("__probe-"):
                continue  # a liveness probe's answer: its arrival (_last_rx) was the point
            req = self._pending.get(rid) if isinstance(rid, int) and not isinstance(rid, bool) else None
            if req is None:
                self.counters["late_replies"] += 1
                seen = self._recent.get(rid) if isinstance(rid, int) else None
                if seen is not None:
                    seen[1] += 1
                    if seen[1] > seen[0]:  # more answers than we sent tries: a real duplicate
                        self.counters["duplicates"] += 1
                continue
            self.counters["replies"] += 1
            self._finish(req, (header, payloads))

    def _read_monitor(self) -> None:
        for event in read_monitor(self._monitor) if self._monitor is not None else ():
            refused = self._handshake.feed(event)
            if refused is not None:
                self._fail_all(Unauthorized(refused, endpoint=self.endpoint))
            if event.get("event") == zmq.EVENT_DISCONNECTED and self._pending and self.retry is not None:
                self._want_reconnect("the connection to the broker dropped", time.monotonic())

    def _fail_all(self, exc: LipsyncError) -> None:
        for req in list(self._pending.values()):
            self._finish(req, exc=exc)

    def _want_reconnect(self, why: str, now: float) -> None:
        if self._reconnect_wanted is None:
            self._reconnect_wanted = why
            self._reconnect_after = max(now, self._reconnect_after)

    def _reconnect(self, why: str, now: float) -> None:
        """Replace the socket and resend what is in flight (the old pipe's copies are dropped)."""
        self._reconnect_wanted = None
        self._probe_at = None
        self.counters["reconnects"] += 1
        log.info("client: %s; reconnecting to %s and resending %d request(s)", why, self.endpoint,
                 len(self._pending))
        self._close_socket()
        self._open()
        r = self.retry
        self._reconnect_after = now + self._reconnect_gap
        if r is not None:
            self._reconnect_gap = min(r.reconnect_max_s, max(r.reconnect_min_s, self._reconnect_gap * 2))
        for req in sorted(self._pending.values(), key=lambda q: q.id):
            if req.future.cancelled():
                self._pending.pop(req.id, None)
            elif not req.retryable:
                self._finish(req, exc=Unavailable(
                    f"the connection to the broker at {self.endpoint} dropped while '{req.what}' was in "
                    "flight; it was not resent (force_reload is not repeated)"))
            else:
                self._send(req, now)

    def _probe(self, now: float) -> None:
        self._probe_at = now
        try:
            self._dealer.send_multipart(encode({"id": f"__probe-{next(self._probe_ids)}", "op": "health"}),
                                        zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _run_timers(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _, rid = heapq.heappop(timers)
            req = self._pending.get(rid)
            if req is None or when != req.event_at:
                continue  # answered, forgotten, or rescheduled since
            if req.future.cancelled():
                self._pending.pop(rid, None)
                continue
            if now >= req.give_up_at:
                self.counters["gave_up"] += 1
                self._finish(req, exc=Unavailable(
                    f"no reply to '{req.what}' from the broker at {self.endpoint} within {req.timeout:.1f}s "
                    f"({req.tries} tr{'y' if req.tries == 1 else 'ies'}); {NOT_RUNNING_HINT}", tries=req.tries))
                continue
            if req.unsent:
                self._send(req, now)
            else:
                self._per_try_expired(req, now)

    def _per_try_expired(self, req: _Req, now: float) -> None:
        r = self.retry
        if r is None or not req.retryable:
            req.next_try_at = math.inf
        elif self._last_rx > max(req.sent_at, now - r.per_try_s):
            # The broker answers (others, or our probe): this request is queued or being worked
            # on. Waiting is cheaper than a duplicate; a dropped connection resends it at once.
            req.next_try_at = now + r.per_try(req.tries)
        elif self._probe_at is None or self._last_rx > self._probe_at:
            self._probe(now)
            req.next_try_at = now + r.probe_s
        elif now - self._probe_at >= r.probe_s:
            self._want_reconnect(f"no word from the broker for {now - max(self._last_rx, req.sent_at):.1f} s",
                                 now)
            req.next_try_at = now + r.per_try(req.tries)
        else:
            req.next_try_at = self._probe_at + r.probe_s
        self._schedule(req)


__all__ = ["DEFAULT_RETRY", "RetryPolicy", "Transport"]
