"""How valuable a model is to keep loaded: one score for the broker and the worker.

``capacity.eviction_policy`` names the order in which loaded models are given up:

* ``lru``: the last time the model was used (older = colder);
* ``lfu``: a :class:`DecayedCount` of its uses -- each use adds one and the count halves every
  ``half_life_s`` without use (least frequently used, with ageing, so a model that was popular an
  hour ago does not stay loaded forever).

The broker's :class:`Heat` scores every model it sees requested, cluster-wide (``broker/routing.py``
picks eviction hints by it); a worker scores the models it holds (``worker/cache.py``,
``worker/noop.py``) and uses the same score when it has to choose without a hint.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

POLICIES = ("lru", "lfu")
LFU_HALF_LIFE_S = 300.0   # default half-life of an LFU score


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"eviction policy {policy!r} is not one of {', '.join(POLICIES)}")
    return policy


class DecayedCount:
    """An exponentially decayed count of uses: ``score`` as of the time ``at`` of the last use."""

    __slots__ = ("score", "at")

    def __init__(self) -> None:
        self.score = 0.0
        self.at = -math.inf

    def add(self, now: float, half_life_s: float) -> None:
        """One use at ``now``."""
        self.score = self.value(now, half_life_s) + 1.0
        self.at = now

    def value(self, now: float, half_life_s: float) -> float:
        """The count at ``now``: s x 2^(-(now - at) / h)."""
        score = self.score
        if score:
            score *= 0.5 ** (max(0.0, now - self.at) / half_life_s)
        return score

    def key(self, half_life_s: float) -> float:
        """A key that orders counts as :meth:`value` does at any one time, without a clock:
        s x 2^(-(now - at)/h) orders as log2(s) + at/h. It changes only on a use, and then only
        grows (what the broker's placement heap relies on). -inf: never used."""
        score = self.score
        return math.log2(score) + self.at / half_life_s if score > 0 else -math.inf


class Heat:
    """How valuable each model is to keep loaded, by name, under one policy.

    ``lru``: the last time the model was touched. ``lfu``: a :class:`DecayedCount` with
    half-life ``half_life_s``, kept for every model touched, loaded or not.
    """

    def __init__(self, policy: str = "lru", half_life_s: float = LFU_HALF_LIFE_S) -> None:
        self.policy = check_policy(policy)
        self.half_life_s = half_life_s
        self._lfu = policy == "lfu"
        self._last: dict[str, float] = {}
        self._counts: dict[str, DecayedCount] = {}

    def touch(self, model: str, now: float) -> None:
        if self._lfu:
            c = self._counts.get(model)
            if c is None:
                c = self._counts[model] = DecayedCount()
            c.add(now, self.half_life_s)
        self._last[model] = now

    def last_used(self, model: str) -> Optional[float]:
        return self._last.get(model)

    def value(self, model: str, now: float) -> float:
        if not self._lfu:
            return self._last.get(model, -math.inf)
        c = self._counts.get(model)
        return c.value(now, self.half_life_s) if c is not None else 0.0

    def valuer(self, now: float) -> Callable[[str], float]:
        return lambda m: self.value(m, now)

    def order_key(self, model: str) -> float:
        """Orders models as ``value`` does at any one time, without a clock (see
        :meth:`DecayedCount.key`); for ``lru`` the last use. -inf: never touched."""
        if not self._lfu:
            return self._last.get(model, -math.inf)
        c = self._counts.get(model)
        return c.key(self.half_life_s) if c is not None else -math.inf
