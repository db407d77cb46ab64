"""Admission and dispatch: the broker's queues, deadlines and the legs it sends to workers.

The :class:`Dispatcher` owns what waits (per-model queues, unload legs) and the worker table,
and decides where each request goes by calling the pure ``routing.route`` once per decision. It
sends through the callables the broker gives it (it has no sockets) and is the
:class:`requests.Outlet` through which every request kind is answered.

A request's life (docs/ARCHITECTURE.md, "A request's life"); every exit is ``Pending.finish``:

  in      broker._on_client_message: header bounded + unpacked (wire.read_header), envelope
          (validate.py) -> unknown id: catalog_watch.Parking holds the frames until a catalog
          read -> _on_infer / _on_load_model: request rules, load backoff -> ClientRequest
          (_on_unload_model: one UnloadLeg per holder -> fan_out; preload(): a Preload leg)
  admit   admit(): queue empty and route() finds a worker -> send() now (a cold load that cannot
          fit the target: finish(overloaded)); else admission.check (not expected within 0.8 x
          the deadline: finish(overloaded)) and ModelQueues.push (full: overloaded)
  wait    in its model's queue; dispatch() takes heads oldest first as credits free,
          route() each: DISPATCH / PLACE -> send(), WAIT -> stays
  sent    send(): header + rid + time left -> the worker; Worker.start (credit taken, index);
          a failed send re-queues it (unsent) or finishes it
  exits   replied(): the worker's reply -> Worker.finish, finish(reply)   (a late one: counted)
          sweep(): deadline in the queue or on a worker -> expire -> finish(timeout)
          sweep() -> _recheck(), dispatch(): no longer expected within the target -> finish(overloaded)
          sweep(): no worker for no_worker_grace_s -> finish(unavailable)
          worker_left(): its legs -> lost(): re-queued at the front once, else finish(unavailable)
          load_failed(): a model's failed load answers its queue -> finish(model_load_failed)
          broker shutdown: drain_all() -> finish(unavailable)
"""
from __future__ import annotations

import itertools
from bisect import bisect_left
import logging
import time
from collections import deque
from typing import Any, Callable, Optional

import msgpack

from ..common import vocab
from ..common.errors import ModelLoadFailed, Overloaded, Unavailable
from ..common.heat import Heat
from ..common.load_backoff import LoadBackoff
from ..common.protocol import TAG
from .admission import RECHECK_S, RECHECK_SLACK, Admission, QueueView
from .queues import ModelQueues
from .requests import ClientRequest, Pending, Preload, UnloadLeg, error_code
from .placement import PlacementIndex
from .routing import DISPATCH, PLACE, WAIT, Decision, Demand, route
from .stats import BrokerStats
from .workers import Heartbeat, ModelEvent, StatsReport, Worker, WorkerTable

log = logging.getLogger("lipsync_cluster.broker")

PRELOAD_RETRY_S = 10.0      # after a failed or impossible preload, try again this much later


class Dispatcher:
    """Queues, deadlines, routing decisions and the worker legs; the broker's single thread only."""

    def __init__(self, config: Any, stats: BrokerStats, catalog: Callable[[], dict], *,
                 send_client: Callable[..., None], send_worker: Callable[[Worker, list], bool],
                 default_deadline_s: float, lfu_half_life_s: float, no_worker_grace_s: float) -> None:
        cl = config.cluster
        self.stats = stats
        self.catalog = catalog                       # () -> {model_id: {version, preload, ...}}
        self.to_client = send_client                 # (Outlet) the broker's frontend
        self._send_worker = send_worker
        self.queues = ModelQueues(cl.queue_limit_per_model, cl.queue_limit_total)
        self.control: deque[UnloadLeg] = deque()     # unload legs, each waiting for its one worker
        self.heat = Heat(config.capacity.eviction_policy, lfu_half_life_s)
        self.table = WorkerTable(self.heat.order_key)  # its placement index orders victims by heat
        self.sizes: dict[str, int] = {}              # model -> bytes, as workers measured it
        self.admission = Admission()                 # learned times and the admission rule (admission.py)
        self._recheck_at = 0.0                       # when queued requests are next checked again
        self.saturated_since: Optional[float] = None  # since when more requests wait than run at once
        self.load_failures = LoadBackoff(cl.load_failure_backoff_s, cl.load_failure_backoff_max_s)
        self.max_copies = cl.max_copies_per_model
        self.placement_patience = cl.placement_patience  # x a load time (routing.place; 0 = off)
        self.default_deadline_s = default_deadline_s
        self.no_worker_grace_s = no_worker_grace_s
        self.log_model_operations = config.logging.log_model_operations
        self.no_workers_since: Optional[float] = time.monotonic()
        self.dirty = False                           # something changed: dispatch() has work
        self._rids = itertools.count(1)
        self._packer = msgpack.Packer(use_bin_type=True)
        self._preload_at: dict[str, float] = {}      # model -> when we last tried to preload it

    def next_rid(self) -> int:
        return next(self._rids)

    def deadline(self, now: float, deadline_s: Optional[float]) -> float:
        return now + (deadline_s if deadline_s is not None else self.default_deadline_s)

    def client_request(self, client: bytes, cid: Any, op: str, model: str, header: dict,
                       payloads: list, deadline_s: Optional[float]) -> ClientRequest:
        now = time.monotonic()
        return ClientRequest(self.next_rid(), client, cid, op, model, header, payloads, now,
                             self.deadline(now, deadline_s))

    # --- workers: what the broker hears about them (the table's only writer) ---------------

    def worker_joined(self, w: Worker) -> list[Worker]:
        """A worker registered; returns the stale entries it replaces (same identity or name),
        already out of the table: the broker answers for them with :meth:`worker_left`."""
        stale = self.table.add(w)
        self.no_workers_since = None
        self.dirty = True
        return stale

    def worker_left(self, w: Worker) -> int:
        """Forget ``w``; its in-flight requests finish, or go back to the front of their queue
        once (:meth:`worker_lost`). Returns how many were in flight."""
        if self.table.get(w.identity) is w:
            self.table.remove(w.identity)
        pending = w.take_all_sent()
        self.worker_lost(pending, w.name)
        if not len(self.table) and self.no_workers_since is None:
            self.no_workers_since = time.monotonic()
        return len(pending)

    def worker_heartbeat(self, w: Worker, hb: Heartbeat) -> None:
        w.apply_heartbeat(hb)
        self.dirty = True

    def worker_event(self, w: Worker, e: ModelEvent) -> None:
        """A model event: what ``w`` holds changed; a load that succeeded ends its backoff."""
        w.apply_model_event(e)
        if e.event == vocab.LOADED:
            self.load_failures.succeeded(e.model)
        self.dirty = True

    def worker_measured(self, w: Worker, s: StatsReport) -> None:
        """A worker's stats: what it runs, and what each model it holds really costs."""
        w.apply_stats(s)
        self.sizes.update(s.sizes)

    def saw(self, p: Pending) -> None:
        """A client asked for ``p``'s model: LFU/LRU see every request, even ones shed later."""
        self.heat.touch(p.model, p.arrival)

    # --- admission -----------------------------------------------------------------------

    def admit(self, p: Pending) -> None:
        """Send ``p`` now if its queue is empty and a worker fits; else queue it (bounded), unless
        it is not expected to finish within its deadline's target (admission.py): then
        `overloaded` at once."""
        adm = self.admission
        timed = p.op == "infer" and p.deadline is not None
        # The target share applies to a deadline the caller set; the default one is a safety net.
        share = None if p.header.get("deadline_ms") is not None else 1.0
        if timed:
            p.due = adm.due(p.arrival, p.deadline - p.arrival, share)
        depth = self.queues.depth(p.model)
        if not depth:
            d = self.route(p, p.arrival)
            if d.action != WAIT:
                finish = adm.start_finish(p.model, p.arrival, True) if d.action == PLACE and timed else 0.0
                if finish > p.due:  # a cold load that cannot finish within the target: say so now
                    exc = adm.cold_refusal(p.model, p.deadline - p.arrival, p.due - p.arrival, finish - p.arrival)
                    p.finish(self, exc, now=p.arrival)
                else:
                    self.send(p, d, p.arrival)
                return
        try:
            if timed:
                self.note_saturation(p.arrival)
                p.expect_s = adm.check(p.model, p.deadline - p.arrival, self._view(p.model, p.arrival, depth), share)
            self.queues.push(p)
        except Overloaded as exc:
            exc.details.setdefault("retry_after_ms", self._retry_after_ms(p.model))
            p.finish(self, exc, now=time.monotonic())

    def _view(self, model: str, now: float, depth: int) -> QueueView:
        index = self.table.index
        since = self.saturated_since
        return QueueView(credits=index.credits, in_flight=index.in_flight, queued=self.queues.total,
                         depth=depth, holder_credits=index.holder_credits.get(model, 0),
                         saturated_s=0.0 if since is None else now - since)

    def _recheck(self, now: float) -> None:
        """Refuse queued requests now expected to finish past their deadline's target (before the
        deadline, not at it): the estimate at admission turned out wrong."""
        adm, index, queues = self.admission, self.table.index, self.queues
        if not index.credits:
            return
        arrivals = sorted(p.arrival for p in queues)  # a request's place in the oldest-head-first order
        credits, flight, holders = index.credits, index.in_flight, index.holder_credits

        def finish(p: Pending, ahead_model: int) -> float:
            ahead = bisect_left(arrivals, p.arrival)
            return now + adm.expect(p.model, credits, flight, ahead, ahead_model, holders.get(p.model, 0))[1]

        for p, t in queues.prune_late(finish, RECHECK_SLACK):
            self._refuse_late(p, now, t, t - adm.service_high(p.model))  # when it would start

    def _refuse_late(self, p: Pending, now: float, finish: float, start: float) -> None:
        """Refuse ``p`` (out of its queue, or never queued): it would start at ``start`` and
        finish at ``finish``, past its deadline's target."""
        self._left_queue(p, start - p.arrival)  # it would have waited at least this long
        p.finish(self, self.admission.refusal(p.model, now - p.arrival, p.deadline - p.arrival,
                                              p.due - p.arrival, finish - p.arrival), now=now)

    def _left_queue(self, p: Pending, waited_s: float, cold: Optional[bool] = None) -> None:
        """``p`` left the queue (sent, refused, expired) after ``waited_s``: the margin learns
        how long it waited against what was predicted when it was admitted (``cold``: its model
        had to be placed; None: no worker holds it now)."""
        if p.expect_s >= 0:
            if cold is None:
                cold = not self.table.index.holder_credits.get(p.model)
            self.admission.waited(p.expect_s, waited_s, cold)
            p.expect_s = -1.0

    def fan_out(self, legs: list[UnloadLeg]) -> None:
        self.control.extend(legs)
        self.dirty = True

    def note_saturation(self, now: float) -> None:
        """Track since when more requests wait than every worker's credits run at once."""
        credits = self.table.index.credits
        if credits and self.queues.total >= credits:
            if self.saturated_since is None:
                self.saturated_since = now
        else:
            self.saturated_since = None

    def _retry_after_ms(self, model: str) -> int:
        service = self.stats.service_s(model) or 0.05
        capacity = self.table.index.holder_credits.get(model, 0) or 1
        return int(min(10_000, max(10, 1000 * service * self.queues.depth(model) / capacity)))

    def check_loadable(self, model: str, now: float) -> None:
        """A broken package, or a model in its load-failure backoff that no worker holds: raise
        `model_load_failed` with the reason (common/load_backoff.py)."""
        info = self.catalog().get(model) or {}
        if info.get("error"):
            raise ModelLoadFailed(f"model '{model}' cannot be loaded: {info['error']}",
                                  model_id=model, reason=info["error"])
        if self.load_failures and not self.table.index.copies.get(model):
            self.load_failures.check(model, info.get("version"), now)

    def load_failed(self, model: str, error: Any, now: float) -> None:
        """A load of ``model`` failed: start (or extend) its backoff; unless a worker holds it,
        answer its queued requests with the same error now instead of trying it again for each."""
        info = self.catalog().get(model) or {}
        err = error if isinstance(error, dict) else {}
        details = err.get("details") if isinstance(err.get("details"), dict) else {}
        reason = str(details.get("reason") or err.get("message") or "load failed")
        # Keyed by the version the worker tried: a failure of an older package (the worker had not
        # seen the new one yet) must not block the new one.
        f = self.load_failures.failed(model, details.get("version", info.get("version")), reason, now)
        if self.table.index.copies.get(model):
            return
        exc = self.load_failures.error(model, f, now)
        while self.queues.depth(model):
            self.queues.pop(model).finish(self, exc, now=now)

    # --- routing and sending -------------------------------------------------------------------

    def model_size(self, model: str) -> Optional[int]:
        """Bytes a model takes on a worker: as measured by a worker that holds it, else the
        catalog's estimate, else None (unknown: fits anywhere)."""
        size = self.sizes.get(model)
        if size is None:
            mb = (self.catalog().get(model) or {}).get("memory_estimate_mb")
            size = int(mb * 2**20) if isinstance(mb, (int, float)) and mb > 0 else None
        return size

    def route(self, p: Pending, now: float) -> Decision:
        """One ``routing.route`` call per decision; the demand inputs (queue depth, measured
        times, memory size) are computed by it only on a miss, so a hit stays one index lookup."""
        index = self.table.index
        if p.targets is not None:
            index = PlacementIndex.of([w for w in self.table.values() if w.name in p.targets],
                                      self.heat.order_key)

        def demand() -> Demand:
            stats = self.stats
            load_s = stats.load_s(p.model)
            return Demand(busy_models=self.queues.busy_models(), depth=max(1, self.queues.depth(p.model)),
                          service_s=stats.service_s(p.model), load_s=load_s, head_wait_s=now - p.arrival,
                          patience_s=(load_s or 0.0) * self.placement_patience, size=self.model_size(p.model))

        return route(p.model, index, demand, max_copies=self.max_copies, allow_evict=not p.no_evict,
                     size_of=self.model_size)

    def dispatch(self, now: Optional[float] = None) -> None:
        """Match waiting requests with free credits: unload legs first, then oldest head first."""
        self.dirty = False
        now = time.monotonic() if now is None else now
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
                    p.expire(self, now)
                    continue
                d = self.route(p, now)
                if d.action == WAIT:
                    break
                queues.pop(model)
                finish = self.admission.start_finish(p.model, now, d.action == PLACE)
                if finish > p.due:
                    # Starting now misses its deadline's target (the re-check runs only every RECHECK_S).
                    self._refuse_late(p, now, finish, now)
                    continue
                self.send(p, d, now)
            if not self.table.any_free():
                return

    def _dispatch_control(self, now: float) -> None:
        for _ in range(len(self.control)):
            p = self.control.popleft()
            w = self.table.by_name(p.target)
            if w is None:
                p.lost(self, p.target, now)
            elif w.free > 0:
                self.send(p, Decision(DISPATCH, w), now)
            else:
                self.control.append(p)

    def send(self, p: Pending, d: Decision, now: float) -> None:
        w: Worker = d.worker
        p.evict_hint = d.evict
        header = p.header.copy()
        # The time left, not a wall-clock instant: a worker on another host counts it from when the
        # leg arrives, so clock skew between hosts cannot make it refuse (or keep) everything.
        header["op"] = "request"
        header["client_op"] = p.op
        header["rid"] = p.rid
        header["queue_ms"] = (now - p.arrival) * 1000.0
        header["deadline_left_ms"] = None if p.deadline is None else (p.deadline - now) * 1000.0
        if d.evict is not None:
            header["evict_hint"] = d.evict
        info = self.catalog().get(p.model)
        if info is not None:
            header["model_version"] = info.get("version")
        if not self._send_worker(w, [TAG, self._packer.pack(header), *p.payloads]):
            # The worker was dropped meanwhile: the leg waits again, or finishes as if it was lost.
            if p.unsent(self, w.name, now):
                self.queues.push_front(p)
            self.dirty = True
            return
        w.start(p, now)
        p.worker = w.name
        p.dispatched_at = now
        if p.expect_s >= 0:
            self._left_queue(p, now - p.arrival, d.action == PLACE)
        if d.action == PLACE and self.log_model_operations:
            log.info("placing model %s on worker %s (%s%s)", p.model, w.name, d.reason,
                     f"; evicting {d.evict}" if d.evict else "")

    # --- replies and losses ----------------------------------------------------------------

    def replied(self, w: Worker, header: dict, payloads: list) -> None:
        """A worker's ``reply``: note what it tells about the worker, then finish the request."""
        p = w.finish(header.pop("rid", None))
        if p is None:
            self.stats.late_replies += 1
            return
        self.dirty = True
        now = time.monotonic()
        if p.op == "infer":
            self.stats.service(p.model, now - p.dispatched_at)
            load_ms = header.get("model_load_ms") if header.get("model_loaded") is True else None
            self.admission.served(p.model, now - p.dispatched_at,
                                  load_ms / 1000.0 if isinstance(load_ms, (int, float)) else None)
        code = error_code(header)
        if code is None:
            if p.op == "load_model":
                w.apply_event(vocab.LOADED, p.model)
        elif code == "model_load_failed" and not p.answered:
            self.load_failed(p.model, header.get("error"), now)
        if not p.finish(self, header, payloads, now):
            self.stats.late_replies += 1  # the broker already answered it (timeout)

    def worker_lost(self, pending: list[Pending], worker: str) -> None:
        """``worker``'s in-flight legs: each finishes, or goes back to the front of its queue once."""
        now = time.monotonic()
        # Re-queue in reverse so the oldest ends up at the very front.
        for p in sorted(pending, key=lambda p: p.arrival, reverse=True):
            if p.lost(self, worker, now):
                self.queues.push_front(p)
        self.dirty = True

    def sweep(self, now: float) -> None:
        """Deadlines (queued and in flight) and requests waiting too long for any worker."""
        self.note_saturation(now)
        for p in self.queues.expire(now):
            self._left_queue(p, now - p.arrival)
            p.expire(self, now)
        if self.queues.total and now >= self._recheck_at:
            # A few microseconds per queued request: a deep queue is re-checked less often.
            self._recheck_at = now + max(RECHECK_S, 6e-5 * self.queues.total)
            self._recheck(now)
        if self.control:
            for p in [p for p in self.control if p.deadline is not None and p.deadline <= now]:
                self.control.remove(p)
                p.expire(self, now)
        for w in self.table.values():
            for p in w.sent.values():
                if p.expires_in_flight and not p.answered and p.deadline is not None and p.deadline <= now:
                    # The credit stays taken until the worker answers; the client hears now.
                    p.expire(self, now)
        since = self.no_workers_since
        if since is not None and self.queues.total and now - since >= self.no_worker_grace_s:
            gone = Unavailable(f"no worker has been registered for {now - since:.0f} s")
            for p in self.queues.drain():
                p.finish(self, gone, now=now)
        if self.queues.total:
            self.dirty = True  # heads that waited long enough may now get another copy

    def drain_all(self) -> list[Pending]:
        """Everything waiting or in flight (shutdown); the worker table keeps its workers."""
        pending: list[Pending] = self.queues.drain() + list(self.control)
        self.control.clear()
        for w in self.table.values():
            pending.extend(w.take_all_sent())
        return pending

    # --- preloads --------------------------------------------------------------------------

    def preload(self, now: float) -> None:
        """Place each `preload` model that no worker holds, into a free slot only (no eviction)."""
        if not len(self.table):
            return
        for model, info in self.catalog().items():
            if (not info.get("preload") or self.queues.depth(model)
                    or now - self._preload_at.get(model, -1e9) < PRELOAD_RETRY_S
                    or self.table.index.holders.get(model)):
                continue
            p = Preload(self.next_rid(), model, now, self.deadline(now, None))
            self._preload_at[model] = now
            d = self.route(p, now)
            if d.action != WAIT:  # never queued: it must not hold up client requests
                self.send(p, d, now)

    def preload_settled(self, model: str, worker: Optional[str], error: Any, now: float) -> None:
        """(Outlet) A preload finished: forget it on success; otherwise try again later."""
        if error is None:
            self._preload_at.pop(model, None)
            log.info("preloaded model %s on worker %s", model, worker)
        else:
            self._preload_at[model] = now
            log.warning("preloading model %s on worker %s failed: %s", model, worker, error)
