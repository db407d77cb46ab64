"""Where a request goes: pure decisions over the placement index (no sockets, no clocks).

For the head request of model m's queue (docs/ARCHITECTURE.md, "Routing and placement"):

1. a worker with m loaded and a free credit (fewest in flight): dispatch there;
2. else, if some workers hold m (loaded or loading): another copy is placed when the queue's
   expected wait -- requests waiting x service time / the credits of the workers holding m --
   is longer than a load of m (the ski-rental rule: a copy costs one load; waiting longer than
   that costs more), up to ``max_copies`` (0 = no cap, so a hot model may reach every worker);
   before m's service time is measured, while every copy is still loading and more requests
   wait than those copies have credits, another copy goes into a free slot (no eviction: it is
   ready about when they are; ``_copy_while_loading``); otherwise wait for a copy;
3. else place m: a worker with a free credit and a free model slot where m fits its free memory
   (fewest models first), else the worker whose least valuable evictable model is the coldest;
   that model is the eviction hint sent with the request. Evictable = loaded, nothing in flight
   for it on that worker and nothing queued for it in the broker. A redundant copy (a model
   loaded on another worker too) goes before any model's only copy: evicting it costs no load,
   which is also how copies shrink when a model's demand falls;
4. nothing fits: wait (a credit frees, a load finishes, or the deadline answers).

Each step asks the :class:`~.placement.PlacementIndex` (kept up to date by the worker table), so a
decision never scans the fleet. ``route`` also takes a plain list of workers (tests, one-offs): it
then indexes them first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Collection, NamedTuple, Optional, Union

from ..common.heat import Heat  # noqa: F401 - the broker's heat, named here with the decisions it orders
from .placement import PlacementIndex, fits_by_memory

DISPATCH = "dispatch"  # m is loaded on the worker
PLACE = "place"        # the worker will load m (evicting ``evict`` first when given)
WAIT = "wait"

COPY_FLOOR_S = 0.05    # never add a copy for a wait shorter than this (a load is never free)


class Decision(NamedTuple):
    action: str
    worker: object = None
    evict: Optional[str] = None
    reason: str = ""


def copy_threshold_s(service_s: Optional[float], load_s: Optional[float] = None,
                     floor_s: float = COPY_FLOOR_S) -> float:
    """The expected wait above which another copy pays off: one load of the model (two service
    times while no load has been measured), at least ``floor_s``."""
    return max(floor_s, load_s if load_s is not None else 2.0 * (service_s or 0.0))


def expected_wait_s(depth: int, service_s: Optional[float], credits: int) -> Optional[float]:
    """How long ``depth`` waiting requests take to drain through ``credits`` (None: unknown)."""
    if service_s is None or credits <= 0:
        return None
    return depth * service_s / credits


def _copy_while_loading(model: str, index: PlacementIndex, depth: int, credits: int) -> bool:
    """Whether a model whose service time is not measured yet gets another copy now: every copy
    of it is still loading and more requests wait for it than those copies have credits.

    The ski-rental rule needs the service time, and the first one is measured only when the
    first request comes back (a load plus a service: seconds for a UNet). Until then, a request
    that cannot start on the loading copies waits at least the rest of their load plus one
    service; a copy placed now is ready about when they are, so it makes no request wait longer
    and the queue starts draining through both at once. It goes into a free slot only (no
    eviction: it costs an idle worker's load, never another model's place), and the redundant
    copy is the first to go when demand moves (``place``)."""
    return not index.copies.get(model) and depth > credits > 0


def _index(workers: Any, value: Optional[Callable[[str], float]]) -> PlacementIndex:
    if isinstance(workers, PlacementIndex):
        return workers
    return PlacementIndex.of(workers, value)


def place(model: str, index: PlacementIndex, busy_models: Collection[str] = (),
          allow_evict: bool = True, *, head_wait_s: float = 0.0, patience_s: float = 0.0,
          size: Optional[int] = None,
          size_of: Callable[[str], Optional[int]] = lambda m: None) -> Decision:
    """A free slot where ``model`` fits, else evict the coldest evictable model among the workers
    with a credit (redundant copies first).

    With ``patience_s`` > 0 (``cluster.placement_patience`` x the model's load time; off by
    default), a request that has waited less than that does not evict a model's only copy while
    a busy worker holds a colder one (or has a free slot): it waits for that worker instead.
    Under load the idle worker is rarely the one holding the cluster's coldest model -- that is
    usually a model being loaded for a single request right now -- so this trades some latency
    and throughput for fewer loads (docs/BENCHMARKS.md, Routing).
    """
    fits = fits_by_memory(size, size_of)
    d = _place(model, index, busy_models, allow_evict, fits, head_wait_s, patience_s)
    if d.action == WAIT and size is not None and not index.fits_anywhere(size):
        # No worker reports the room, even once idle: the memory-blind choice, and that worker
        # makes room (evicting more than one model if it must) or answers `capacity_full` with
        # its numbers -- better than waiting for a fit that will not come.
        d = _place(model, index, busy_models, allow_evict, lambda w, victim=None: True,
                   head_wait_s, patience_s)
        if d.action == PLACE:
            d = d._replace(reason=d.reason + f" (no worker reports {size} bytes free)")
    return d


def _place(model: str, index: PlacementIndex, busy_models: Collection[str], allow_evict: bool,
           fits: Callable[..., bool], head_wait_s: float, patience_s: float) -> Decision:
    w = index.pick_free_slot(model, fits)
    if w is not None:
        return Decision(PLACE, w, None, "free slot")
    if allow_evict:
        found = index.pick_victim(model, busy_models, fits)
        if found is not None:
            victim = found[1]
            if (head_wait_s < patience_s and index.copies.get(victim, 0) <= 1
                    and index.colder_on_busy_worker(model, busy_models, index.order_key(victim))):
                return Decision(WAIT, None, None, "a busy worker holds a colder model")
            return Decision(PLACE, found[0], victim, "evict coldest")
    return Decision(WAIT, None, None, "no worker with a free credit and a free or evictable slot"
                    " where the model fits")


@dataclass(frozen=True)
class Demand:
    """What a miss needs to know of the demand for a model (a hit needs none of it).

    ``busy_models``: models with requests waiting (never evicted); ``depth``: requests of the model
    waiting, the routed one included; ``service_s`` / ``load_s``: its measured service and load
    times (None: not measured yet); ``head_wait_s``: how long the routed request has waited;
    ``patience_s``: ``cluster.placement_patience`` x the load time (0: off); ``size``: the model's
    memory in bytes (None: unknown, fits anywhere). A field that does not exist is a TypeError.
    """

    busy_models: Collection[str] = ()
    depth: int = 1
    service_s: Optional[float] = None
    load_s: Optional[float] = None
    head_wait_s: float = 0.0
    patience_s: float = 0.0
    size: Optional[int] = None


NO_DEMAND = Demand()


def route(model: str, workers: Any, demand: Union[Demand, Callable[[], Demand]] = NO_DEMAND, *,
          value: Optional[Callable[[str], float]] = None, max_copies: int = 0, allow_evict: bool = True,
          size_of: Callable[[str], Optional[int]] = lambda m: None) -> Decision:
    """Decide what to do with the head request of ``model``'s queue (see the module doc).

    ``workers``: the table's :class:`PlacementIndex` (or a list of workers, indexed here with
    ``value`` as the order of eviction). ``demand``: a :class:`Demand`, or a callable returning
    one that is called only on a miss: the hit -- the common case -- costs one index lookup and
    builds nothing, and the broker decides in one call. ``max_copies``: copies of a model at
    most (0: no cap); ``allow_evict`` False: free slots only (preloads); ``size_of``: any model's
    size in bytes, for the room an eviction frees.
    """
    index = _index(workers, value)
    w = index.pick_loaded(model)
    if w is not None:
        return Decision(DISPATCH, w, None, "loaded")
    if not isinstance(demand, Demand):
        demand = demand()
        if not isinstance(demand, Demand):
            raise TypeError(f"route: demand() returned {type(demand).__name__}, not a Demand")
    holders = index.holders.get(model)
    if holders:
        if max_copies and len(holders) >= max_copies:
            return Decision(WAIT, None, None, "busy (max_copies_per_model reached)")
        service_s = demand.service_s
        credits = index.holder_credits.get(model, 0)
        wait = expected_wait_s(demand.depth, service_s, credits)
        if wait is None and _copy_while_loading(model, index, demand.depth, credits):
            d = place(model, index, demand.busy_models, allow_evict=False, size=demand.size, size_of=size_of)
            if d.action == PLACE:
                return d._replace(reason=f"another copy ({demand.depth} waiting, more than the {credits} "
                                         f"credits of its loading copies): {d.reason}")
            return Decision(WAIT, None, None, "loading")
        if wait is None or wait <= copy_threshold_s(service_s, demand.load_s):
            return Decision(WAIT, None, None, "loading" if index.loading.get(model) else "busy")
        d = place(model, index, demand.busy_models, allow_evict, size=demand.size, size_of=size_of)
        if d.action == PLACE:
            return d._replace(reason=f"another copy (expected wait {wait:.3f} s): {d.reason}")
        return d
    return place(model, index, demand.busy_models, allow_evict, head_wait_s=demand.head_wait_s,
                 patience_s=demand.patience_s, size=demand.size, size_of=size_of)
