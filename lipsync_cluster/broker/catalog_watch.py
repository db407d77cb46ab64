"""Calls the model catalog off the broker's thread, and holds requests for ids it may soon know.

``catalog()`` may read the disk (a new or changed package is hashed), which can take seconds for
a large package; the routing loop must never wait for that. A :class:`CatalogWatcher` thread calls
it every ``period_s`` and whenever asked (a request named an unknown id), at most every
``min_gap_s``, and after each scan pokes the broker through an inproc socket. The broker reads
``current`` (a dict swapped whole, never mutated) and ``scans`` (to tell whether a scan finished
after a given moment).

A request naming an id the catalog does not (yet) know is parked (:class:`Parking`): a package
copied in a moment ago must not be answered ``unknown_model``. It is handled again once a catalog
read that started after it has finished, or after PARK_MAX_S (a read that hangs), and then an id
still unknown is answered ``unknown_model``.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

import zmq

log = logging.getLogger("lipsync_cluster.broker")

MAX_PARKED = 1024           # requests waiting for a catalog re-read; beyond: unknown_model at once
PARK_MAX_S = 5.0            # a read that takes longer: parked requests are answered from the last one


class Park(Exception):
    """Raised while validating a request that names an id not (yet) in the catalog."""


class CatalogWatcher:
    def __init__(self, catalog: Callable[[], dict], ctx: zmq.Context, wake_endpoint: str, *,
                 period_s: float = 2.0, min_gap_s: float = 0.25) -> None:
        self._fn = catalog
        self._ctx = ctx
        self._endpoint = wake_endpoint
        self.period_s = period_s
        self.min_gap_s = min_gap_s
        self.current: dict[str, dict] = {}
        self.scans = 0                  # completed scans (successful or not)
        self.busy = False               # a scan is running on the watcher thread
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._failing = False
        self._thread: Optional[threading.Thread] = None

    def scan(self) -> bool:
        """One call of ``catalog()``; keeps the last good result when it fails. True if it changed."""
        try:
            catalog = self._fn()
            if not isinstance(catalog, dict):
                raise TypeError(f"catalog() returned {type(catalog).__name__}, not a dict")
        except Exception as exc:
            if not self._failing:
                log.warning("broker: reading the model catalog failed (%s); keeping the last one", exc)
            self._failing = True
            self.scans += 1
            return False
        self._failing = False
        old = self.current
        changed = catalog.keys() != old.keys() or any(catalog[m] != old[m] for m in catalog)
        if catalog.keys() != old.keys():
            added, removed = catalog.keys() - old.keys(), old.keys() - catalog.keys()
            log.info("catalog: %d model(s)%s%s", len(catalog),
                     f"; new: {', '.join(sorted(added))}" if added else "",
                     f"; gone: {', '.join(sorted(removed))}" if removed else "")
        self.current = dict(catalog)
        self.scans += 1
        return changed

    def request(self) -> None:
        """Ask for a scan soon (from the broker thread; cheap)."""
        self._wanted.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="catalog-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wanted.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        wake = self._ctx.socket(zmq.PUSH)
        wake.setsockopt(zmq.LINGER, 0)
        wake.connect(self._endpoint)
        try:
            last = time.monotonic()
            while not self._stop.is_set():
                self._wanted.wait(timeout=max(0.0, last + self.period_s - time.monotonic()))
                if self._stop.is_set():
                    break
                gap = last + self.min_gap_s - time.monotonic()
                if gap > 0:
                    time.sleep(gap)
                self._wanted.clear()
                self.busy = True  # set before reading: a request parked after this sees it
                try:
                    self.scan()
                finally:
                    self.busy = False
                last = time.monotonic()
                try:
                    wake.send(b"", zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        finally:
            wake.close(linger=0)


class Parking:
    """Requests (their frames, as received) waiting for a catalog read; the broker's thread only.

    ``known(model)`` is the validators' question: True if the catalog has it, False when it is to
    be answered ``unknown_model`` now (while replaying, or with MAX_PARKED parked), else it raises
    :class:`Park` and the broker calls :meth:`park`. :meth:`release` replays what is due through
    ``handle`` (the broker's client-message handler, which asks ``known`` again).
    """

    def __init__(self, watch: CatalogWatcher, handle: Callable[[list], None], *,
                 max_parked: int = MAX_PARKED, max_wait_s: Optional[float] = None) -> None:
        self._watch = watch
        self._handle = handle
        self.max_parked = max_parked
        self.max_wait_s = PARK_MAX_S if max_wait_s is None else max_wait_s
        self._parked: list[tuple[int, float, list]] = []  # (scan that must finish, parked at, frames)
        self._replaying = False

    def __len__(self) -> int:
        return len(self._parked)

    def known(self, model: str) -> bool:
        if model in self._watch.current:
            return True
        if self._replaying or len(self._parked) >= self.max_parked:
            return False
        raise Park  # wait for a fresh read: the package may have been added a moment ago

    def park(self, frames: list, now: float) -> None:
        """Answered once a catalog read that started after this moment has finished."""
        watch = self._watch
        self._parked.append((watch.scans + (2 if watch.busy else 1), now, frames))
        watch.request()

    def release(self, now: float) -> None:
        """Replay parked requests whose catalog read finished, or that waited ``max_wait_s``."""
        if not self._parked:
            return
        done = self._watch.scans
        ready, waiting = [], []
        for item in self._parked:
            (ready if item[0] <= done or now - item[1] >= self.max_wait_s else waiting).append(item)
        if ready:
            self._parked = waiting
            self._replay([frames for _, _, frames in ready])

    def release_all(self) -> None:
        """Replay everything now (shutdown): unknown ids get their answer."""
        parked, self._parked = [frames for _, _, frames in self._parked], []
        self._replay(parked)

    def _replay(self, parked: list[list]) -> None:
        """Handle parked requests again; an id still unknown is now answered `unknown_model`."""
        self._replaying = True
        try:
            for frames in parked:
                try:
                    self._handle(frames)
                except Exception:
                    log.exception("broker: unexpected error handling a parked request; continuing")
        finally:
            self._replaying = False
