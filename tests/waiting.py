"""The one way tests wait: on a condition, with a deadline, failing with what was awaited.

A fixed ``time.sleep`` is either too short on a loaded machine (a flaky test) or too long on an idle
one (a slow test); a hand-written poll loop forgets its deadline or says nothing useful when it
runs out. These helpers poll a condition until it holds and, past the deadline, fail naming what
was awaited and the last value (or error) seen.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, TypeVar

T = TypeVar("T")

# Polling starts fast (most conditions hold within milliseconds) and backs off to this.
MAX_INTERVAL_S = 0.1


class WaitTimeout(AssertionError):
    """A condition did not hold within its deadline (an AssertionError: the test fails, not errors)."""


def _fail(what: str, timeout: float, last: Any, error: BaseException | None) -> WaitTimeout:
    seen = f"last error: {error!r}" if error is not None else f"last value: {last!r}"
    return WaitTimeout(f"waited {timeout:g} s for {what}; {seen}"[:2000])


class _Backoff:
    """The pauses between tries of ``wait_until`` and its async twin: 5 ms doubling up to
    ``interval``, never past the deadline; past it, WaitTimeout with the last value or error."""

    def __init__(self, timeout: float, what: str, interval: float) -> None:
        self.timeout, self.what, self.interval = timeout, what, interval
        self.deadline = time.monotonic() + timeout
        self.next = min(0.005, interval)

    def pause(self, last: Any, error: BaseException | None) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _fail(self.what, self.timeout, last, error)
        pause, self.next = min(self.next, left), min(self.next * 2, self.interval)
        return pause


def wait_until(cond: Callable[[], T], timeout: float, what: str, *, retry: tuple[type[BaseException], ...] = (),
               interval: float = MAX_INTERVAL_S) -> T:
    """Calls ``cond`` until it returns a truthy value and returns that value.

    ``retry``: exception types that count as "not yet" (e.g. a client's Unavailable while a
    process restarts); any other exception propagates at once. Past ``timeout`` seconds, raises
    WaitTimeout naming ``what`` and the last value or error. ``cond`` is always tried at least once,
    and once more at the deadline, so a slow machine gets the whole timeout.
    """
    backoff = _Backoff(timeout, what, interval)
    while True:
        last, error = None, None
        try:
            last = cond()
        except retry as exc:
            error = exc
        if error is None and last:
            return last
        time.sleep(backoff.pause(last, error))


async def wait_until_async(cond: Callable[[], Awaitable[T]], timeout: float, what: str, *,
                           retry: tuple[type[BaseException], ...] = (), interval: float = MAX_INTERVAL_S) -> T:
    """``wait_until`` for a coroutine condition, inside an event loop (never blocks the loop)."""
    backoff = _Backoff(timeout, what, interval)
    while True:
        last, error = None, None
        try:
            last = await cond()
        except retry as exc:
            error = exc
        if error is None and last:
            return last
        await asyncio.sleep(backoff.pause(last, error))


def holds_for(cond: Callable[[], Any], seconds: float, what: str, *, interval: float = MAX_INTERVAL_S) -> None:
    """Checks that ``cond`` stays truthy for ``seconds`` (a claim that something does NOT happen,
    e.g. an unlisted worker never registers): fails at the first check where it does not hold.

    This is the one place a test spends a fixed time on purpose: an absence has no event to wait
    for. The window should be a few of the system's own periods (heartbeats, refreshes)."""
    end = time.monotonic() + seconds
    while True:
        value = cond()
        if not value:
            raise AssertionError(f"{what} stopped holding; value: {value!r}"[:2000])
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(interval, left))
