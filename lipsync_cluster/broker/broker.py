"""The broker: three sockets, one thread, one handler per message kind (Majordomo style).

    frontend ROUTER  <- clients (DEALER): infer + management ops
    backend  ROUTER  <- workers (DEALER): ready / heartbeat / reply / event / stats / disconnect
    PUB              -> stats console, exporters: b"stats" snapshots (~1 s), b"event" as they happen

Requests are validated, queued per model (``queues.py``) and sent to a worker chosen by the pure
decisions in ``routing.py`` over the worker table (``workers.py``). A worker never has more
requests than the credits it announced. Payload frames are forwarded as the zmq Frames they
arrived in (no copy, no re-encoding); only the small msgpack header is rewritten per leg.
"""
from __future__ import annotations

import itertools
import logging
import math
import signal
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

import msgpack
import zmq

from ..common.errors import (BadRequest, InternalError, LipsyncError, ModelLoadFailed, Overloaded,
                             RequestTimeout, Unavailable)
from ..common.load_backoff import LoadBackoff
from ..common.protocol import TAG, decode
from ..common.security import BrokerSecurity, SecurityError
from ..config.schema import Config
from . import management
from .catalog_watch import CatalogWatcher
from .hardening import check_message_size, clean_stats, open_security
from .queues import ModelQueues, Pending
from .routing import DISPATCH, PLACE, WAIT, Decision, Heat, copy_threshold_s, pick_loaded, route
from .stats import BrokerStats, format_report
from .validate import check_deadline, check_envelope, check_infer, check_load, check_model
from ..common.wire import readable, recv_parts, send_parts
from .workers import Worker, WorkerTable

log = logging.getLogger("lipsync_cluster.broker")

RECV_BATCH = 256            # messages read from one socket before looking at the other
SWEEP_S = 0.025             # deadline sweep / copy check period
PUBLISH_S = 1.0             # stats snapshot period on the PUB socket
CATALOG_REFRESH_S = 2.0     # re-read the catalog this often (plus when an unknown id arrives)
UNKNOWN_REFRESH_S = 0.25    # ... but at most this often
MAX_PARKED = 1024           # requests waiting for a catalog re-read; beyond: unknown_model at once
PARK_MAX_S = 5.0            # a read that takes longer: parked requests are answered from the last one
PRELOAD_RETRY_S = 10.0      # after a failed or impossible preload, try again this much later
HWM = 100_000               # messages per peer queue; a client that stops reading loses replies
SOCKET_BUFFER = 4 * 2**20   # kernel send/receive buffer per connection (SO_SNDBUF/SO_RCVBUF)

Catalog = Callable[[], "dict[str, dict]"]


class BindError(RuntimeError):
    """An endpoint could not be bound (most often: the port is already in use)."""


class Gather:
    """An ``unload_model`` fanned out to every worker holding the model; answered once."""

    __slots__ = ("client", "cid", "model", "remaining", "workers", "errors")

    def __init__(self, client: bytes, cid: Any, model: str, count: int) -> None:
        self.client, self.cid, self.model = client, cid, model
        self.remaining = count
        self.workers: list[str] = []
        self.errors: list[dict] = []


_unpackb = msgpack.unpackb
_SCALARS = (str, int, float, bytes, type(None))


def _fast_header(frames: list) -> Optional[dict]:
    """The header of a well-formed ``[identity, TAG, header, ...]`` message, else None.

    The common case in a few operations; anything unusual returns None and the caller runs
    ``protocol.decode`` to get the precise error.
    """
    if len(frames) < 3 or frames[1].bytes != TAG:
        return None
    try:
        header = _unpackb(frames[2].buffer)
    except Exception:
        return None
    return header if type(header) is dict else None


def _counted(p: Pending) -> Optional[str]:
    """The model whose counters an outcome goes to: infer requests only (others: totals only)."""
    return p.model if p.op == "infer" else None


class _Park(Exception):
    """Raised while validating a request that names an id not (yet) in the catalog."""


class _Busy:
    """``model in busy`` -> the model has requests queued (a Collection view, computed lazily)."""

    __slots__ = ("queues",)

    def __init__(self, queues: ModelQueues) -> None:
        self.queues = queues

    def __contains__(self, model: object) -> bool:
        return self.queues.depth(model) > 0  # type: ignore[arg-type]


class Broker:
    def __init__(self, config: Config, catalog: Catalog, *, ctx: Optional[zmq.Context] = None,
                 default_deadline_s: float = 120.0, lfu_half_life_s: float = 300.0,
                 no_worker_grace_s: float = 10.0) -> None:
        cl = config.cluster
        self.config = config
        self._own_ctx = ctx is None
        self.ctx = ctx if ctx is not None else zmq.Context()
        self._catalog_wake_endpoint = f"inproc://lsc-broker-catalog-{id(self):x}"
        self._watch = CatalogWatcher(catalog, self.ctx, self._catalog_wake_endpoint,
                                     period_s=CATALOG_REFRESH_S, min_gap_s=UNKNOWN_REFRESH_S)
        self._catalog_wake: Optional[zmq.Socket] = None
        self._parked: list[tuple[int, float, list]] = []  # (scan that must finish, parked at, frames)
        self._replaying = False
        self.interval = cl.heartbeat_interval_s
        self.dead_after = cl.heartbeat_interval_s * cl.heartbeat_liveness
        self.max_batch = cl.max_batch_size
        self.max_copies = cl.max_copies_per_model
        self.default_deadline_s = default_deadline_s
        self.no_worker_grace_s = no_worker_grace_s
        self.security = BrokerSecurity(None)         # CURVE + ZAP once bind() has read the config
        self.max_message_bytes = config.server.max_message_size_mb * 2**20
        self.load_failures = LoadBackoff(cl.load_failure_backoff_s, cl.load_failure_backoff_max_s)
        now = time.monotonic()
        self.table = WorkerTable()
        self.queues = ModelQueues(cl.queue_limit_per_model, cl.queue_limit_total)
        self.control: deque[Pending] = deque()       # unload fan-out legs, each for one worker
        self.heat = Heat(config.capacity.eviction_policy, lfu_half_life_s)
        self.stats = BrokerStats(now)
        self._busy = _Busy(self.queues)
        self._rids = itertools.count(1)
        self._packer = msgpack.Packer(use_bin_type=True)
        self._preload_at: dict[str, float] = {}      # model -> when we last tried to preload it
        self._no_workers_since: Optional[float] = now
        self._dirty = False
        self.frontend: Optional[zmq.Socket] = None
        self.backend: Optional[zmq.Socket] = None
        self.publisher: Optional[zmq.Socket] = None
        self.metrics: Any = None  # broker/metrics.py MetricsServer when cluster.metrics_port is set
        self.placement_patience = cl.placement_patience  # x a load time (routing.place; 0 = off)
        self.frontend_endpoint = self.backend_endpoint = self.stats_endpoint = ""
        self._hb_frames = [TAG, self._packer.pack({"op": "heartbeat"})]
        self._disconnect_frames = [TAG, self._packer.pack({"op": "disconnect"})]
        self._client_ops = {
            "infer": self._on_infer, "load_model": self._on_load_model,
            "unload_model": self._on_unload_model, "list_models": self._on_list_models,
            "model_stats": self._on_model_stats, "health": self._on_health,
        }
        self._worker_ops = {
            "heartbeat": self._on_heartbeat, "reply": self._on_reply, "event": self._on_event,
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
                    sock.setsockopt(zmq.SNDHWM, HWM)
                    sock.setsockopt(zmq.RCVHWM, HWM)
                    # Room for a whole large payload per connection in the kernel: a 1 MB frame
                    # crosses loopback in fewer flow-control rounds (the kernel caps this value).
                    sock.setsockopt(zmq.SNDBUF, SOCKET_BUFFER)
                    sock.setsockopt(zmq.RCVBUF, SOCKET_BUFFER)
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
                if self._dirty:
                    self._dispatch()
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
        """Handle the waiting messages (poll said at least one), at most RECV_BATCH."""
        for _ in range(RECV_BATCH):
            try:
                handle(recv_parts(sock))
            except zmq.Again:
                return
            except Exception:  # a bug must cost one message, not the broker
                log.exception("broker: unexpected error handling a message; continuing")
            if not readable(sock):
                return

    def _send_client(self, client: bytes, header: dict, payloads: Any = ()) -> None:
        try:
            send_parts(self.frontend, [client, TAG, self._packer.pack(header), *payloads])
        except zmq.ZMQError:  # EHOSTUNREACH: the client went away; EAGAIN: it stopped reading
            self.stats.undeliverable += 1

    def _reply(self, client: Optional[bytes], cid: Any, **fields: Any) -> None:
        if client is not None:
            self._send_client(client, {"id": cid, "ok": True, **fields})

    def _reply_error(self, client: Optional[bytes], cid: Any, error: LipsyncError,
                     model: Optional[str] = None, latency_s: float = 0.0) -> None:
        self.stats.outcome(model, error.code, latency_s)
        if client is not None:
            self._send_client(client, {"id": cid, "ok": False, "error": error.to_wire()})

    def _send_worker(self, w: Worker, frames: list) -> bool:
        try:
            send_parts(self.backend, [w.identity, *frames])
            return True
        except zmq.ZMQError as exc:
            log.warning("worker %s unreachable (%s); dropping it", w.name, exc)
            self._lost(w, "unreachable")
            return False

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

    def _known(self, model: str) -> bool:
        if model in self._watch.current:
            return True
        if self._replaying or len(self._parked) >= MAX_PARKED:
            return False
        raise _Park  # wait for a fresh read: the package may have been added a moment ago

    def _on_catalog_scanned(self) -> None:
        try:
            while True:
                self._catalog_wake.recv(zmq.NOBLOCK)
        except zmq.Again:
            pass
        self._release_parked(time.monotonic())
        self._preload(time.monotonic())

    def _release_parked(self, now: float) -> None:
        """Replay parked requests whose catalog read finished, or that waited PARK_MAX_S."""
        if not self._parked:
            return
        done = self._watch.scans
        ready, waiting = [], []
        for item in self._parked:
            (ready if item[0] <= done or now - item[1] >= PARK_MAX_S else waiting).append(item)
        if ready:
            self._parked = waiting
            self._replay([frames for _, _, frames in ready])

    def _replay(self, parked: list[list]) -> None:
        """Handle parked requests again; an id still unknown is now answered `unknown_model`."""
        self._replaying = True
        try:
            for frames in parked:
                try:
                    self._on_client_message(frames)
                except Exception:
                    log.exception("broker: unexpected error handling a parked request; continuing")
        finally:
            self._replaying = False

    # --- client messages ------------------------------------------------------------------

    def _on_client_message(self, frames: list) -> None:
        client = frames[0].bytes
        header: Any = None
        try:
            header = _fast_header(frames)
            if header is None:
                header, _ = decode(frames[1:])  # not the well-formed case: raises, saying why
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
            self._reply_error(client, cid if isinstance(cid, (str, int, float, bytes)) else None, exc)
            return
        try:
            handler(client, cid, header, payloads)
        except _Park:
            # Answered once a catalog read that started after this moment has finished.
            watch = self._watch
            self._parked.append((watch.scans + (2 if watch.busy else 1), time.monotonic(), frames))
            watch.request()
        except LipsyncError as exc:
            model = header.get("model_id")
            self._reply_error(client, cid, exc, model if isinstance(model, str) and model in self.catalog else None)
        except Exception as exc:  # a bug: log it, and still answer (a client never waits for nothing)
            log.exception("broker: unexpected error handling %r from a client", header.get("op"))
            self._reply_error(client, cid, InternalError(f"broker error: {type(exc).__name__}: {exc}"))

    def _new_pending(self, client: Optional[bytes], cid: Any, op: str, model: Optional[str],
                     header: dict, payloads: list, deadline_s: Optional[float]) -> Pending:
        now = time.monotonic()
        return Pending(next(self._rids), client, cid, op, model, header, payloads, now,
                       now + (deadline_s if deadline_s is not None else self.default_deadline_s))

    def _on_infer(self, client: bytes, cid: Any, header: dict, payloads: list) -> None:
        model = check_model(header, self._known)
        batch = check_infer(header, payloads, self.max_batch)
        deadline_s = check_deadline(header)
        now = time.monotonic()
        if self.load_failures or "error" in self._watch.current.get(model, ()):
            self._check_loadable(model, now)
        p = Pending(next(self._rids), client, cid, "infer", model, header, payloads, now,
                    now + (deadline_s if deadline_s is not None else self.default_deadline_s))
        p.frames = batch
        self.stats.arrival(model)
        self.heat.touch(model, now)  # LFU/LRU see every request, even ones shed below
        self._admit(p)

    def _check_loadable(self, model: str, now: float) -> None:
        """A broken package, or a model in its load-failure backoff that no worker holds: answer
        `model_load_failed` with the reason at once (common/load_backoff.py)."""
        info = self._watch.current.get(model) or {}
        if info.get("error"):
            raise ModelLoadFailed(f"model '{model}' cannot be loaded: {info['error']}",
                                  model_id=model, reason=info["error"])
        if self.load_failures and not any(w.has_loaded(model) for w in self.table.values()):
            self.load_failures.check(model, info.get("version"), now)

    def _on_load_failure(self, model: str, error: Any, now: float) -> None:
        """A load of ``model`` failed: start (or extend) its backoff; unless a worker holds it,
        answer its queued requests with the same error now instead of trying it again for each."""
        info = self._watch.current.get(model) or {}
        err = error if isinstance(error, dict) else {}
        details = err.get("details") if isinstance(err.get("details"), dict) else {}
        reason = str(details.get("reason") or err.get("message") or "load failed")
        # Keyed by the version the worker tried: a failure of an older package (the worker had not
        # seen the new one yet) must not block the new one.
        f = self.load_failures.failed(model, details.get("version", info.get("version")), reason, now)
        if any(w.has_loaded(model) for w in self.table.values()):
            return
        exc = self.load_failures.error(model, f, now)
        while self.queues.depth(model):
            p = self.queues.pop(model)
            if not p.answered and p.client is not None:
                p.answered = True
                self._reply_error(p.client, p.cid, exc, _counted(p), now - p.arrival)

    def _on_load_model(self, client: bytes, cid: Any, header: dict, payloads: list) -> None:
        model = check_model(header, self._known)
        check_load(header)
        if not header.get("force_reload"):  # an operator's forced reload tries even in the backoff
            self._check_loadable(model, time.monotonic())
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
        p = self._new_pending(client, cid, "load_model", model, header, payloads, check_deadline(header))
        p.targets = frozenset(targets) if targets is not None else None
        self.stats.arrival(None)  # cluster totals only: a model's counters are about its frames
        self._admit(p)

    def _on_unload_model(self, client: bytes, cid: Any, header: dict, payloads: list) -> None:
        model = check_model(header, self._known)
        deadline_s = check_deadline(header)
        holders = [w for w in self.table.values() if w.holds(model)]
        if not holders:
            self._reply(client, cid, model_id=model, workers=[])
            return
        gather = Gather(client, cid, model, len(holders))
        for w in holders:
            p = self._new_pending(None, None, "unload_model", model, header, payloads, deadline_s)
            p.targets, p.parent = frozenset((w.name,)), gather
            self.control.append(p)
        self._dirty = True

    def _on_list_models(self, client: bytes, cid: Any, header: dict, payloads: list) -> None:
        now = time.monotonic()
        self._reply(client, cid, models=management.list_models(self.catalog, self.table, self.queues,
                                                               self.stats, now))

    def _on_model_stats(self, client: bytes, cid: Any, header: dict, payloads: list) -> None:
        model = check_model(header, self._known) if header.get("model_id") is not None else None
        body = management.model_stats(self.catalog, self.table, self.queues, self.stats,
                                      time.monotonic(), model)
        self._reply(client, cid, **body)

    def _on_health(self, client: bytes, cid: Any, header: dict, payloads: list) -> None:
        self._reply(client, cid, **management.health(self.catalog, self.table))

    # --- queueing and dispatch ---------------------------------------------------------------

    def _admit(self, p: Pending) -> None:
        """Send ``p`` now if its queue is empty and a worker fits; else queue it (bounded)."""
        if not self.queues.depth(p.model):
            d = self._route(p, p.arrival)
            if d.action != WAIT:
                self._send_request(p, d, p.arrival)
                return
        try:
            self.queues.push(p)
        except Overloaded as exc:
            exc.details["retry_after_ms"] = self._retry_after_ms(p.model)
            self._reply_error(p.client, p.cid, exc, _counted(p))

    def _retry_after_ms(self, model: str) -> int:
        service = self.stats.service_s(model) or 0.05
        capacity = sum(w.credits for w in self.table.values() if w.holds(model)) or 1
        return int(min(10_000, max(10, 1000 * service * self.queues.depth(model) / capacity)))

    def _route(self, p: Pending, now: float) -> Decision:
        workers: Any = self.table.values()
        if p.targets is not None:
            workers = [w for w in workers if w.name in p.targets]
        w = pick_loaded(p.model, workers)  # the common case, without building route()'s inputs
        if w is not None:
            return Decision(DISPATCH, w, None, "loaded")
        load_s = self.stats.load_s(p.model)
        return route(p.model, workers, busy_models=self._busy, value=self.heat.valuer(now),
                     head_wait_s=now - p.arrival,
                     copy_after_s=copy_threshold_s(self.stats.service_s(p.model), load_s=load_s),
                     max_copies=self.max_copies, allow_evict=not p.no_evict,
                     patience_s=(load_s or 0.0) * self.placement_patience)

    def _dispatch(self) -> None:
        """Match waiting requests with free credits: unload legs first, then oldest head first."""
        self._dirty = False
        now = time.monotonic()
        if self.control:
            self._dispatch_control(now)
        if not self.queues.total or not self.table.any_free():
            return
        queues = self.queues
        for model in queues.by_head_age():
            while True:
                p = queues.head(model)
                if p is None:
                    break
                if p.deadline is not None and p.deadline <= now:
                    queues.pop(model)
                    self._expire(p, now)
                    continue
                d = self._route(p, now)
                if d.action == WAIT:
                    break
                queues.pop(model)
                self._send_request(p, d, now)
            if not self.table.any_free():
                return

    def _dispatch_control(self, now: float) -> None:
        for _ in range(len(self.control)):
            p = self.control.popleft()
            (name,) = p.targets
            w = self.table.by_name(name)
            if w is None:  # the worker left: the model went with it
                self._gather_done(p, name, {"ok": True, "note": "worker left"})
            elif w.free > 0:
                self._send_request(p, Decision(DISPATCH, w), now)
            else:
                self.control.append(p)

    def _send_request(self, p: Pending, d: Decision, now: float) -> None:
        w: Worker = d.worker
        p.evict_hint = d.evict
        header = p.header.copy()
        header.update(op="request", client_op=p.op, rid=p.rid, queue_ms=(now - p.arrival) * 1000.0,
                      deadline=None if p.deadline is None else time.time() + (p.deadline - now))
        if d.evict is not None:
            header["evict_hint"] = d.evict
        info = self._watch.current.get(p.model)
        if info is not None:
            header["model_version"] = info.get("version")
        if not self._send_worker(w, [TAG, self._packer.pack(header), *p.payloads]):
            self.queues.push_front(p) if p.parent is None else self.control.appendleft(p)
            self._dirty = True
            return
        w.start(p, now)
        p.worker = w.name
        p.dispatched_at = now
        if d.action == PLACE and self.config.logging.log_model_operations:
            log.info("placing model %s on worker %s (%s%s)", p.model, w.name, d.reason,
                     f"; evicting {d.evict}" if d.evict else "")

    # --- worker messages ------------------------------------------------------------------

    def _on_worker_message(self, frames: list) -> None:
        identity = frames[0].bytes
        header = _fast_header(frames)
        if header is None:
            try:
                header, _ = decode(frames[1:])
            except LipsyncError as exc:
                log.warning("broker: malformed message from a worker: %s", exc.message)
                return
        payloads = frames[3:]
        op = header.get("op")
        w = self.table.get(identity)
        if op == "reply" and w is not None:  # the hot path
            w.last_seen = time.monotonic()
            self._on_reply(w, header, payloads)
            return
        if w is None:
            if op == "ready":
                self._on_ready(identity, header)
            elif op != "disconnect":
                # Unknown (e.g. declared dead, or the broker restarted): discard and make it
                # register again. A late reply is dropped here, so it is never delivered twice.
                if op == "reply":
                    self.stats.late_replies += 1
                try:
                    self.backend.send_multipart([identity, *self._disconnect_frames], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # it went away again
            return
        w.last_seen = time.monotonic()
        handler = self._worker_ops.get(op) if type(op) is str else None
        if handler is None:
            log.warning("broker: worker %s sent unknown op %r; ignored", w.name, op)
            return
        handler(w, header, payloads)

    def _on_ready(self, identity: bytes, header: dict) -> None:
        name = header.get("worker")
        if not isinstance(name, str) or not name:
            log.error("broker: a worker sent `ready` without a 'worker' name; ignored")
            return

        def num(key: str, default: int) -> int:
            v = header.get(key)
            return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else default

        gpu = header.get("gpu")
        w = Worker(identity, name, host=str(header.get("host", "")), pid=num("pid", 0),
                   gpu=gpu if isinstance(gpu, int) and not isinstance(gpu, bool) else None,
                   credits=min(64, max(1, num("credits", 1))), max_models=max(1, num("max_models", 1)),
                   max_memory_bytes=num("max_memory_bytes", 0))
        w.apply_report(header.get("loaded"), header.get("loading"))
        w.restarts = self.stats.registered(name, w.pid)
        for old in self.table.add(w):
            self._lost(old, f"replaced by a new registration of {name}")
        self._no_workers_since = None
        log.info("worker %s registered (host %s, pid %s, gpu %s, credits %d, max_models %d, loaded: %s)",
                 name, w.host, w.pid, w.gpu, w.credits, w.max_models, ", ".join(sorted(w.loaded)) or "-")
        self._publish(b"event", {"event": "worker_joined", "worker": name, "time": time.time(),
                                 "host": w.host, "pid": w.pid, "gpu": w.gpu, "credits": w.credits})
        self._dirty = True

    def _on_ready_again(self, w: Worker, header: dict, payloads: list) -> None:
        # The same socket registering again: start from a clean slate.
        self._lost(w, "re-registered")
        self._on_ready(w.identity, header)

    def _on_heartbeat(self, w: Worker, header: dict, payloads: list) -> None:
        w.apply_report(header.get("loaded"), header.get("loading"))
        draining = header.get("draining") is True
        if draining and not w.draining:
            log.info("worker %s is draining", w.name)
        w.draining = draining
        self._dirty = True

    def _on_reply(self, w: Worker, header: dict, payloads: list) -> None:
        p = w.finish(header.pop("rid", None))
        if p is None:
            self.stats.late_replies += 1
            return
        self._dirty = True
        now = time.monotonic()
        ok = header.get("ok") is True
        if p.op == "infer":
            if ok and p.client is not None and not p.answered:
                # The common case, counted inline (see BrokerStats.outcome / .service).
                c = self.stats.model(p.model)
                service = now - p.dispatched_at
                c.service_s = service if c.service_s is None else 0.8 * c.service_s + 0.2 * service
                c.success(now - p.arrival, p.dispatched_at - p.arrival, header, service, p.frames, now)
                self.stats.total_ok += 1
                p.answered = True
                header.pop("op", None)
                header["id"] = p.cid
                if p.retries:  # re-dispatched after its first worker died (chaos reports count these)
                    header["retried"] = p.retries
                self._send_client(p.client, header, payloads)
                return
            self.stats.service(p.model, now - p.dispatched_at)
        if p.parent is not None:
            self._gather_done(p, w.name, header)
            return
        if p.answered:  # the broker already answered (timeout): this reply is late
            self.stats.late_replies += 1
            return
        p.answered = True
        if p.op == "load_model":
            if ok:
                w.loaded.add(p.model)
                w.loading.discard(p.model)
                header.setdefault("model_id", p.model)
                header["workers"] = [w.name]
        error = header.get("error")
        code = None if ok else (error.get("code") if isinstance(error, dict) else None) or "internal"
        if code == "model_load_failed" and p.model is not None:
            self._on_load_failure(p.model, error, now)
        if p.client is None:  # the broker's own request (preload); a failure waits to retry
            if ok:
                self._preload_at.pop(p.model, None)
                log.info("preloaded model %s on worker %s", p.model, w.name)
            else:
                self._preload_at[p.model] = now
                log.warning("preloading model %s on worker %s failed: %s", p.model, w.name, error)
            return
        self.stats.outcome(_counted(p), code, now - p.arrival, p.frames if ok else 0, now)
        header.pop("op", None)
        header["id"] = p.cid
        self._send_client(p.client, header, payloads)

    def _on_event(self, w: Worker, header: dict, payloads: list) -> None:
        event, model = header.get("event"), header.get("model_id")
        if isinstance(event, str) and isinstance(model, str):
            w.apply_event(event, model)
            if event == "loaded" and isinstance(header.get("version"), str):
                w.versions[model] = header["version"]
            if event == "loaded":
                self.load_failures.succeeded(model)
        if "loaded" in header:
            w.apply_report(header.get("loaded"), header.get("loading"))
        if self.config.logging.log_model_operations and event != "loading":
            log.info("worker %s: model %s %s%s", w.name, model, event,
                     f" ({header['reason']})" if header.get("reason") else "")
        header.pop("op", None)
        header["worker"] = w.name
        header.setdefault("time", time.time())
        self._publish(b"event", header)
        self._dirty = True

    def _on_stats(self, w: Worker, header: dict, payloads: list) -> None:
        header.pop("op", None)
        w.stats = header = clean_stats(header)  # management answers are built from it: types checked
        w.stats_at = time.monotonic()
        mm = header.get("max_models")
        if isinstance(mm, int) and not isinstance(mm, bool) and mm >= 1:
            w.max_models = mm

    def _on_disconnect(self, w: Worker, header: dict, payloads: list) -> None:
        self._lost(w, "disconnected")

    # --- failures, deadlines, fan-out ---------------------------------------------------------

    def _lost(self, w: Worker, reason: str) -> None:
        """Forget ``w``; its in-flight requests go back to the front of their queue once."""
        if self.table.get(w.identity) is w:
            self.table.remove(w.identity)
        pending = w.take_all_inflight()
        log.log(logging.INFO if reason == "disconnected" else logging.WARNING,
                "worker %s gone (%s); %d request(s) in flight", w.name, reason, len(pending))
        self._publish(b"event", {"event": "worker_left", "worker": w.name, "reason": reason,
                                 "time": time.time(), "in_flight": len(pending)})
        # Re-queue in reverse so the oldest ends up at the very front.
        for p in sorted(pending, key=lambda p: p.arrival, reverse=True):
            self._retry(p, w.name)
        if not len(self.table) and self._no_workers_since is None:
            self._no_workers_since = time.monotonic()
        self._dirty = True

    def _retry(self, p: Pending, worker: str) -> None:
        if p.parent is not None:
            self._gather_done(p, worker, {"ok": True, "note": "worker left"})
            return
        if p.answered:
            return
        if p.client is None:
            self._preload_at[p.model] = time.monotonic()
            return
        if p.targets is not None or p.retries >= 1:
            p.answered = True
            why = ("its target worker" if p.targets is not None else "a second worker")
            self._reply_error(p.client, p.cid, Unavailable(
                f"{why} ({worker}) went away while handling the request", worker=worker),
                _counted(p), time.monotonic() - p.arrival)
            return
        p.retries += 1
        p.worker, p.evict_hint = None, None
        self.stats.retry(p.model)
        self.queues.push_front(p)

    def _expire(self, p: Pending, now: float) -> None:
        p.answered = True
        if p.parent is not None:
            self._gather_done(p, next(iter(p.targets)), {"ok": False, "error": RequestTimeout(
                "the worker did not answer before the deadline").to_wire()})
            return
        if p.client is None:
            return
        waited = (now - p.arrival) * 1000.0
        where = f"on worker {p.worker}" if p.worker else "in the broker queue"
        self._reply_error(p.client, p.cid, RequestTimeout(
            f"deadline passed after {waited:.0f} ms {where}", waited_ms=round(waited, 1)),
            _counted(p), now - p.arrival)

    def _gather_done(self, p: Pending, worker: str, header: dict) -> None:
        g: Gather = p.parent
        p.parent = None
        if header.get("ok") is True:
            g.workers.append(worker)
        else:
            g.errors.append({"worker": worker, "error": header.get("error")})
        g.remaining -= 1
        if g.remaining > 0:
            return
        if not g.errors:
            self._reply(g.client, g.cid, model_id=g.model, workers=sorted(g.workers))
            return
        first = g.errors[0].get("error") or {}
        message = f"unload_model failed on {len(g.errors)} worker(s): " + "; ".join(
            f"{e['worker']}: {(e.get('error') or {}).get('message', 'error')}" for e in g.errors)
        err = {"code": first.get("code", "internal") if isinstance(first, dict) else "internal",
               "message": message, "details": {"workers": sorted(g.workers), "errors": g.errors}}
        self.stats.outcome(g.model, err["code"], 0.0)
        self._send_client(g.client, {"id": g.cid, "ok": False, "model_id": g.model, "error": err})

    def _sweep(self, now: float) -> None:
        """Deadlines (queued and in flight), workerless waits, parked requests, copy checks."""
        self._release_parked(now)
        for p in self.queues.expire(now):
            self._expire(p, now)
        if self.control:
            for p in [p for p in self.control if p.deadline is not None and p.deadline <= now]:
                self.control.remove(p)
                self._expire(p, now)
        for w in self.table.values():
            for p in w.inflight.values():
                if not p.answered and p.deadline is not None and p.deadline <= now and p.parent is None:
                    # The credit stays taken until the worker answers; the client hears now.
                    self._expire(p, now)
        if (self._no_workers_since is not None and self.queues.total
                and now - self._no_workers_since >= self.no_worker_grace_s):
            for p in self.queues.drain():
                p.answered = True
                self._reply_error(p.client, p.cid, Unavailable(
                    f"no worker has been registered for {now - self._no_workers_since:.0f} s"),
                    _counted(p), now - p.arrival)
        if self.queues.total:
            self._dirty = True  # heads that waited long enough may now get another copy

    def _preload(self, now: float) -> None:
        """Place each `preload` model that no worker holds, into a free slot only (no eviction)."""
        if not len(self.table):
            return
        for model, info in self.catalog.items():
            if (not info.get("preload") or self.queues.depth(model)
                    or now - self._preload_at.get(model, -1e9) < PRELOAD_RETRY_S
                    or any(w.holds(model) for w in self.table.values())):
                continue
            p = self._new_pending(None, None, "load_model", model,
                                  {"id": None, "op": "load_model", "model_id": model}, [], None)
            p.no_evict = True
            self._preload_at[model] = now
            d = self._route(p, now)
            if d.action != WAIT:  # never queued: it must not hold up client requests
                self._send_request(p, d, now)

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
        body["eviction_policy"] = self.heat.policy
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
            parked, self._parked = [frames for _, _, frames in self._parked], []
            self._replay(parked)  # unknown ids get their answer; the rest join what is drained below
            gone = Unavailable("the broker is shutting down")
            pending = self.queues.drain() + list(self.control)
            self.control.clear()
            for w in list(self.table.values()):
                pending.extend(w.take_all_inflight())
                try:
                    self.backend.send_multipart([w.identity, *self._disconnect_frames], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            for p in pending:
                if p.parent is not None:
                    self._gather_done(p, next(iter(p.targets)), {"ok": False, "error": gone.to_wire()})
                elif not p.answered and p.client is not None:
                    p.answered = True
                    self._reply_error(p.client, p.cid, gone, _counted(p))
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
            broker.metrics = MetricsServer(config.server.host, config.cluster.metrics_port).start()
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
