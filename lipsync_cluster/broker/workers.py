"""The broker's table of registered workers.

One :class:`Worker` per connected worker process, keyed by its ROUTER identity. The broker's
view of what a worker holds combines what the worker last *reported* (``ready``, heartbeats,
events) with what the broker itself has *sent* and not yet seen answered (in-flight requests
and eviction hints). The combination matters because reports lag: a heartbeat written just
before the worker received a request still says the model is absent, and must not make the
broker place the same model a second time.

What a worker reports (``ready``, ``heartbeat``, ``event``, ``stats``) is parsed here, once, into
the typed reports below (:class:`Registration`, :class:`Heartbeat`, :class:`ModelEvent`,
:class:`StatsReport`); the broker and the dispatcher use those and never read a report's header.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from ..common import vocab
from .hardening import clean_event, clean_stats
from .placement import PlacementIndex
from .requests import Pending


# --- reports: a worker's messages, parsed once ---------------------------------------------------

def _count(header: dict, key: str, default: int) -> int:
    """A non-negative int field (a bool is not one), else ``default``."""
    v = header.get(key)
    return v if type(v) is int and v >= 0 else default


def _names(value: Any) -> Optional[frozenset[str]]:
    """A list of model ids as a set (entries that are not strings dropped); None: not a list."""
    if isinstance(value, (list, tuple)):
        return frozenset(m for m in value if isinstance(m, str))
    return None


@dataclass(frozen=True)
class Holdings:
    """What a worker says it holds, and its free memory: ``ready``, heartbeats, some events.
    None: not said (the broker keeps what it knew)."""

    loaded: Optional[frozenset[str]] = None
    loading: Optional[frozenset[str]] = None
    mem_free: Optional[int] = None     # bytes its budget can still take (placement fits by it)

    @classmethod
    def parse(cls, header: dict) -> "Holdings":
        mem_free = header.get(vocab.MEM_FREE)
        return cls(_names(header.get("loaded")), _names(header.get("loading")),
                   mem_free if type(mem_free) is int and mem_free >= 0 else None)


class ReportError(ValueError):
    """A report the broker cannot use (the message says why; it is logged and ignored)."""


@dataclass(frozen=True)
class Registration:
    """A worker's ``ready``: who it is, what it can take, what it holds."""

    name: str
    host: str = ""
    pid: int = 0
    gpu: Optional[int] = None
    credits: int = 1                   # 1..64
    max_models: int = 1
    max_memory_bytes: int = 0
    holdings: Holdings = field(default_factory=Holdings)
    batches: bool = False              # it takes `requests` batches (common/wire.py)

    @classmethod
    def parse(cls, header: dict) -> "Registration":
        name = header.get("worker")
        if not isinstance(name, str) or not name:
            raise ReportError("a worker sent `ready` without a 'worker' name")
        gpu = header.get("gpu")
        return cls(name, host=str(header.get("host", "")), pid=_count(header, "pid", 0),
                   gpu=gpu if type(gpu) is int else None,
                   credits=min(64, max(1, _count(header, "credits", 1))),
                   max_models=max(1, _count(header, "max_models", 1)),
                   max_memory_bytes=_count(header, "max_memory_bytes", 0), holdings=Holdings.parse(header),
                   batches=header.get("batches") is True)


@dataclass(frozen=True)
class Heartbeat:
    holdings: Holdings
    draining: bool = False

    @classmethod
    def parse(cls, header: dict) -> "Heartbeat":
        return cls(Holdings.parse(header), header.get("draining") is True)


@dataclass(frozen=True)
class ModelEvent:
    """A worker's ``event`` about one model (:data:`vocab.MODEL_EVENTS`): ``body`` is what the broker
    keeps and publishes (``hardening.clean_event``: typed, bounded); ``holdings`` the lists some
    events carry."""

    event: str
    model: str
    body: dict
    holdings: Optional[Holdings] = None

    @classmethod
    def parse(cls, header: dict) -> "ModelEvent":
        body = clean_event(header)
        if body is None:
            raise ReportError(f"an event that is not one ({str(header.get('event'))[:64]!r} for "
                              f"{str(header.get('model_id'))[:80]!r})")
        holdings = Holdings(_names(body["loaded"]), _names(body.get("loading"))) if "loaded" in body else None
        return cls(body["event"], body["model_id"], body, holdings)


@dataclass(frozen=True)
class StatsReport:
    """A worker's ``stats``: ``body`` as kept for management answers (``hardening.clean_stats``),
    its ``max_models`` when valid, and each model's memory as the worker measured it."""

    body: dict
    max_models: Optional[int] = None
    sizes: dict = field(default_factory=dict)  # model -> bytes

    @classmethod
    def parse(cls, header: dict) -> "StatsReport":
        header = {k: v for k, v in header.items() if k != "op"}
        body = clean_stats(header)
        mm = body.get("max_models")
        sizes = {}
        for m in body.get("models") or ():
            size = m.get("memory_bytes")
            if type(size) is int and size > 0:
                sizes[m["model_id"]] = size
        return cls(body, mm if type(mm) is int and mm >= 1 else None, sizes)


class Worker:
    """One registered worker. Mutated only by the broker's single thread."""

    __slots__ = (
        "identity", "name", "host", "pid", "gpu", "credits", "_max_models", "max_memory_bytes",
        "loaded", "loading", "sent", "inflight_by_model", "hints", "last_seen", "registered_at",
        "_draining", "restarts", "stats", "served", "mem_free", "index", "batches",
    )

    def __init__(self, identity: bytes, name: str, *, host: str = "", pid: int = 0,
                 gpu: Optional[int] = None, credits: int = 1, max_models: int = 1,
                 max_memory_bytes: int = 0, loaded: Any = (), loading: Any = (),
                 batches: bool = False, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        self.identity = identity
        self.name = name
        self.host = host
        self.pid = pid
        self.gpu = gpu
        self.index: Any = None                    # the table's PlacementIndex, told of every change
        self.credits = max(1, int(credits))
        self._max_models = max(1, int(max_models))
        self.max_memory_bytes = int(max_memory_bytes or 0)
        self.loaded: set[str] = set(loaded)       # as last reported by the worker
        self.loading: set[str] = set(loading)     # as last reported by the worker
        self.sent: dict[int, Pending] = {}        # rid -> request sent and not yet answered
        self.inflight_by_model: dict[str, int] = {}
        self.hints: dict[str, int] = {}           # eviction hints sent and not yet answered
        self.last_seen = now
        self.registered_at = now
        self._draining = False
        self.restarts = 0                         # earlier registrations of this name by another pid
        self.stats: dict = {}                     # the worker's latest `stats` message
        self.served = 0
        self.mem_free: Optional[int] = None      # bytes the worker can still take (heartbeat); None: unknown
        self.batches = batches                    # it takes several legs in one message (Registration)

    def changed(self, shape: bool = True, busy: Optional[str] = None) -> None:
        """Re-index this worker (call after changing what it holds or its credits). ``shape``
        False: only how many requests it has in flight changed, and at most whether the loaded
        model ``busy`` has any (the index's fast path, once per request)."""
        if self.index is not None:
            if shape:
                self.index.update(self)
            else:
                self.index.moved(self, busy)

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        if value != self._draining:
            self._draining = value
            self.changed()

    @property
    def max_models(self) -> int:
        return self._max_models

    @max_models.setter
    def max_models(self, value: int) -> None:
        if value != self._max_models:
            self._max_models = value
            self.changed()

    # --- capacity ------------------------------------------------------------------------

    @property
    def free(self) -> int:
        """Requests the broker may still send (credits minus in flight; none while draining)."""
        return 0 if self.draining else self.credits - len(self.sent)

    @property
    def in_flight(self) -> int:
        """How many requests were sent to it and not yet answered."""
        return len(self.sent)

    # --- what the worker holds (reported state corrected by what is in transit) -------------

    def has_loaded(self, model: str) -> bool:
        # A model we told the worker to evict counts as gone until that request is answered.
        return model in self.loaded and model not in self.hints

    def is_loading(self, model: str) -> bool:
        if model in self.loading:
            return True
        # A request for a model the worker does not hold makes the worker load it.
        return model not in self.loaded and self.inflight_by_model.get(model, 0) > 0

    def holds(self, model: str) -> bool:
        return self.has_loaded(model) or self.is_loading(model)

    def held_models(self) -> set[str]:
        held = (self.loaded - self.hints.keys()) | self.loading
        held.update(m for m, n in self.inflight_by_model.items() if n > 0)
        return held

    @property
    def slots_used(self) -> int:
        return len(self.held_models())

    def evictable(self, busy_models: Any) -> list[str]:
        """Loaded models with nothing in flight here and nothing queued for them anywhere."""
        return [m for m in self.loaded
                if m not in self.hints and not self.inflight_by_model.get(m)
                and m not in self.loading and m not in busy_models]

    # --- in-flight bookkeeping -----------------------------------------------------------

    def start(self, p: Pending, now: float) -> None:
        self.sent[p.rid] = p
        m = p.model
        first = False  # a model's first request in flight here changes what is held or evictable
        if m is not None:
            by_model = self.inflight_by_model
            n = by_model.get(m, 0)
            by_model[m] = n + 1
            first = n == 0
        hint = p.evict_hint
        if hint is not None:
            self.hints[hint] = self.hints.get(hint, 0) + 1
        index = self.index
        if index is None:
            return
        if hint is None and not first:
            index.moved(self)  # the per-request path: only its in-flight count changed
        elif hint is None and self._plainly_loaded(m):
            index.moved(self, m)
        else:
            index.update(self)

    def finish(self, rid: Any) -> Optional[Pending]:
        p = self.sent.pop(rid, None) if type(rid) is int else None
        if p is None:
            return None
        m = p.model
        last = False
        if m is not None:
            by_model = self.inflight_by_model
            n = by_model.get(m, 0) - 1
            if n > 0:
                by_model[m] = n
            else:
                by_model.pop(m, None)
                last = True
        hint = p.evict_hint
        if hint is not None:
            n = self.hints.get(hint, 0) - 1
            if n > 0:
                self.hints[hint] = n
            else:
                self.hints.pop(hint, None)
        self.served += 1
        index = self.index
        if index is not None:
            if hint is None and not last:
                index.moved(self)
            elif hint is None and self._plainly_loaded(m):
                index.moved(self, m)
            else:
                index.update(self)
        return p

    def _plainly_loaded(self, model: Optional[str]) -> bool:
        """Loaded, not being loaded again, no eviction hint out for it: a request starting or
        ending for it changes only whether it can be evicted here."""
        return model in self.loaded and model not in self.loading and model not in self.hints

    def take_all_sent(self) -> list[Pending]:
        pending = list(self.sent.values())
        self.sent.clear()
        self.inflight_by_model.clear()
        self.hints.clear()
        self.changed()
        return pending

    # --- reports -------------------------------------------------------------------------

    @classmethod
    def register(cls, identity: bytes, r: Registration) -> "Worker":
        """A worker from its ``ready``."""
        w = cls(identity, r.name, host=r.host, pid=r.pid, gpu=r.gpu, credits=r.credits,
                max_models=r.max_models, max_memory_bytes=r.max_memory_bytes, batches=r.batches)
        w.apply_holdings(r.holdings)
        return w

    def apply_holdings(self, h: Holdings) -> None:
        """What it says it holds, taken as the truth where said; its free memory."""
        if h.loaded is not None:
            self.loaded = set(h.loaded)
        if h.loading is not None:
            self.loading = set(h.loading)
        if h.mem_free is not None:
            self.mem_free = h.mem_free
        self.changed()

    def apply_heartbeat(self, hb: Heartbeat) -> None:
        self.apply_holdings(hb.holdings)
        self.draining = hb.draining

    def apply_model_event(self, e: ModelEvent) -> None:
        self.apply_event(e.event, e.model)
        if e.holdings is not None:
            self.apply_holdings(e.holdings)

    def apply_stats(self, s: StatsReport) -> None:
        self.stats = s.body
        if s.max_models is not None:
            self.max_models = s.max_models

    def apply_report(self, loaded: Any, loading: Any = None) -> None:
        """Take a full `loaded` (and optionally `loading`) list from the worker as the truth."""
        if isinstance(loaded, (list, tuple)):
            self.loaded = {m for m in loaded if isinstance(m, str)}
        if isinstance(loading, (list, tuple)):
            self.loading = {m for m in loading if isinstance(m, str)}
        self.changed()

    def apply_event(self, event: str, model: str) -> None:
        if event == vocab.LOADING:
            self.loading.add(model)
        elif event == vocab.LOADED:
            self.loading.discard(model)
            self.loaded.add(model)
        elif event in vocab.GONE_EVENTS:
            self.loading.discard(model)
            self.loaded.discard(model)
        self.changed()

    def summary(self, now: float) -> dict:
        return {
            "worker": self.name, "host": self.host, "pid": self.pid, "gpu": self.gpu,
            "credits": self.credits, "in_flight": len(self.sent),
            "loaded": sorted(self.loaded), "loading": sorted(self.loading),
            "max_models": self.max_models, "max_memory_bytes": self.max_memory_bytes,
            "draining": self.draining, "restarts": self.restarts, "served": self.served,
            "last_seen_s": round(now - self.last_seen, 3),
            "uptime_s": round(now - self.registered_at, 3),
        }


class WorkerTable:
    """Registered workers by ROUTER identity, a name index (names are unique), and the placement
    index (``index``) that each registered worker keeps up to date as it changes."""

    def __init__(self, order_key: Any = None) -> None:
        self._by_id: dict[bytes, Worker] = {}
        self._by_name: dict[str, Worker] = {}
        self.index = PlacementIndex(order_key)

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Worker]:
        return iter(list(self._by_id.values()))

    def values(self):
        """A live view (do not add or remove while iterating it)."""
        return self._by_id.values()

    def get(self, identity: bytes) -> Optional[Worker]:
        return self._by_id.get(identity)

    def by_name(self, name: str) -> Optional[Worker]:
        return self._by_name.get(name)

    def add(self, worker: Worker) -> list[Worker]:
        """Register ``worker``; returns the stale entries it replaces (same identity or name).

        A worker that reconnects gets a new socket (a new identity) but keeps its name, so an
        old entry with the same name is a dead connection of the same process.
        """
        stale = []
        for old in (self._by_id.get(worker.identity), self._by_name.get(worker.name)):
            if old is not None and old not in stale:
                stale.append(old)
                self.remove(old.identity)
        self._by_id[worker.identity] = worker
        self._by_name[worker.name] = worker
        worker.index = self.index
        self.index.update(worker)
        return stale

    def remove(self, identity: bytes) -> Optional[Worker]:
        worker = self._by_id.pop(identity, None)
        if worker is not None:
            if self._by_name.get(worker.name) is worker:
                del self._by_name[worker.name]
            self.index.remove(worker)
            worker.index = None
        return worker

    def expired(self, now: float, timeout_s: float) -> list[Worker]:
        return [w for w in self._by_id.values() if now - w.last_seen > timeout_s]

    def holders(self, model: str) -> list[Worker]:
        """Workers holding ``model`` (loaded or loading), draining ones left out."""
        return list(self.index.holders.get(model, ()))

    def any_free(self) -> bool:
        return bool(self.index.free)
