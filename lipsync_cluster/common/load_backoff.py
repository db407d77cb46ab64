"""Per-model backoff after failed loads (as ModelMesh does): no tight retry loop on a broken model.

A model whose load failed is not tried again for ``base_s`` seconds; each further failure (an
attempt made after the window closed) doubles the window, up to ``max_s``. Meanwhile every request
for it is answered at once with the same ``model_load_failed`` and its reason, plus
``retry_after_ms``. A success, or a new version of the package (re-prepared, fixed), clears it.

Used by the broker (cluster-wide answer without bothering a worker) and by the worker's model
cache (so a burst of requests that reached a worker together causes one load attempt, not one per
request). Not thread-safe by itself: the broker calls it from its one thread, the cache under its lock.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .errors import ModelLoadFailed


@dataclass
class Failure:
    version: Any
    reason: str
    failures: int
    failed_at: float
    until: float


class LoadBackoff:
    def __init__(self, base_s: float = 2.0, max_s: float = 300.0) -> None:
        if base_s <= 0 or max_s < base_s:
            raise ValueError(f"backoff needs 0 < base_s <= max_s, got {base_s}, {max_s}")
        self.base_s = base_s
        self.max_s = max_s
        self.entries: dict[str, Failure] = {}

    def __bool__(self) -> bool:
        return bool(self.entries)

    def failed(self, model: str, version: Any, reason: str, now: float) -> Failure:
        """Record a failed load. A failure inside an open window (a request that was already on
        its way) refreshes the reason but does not lengthen the window."""
        f = self.entries.get(model)
        if f is not None and f.version == version and now < f.until:
            f.reason = reason or f.reason
            return f
        count = f.failures + 1 if f is not None and f.version == version else 1
        window = min(self.max_s, self.base_s * 2 ** (count - 1))
        f = self.entries[model] = Failure(version, reason, count, now, now + window)
        return f

    def succeeded(self, model: str) -> None:
        self.entries.pop(model, None)

    def blocked(self, model: str, version: Any, now: float) -> Optional[Failure]:
        """The open failure window for ``model`` at ``version``, or None (a load may be tried)."""
        f = self.entries.get(model)
        if f is None:
            return None
        if f.version != version:  # a new package: forget the old one's failures
            del self.entries[model]
            return None
        return f if now < f.until else None

    def error(self, model: str, f: Failure, now: float) -> ModelLoadFailed:
        wait = max(0.0, f.until - now)
        return ModelLoadFailed(
            f"model '{model}' failed to load ({f.failures} time(s) in a row); not retried for "
            f"{wait:.1f} s more: {f.reason}", model_id=model, reason=f.reason, failures=f.failures,
            retry_after_ms=int(wait * 1000) + 1, version=f.version)

    def check(self, model: str, version: Any, now: float) -> None:
        """Raise the backoff's :class:`ModelLoadFailed` when ``model`` is inside its window."""
        f = self.blocked(model, version, now)
        if f is not None:
            raise self.error(model, f, now)
