"""Admission that keeps its word: admit a request only when it is expected to finish well within
its deadline, and refuse it early from the queue when that turns out wrong.

Pure (no sockets, no clock of its own: every call takes ``now``), so it is tested in-process with
an injected clock (tests/test_admission.py). The :class:`~.dispatch.Dispatcher` owns one
:class:`Admission` and feeds it what it measures; this module owns the rule:

* **What it learns** (:class:`Dist`: an exponentially weighted mean and variance, so a p90 of
  recent samples, not a mean): per model (and for all models together, the fallback of a model
  not measured yet) the *service* time (dispatch -> reply, minus the model load the worker
  reported) and the *load* time (``model_load_ms`` of replies that loaded their model); and the
  *margin*: how much longer requests really waited in the queue than predicted when they were
  admitted (the ratio actual / predicted; its p90, between 1 and :data:`MARGIN_MAX`). The queue
  model below is optimistic under load (service slows when every core is busy, a cold model
  waits for a slot to free); the margin learns by how much, instead of a constant.
* **The rule at admission** (:meth:`Admission.check`, for a request that must queue): the
  expected wait (the work queued ahead and running now over every worker's credits; or its own
  model's queue over the credits of the copies serving it, when longer) times the margin, plus
  a p90 load when no worker holds its model (a cold load), plus its own p90 service, must fit in
  :data:`TARGET` (0.8) of its deadline. A model no worker holds while the cluster has been
  saturated for :data:`SATURATED_S` waits for a slot that will not free in time: refused.
* **The re-check** (every :data:`RECHECK_S`, for every queued request): the same estimate
  (:meth:`Admission.expect`) from where it stands now (what is still queued before it, what its
  model's holders are now), added to the time it already waited; past the target by more than
  :data:`RECHECK_SLACK` of it (a request admitted just within it is not refused when the next
  reply moves the estimate a little: the estimate is a p90, most finish before it): refused now
  with ``overloaded`` (``queue: "recheck"``), before its deadline rather than at it. And at
  dispatch, a request whose start now (and load, when its model must be placed) would finish
  past the target is refused instead of sent (:meth:`Admission.start_finish`).

A request answered within the target keeps the promise; one that cannot is told early, so the
caller can go elsewhere while it still has time.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

from ..common.errors import Overloaded

TARGET = 0.8            # of the deadline: an admitted request is expected to finish by then
RECHECK_S = 0.05        # how often queued requests are checked again
RECHECK_SLACK = 0.1     # the re-check gives up past the target + this share of it (not at it: hysteresis)
SATURATED_S = 1.0       # more waiting than running for this long: a cold model's slot will not free
MARGIN_MAX = 4.0        # the learned queue-wait margin is clamped to [1, MARGIN_MAX]
MARGIN_MIN_SAMPLES = 8  # observations before the margin counts (until then: 1)
MARGIN_Z = 0.5          # the margin: this many standard deviations above the typical log ratio
WAIT_FLOOR_S = 0.25     # predicted waits shorter than this do not teach the margin (noise)
Z90 = 1.2816            # the normal distribution's 90th percentile, in standard deviations
CV_FLOOR = 0.1          # a distribution is never assumed tighter than this (few samples)
DEFAULT_SERVICE_S = 0.05  # nothing measured yet
DEFAULT_LOAD_S = 0.5


class Dist:
    """A streaming estimate of a positive quantity: exponentially weighted mean and variance
    (weight ``alpha`` for the newest sample: about the last 2/alpha samples count)."""

    __slots__ = ("alpha", "mean", "var", "n", "hi")

    def __init__(self, alpha: float = 0.1) -> None:
        self.alpha = alpha
        self.mean = 0.0
        self.var = 0.0
        self.n = 0
        self.hi = 0.0   # high(), kept current: read on every dispatch

    def observe(self, x: float) -> None:
        # Once per reply, twice (the model's and all models'): kept to plain arithmetic.
        n = self.n
        if n:  # West (1979): the incremental exponentially weighted variance
            mean = self.mean
            diff = x - mean
            incr = self.alpha * diff
            mean += incr
            var = (1.0 - self.alpha) * (self.var + diff * incr)
        else:
            mean, var = x, 0.0
        self.mean, self.var, self.n = mean, var, n + 1
        sd, floor = var ** 0.5, CV_FLOOR * abs(mean)
        self.hi = mean + Z90 * (sd if sd > floor else floor)

    @property
    def sd(self) -> float:
        return max(math.sqrt(max(0.0, self.var)), CV_FLOOR * abs(self.mean))

    def high(self, z: float = Z90) -> float:
        """About the 90th percentile (``z`` standard deviations above the mean)."""
        return self.mean + z * self.sd


class QueueView(NamedTuple):
    """What the dispatcher knows about the cluster when a request arrives (or is re-checked).
    (A named tuple, not a frozen dataclass: built on every queued request, at half the cost.)"""

    credits: int              # every registered worker's credits (not draining)
    in_flight: int            # requests running on workers now
    queued: int               # requests queued (all models) ahead of it
    depth: int                # requests queued for this request's model (ahead of it)
    holder_credits: int       # credits of the workers holding its model (0: a cold load)
    saturated_s: float        # how long more requests have waited than the cluster runs at once


class Admission:
    """The learned distributions and the admission rule (see the module doc)."""

    def __init__(self, target: float = TARGET, alpha: float = 0.1) -> None:
        self.target = target
        self.alpha = alpha
        self.service: dict[str, Dist] = {}
        self.load: dict[str, Dist] = {}
        self.all_service = Dist(alpha)
        self.all_load = Dist(alpha)
        # log(actual queue wait / predicted) of admitted requests, for models held when they left the
        # queue and for cold ones (which also waited for a slot to free: a margin of their own)
        self.ratio = Dist(alpha)
        self.ratio_cold = Dist(alpha)
        self.refused_late = 0         # refused by the re-check (counted for the stats)
        # margin(False), margin(True): recomputed when a ratio is observed (waited()), read per request
        self._margins = [1.0, 1.0]

    def summary(self) -> dict:
        """What admission has learned, for the stats snapshot (the console, /metrics, operators)."""
        def ms(d: Dist) -> Optional[float]:
            return round(d.hi * 1000.0, 1) if d.n else None
        return {"target": self.target, "margin": round(self.margin(), 3),
                "margin_cold": round(self.margin(True), 3), "service_p90_ms": ms(self.all_service),
                "load_p90_ms": ms(self.all_load), "refused_from_queue": self.refused_late}

    # --- what is measured ------------------------------------------------------------------

    def served(self, model: str, service_s: float, load_s: Optional[float] = None) -> None:
        """A reply: ``service_s`` from dispatch to reply, of which ``load_s`` loaded the model."""
        if load_s is not None and load_s > 0:
            self._dist(self.load, model).observe(load_s)
            self.all_load.observe(load_s)
            service_s -= load_s
        service_s = max(service_s, 1e-4)
        self._dist(self.service, model).observe(service_s)
        self.all_service.observe(service_s)

    def waited(self, predicted_s: float, actual_s: float, cold: bool = False) -> None:
        """A request admitted to the queue left it (dispatched, or refused or expired there:
        then ``actual_s`` is at least what it would have waited). Teaches the margin: the log of
        actual / predicted, so that a few wild ratios do not swamp it (short predictions, whose
        ratio is mostly noise, are left out)."""
        if predicted_s >= WAIT_FLOOR_S:
            r = self.ratio_cold if cold else self.ratio
            r.observe(math.log(max(actual_s, 1e-3) / predicted_s))
            self._margins[bool(cold)] = (1.0 if r.n < MARGIN_MIN_SAMPLES else
                                         min(MARGIN_MAX, max(1.0, math.exp(r.mean + MARGIN_Z * r.sd))))

    def _dist(self, table: dict[str, Dist], model: str) -> Dist:
        d = table.get(model)
        if d is None:
            d = table[model] = Dist(self.alpha)
        return d

    # --- what is expected ------------------------------------------------------------------

    def service_mean(self, model: Optional[str]) -> float:
        d = self.service.get(model) if model is not None else None
        if d is None or not d.n:
            d = self.all_service
        return d.mean if d.n else DEFAULT_SERVICE_S

    def service_high(self, model: str) -> float:
        d = self.service.get(model)
        if d is None:
            d = self.all_service
        return d.hi if d.n else DEFAULT_SERVICE_S

    def load_high(self, model: str) -> float:
        d = self.load.get(model)
        if d is None:
            d = self.all_load
        return d.hi if d.n else DEFAULT_LOAD_S

    def cold_high(self, model: str) -> float:
        """About the 90th percentile of a load followed by a service of ``model`` (the p90 of the
        sum, not the sum of the p90s: the two vary independently)."""
        load = self.load.get(model) or self.all_load
        svc = self.service.get(model) or self.all_service
        lm, ls = (load.mean, load.sd) if load.n else (DEFAULT_LOAD_S, CV_FLOOR * DEFAULT_LOAD_S)
        sm, ss = (svc.mean, svc.sd) if svc.n else (DEFAULT_SERVICE_S, CV_FLOOR * DEFAULT_SERVICE_S)
        return lm + sm + Z90 * math.sqrt(ls * ls + ss * ss)

    def margin(self, cold: bool = False) -> float:
        """How much longer than predicted queued requests wait: a little above the typical ratio
        (the tail is the re-check's), in [1, MARGIN_MAX]; cold models' own."""
        return self._margins[bool(cold)]  # kept current by waited(): read on every queued request

    def expect(self, model: str, credits: int, in_flight: int, ahead: int, ahead_model: int,
               holder_credits: int) -> tuple[float, float]:
        """``(wait, finish)`` for a request with ``ahead`` requests queued before it (all models;
        the broker serves the oldest head first, so all queues drain together) and
        ``ahead_model`` before it in its own model's queue: ``wait`` is the predicted queue wait
        before the margin (those ahead and those running, at the mean service of all models,
        over every credit; or its own model's queue over its holders' credits when longer), and
        ``finish`` how long from now until it is answered: the wait x the margin, plus its p90
        service, or when no worker holds its model (a cold load) the p90 of a load and service."""
        wait = (ahead + in_flight) * self.service_mean(None) / max(1, credits)
        if holder_credits:
            wait = max(wait, ahead_model * self.service_mean(model) / holder_credits)
            return wait, wait * self.margin() + self.service_high(model)
        return wait, wait * self.margin(True) + self.cold_high(model)

    def check(self, model: str, budget_s: float, view: QueueView, target: Optional[float] = None) -> float:
        """Admit a request that must queue, or raise :class:`Overloaded` saying why. Returns the
        predicted queue wait (kept on the request: the margin learns from it; -1 when there is
        nothing to learn from: no worker, or no service measured yet). ``target``: the
        share of ``budget_s`` to fit in (default: :attr:`target`)."""
        if view.credits <= 0:  # no worker registered: nothing to estimate (the no-worker grace answers)
            return -1.0
        wait, finish = self.expect(model, view.credits, view.in_flight, view.queued, view.depth,
                                   view.holder_credits)
        cold = not view.holder_credits
        if cold and view.saturated_s > SATURATED_S:
            raise Overloaded(
                f"no worker holds model {model!r} and every worker is busy with requests "
                "waiting for the models it holds", queue="wait",
                expected_wait_ms=round(wait * 1000.0, 1),
                retry_after_ms=int(min(60_000, max(10, 1000.0 * wait))))
        share = self.target if target is None else target
        allowed = share * budget_s
        if finish > allowed:
            raise Overloaded(
                f"expected to finish in {finish:.2f} s (wait {wait:.2f} s x margin {self.margin(cold):.2f}"
                f"{', a load' if cold else ''}, service), past {share:.0%} of the request's "
                f"deadline of {budget_s:.2f} s, for model {model!r}", queue="wait",
                expected_wait_ms=round(wait * 1000.0, 1), expected_finish_ms=round(finish * 1000.0, 1),
                retry_after_ms=int(min(60_000, max(10, 1000.0 * (finish - allowed)))))
        # A prediction from the default guess (nothing measured yet) teaches the margin nothing.
        return wait if self.all_service.n else -1.0

    def due(self, arrival: float, budget_s: float, target: Optional[float] = None) -> float:
        """When a request should be answered at the latest: the target share of its deadline."""
        return arrival + (self.target if target is None else target) * budget_s

    def start_finish(self, model: str, now: float, cold: bool) -> float:
        """At dispatch: when a request started now would finish (p90 service, or of a load and
        service when ``cold``); later than its :meth:`due`: refuse it rather than send it."""
        return now + (self.cold_high(model) if cold else self.service_high(model))

    def cold_refusal(self, model: str, budget_s: float, due_s: float, finish_s: float) -> Overloaded:
        """The error for a request that would be sent at once to load its model, but whose p90
        load and service do not fit its deadline's target."""
        return Overloaded(
            f"model {model!r} must be loaded first: expected to finish in {finish_s:.2f} s (a load and "
            f"its service at the 90th percentile; a load {self.load.get(model, self.all_load).mean:.2f} s on "
            f"average), past "
            f"{due_s:.2f} s ({due_s / max(budget_s, 1e-9):.0%} of the request's deadline of {budget_s:.2f} s)",
            queue="wait", expected_finish_ms=round(finish_s * 1000.0, 1),
            retry_after_ms=int(min(60_000, max(10, 1000.0 * (finish_s - due_s)))))

    def refusal(self, model: str, waited_s: float, budget_s: float, due_s: float, finish_s: float) -> Overloaded:
        """The error for a request the re-check refuses (times in seconds after its arrival)."""
        self.refused_late += 1
        return Overloaded(
            f"refused after {waited_s:.2f} s: model {model!r} is now expected to finish {finish_s:.2f} s "
            f"after the request arrived, past {due_s:.2f} s ({due_s / max(budget_s, 1e-9):.0%} of its "
            f"deadline of {budget_s:.2f} s) "
            "(the queue moved slower than estimated, or its model must be loaded first)", queue="recheck",
            waited_ms=round(waited_s * 1000.0, 1), expected_finish_ms=round(finish_s * 1000.0, 1),
            retry_after_ms=int(min(60_000, max(10, 1000.0 * (finish_s - waited_s)))))
