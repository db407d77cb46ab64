"""The longest test files first when `make test-fast` spreads files over pytest-xdist workers.

``--dist loadfile`` hands each worker one file at a time, in collection order (the Makefile turns
off xdist's own reorder, which puts the files with the most tests first: test_worker_memory.py, four
tests and the longest file, came last and ran alone at the end while the other workers sat idle).
Here the files are ordered by how long they took in a recent run, longest first, so the short ones
fill in at the end: ``file_seconds.json`` beside this file, copied by ``bench/test_tiers.py --write``
from the pytest cache that every loadfile run updates (``CACHE_KEY``). A file not in it goes first.
Only the order of the files changes, never what runs or the order within a file; stale numbers
cost time, nothing else.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

SECONDS_FILE = Path(__file__).with_name("file_seconds.json")
CACHE_KEY = "lipsync/file_seconds"


def _file(nodeid: str) -> str:
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1]


def known_seconds() -> dict[str, float]:
    try:
        return {str(k): float(v) for k, v in json.loads(SECONDS_FILE.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


class FileOrder:
    """The plugin (registered by conftest.py in a --dist loadfile run and in xdist's workers)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.spent: dict[str, float] = {}
        self.failed = False

    def pytest_collection_modifyitems(self, items: list) -> None:
        # Longest file first; stable, so the tests of a file stay in their order.
        seconds = known_seconds()
        items.sort(key=lambda item: -seconds.get(_file(item.nodeid), float("inf")))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # On the controller, where every worker's reports arrive: a phase's duration to its file.
        if hasattr(self.config, "workerinput"):
            return
        name = _file(report.nodeid)
        self.spent[name] = self.spent.get(name, 0.0) + report.duration
        self.failed = self.failed or report.failed

    def pytest_sessionfinish(self) -> None:
        # A whole run (not -k or --lf) that passed: its seconds per file into the cache.
        cache, opt = getattr(self.config, "cache", None), self.config.option  # none with -p no:cacheprovider
        if not self.spent or cache is None or opt.keyword or getattr(opt, "lf", False) or self.failed:
            return
        cache.set(CACHE_KEY, {**cache.get(CACHE_KEY, {}), **{k: round(v, 2) for k, v in self.spent.items()}})


def register(config: pytest.Config) -> None:
    # The controller of a loadfile run records; its xdist workers (whose own `dist` option xdist
    # sets to "no") collect, so they order.
    if hasattr(config, "workerinput") or getattr(config.option, "dist", "no") == "loadfile":
        config.pluginmanager.register(FileOrder(config), "lipsync-file-order")
