"""Where a request goes: pure decisions over the worker table (no sockets, no clocks).

For a request of model m (ARCHITECTURE.md, "Routing and placement"):

1. a worker with m loaded and a free credit (fewest in flight): dispatch there;
2. else, if some worker has m loaded or is loading it: wait for it, unless the head of m's queue
   has waited longer than ``copy_after_s`` while every holder is busy with m loaded, in which
   case m gets another copy (up to ``max_copies``);
3. else place m: a worker with a free credit and a free model slot (fewest models first), else
   the worker whose least valuable evictable model is the coldest; that model is the eviction
   hint sent with the request. Evictable = loaded, nothing in flight for it on that worker and
   nothing queued for it in the broker. A redundant copy (a model loaded on another worker too)
   goes before any model's only copy: evicting it costs no load.
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


def copy_threshold_s(service_s: Optional[float], floor_s: float = 0.05,
                     load_s: Optional[float] = None) -> float:
    """How long the head of a queue may wait for a busy copy before another copy is placed.

    At least two services, and at least one model load (``load_s``, when known): a copy costs a
    load, so the queue first waits as long as that load would take (the ski-rental rule: at most
    twice the cost of the better choice made in hindsight).
    """
    return max(floor_s, 2.0 * (service_s or 0.0), load_s or 0.0)


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
    evictable model, where a redundant copy (the model is also loaded on another worker) comes
    before every only copy. Ties go to the worker with fewer in flight, then by name.
    """
    workers = list(workers)
    copies: dict[str, int] = {}
    for w in workers:
        for m in w.loaded:
            if w.has_loaded(m):
                copies[m] = copies.get(m, 0) + 1

    def cost(m: str) -> tuple:
        return (copies.get(m, 0) <= 1, value(m), m)

    best, best_key = None, None
    for w in workers:
        if w.free <= 0 or w.holds(model):
            continue
        candidates = w.evictable(busy_models)
        if not candidates:
            continue
        victim = min(candidates, key=cost)
        key = (cost(victim)[:2], w.in_flight, w.name)
        if best_key is None or key < best_key:
            best, best_key = (w, victim), key
    return best


def colder_on_busy_worker(model: str, workers: Iterable, busy_models: Collection[str],
                          value: Callable[[str], float], than: float) -> bool:
    """Whether a worker without a free credit (not draining) has a free slot, or holds a model
    colder than ``than`` that nothing waits for in the broker: once that worker's request is done
    the model is evictable (often it is the one being loaded right now, for a single request)."""
    for w in workers:
        if w.free > 0 or getattr(w, "draining", False) or w.holds(model):
            continue
        if w.slots_used < w.max_models:
            return True
        for m in w.held_models():
            if m not in busy_models and value(m) < than:
                return True
    return False


def place(model: str, workers: Sequence, busy_models: Collection[str],
          value: Callable[[str], float], allow_evict: bool = True, *,
          head_wait_s: float = 0.0, patience_s: float = 0.0) -> Decision:
    """A free slot, else evict the coldest evictable model among the workers with a credit.

    With ``patience_s`` > 0 (``cluster.placement_patience`` x the model's load time; off by
    default), a request that has waited less than that does not evict a model's only copy while
    a busy worker holds a colder one (or has a free slot): it waits for that worker instead.
    Under load the idle worker is rarely the one holding the cluster's coldest model -- that is
    usually a model being loaded for a single request right now -- so this trades some latency
    and throughput for fewer loads (docs/BENCHMARKS.md, Routing).
    """
    w = pick_free_slot(model, workers)
    if w is not None:
        return Decision(PLACE, w, None, "free slot")
    if allow_evict:
        found = pick_victim(model, workers, busy_models, value)
        if found is not None:
            victim = found[1]
            if (head_wait_s < patience_s and not redundant(victim, workers)
                    and colder_on_busy_worker(model, workers, busy_models, value, value(victim))):
                return Decision(WAIT, None, None, "a busy worker holds a colder model")
            return Decision(PLACE, found[0], victim, "evict coldest")
    return Decision(WAIT, None, None, "no worker with a free credit and a free or evictable slot")


def redundant(model: str, workers: Iterable) -> bool:
    """Loaded on two workers or more (evicting one copy costs no load)."""
    return sum(1 for w in workers if w.has_loaded(model)) > 1


def route(model: str, workers: Sequence, *, busy_models: Collection[str] = (),
          value: Callable[[str], float] = lambda m: 0.0, head_wait_s: float = 0.0,
          copy_after_s: float = math.inf, max_copies: int = 1,
          allow_evict: bool = True, patience_s: float = 0.0) -> Decision:
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
    return place(model, workers, busy_models, value, allow_evict, head_wait_s=head_wait_s,
                 patience_s=patience_s)


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
