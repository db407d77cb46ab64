"""The broker: three sockets, one thread, one handler per message kind (Majordomo style).

    frontend ROUTER  <- clients (DEALER): infer + management ops
    backend  ROUTER  <- workers (DEALER): ready / heartbeat / reply / event / stats / disconnect
    PUB              -> stats console, exporters: b"stats" snapshots (~1 s), b"event" as they happen

This module holds the sockets, the poll loop and its two op tables (client ops, worker ops).
Requests are validated (``validate.py``), become one of the request kinds (``requests.py``) and
go to the :class:`~.dispatch.Dispatcher` (``dispatch.py``: queues per model, deadlines, the pure
decisions of ``routing.py`` over the worker table of ``workers.py``). A worker never has more
requests than the credits it announced. Payload frames are forwarded as the zmq Frames they
arrived in (no copy, no re-encoding); only the small msgpack header is rewritten per leg. The
legs of one loop turn to a worker that takes batches leave as one message (``_flush_legs``).

A worker's reports are parsed once into typed reports (``workers.py``) and handed to the
dispatcher's verbs (``worker_joined``, ``worker_left``, ``worker_heartbeat``, ``worker_event``,
``worker_measured``): the broker never writes the dispatcher's state itself. The design as a
whole: docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import logging
import math
import signal
import threading
import time
from typing import Any, Callable, Optional

import msgpack
import zmq

from ..common import vocab
from ..common.errors import BadRequest, InternalError, LipsyncError, Unavailable
from ..common.heat import LFU_HALF_LIFE_S
from ..common.infer_request import check_deadline, check_infer, strip_broker_fields
from ..common.protocol import TAG
from ..common.security import BrokerSecurity, SecurityError
from ..common.wire import (MAX_BATCH_ITEMS, MAX_HEADER_BYTES, MAX_WORKER_HEADER_BYTES, batch_frames,
                           readable, read_header, recv_parts, send_parts, tune, unbatch)
from ..config.schema import Config
from . import management
from .catalog_watch import CatalogWatcher, Park, Parking
from .dispatch import Dispatcher
from .hardening import check_message_size, open_security
from .requests import Gather, UnloadLeg
from .stats import BrokerStats, format_report
from .validate import check_envelope, check_known, check_load, check_model
from .workers import Heartbeat, ModelEvent, Registration, ReportError, StatsReport, Worker

log = logging.getLogger("lipsync_cluster.broker")

RECV_BATCH = 256            # messages read from one socket before looking at the other
SWEEP_S = 0.025             # deadline sweep / copy check period
PUBLISH_S = 1.0             # stats snapshot period on the PUB socket
CATALOG_REFRESH_S = 2.0     # re-read the catalog this often (plus when an unknown id arrives)
UNKNOWN_REFRESH_S = 0.25    # ... but at most this often

Catalog = Callable[[], "dict[str, dict]"]


class BindError(RuntimeError):
    """An endpoint could not be bound (most often: the port is already in use)."""


_SCALARS = (str, int, float, bytes, type(None))


class Broker:
    def __init__(self, config: Config, catalog: Catalog, *, ctx: Optional[zmq.Context] = None,
                 default_deadline_s: float = 120.0, lfu_half_life_s: float = LFU_HALF_LIFE_S,
                 no_worker_grace_s: float = 10.0) -> None:
        cl = config.cluster
        self.config = config
        self._own_ctx = ctx is None
        self.ctx = ctx if ctx is not None else zmq.Context()
        self._catalog_wake_endpoint = f"inproc://lsc-broker-catalog-{id(self):x}"
        self._watch = CatalogWatcher(catalog, self.ctx, self._catalog_wake_endpoint,
                                     period_s=CATALOG_REFRESH_S, min_gap_s=UNKNOWN_REFRESH_S)
        self._catalog_wake: Optional[zmq.Socket] = None
        self._parking = Parking(self._watch, self._on_client_message)  # ids the catalog may soon know
        self._known = self._parking.known
        self.interval = cl.heartbeat_interval_s
        self.dead_after = cl.heartbeat_interval_s * cl.heartbeat_liveness
        self.max_batch = cl.max_batch_size
        self.security = BrokerSecurity(None)         # CURVE + ZAP once bind() has read the config
        self.max_message_bytes = config.server.max_message_size_mb * 2**20
        self.stats = BrokerStats(time.monotonic())
        self.dispatcher = Dispatcher(config, self.stats, lambda: self._watch.current,
                                     send_client=self._send_client, send_worker=self._send_leg,
                                     default_deadline_s=default_deadline_s,
                                     lfu_half_life_s=lfu_half_life_s, no_worker_grace_s=no_worker_grace_s)
        self.table = self.dispatcher.table
        self.queues = self.dispatcher.queues
        self._packer = msgpack.Packer(use_bin_type=True)
        self._outbox: dict[Worker, list] = {}       # legs of this loop turn, per worker that takes batches
        self.frontend: Optional[zmq.Socket] = None
        self.backend: Optional[zmq.Socket] = None
        self.publisher: Optional[zmq.Socket] = None
        self.metrics: Any = None  # broker/metrics.py MetricsServer when cluster.metrics_port is set
        self.frontend_endpoint = self.backend_endpoint = self.stats_endpoint = ""
        self._hb_frames = [TAG, self._packer.pack({"op": "heartbeat"})]
        self._disconnect_frames = [TAG, self._packer.pack({"op": "disconnect"})]
        self._client_ops = {
            "infer": self._on_infer, "load_model": self._on_load_model,
            "unload_model": self._on_unload_model, "list_models": self._on_list_models,
            "model_stats": self._on_model_stats, "health": self._on_health,
        }
        self._worker_ops = {
            "heartbeat": self._on_heartbeat, "reply": self.dispatcher.replied, "event": self._on_event,
            "stats": self._on_stats, "disconnect": self._on_disconnect, "ready": self._on_ready_again,
        }

    # --- sockets -------------------------------------------------------------------------

    def bind(self) -> None:
        """Bind the three sockets; :class:`BindError` names the endpoint that failed.

        An endpoint may use port ``*`` (e.g. ``tcp://127.0.0.1:*``); the bound addresses are in
        ``frontend_endpoint`` / ``backend_endpoint`` / ``stats_endpoint`` afterwards.
        """
        max_bytes = self.config.server.max_message_size_mb * 2**20
        try:  # loopback only in the clear; CURVE keys and the ZAP handler (common/security.py)
            self.security = open_security(self.config, self.ctx)
        except SecurityError as exc:
            raise BindError(str(exc)) from None
        made: list[zmq.Socket] = []
        try:
            for role, endpoint, kind in (("frontend", self.config.frontend, zmq.ROUTER),
                                         ("backend", self.config.backend, zmq.ROUTER),
                                         ("stats", self.config.stats_endpoint, zmq.PUB)):
                sock = self.ctx.socket(kind)
                made.append(sock)
                sock.setsockopt(zmq.LINGER, 500)
                self.security.apply_server(sock, role)
                if kind == zmq.ROUTER:
                    # A reply to a peer that went away must fail fast, never block the broker.
                    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
                    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
                    tune(sock)  # queue and kernel buffer sizes (common/wire.py)
                else:
                    sock.setsockopt(zmq.SNDHWM, 1000)  # slow subscribers miss snapshots
                try:
                    sock.bind(endpoint)
                except zmq.ZMQError as exc:
                    if exc.errno == zmq.EADDRINUSE:
                        raise BindError(f"{endpoint} is already in use (broker {role} socket)") from None
                    raise BindError(f"cannot bind the broker {role} socket to {endpoint}: {exc}") from None
                setattr(self, f"{role}_endpoint", sock.getsockopt_string(zmq.LAST_ENDPOINT))
        except BaseException:
            for sock in made:
                sock.close(linger=0)
            self.security.stop()
            raise
        self.frontend, self.backend, self.publisher = made
        self._catalog_wake = self.ctx.socket(zmq.PULL)
        self._catalog_wake.setsockopt(zmq.LINGER, 0)
        self._catalog_wake.bind(self._catalog_wake_endpoint)
        log.info("broker listening: clients %s, workers %s, stats %s",
                 self.frontend_endpoint, self.backend_endpoint, self.stats_endpoint)

    def run(self, stop_event: Optional[threading.Event] = None) -> None:
        """Serve until ``stop_event`` is set; then answer what is pending and close."""
        if self.frontend is None:
            self.bind()
        stop = stop_event if stop_event is not None else threading.Event()
        self._watch.scan()  # the first read before serving; later ones run on the watcher thread
        self._watch.start()
        backend, frontend, wake = self.backend, self.frontend, self._catalog_wake
        idle_poll = [(backend, zmq.POLLIN), (frontend, zmq.POLLIN), (wake, zmq.POLLIN)]
        now = time.monotonic()
        next_hb = now + self.interval
        next_sweep = now + SWEEP_S
        next_pub = now + PUBLISH_S
        report_s = self.config.logging.stats_report_minutes * 60.0
        next_report = now + report_s if report_s > 0 else float("inf")
        on_worker, on_client = self._on_worker_message, self._on_client_message
        dispatcher = self.dispatcher
        try:
            while not stop.is_set():
                wait_ms = max(0.0, min(next_sweep, next_hb) - time.monotonic()) * 1000.0
                # One poll per wake-up (it returns at once when something is waiting), then read
                # each ready socket dry. Workers first: their replies free credits.
                for sock, _ in zmq.zmq_poll(idle_poll, min(math.ceil(wait_ms), 100)):
                    if sock is wake:
                        self._on_catalog_scanned()
                    else:
                        self._drain(sock, on_worker if sock is backend else on_client)
                if dispatcher.dirty:
                    dispatcher.dispatch()
                if self._outbox:  # this turn's legs, one message per worker
                    self._flush_legs()
                now = time.monotonic()
                if now >= next_sweep:
                    next_sweep = now + SWEEP_S
                    self._sweep(now)
                if now >= next_hb:
                    next_hb = now + self.interval
                    self._heartbeat(now)
                if now >= next_pub:
                    next_pub = now + PUBLISH_S
                    self._publish_stats(now)
                if now >= next_report:
                    next_report = now + report_s
                    for line in self.report_lines():
                        log.info(line)
        finally:
            self._shutdown()

    def _drain(self, sock: zmq.Socket, handle: Callable[[list], None]) -> None:
        """Handle the waiting messages (poll said at least one), at most RECV_BATCH.

        Read until a receive finds nothing: asking the socket first (``readable``, ZMQ_EVENTS)
        costs a poll() system call per message, about as much as receiving one."""
        for _ in range(RECV_BATCH):
            try:
                handle(recv_parts(sock))
            except zmq.Again:
                return
            except Exception:  # a bug must cost one message, not the broker
                log.exception("broker: unexpected error handling a message; continuing")

    def _send_client(self, client: bytes, header: dict, payloads: Any = ()) -> None:
        try:
            send_parts(self.frontend, [client, TAG, self._packer.pack(header), *payloads])
        except zmq.ZMQError:  # EHOSTUNREACH: the client went away; EAGAIN: it stopped reading
            self.stats.undeliverable += 1

    def _refuse(self, client: bytes, cid: Any, error: LipsyncError, model: Optional[str] = None) -> None:
        """Answer a message that never became a request (bad header, unknown model, ...)."""
        self.stats.outcome(model, error.code, 0.0)
        self._send_client(client, {"id": cid, "ok": False, "error": error.to_wire()})

    def _send_worker(self, w: Worker, frames: list) -> bool:
        try:
            send_parts(self.backend, [w.identity, *frames])
            return True
        except zmq.ZMQError as exc:
            log.warning("worker %s unreachable (%s); dropping it", w.name, exc)
            self._lost(w, "unreachable")
            return False

    def _send_leg(self, w: Worker, frames: list) -> bool:
        """The dispatcher's way out: one leg (``[TAG, header, *payloads]``) to ``w``. A worker that
        takes batches gets the legs of one loop turn as one message (:meth:`_flush_legs`, at the
        end of the turn); False: ``w`` is gone and this leg was not sent."""
        if not w.batches:
            return self._send_counted(w, frames, 1)
        legs = self._outbox.get(w)
        if legs is None:
            self._outbox[w] = legs = []
        legs.append(frames[1:])
        return True

    def _flush_legs(self) -> None:
        """This turn's legs, one message per worker (its credits, at most 64, bound them; more
        would go in several batches)."""
        outbox, self._outbox = self._outbox, {}
        for w, legs in outbox.items():
            for i in range(0, len(legs), MAX_BATCH_ITEMS):
                batch = legs[i:i + MAX_BATCH_ITEMS]
                frames = [TAG, *batch[0]] if len(batch) == 1 else batch_frames("requests", batch, self._packer)
                if not self._send_counted(w, frames, len(batch)):
                    break  # w is dropped: its legs, in flight on it, went back to their queues

    def _send_counted(self, w: Worker, frames: list, legs: int) -> bool:
        """One message carrying ``legs`` legs to ``w``, counted once sent."""
        if not self._send_worker(w, frames):
            return False
        self.stats.legs += legs  # for /metrics: legs per message shows how much batching saves
        self.stats.leg_messages += 1
        return True

    def _publish(self, topic: bytes, body: dict) -> None:
        if topic == b"event":
            self.stats.record_event(body)  # counts for the console and /metrics
        try:
            send_parts(self.publisher, [topic, self._packer.pack(body)])
        except zmq.ZMQError:
            pass  # no subscriber keeping up: snapshots are disposable

    # --- catalog -------------------------------------------------------------------------

    @property
    def catalog(self) -> dict[str, dict]:
        """Every configured model (as of the latest scan): ``{model_id: {version, preload, ...}}``."""
        return self._watch.current

    def _on_catalog_scanned(self) -> None:
        try:
            while True:
                self._catalog_wake.recv(zmq.NOBLOCK)
        except zmq.Again:
            pass
        self._parking.release(time.monotonic())
        self.dispatcher.preload(time.monotonic())

    # --- client messages ------------------------------------------------------------------

    def _on_client_message(self, frames: list) -> None:
        client = frames[0].bytes
        header: Any = None
        try:
            # Size-checked before it is unpacked, unpacked once (a huge header costs nothing).
            header = read_header(frames, 1, MAX_HEADER_BYTES)
            payloads = frames[3:]
            op = header.get("op")  # a map or list as op is unhashable: no lookup, a bad_request
            handler = self._client_ops.get(op) if type(op) is str else None
            if handler is None or "id" not in header:
                check_envelope(header)  # raises, naming the field
            cid = header["id"]
            if type(cid) not in _SCALARS:
                check_envelope(header)
            if payloads:  # ZMQ_MAXMSGSIZE bounds each frame; this bounds their sum
                check_message_size(frames[1:], self.max_message_bytes)
            if self.security.admin_only:
                self.security.authorize(header.get("op"), frames[1])  # ZAP User-Id: an admin key?
        except LipsyncError as exc:
            cid = header.get("id") if isinstance(header, dict) else None
            log.debug("bad request from client: %s", exc.message)
            self._refuse(client, cid if isinstance(cid, (str, int, float, bytes)) else None, exc)
            return
        strip_broker_fields(header)  # a client cannot set what the broker tells a worker
        try:
            handler(client, cid, header, payloads)
        except Park:  # answered once a catalog read that started after this moment has finished
            self._parking.park(frames, time.monotonic())
        except LipsyncError as exc:
            model = header.get("model_id")
            self._refuse(client, cid, exc, model if isinstance(model, str) and model in self.catalog else None)
        except Exception as exc:  # a bug: log it, and still answer (a client never waits for nothing)
            log.exception("broker: unexpected error handling %r from a client", header.get("op"))
            self._refuse(client, cid, InternalError(f"broker error: {type(exc).__name__}: {exc}"))

    def _on_infer(self, client: bytes, cid: Any, header: dict, payloads: list) -> None:
        batch = check_infer(header, payloads, self.max_batch)  # the request rules, the id's form included
        model = check_known(header["model_id"], self._known)
        deadline_s = check_deadline(header)
        d = self.dispatcher
        if d.load_failures or "error" in self._watch.current.get(model, ()):
            d.check_loadable(model, time.monotonic())
        p = d.client_request(client, cid, "infer", model, header, payloads, deadline_s)
        p.frames = batch
        self.stats.arrival(model)
        d.saw(p)  # LFU/LRU see every request, even ones shed below
        d.admit(p)

    def _on_load_model(self, client: bytes, cid: Any, header: dict, payloads: list) -> None:
        model = check_model(header, self._known)
        check_load(header)
        d = self.dispatcher
        if not header.get("force_reload"):  # an operator's forced reload tries even in the backoff
            d.check_loadable(model, time.monotonic())
        targets: Optional[set[str]] = None
        name = header.get("worker")
        if name is not None:
            if self.table.by_name(name) is None:
                raise BadRequest(f"field 'worker' is {name!r}: no such worker; registered: "
                                 + (", ".join(sorted(w.name for w in self.table.values())) or "none"))
            targets = {name}
        gpu = header.get("gpu")
        if gpu is not None:
            on_gpu = {w.name for w in self.table.values() if w.gpu == gpu}
            targets = on_gpu if targets is None else targets & on_gpu
            if not targets:
                raise BadRequest(f"field 'gpu' is {gpu}: no registered worker"
                                 + (f" named {name!r}" if name else "") + f" on GPU {gpu}")
        p = d.client_request(client, cid, "load_model", model, header, payloads, check_deadline(header))
        p.targets = frozenset(targets) if targets is not None else None
        self.stats.arrival(None)  # cluster totals only: a model's counters are about its frames
        d.admit(p)

    def _on_unload_model(self, client: bytes, cid: Any, header: dict, payloads: list) -> None:
        model = check_model(header, self._known)
        deadline_s = check_deadline(header)
        holders = [w for w in self.table.values() if w.holds(model)]
        if not holders:
            self._send_client(client, {"id": cid, "ok": True, "model_id": model, "workers": []})
            return
        d = self.dispatcher
        gather = Gather(client, cid, model, len(holders))
        now = time.monotonic()
        d.fan_out([UnloadLeg(d.next_rid(), gather, w.name, header, payloads, now, d.deadline(now, deadline_s))
                   for w in holders])

    def _on_list_models(self, client: bytes, cid: Any, header: dict, payloads: list) -> None:
        models = management.list_models(self.catalog, self.table, self.queues, self.stats, time.monotonic())
        self._send_client(client, {"id": cid, "ok": True, "models": models})

    def _on_model_stats(self, client: bytes, cid: Any, header: dict, payloads: list) -> None:
        model = check_model(header, self._known) if header.get("model_id") is not None else None
        body = management.model_stats(self.catalog, self.table, self.queues, self.stats,
                                      time.monotonic(), model)
        self._send_client(client, {"id": cid, "ok": True, **body})

    def _on_health(self, client: bytes, cid: Any, header: dict, payloads: list) -> None:
        self._send_client(client, {"id": cid, "ok": True, **management.health(self.catalog, self.table)})

    # --- worker messages ------------------------------------------------------------------

    def _on_worker_message(self, frames: list) -> None:
        identity = frames[0].bytes
        try:
            header = read_header(frames, 1, MAX_WORKER_HEADER_BYTES)
        except LipsyncError as exc:
            log.warning("broker: malformed message from a worker: %s", exc.message)
            return
        payloads = frames[3:]
        op = header.get("op")
        w = self.table.get(identity)
        if op == "reply" and w is not None:  # the hot path
            w.last_seen = time.monotonic()
            self.dispatcher.replied(w, header, payloads)
            return
        if op == "replies":  # several replies in one message (common/wire.py)
            self._on_replies(w, identity, header, frames)
            return
        if op == "ready" and not self._may_register(header, frames[1]):
            return
        if w is None:
            if op == "ready":
                self._on_ready(identity, header)
            elif op != "disconnect":
                # Unknown (e.g. declared dead, or the broker restarted): discard and make it
                # register again. A late reply is dropped here, so it is never delivered twice.
                if op == "reply":
                    self.stats.late_replies += 1
                self._send_disconnect(identity)
            return
        w.last_seen = time.monotonic()
        handler = self._worker_ops.get(op) if type(op) is str else None
        if handler is None:
            log.warning("broker: worker %s sent unknown op %r; ignored", w.name, op)
            return
        handler(w, header, payloads)

    def _on_replies(self, w: Optional[Worker], identity: bytes, header: dict, frames: list) -> None:
        """A batch of replies: each one handled as if it had come alone."""
        try:
            replies, skipped = unbatch(header, frames, 3, "reply", MAX_WORKER_HEADER_BYTES)
        except LipsyncError as exc:
            log.warning("broker: malformed message from a worker: %s", exc.message)
            return
        if w is None:  # unknown sender: as for a single late reply
            self.stats.late_replies += len(replies) + len(skipped)
            self._send_disconnect(identity)
            return
        for why in skipped:
            log.warning("broker: a batched reply from worker %s skipped: %s", w.name, why)
        w.last_seen = time.monotonic()
        replied = self.dispatcher.replied
        for reply, payloads in replies:
            replied(w, reply, payloads)

    def _send_disconnect(self, identity: bytes) -> None:
        """Tell a connection the broker does not know (e.g. declared dead) to register again."""
        try:
            self.backend.send_multipart([identity, *self._disconnect_frames], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # it went away again

    def _may_register(self, header: dict, frame: Any) -> bool:
        """A worker's name is bound to its CurveZMQ key (common/security.py): a peer holding
        another key cannot register under it and take its requests."""
        name = header.get("worker")
        why = self.security.worker_may_register(name, frame) if isinstance(name, str) and name else None
        if why is not None:
            log.warning("broker: refused the registration of a worker calling itself %r: %s", name, why)
        return why is None

    def _on_ready(self, identity: bytes, header: dict) -> None:
        try:
            r = Registration.parse(header)
        except ReportError as exc:
            log.error("broker: %s; ignored", exc)
            return
        name = r.name
        w = Worker.register(identity, r)
        w.restarts = self.stats.registered(name, w.pid)
        for old in self.dispatcher.worker_joined(w):
            self._lost(old, f"replaced by a new registration of {name}")
        log.info("worker %s registered (host %s, pid %s, gpu %s, credits %d, max_models %d, loaded: %s)",
                 name, w.host, w.pid, w.gpu, w.credits, w.max_models, ", ".join(sorted(w.loaded)) or "-")
        self._publish(b"event", {"event": vocab.WORKER_JOINED, "worker": name, "time": time.time(),
                                 "host": w.host, "pid": w.pid, "gpu": w.gpu, "credits": w.credits})

    def _on_ready_again(self, w: Worker, header: dict, payloads: list) -> None:
        # The same socket registering again: start from a clean slate.
        self._lost(w, "re-registered")
        self._on_ready(w.identity, header)

    def _on_heartbeat(self, w: Worker, header: dict, payloads: list) -> None:
        hb = Heartbeat.parse(header)
        if hb.draining and not w.draining:
            log.info("worker %s is draining", w.name)
        self.dispatcher.worker_heartbeat(w, hb)

    def _on_event(self, w: Worker, header: dict, payloads: list) -> None:
        try:
            e = ModelEvent.parse(header)  # kept and published: known kinds, typed fields, bounded sizes
        except ReportError as exc:
            log.warning("broker: worker %s sent %s; ignored", w.name, exc)
            return
        self.dispatcher.worker_event(w, e)
        body = e.body
        if self.config.logging.log_model_operations and e.event != vocab.LOADING:
            log.info("worker %s: model %s %s%s", w.name, e.model, e.event,
                     f" ({body['reason']})" if body.get("reason") else "")
        body["worker"] = w.name
        body.setdefault("time", time.time())
        self._publish(b"event", body)

    def _on_stats(self, w: Worker, header: dict, payloads: list) -> None:
        # Management answers are built from what it keeps: types checked, sizes bounded.
        self.dispatcher.worker_measured(w, StatsReport.parse(header))

    def _on_disconnect(self, w: Worker, header: dict, payloads: list) -> None:
        self._lost(w, "disconnected")

    # --- lost workers, timers ---------------------------------------------------------------

    def _lost(self, w: Worker, reason: str) -> None:
        """Forget ``w``; its in-flight requests go back to the front of their queue once."""
        self._outbox.pop(w, None)  # legs not yet sent are in flight on it: they go back too
        log.log(logging.INFO if reason == "disconnected" else logging.WARNING,
                "worker %s gone (%s); %d request(s) in flight", w.name, reason, w.in_flight)
        self._publish(b"event", {"event": vocab.WORKER_LEFT, "worker": w.name, "reason": reason,
                                 "time": time.time(), "in_flight": w.in_flight})
        self.dispatcher.worker_left(w)

    def _sweep(self, now: float) -> None:
        """Parked requests (catalog_watch.py), then deadlines and workerless waits (dispatch.py)."""
        self._parking.release(now)
        self.dispatcher.sweep(now)

    def _heartbeat(self, now: float) -> None:
        # With worker messages still unread (a backlog), silence is not proven: judge next time.
        if not readable(self.backend):
            for w in self.table.expired(now, self.dead_after):
                self._lost(w, f"silent for {now - w.last_seen:.1f} s")
        for w in list(self.table.values()):
            self._send_worker(w, self._hb_frames)

    # --- stats ---------------------------------------------------------------------------

    def snapshot(self, now: Optional[float] = None) -> dict:
        now = time.monotonic() if now is None else now
        body = management.model_stats(self.catalog, self.table, self.queues, self.stats, now)
        body["time"] = time.time()
        body["queues"] = self.queues.depths()
        body["workers_detail"] = [w.summary(now) for w in self.table.values()]
        body["events"] = list(self.stats.events)[-20:]
        body["health"] = management.health(self.catalog, self.table)
        body["eviction_policy"] = self.dispatcher.heat.policy
        body["admission"] = self.dispatcher.admission.summary()  # what admission learned (admission.py)
        return body

    def _publish_stats(self, now: float) -> None:
        self.stats.sample(now)
        body = self.snapshot(now)
        self._publish(b"stats", body)
        if self.metrics is not None:  # hand a finished snapshot to the exporter's HTTP thread
            self.metrics.update(body, self.stats.histograms())

    def report_lines(self) -> list[str]:
        now = time.monotonic()
        body = management.model_stats(self.catalog, self.table, self.queues, self.stats, now)
        return format_report(body["models"], body["workers"])

    # --- shutdown ------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Answer everything pending with `unavailable`, tell workers, close the sockets."""
        try:
            self._watch.stop()
            self._parking.release_all()  # unknown ids get their answer; the rest join what is drained below
            self._outbox.clear()  # legs not sent are in flight on their worker: answered below
            for w in list(self.table.values()):
                self._send_disconnect(w.identity)
            gone = Unavailable("the broker is shutting down")
            now = time.monotonic()
            for p in self.dispatcher.drain_all():
                p.finish(self.dispatcher, gone, now=now)
        except Exception:
            log.exception("broker: error while shutting down")
        finally:
            for sock in (self.frontend, self.backend, self.publisher, self._catalog_wake):
                if sock is not None:
                    sock.close()
            self.frontend = self.backend = self.publisher = self._catalog_wake = None
            self.security.stop()  # the ZAP thread's socket must close before the context ends
            if self._own_ctx:
                self.ctx.term()
            log.info("broker stopped")


def run_broker(config: Config, catalog: Catalog, stop_event: Optional[threading.Event] = None) -> None:
    """Entry point for the supervisor / CLI: bind (raising :class:`BindError`), serve, stop.

    In the main thread SIGINT and SIGTERM set the stop event, so Ctrl-C drains cleanly.
    """
    stop = stop_event if stop_event is not None else threading.Event()
    broker = Broker(config, catalog)
    try:
        if config.cluster.metrics_port:  # /metrics and /health/* over HTTP (broker/metrics.py)
            from .metrics import MetricsServer
            broker.metrics = MetricsServer.from_config(config).start()  # the loopback rule, top-K histograms
        broker.bind()
    except (BindError, OSError) as exc:
        if broker.metrics is not None:
            broker.metrics.stop()
        broker.ctx.term()
        raise exc if isinstance(exc, BindError) else BindError(str(exc)) from None
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    try:
        broker.run(stop)
    finally:
        if broker.metrics is not None:
            broker.metrics.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
