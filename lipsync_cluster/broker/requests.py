"""The requests the broker tracks, one small type per kind, each answered in one place.

Three kinds of request legs travel from the broker to a worker:

* :class:`ClientRequest` - a client's ``infer`` or ``load_model``: answered to the client once,
  counted in the stats;
* :class:`Preload` - the broker's own ``load_model`` for a ``preload`` model: nobody to answer; a
  failure only schedules another try;
* :class:`UnloadLeg` - one worker's share of a client's ``unload_model`` (:class:`Gather`): its
  outcome fans in, and the client is answered when the last leg is in.

Every exit (a worker's reply, a timeout, a lost worker, a full queue, shutdown) calls
:meth:`Pending.finish` with the worker's reply header or a :class:`LipsyncError`; ``finish`` is
the only place that marks a request answered, so a second outcome (a late reply after a timeout)
is recognised there and nowhere else.
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Protocol, Union

from ..common.errors import LipsyncError, RequestTimeout, Unavailable
from .stats import BrokerStats

log = logging.getLogger("lipsync_cluster.broker")

Outcome = Union[dict, LipsyncError]  # a worker's reply header, or the broker's own error


class Outlet(Protocol):
    """What a request needs from the broker to be answered."""

    stats: BrokerStats

    def to_client(self, client: bytes, header: dict, payloads: Any = ()) -> None:
        """Send a reply to a frontend identity (a client that went away is counted, not raised)."""

    def preload_settled(self, model: str, worker: Optional[str], error: Any, now: float) -> None:
        """A preload finished: ``error`` None on success, else what went wrong."""


def error_code(header: dict) -> Optional[str]:
    """None for a successful reply header, else its error code (``internal`` when unreadable)."""
    if header.get("ok") is True:
        return None
    error = header.get("error")
    return (error.get("code") if isinstance(error, dict) else None) or "internal"


class Pending:
    """A request leg from arrival until it is answered (the base of the three kinds).

    ``client`` is the frontend identity (None for the broker's own legs); ``cid`` the client's
    ``id``; ``rid`` the broker's id for the worker leg. ``payloads`` are the received zmq Frames,
    forwarded as they are (no copy). ``deadline`` is on the monotonic clock.
    """

    __slots__ = (
        "rid", "client", "cid", "op", "model", "header", "payloads", "arrival", "deadline",
        "retries", "worker", "dispatched_at", "evict_hint", "targets", "answered", "no_evict",
        "frames", "expect_s", "due",
    )

    # A kind the broker times out while a worker holds it (an unload leg instead waits for the
    # worker: the unload happens whether or not someone still listens).
    expires_in_flight = True

    def __init__(self, rid: int, client: Optional[bytes], cid: Any, op: str, model: Optional[str],
                 header: dict, payloads: list, arrival: float, deadline: Optional[float]) -> None:
        self.rid = rid
        self.client = client
        self.cid = cid
        self.op = op
        self.model = model
        self.header = header
        self.payloads = payloads
        self.arrival = arrival
        self.deadline = deadline
        self.retries = 0
        self.worker: Optional[str] = None        # name of the worker it was sent to
        self.dispatched_at = 0.0
        self.evict_hint: Optional[str] = None
        self.targets: Optional[frozenset[str]] = None  # worker names it may go to (None: any)
        self.answered = False                    # finish() ran: any later outcome is late
        self.no_evict = False                    # place only into a free slot (preloads)
        self.frames = 0                          # frames produced (batch_size for infer)
        self.expect_s = -1.0                     # predicted queue wait at admission (-1: none)
        self.due = float("inf")                  # when it should be answered: its deadline's target

    def __repr__(self) -> str:  # for logs and test failures
        return f"{type(self).__name__}(rid={self.rid}, op={self.op}, model={self.model}, cid={self.cid!r})"

    def finish(self, out: Outlet, outcome: Outcome, payloads: Any = (), now: float = 0.0) -> bool:
        """Answer this request with ``outcome``; False (and nothing done) if it was answered."""
        if self.answered:
            return False
        self.answered = True
        self._answer(out, outcome, payloads, now)
        return True

    def _answer(self, out: Outlet, outcome: Outcome, payloads: Any, now: float) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be answered")

    def expire(self, out: Outlet, now: float) -> None:
        """Its deadline passed (in the queue, or on a worker)."""
        waited = (now - self.arrival) * 1000.0
        where = f"on worker {self.worker}" if self.worker else "in the broker queue"
        self.finish(out, RequestTimeout(f"deadline passed after {waited:.0f} ms {where}",
                                        waited_ms=round(waited, 1)), now=now)

    def lost(self, out: Outlet, worker: str, now: float) -> bool:
        """The worker it was sent to went away: finish it, or return True to queue it again."""
        self.finish(out, Unavailable(f"a worker ({worker}) went away while handling the request",
                                     worker=worker), now=now)
        return False

    def unsent(self, out: Outlet, worker: str, now: float) -> bool:
        """Sending to ``worker`` failed (it was dropped): True to queue it again, else finished."""
        return self.lost(out, worker, now)


class ClientRequest(Pending):
    """A client's ``infer`` or ``load_model``: answered once, counted, replied to."""

    __slots__ = ()

    def _answer(self, out: Outlet, outcome: Outcome, payloads: Any, now: float) -> None:
        stats = out.stats
        counted = self.model if self.op == "infer" else None  # others count in the totals only
        if isinstance(outcome, LipsyncError):
            stats.outcome(counted, outcome.code, now - self.arrival)
            out.to_client(self.client, {"id": self.cid, "ok": False, "error": outcome.to_wire()})
            return
        header = outcome
        code = error_code(header)
        if code is None and counted is not None:  # the common case (see BrokerStats.outcome)
            stats.model(counted).success(now - self.arrival, self.dispatched_at - self.arrival, header,
                                         now - self.dispatched_at, self.frames, now)
            stats.total_ok += 1
            if self.retries:  # re-dispatched after its first worker died (chaos reports count these)
                header["retried"] = self.retries
        else:
            if code is None and self.op == "load_model":
                header.setdefault("model_id", self.model)
                header["workers"] = [self.worker]
            stats.outcome(counted, code, now - self.arrival, self.frames if code is None else 0, now)
        header.pop("op", None)
        header["id"] = self.cid
        out.to_client(self.client, header, payloads)

    def lost(self, out: Outlet, worker: str, now: float) -> bool:
        """Retried once (inference is a pure function), unless it was meant for that worker."""
        if self.answered:
            return False
        if self.targets is not None or self.retries >= 1:
            why = "its target worker" if self.targets is not None else "a second worker"
            self.finish(out, Unavailable(f"{why} ({worker}) went away while handling the request",
                                         worker=worker), now=now)
            return False
        self.retries += 1
        self.worker, self.evict_hint = None, None
        out.stats.retry(self.model)
        return True

    def unsent(self, out: Outlet, worker: str, now: float) -> bool:
        return True  # it never reached the worker: not a retry


class Preload(Pending):
    """The broker's own ``load_model`` of a ``preload`` model, into a free slot only."""

    __slots__ = ()

    def __init__(self, rid: int, model: str, arrival: float, deadline: float) -> None:
        super().__init__(rid, None, None, "load_model", model,
                         {"id": None, "op": "load_model", "model_id": model}, [], arrival, deadline)
        self.no_evict = True

    def _answer(self, out: Outlet, outcome: Outcome, payloads: Any, now: float) -> None:
        if isinstance(outcome, LipsyncError):
            error: Any = outcome.to_wire()
        else:
            error = None if outcome.get("ok") is True else outcome.get("error")
        out.preload_settled(self.model, self.worker, error, now)


class Gather:
    """An ``unload_model`` fanned out to every worker holding the model; answered once."""

    __slots__ = ("client", "cid", "model", "remaining", "workers", "errors")

    def __init__(self, client: bytes, cid: Any, model: str, count: int) -> None:
        self.client, self.cid, self.model = client, cid, model
        self.remaining = count
        self.workers: list[str] = []
        self.errors: list[dict] = []

    def leg_done(self, out: Outlet, worker: str, header: dict) -> None:
        if header.get("ok") is True:
            self.workers.append(worker)
        else:
            self.errors.append({"worker": worker, "error": header.get("error")})
        self.remaining -= 1
        if self.remaining > 0:
            return
        if not self.errors:
            out.to_client(self.client, {"id": self.cid, "ok": True, "model_id": self.model,
                                        "workers": sorted(self.workers)})
            return
        first = self.errors[0].get("error") or {}
        message = f"unload_model failed on {len(self.errors)} worker(s): " + "; ".join(
            f"{e['worker']}: {(e.get('error') or {}).get('message', 'error')}" for e in self.errors)
        err = {"code": first.get("code", "internal") if isinstance(first, dict) else "internal",
               "message": message, "details": {"workers": sorted(self.workers), "errors": self.errors}}
        out.stats.outcome(self.model, err["code"], 0.0)
        out.to_client(self.client, {"id": self.cid, "ok": False, "model_id": self.model, "error": err})


class UnloadLeg(Pending):
    """One worker's share of an ``unload_model``: its outcome goes to the :class:`Gather`."""

    __slots__ = ("gather", "target")

    expires_in_flight = False

    def __init__(self, rid: int, gather: Gather, target: str, header: dict, payloads: list,
                 arrival: float, deadline: float) -> None:
        super().__init__(rid, None, None, "unload_model", gather.model, header, payloads, arrival, deadline)
        self.gather = gather
        self.target = target
        self.targets = frozenset((target,))

    def _answer(self, out: Outlet, outcome: Outcome, payloads: Any, now: float) -> None:
        header = outcome if isinstance(outcome, dict) else {"ok": False, "error": outcome.to_wire()}
        self.gather.leg_done(out, self.target, header)

    def expire(self, out: Outlet, now: float) -> None:
        self.finish(out, RequestTimeout("the worker did not answer before the deadline"), now=now)

    def lost(self, out: Outlet, worker: str, now: float) -> bool:
        self.finish(out, {"ok": True, "note": "worker left"}, now=now)  # the model went with it
        return False
