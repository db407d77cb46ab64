"""Where a request goes: pure decisions over the worker table (no sockets, no clocks).

For a request of model m (ARCHITECTURE.md, "Routing and placement"):

1. a worker with m loaded and a free credit (fewest in flight): dispatch there;
2. else, if some worker has m loaded or is loading it: wait for it, unless the head of m's queue
   has waited longer than ``copy_after_s`` while every holder is busy with m loaded, in which
   case m gets another copy (up to ``max_copies``);
3. else place m: a worker with a free credit and a free model slot (fewest models first), else
   the worker whose least valuable evictable model is the coldest; that model is the eviction
   hint sent with the request. Evictable = loaded, nothing in flight for it on that worker and
   nothing queued for it in the broker.
4. nothing fits: wait (a credit frees, a load finishes, or the deadline answers).

The worker-like objects need: ``name``, ``free``, ``in_flight``, ``max_models``,
``slots_used``, ``has_loaded(m)``, ``is_loading(m)``, ``holds(m)``, ``evictable(busy)``.
"""
from __future__ import annotations

import math
from typing import Callable, Collection, Iterable, NamedTuple, Optional, Sequence

DISPATCH = "dispatch"  # m is loaded on the worker
PLACE = "place"        # the worker will load m (evicting ``evict`` first when given)
WAIT = "wait"


class Decision(NamedTuple):
    action: str
    worker: object = None
    evict: Optional[str] = None
    reason: str = ""


def copy_threshold_s(service_s: Optional[float], floor_s: float = 0.05) -> float:
    """How long the head of a queue may wait for a busy copy before another copy is placed."""
    return max(floor_s, 2.0 * (service_s or 0.0))


def pick_loaded(model: str, workers: Iterable) -> Optional[object]:
    """A worker with ``model`` loaded and a free credit; fewest in flight, then name."""
    best = None
    for w in workers:
        if w.free > 0 and w.has_loaded(model):
            if best is None or (w.in_flight, w.name) < (best.in_flight, best.name):
                best = w
    return best


def pick_free_slot(model: str, workers: Iterable) -> Optional[object]:
    """A worker with a free credit and room for one more model; fewest models, then idlest."""
    best, best_key = None, None
    for w in workers:
        if w.free > 0 and not w.holds(model) and w.slots_used < w.max_models:
            key = (w.slots_used, w.in_flight, w.name)
            if best_key is None or key < best_key:
                best, best_key = w, key
    return best


def pick_victim(model: str, workers: Iterable, busy_models: Collection[str],
                value: Callable[[str], float]) -> Optional[tuple[object, str]]:
    """The (worker, model to evict) whose victim is the least valuable of all.

    Only workers with a free credit are considered; a worker's victim is its least valuable
    evictable model. Ties go to the worker with fewer in flight, then by name.
    """
    best, best_key = None, None
    for w in workers:
        if w.free <= 0 or w.holds(model):
            continue
        candidates = w.evictable(busy_models)
        if not candidates:
            continue
        victim = min(candidates, key=lambda m: (value(m), m))
        key = (value(victim), w.in_flight, w.name)
        if best_key is None or key < best_key:
            best, best_key = (w, victim), key
    return best


def place(model: str, workers: Sequence, busy_models: Collection[str],
          value: Callable[[str], float], allow_evict: bool = True) -> Decision:
    w = pick_free_slot(model, workers)
    if w is not None:
        return Decision(PLACE, w, None, "free slot")
    if allow_evict:
        found = pick_victim(model, workers, busy_models, value)
        if found is not None:
            return Decision(PLACE, found[0], found[1], "evict coldest")
    return Decision(WAIT, None, None, "no worker with a free credit and a free or evictable slot")


def route(model: str, workers: Sequence, *, busy_models: Collection[str] = (),
          value: Callable[[str], float] = lambda m: 0.0, head_wait_s: float = 0.0,
          copy_after_s: float = math.inf, max_copies: int = 1,
          allow_evict: bool = True) -> Decision:
    """Decide what to do with the head request of ``model``'s queue (see the module doc)."""
    w = pick_loaded(model, workers)
    if w is not None:
        return Decision(DISPATCH, w, None, "loaded")
    # A draining worker takes nothing new: its copy does not count (the model is placed again).
    holders = [w for w in workers if w.holds(model) and not getattr(w, "draining", False)]
    if holders:
        if any(w.is_loading(model) for w in holders):
            return Decision(WAIT, None, None, "loading")
        if len(holders) >= max_copies or head_wait_s < copy_after_s:
            return Decision(WAIT, None, None, "busy")
        # Every copy is busy and the queue has waited too long: add a copy elsewhere.
        others = [w for w in workers if not w.holds(model)]  # (pick_* skip those without credit)
        d = place(model, others, busy_models, value, allow_evict)
        return d._replace(reason="another copy: " + d.reason) if d.action == PLACE else d
    return place(model, workers, busy_models, value, allow_evict)


class Heat:
    """How valuable each model is to keep loaded, cluster-wide.

    ``lru``: the last time any worker was sent a request for it (older = colder).
    ``lfu``: an exponentially decayed request count with half-life ``half_life_s``, kept for
    every model the broker has seen requested, loaded or not (it sees every request).
    """

    def __init__(self, policy: str = "lru", half_life_s: float = 300.0) -> None:
        if policy not in ("lru", "lfu"):
            raise ValueError(f"eviction policy {policy!r} is not one of lru, lfu")
        self.policy = policy
        self.half_life_s = half_life_s
        self._last: dict[str, float] = {}
        self._score: dict[str, float] = {}    # decayed count as of self._last[model]

    def touch(self, model: str, now: float) -> None:
        if self.policy == "lfu":
            self._score[model] = self._decayed(model, now) + 1.0
        self._last[model] = now

    def _decayed(self, model: str, now: float) -> float:
        score = self._score.get(model, 0.0)
        if score:
            score *= 0.5 ** (max(0.0, now - self._last[model]) / self.half_life_s)
        return score

    def last_used(self, model: str) -> Optional[float]:
        return self._last.get(model)

    def value(self, model: str, now: float) -> float:
        if self.policy == "lru":
            return self._last.get(model, -math.inf)
        return self._decayed(model, now)

    def valuer(self, now: float) -> Callable[[str], float]:
        return lambda m: self.value(m, now)
