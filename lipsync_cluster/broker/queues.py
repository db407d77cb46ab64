"""Requests waiting in the broker: one bounded FIFO per model.

The queues live in the broker (not in the workers) so that the broker can choose where each
request goes when a credit frees up. Bounds are checked on arrival so that a flood is answered
with ``overloaded`` at once instead of growing memory and latency without limit.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Iterator, Optional

from ..common.errors import Overloaded
from .requests import Pending  # what waits here (tests and benches build them from this module)


class Busy:
    """``model in busy``: the model has requests waiting (a live view, nothing copied)."""

    __slots__ = ("_queues",)

    def __init__(self, queues: dict[str, deque]) -> None:
        self._queues = queues

    def __contains__(self, model: object) -> bool:
        return bool(self._queues.get(model))  # type: ignore[call-overload]


class ModelQueues:
    """Per-model FIFO queues with a per-model and a total bound."""

    def __init__(self, per_model_limit: int, total_limit: int) -> None:
        self.per_model_limit = per_model_limit
        self.total_limit = total_limit
        self._queues: dict[str, deque[Pending]] = {}
        self.total = 0
        self._busy = Busy(self._queues)

    def __len__(self) -> int:
        return self.total

    def depth(self, model: str) -> int:
        q = self._queues.get(model)
        return len(q) if q else 0

    def depths(self) -> dict[str, int]:
        return {m: len(q) for m, q in self._queues.items() if q}

    def busy_models(self) -> Busy:
        """Models with at least one request waiting (never evict these), as a live view."""
        return self._busy

    def push(self, p: Pending, retry_after_ms: int = 100) -> None:
        """Append at the back; raise :class:`Overloaded` when a bound is reached."""
        q = self._queues.get(p.model)
        if q is None:
            q = self._queues[p.model] = deque()
        if len(q) >= self.per_model_limit:
            raise Overloaded(
                f"queue for model {p.model!r} is full ({self.per_model_limit} waiting)",
                retry_after_ms=retry_after_ms, queue="model")
        if self.total >= self.total_limit:
            raise Overloaded(f"broker queues are full ({self.total_limit} waiting in all)",
                             retry_after_ms=retry_after_ms, queue="total")
        q.append(p)
        self.total += 1

    def push_front(self, p: Pending) -> None:
        """Put a retried request back at the head; bounds do not apply (it was admitted)."""
        q = self._queues.get(p.model)
        if q is None:
            q = self._queues[p.model] = deque()
        q.appendleft(p)
        self.total += 1

    def head(self, model: str) -> Optional[Pending]:
        q = self._queues.get(model)
        return q[0] if q else None

    def pop(self, model: str) -> Pending:
        p = self._queues[model].popleft()
        self.total -= 1
        return p

    def by_head_age(self) -> list[str]:
        """Models with waiting requests, the one whose head arrived first first (fairness)."""
        heads = [(q[0].arrival, m) for m, q in self._queues.items() if q]
        heads.sort()
        return [m for _, m in heads]

    def expire(self, now: float) -> list[Pending]:
        """Remove and return every queued request whose deadline has passed."""
        out: list[Pending] = []
        for model, q in self._queues.items():
            if not any(p.deadline is not None and p.deadline <= now for p in q):
                continue
            keep = deque()
            for p in q:
                (out if p.deadline is not None and p.deadline <= now else keep).append(p)
            self._queues[model] = keep
        self.total -= len(out)
        return out

    def prune_late(self, finish: Callable[[Pending, int], float], slack: float = 0.0) -> list[tuple[Pending, float]]:
        """Remove and return the queued requests that would finish after their ``due`` time (plus
        ``slack`` x the time from their arrival to it), each with that expected finish:
        ``finish(p, ahead)``, ``ahead`` being how many wait before it in its model's queue
        (admission.py; requests without a due time are not asked)."""
        out: list[tuple[Pending, float]] = []
        inf = float("inf")
        for model, q in self._queues.items():
            late = None
            for i, p in enumerate(q):
                if p.due != inf:
                    t = finish(p, i)
                    if t > p.due + slack * (p.due - p.arrival):
                        (late := late or []).append((p, t))
            if late:
                out.extend(late)
                gone = {id(p) for p, _ in late}
                self._queues[model] = deque(p for p in q if id(p) not in gone)
        self.total -= len(out)
        return out

    def drain(self) -> list[Pending]:
        out = [p for q in self._queues.values() for p in q]
        self._queues.clear()
        self.total = 0
        return out

    def __iter__(self) -> Iterator[Pending]:
        for q in self._queues.values():
            yield from q
