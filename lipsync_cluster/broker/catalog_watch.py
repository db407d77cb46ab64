"""Calls the model catalog off the broker's thread.

``catalog()`` may read the disk (a new or changed package is hashed), which can take seconds for
a large package; the routing loop must never wait for that. A :class:`CatalogWatcher` thread calls
it every ``period_s`` and whenever asked (a request named an unknown id), at most every
``min_gap_s``, and after each scan pokes the broker through an inproc socket. The broker reads
``current`` (a dict swapped whole, never mutated) and ``scans`` (to tell whether a scan finished
after a given moment).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

import zmq

log = logging.getLogger("lipsync_cluster.broker")


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
