"""Indexes over the worker table, so that a routing decision never scans every worker.

A decision needs four questions answered (``routing.route``):

* which workers have model m loaded and a free credit, fewest in flight first (a hit);
* how many workers hold m (loaded or loading), how many are loading it, their credits;
* which workers have a free credit and a free model slot, fewest models then fewest in flight;
* which loaded model is the least valuable one that can be evicted on a worker with a free
  credit (a redundant copy before any only copy).

:class:`PlacementIndex` keeps each answer up to date as workers change: a :class:`Worker` calls
``index.update(self)`` after every change (``Worker.changed``); the update removes that worker's
old entries and adds its new ones, which costs the few models one worker holds, not the fleet.
The first three answers are buckets keyed by small integers (in flight, models held), so a hit
costs the same at 2,048 workers as at 8. The last is a heap of loaded models ordered by
(only copy?, value), where value is ``order_key`` -- a key that changes only when the model is
requested and then only grows (``common/heat.py``, ``Heat.order_key``); entries whose key grew are re-pushed when
they surface (lazy update), so the heap is never rebuilt per request.
"""
from __future__ import annotations

import heapq
from typing import Any, Callable, Collection, Iterable, Optional

Key = Callable[[str], float]


class _Entry:
    """What one worker is indexed under (so that its entries can be removed on the next update)."""

    __slots__ = ("active", "held", "ready", "loading", "evictable", "in_flight", "room", "credits",
                 "free", "slots", "spare")

    def __init__(self) -> None:
        self.active = False          # not draining: counts as a holder
        self.held: frozenset = frozenset()      # loaded (not hinted away) or loading: ``holds``
        self.slots = 0                           # model slots taken (``slots_used``)
        self.spare = False                       # slots < max_models: room for one more model
        self.ready: frozenset = frozenset()      # loaded (not hinted away) on this worker
        self.loading: frozenset = frozenset()
        self.evictable: frozenset = frozenset()  # loaded, nothing in flight, not loading, not hinted
        self.in_flight = 0
        self.room: Optional[tuple[int, int]] = None  # (models held, in flight) when it can take one more
        self.credits = 0
        self.free = False


def _add(buckets: dict, key: Any, w: Any) -> None:
    b = buckets.get(key)
    if b is None:
        b = buckets[key] = {}
    b[w] = None


def _drop(buckets: dict, key: Any, w: Any) -> None:
    b = buckets.get(key)
    if b is not None:
        b.pop(w, None)
        if not b:
            del buckets[key]


class PlacementIndex:
    """Per-model and per-capacity indexes over a set of workers (see the module doc)."""

    def __init__(self, order_key: Optional[Key] = None) -> None:
        self.order_key: Key = order_key or (lambda m: 0.0)
        self._entries: dict[Any, _Entry] = {}
        self.holders: dict[str, dict] = {}         # model -> {worker: None}, not draining
        self.holder_credits: dict[str, int] = {}   # model -> credits of its holders
        self.loading: dict[str, int] = {}          # model -> holders loading it
        self.copies: dict[str, int] = {}           # model -> workers with it loaded (not draining)
        self.ready: dict[str, dict[int, dict]] = {}  # model -> in flight -> {worker} (loaded, free credit; none empty)
        self.room: dict[tuple[int, int], dict] = {}  # (models held, in flight) -> {worker} (credit + slot)
        self.free: dict = {}                       # workers with a free credit
        self.evictable: dict[str, dict] = {}       # model -> {worker} where it could be evicted
        self.credits = 0                           # credits of every worker that is not draining
        self.in_flight = 0                         # requests in flight on every worker
        self._heap: list[tuple[bool, float, str]] = []

    @classmethod
    def of(cls, workers: Iterable, order_key: Optional[Key] = None) -> "PlacementIndex":
        """An index over ``workers`` that they are not told about (a one-off decision, tests)."""
        index = cls(order_key)
        for w in workers:
            index.update(w)
        return index

    def __len__(self) -> int:
        return len(self._entries)

    def workers(self) -> Iterable:
        return self._entries.keys()

    # --- maintenance ----------------------------------------------------------------------

    def update(self, w: Any) -> None:
        """Re-index ``w`` from its current state."""
        old = self._entries.get(w)
        if old is None:
            old = self._entries[w] = _Entry()
        new = _Entry()
        new.active = not w.draining
        new.free = w.free > 0
        new.in_flight = w.in_flight
        if new.active:
            loading = w.loading
            by_model = w.inflight_by_model
            loaded = w.loaded
            hints = w.hints
            new.credits = w.credits
            new.ready = frozenset(m for m in loaded if m not in hints)
            in_flight = {m for m, n in by_model.items() if n > 0}
            new.loading = frozenset(loading.union(m for m in in_flight if m not in loaded))
            new.held = new.ready | new.loading
            new.slots = len(new.held.union(in_flight))
            new.evictable = frozenset(m for m in new.ready if m not in in_flight and m not in loading)
            new.spare = new.slots < w.max_models
            if new.free and new.spare:
                new.room = (new.slots, new.in_flight)
        self._apply(w, old, new)
        self._entries[w] = new

    def moved(self, w: Any, busy: Optional[str] = None) -> None:
        """Re-index ``w`` when only its number of requests in flight changed, and with ``busy``
        whether that loaded model has requests in flight (so can be evicted) -- what it holds,
        its hints, credits and slots did not: the per-request path, a few dict operations.
        (Credits and slots are read from its entry: they change only through :meth:`update`.)"""
        e = self._entries.get(w)
        if e is None or not e.active:
            self.update(w)
            return
        if busy is not None:
            if busy in e.evictable:
                e.evictable = e.evictable - {busy}
                _drop(self.evictable, busy, w)
            elif busy in e.ready and not w.inflight_by_model.get(busy):
                e.evictable = e.evictable | {busy}
                _add(self.evictable, busy, w)
        in_flight = len(w.sent)
        old = e.in_flight
        if in_flight == old:
            return
        free = in_flight < e.credits  # active: not draining, so free credits = credits - in flight
        was_free = e.free
        self.in_flight += in_flight - old
        if free != was_free:
            if free:
                self.free[w] = None
            else:
                self.free.pop(w, None)
        if e.spare:  # (here too empty buckets stay: a request costs no allocation but the key)
            rooms = self.room
            if e.room is not None:
                b = rooms.get(e.room)
                if b is not None:
                    b.pop(w, None)
            if free:
                e.room = room = (e.slots, in_flight)
                b = rooms.get(room)
                if b is None:
                    b = rooms[room] = {}
                b[w] = None
            else:
                e.room = None
        ready = self.ready
        # Empty level buckets go (pick_loaded takes the min of the levels there are: with them
        # kept, every hit scanned a level per credit; a one-entry dict per request costs less).
        for m in e.ready:
            levels = ready.get(m)
            if was_free and levels is not None:
                b = levels.get(old)
                if b is not None:
                    b.pop(w, None)
                    if not b:
                        del levels[old]
            if free:
                if levels is None:
                    levels = ready[m] = {}
                b = levels.get(in_flight)
                if b is None:
                    b = levels[in_flight] = {}
                b[w] = None
            elif levels is not None and not levels:
                del ready[m]
        e.in_flight, e.free = in_flight, free

    def remove(self, w: Any) -> None:
        old = self._entries.pop(w, None)
        if old is not None:
            self._apply(w, old, _Entry())

    def _apply(self, w: Any, old: _Entry, new: _Entry) -> None:
        self.credits += new.credits - old.credits
        self.in_flight += new.in_flight - old.in_flight
        if old.free != new.free:
            if new.free:
                self.free[w] = None
            else:
                self.free.pop(w, None)
        if old.room != new.room:
            if old.room is not None:
                _drop(self.room, old.room, w)
            if new.room is not None:
                _add(self.room, new.room, w)
        for m in old.held - new.held:
            self._count(self.holder_credits, m, -old.credits)
            _drop(self.holders, m, w)
        for m in new.held - old.held:
            self._count(self.holder_credits, m, new.credits)
            _add(self.holders, m, w)
        if old.credits != new.credits:
            for m in old.held & new.held:
                self._count(self.holder_credits, m, new.credits - old.credits)
        for m in old.loading - new.loading:
            self._count(self.loading, m, -1)
        for m in new.loading - old.loading:
            self._count(self.loading, m, 1)
        for m in old.ready - new.ready:
            self._count(self.copies, m, -1)
        for m in new.ready - old.ready:
            if self._count(self.copies, m, 1) <= 2:  # now loaded somewhere, or now redundant
                heapq.heappush(self._heap, self._heap_key(m))
        # A loaded model with a free credit on this worker, bucketed by its in flight.
        was = old.ready if old.free else frozenset()
        now = new.ready if new.free else frozenset()
        if old.in_flight != new.in_flight:
            for m in was:
                self._ready_drop(m, old.in_flight, w)
            for m in now:
                self._ready_add(m, new.in_flight, w)
        else:
            for m in was - now:
                self._ready_drop(m, old.in_flight, w)
            for m in now - was:
                self._ready_add(m, new.in_flight, w)
        for m in old.evictable - new.evictable:
            _drop(self.evictable, m, w)
        for m in new.evictable - old.evictable:
            _add(self.evictable, m, w)
        if len(self._heap) > 4 * len(self.copies) + 64:
            self._heap = [self._heap_key(m) for m in self.copies]
            heapq.heapify(self._heap)

    @staticmethod
    def _count(counts: dict, key: str, delta: int) -> int:
        n = counts.get(key, 0) + delta
        if n:
            counts[key] = n
        else:
            counts.pop(key, None)
        return n

    def _ready_add(self, m: str, in_flight: int, w: Any) -> None:
        levels = self.ready.get(m)
        if levels is None:
            levels = self.ready[m] = {}
        _add(levels, in_flight, w)

    def _ready_drop(self, m: str, in_flight: int, w: Any) -> None:
        levels = self.ready.get(m)
        if levels is not None:
            b = levels.get(in_flight)
            if b is not None:
                b.pop(w, None)
                if not b:
                    del levels[in_flight]
            if not levels:
                del self.ready[m]

    def _heap_key(self, m: str) -> tuple[bool, float, str]:
        return (self.copies.get(m, 0) <= 1, self.order_key(m), m)

    # --- queries --------------------------------------------------------------------------

    def holds(self, w: Any, model: str) -> bool:
        e = self._entries.get(w)
        return e is not None and model in e.held

    def pick_loaded(self, model: str) -> Any:
        """A worker with ``model`` loaded and a free credit, fewest in flight; else None."""
        levels = self.ready.get(model)  # in flight -> {worker}: only non-empty levels are kept
        if not levels:
            return None
        return next(iter(levels[min(levels)]))

    def pick_free_slot(self, model: str, fits: Callable[[Any], bool]) -> Any:
        """A worker with a free credit and a free slot that does not hold ``model`` and where it
        ``fits``: fewest models held, then fewest in flight. Else None."""
        for key in sorted(self.room):
            for w in self.room[key]:
                if fits(w) and not self.holds(w, model):
                    return w
        return None

    def pick_victim(self, model: str, busy: Collection[str],
                    fits: Callable[[Any, Optional[str]], bool]) -> Optional[tuple[Any, str]]:
        """The (worker, model to evict) for placing ``model``: the least valuable loaded model
        that nothing waits for (``busy``), redundant copies first, on a worker with a free credit
        that does not hold ``model`` and where ``model`` fits once the victim is gone; among its
        workers the one with the fewest in flight. None when there is none."""
        if not self.free:
            return None
        heap, key_of = self._heap, self._heap_key
        popped: list[tuple[bool, float, str]] = []
        seen: set[str] = set()
        found = None
        try:
            while heap:
                entry = heapq.heappop(heap)
                m = entry[2]
                if m in seen or m not in self.copies:
                    continue  # a duplicate, or no longer loaded anywhere (pushed again on a load)
                current = key_of(m)
                if current != entry:
                    heapq.heappush(heap, current)  # its key grew since: it surfaces later
                    continue
                seen.add(m)
                popped.append(entry)
                if m == model or m in busy:
                    continue
                best = None
                for w in self.evictable.get(m, ()):
                    if w in self.free and (best is None or (w.in_flight, w.name) < (best.in_flight, best.name)) \
                            and not self.holds(w, model) and fits(w, m):
                        best = w
                if best is not None:
                    found = (best, m)
                    return found
            return None
        finally:
            for entry in popped:
                heapq.heappush(heap, entry)

    def fits_anywhere(self, size: int) -> bool:
        """Whether some worker (busy or not) reports ``size`` bytes free, or does not report its
        memory. A scan: only asked when no worker with a free credit had the room."""
        for w, e in self._entries.items():
            free = getattr(w, "mem_free", None)
            if e.active and (free is None or free >= size):
                return True
        return False

    def colder_on_busy_worker(self, model: str, busy: Collection[str], than: float) -> bool:
        """Whether a worker without a free credit (not draining) has a free slot, or holds a
        model colder than ``than`` that nothing waits for. A scan: only used with
        ``placement_patience`` (off by default)."""
        for w, e in self._entries.items():
            if e.free or not e.active or model in e.held:
                continue
            if e.slots < w.max_models:
                return True
            if any(m not in busy and self.order_key(m) < than for m in e.held):
                return True
        return False


def fits_by_memory(size: Optional[int], size_of: Callable[[str], Optional[int]]):
    """``fits(worker, victim=None)``: ``size`` bytes fit in the worker's reported free memory
    (plus the victim's size when one is evicted first). Unknown sizes or memory always fit."""
    def fits(w: Any, victim: Optional[str] = None) -> bool:
        free = getattr(w, "mem_free", None)
        if size is None or free is None:
            return True
        if victim is not None:
            free += size_of(victim) or 0
        return size <= free
    return fits

