"""The shared wait helpers (tests/waiting.py): they return what held, and fail naming what they
waited for, within their deadline."""
from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from waiting import WaitTimeout, holds_for, wait_until, wait_until_async


def test_wait_until_returns_the_first_truthy_value():
    counter = itertools.count()
    assert wait_until(lambda: next(counter) >= 3 and "done", 5, "the third call") == "done"


def test_wait_until_fails_at_its_deadline_naming_what_and_the_last_value():
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"waited 0.2 s for the answer; last value: \[\]") as failed:
        wait_until(lambda: [], 0.2, "the answer")
    assert isinstance(failed.value, AssertionError)  # a test failure, not an error
    assert 0.2 <= time.monotonic() - t0 < 5


def test_wait_until_retries_only_the_errors_it_is_told_to():
    calls = itertools.count()

    def flaky():
        if next(calls) < 2:
            raise ConnectionError("not yet")
        return 42

    assert wait_until(flaky, 5, "a connection", retry=(ConnectionError,)) == 42
    with pytest.raises(WaitTimeout, match="last error: ConnectionError"):
        wait_until(lambda: (_ for _ in ()).throw(ConnectionError("down")), 0.1, "x", retry=(ConnectionError,))
    with pytest.raises(KeyError):  # anything else is a real failure, at once
        wait_until(lambda: {}["missing"], 5, "a key", retry=(ConnectionError,))


def test_wait_until_async_waits_without_blocking_the_loop():
    async def run():
        flag = asyncio.Event()
        asyncio.get_running_loop().call_later(0.05, flag.set)

        async def is_set():
            return flag.is_set()

        assert await wait_until_async(is_set, 5, "the flag") is True
        with pytest.raises(WaitTimeout, match="for never"):
            await wait_until_async(lambda: asyncio.sleep(0, result=0), 0.1, "never")

    asyncio.run(run())


def test_holds_for_fails_when_the_claim_stops_holding():
    holds_for(lambda: True, 0.05, "always")
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="quiet stopped holding"):
        holds_for(lambda: time.monotonic() - t0 < 0.05, 5, "quiet")
    assert time.monotonic() - t0 < 4, "the failure comes at the first check that sees it"
