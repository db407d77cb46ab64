"""The catalog: which models this cluster serves, found from the config (explicit ``models``
entries and/or a ``models_dir`` of packages) and kept current while the cluster runs.

A rescan is cheap: a package is re-read only when its fingerprint (the modification times and
sizes of its manifest and crop rects, and of its frames folder) changed, so a re-prepared model is
picked up on the next request and a package dropped into ``models_dir`` becomes servable without
a restart; a deleted one disappears.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Callable, Mapping, Optional

if TYPE_CHECKING:  # common sits below config: the entries are only duck-typed here
    from ..config import ModelEntry
from .errors import ModelLoadFailed, UnknownModel
from .model_package import MANIFEST, ModelPackage, ModelPackageError, load_package, package_from_entry, public_reason

log = logging.getLogger("lipsync_cluster.catalog")


def _stat_key(*paths: Optional[str | os.PathLike]) -> tuple:
    key = []
    for p in paths:
        if p is None:
            continue
        try:
            st = os.stat(p)
            key.append((str(p), st.st_mtime_ns, st.st_size))
        except OSError:
            key.append((str(p), None, None))
    return tuple(key)


class Catalog:
    def __init__(self, models_dir: Optional[str], entries: Mapping[str, "ModelEntry"] | None = None,
                 refresh_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.models_dir = models_dir
        self.entries = dict(entries or {})
        self.refresh_s = refresh_s
        self.clock = clock
        self._lock = threading.Lock()
        self._packages: dict[str, ModelPackage] = {}
        self._fingerprints: dict[str, tuple] = {}
        self.errors: dict[str, str] = {}
        self._scanned_at = -1e18

    # --- sources -------------------------------------------------------------------------

    def _sources(self) -> dict[str, tuple[Callable[[], tuple], Callable[[], ModelPackage]]]:
        """Every model: how to take its fingerprint and how to (re)load it. Explicit entries win
        over the folder."""
        sources: dict[str, tuple[Callable[[], tuple], Callable[[], ModelPackage]]] = {}
        models_dir = self.models_dir
        if models_dir and os.path.isdir(models_dir):
            for entry in sorted(os.scandir(models_dir), key=lambda e: e.name):
                manifest = os.path.join(entry.path, MANIFEST)
                if entry.is_dir() and os.path.isfile(manifest):
                    folder = entry.path
                    paths = (manifest, os.path.join(folder, "crop_rects.json"), os.path.join(folder, "frames"))
                    sources[entry.name] = (lambda paths=paths: _stat_key(*paths),
                                           lambda folder=folder, name=entry.name: load_package(folder, name))
        for model_id, spec in self.entries.items():
            if spec.package:
                paths = (os.path.join(spec.package, MANIFEST), spec.package)
            else:
                paths = (spec.model_path, spec.crop_rects_path, spec.background_dir)
            sources[model_id] = (lambda paths=paths: _stat_key(*paths),
                                 lambda mid=model_id, spec=spec: package_from_entry(mid, spec))
        return sources

    def refresh(self) -> None:
        sources = self._sources()
        with self._lock:
            packages, fingerprints, errors = {}, {}, {}
            for model_id, (fingerprint, load) in sources.items():
                key = fingerprint()
                if self._fingerprints.get(model_id) == key and model_id in self._packages:
                    packages[model_id] = self._packages[model_id]
                elif self._fingerprints.get(model_id) == key and model_id in self.errors:
                    errors[model_id] = self.errors[model_id]
                else:
                    key = self._load_stable(key, fingerprint, load, packages, errors, model_id)
                fingerprints[model_id] = key
            self._packages, self._fingerprints, self.errors = packages, fingerprints, errors
            self._scanned_at = self.clock()

    def _load_stable(self, key: tuple, fingerprint: Callable[[], tuple], load: Callable[[], ModelPackage],
                     packages: dict, errors: dict, model_id: str) -> tuple:
        """Load a package and make sure it did not change while it was read.

        A re-prepare swaps the package folder; a read that straddles the swap could pair the old
        manifest with the new frames. Re-reading until the fingerprint holds still closes that.
        """
        for _ in range(5):
            try:
                package: Optional[ModelPackage] = load()
                problem = None
            except ModelPackageError as exc:
                package, problem = None, exc.message
            after = fingerprint()  # this package's files only, not a rescan of every folder
            if after == key:
                break
            key = after
        if package is not None:
            packages[model_id] = package
        else:
            errors[model_id] = problem
            if self.errors.get(model_id) != problem:  # the details go to the log, once per change
                log.warning("model '%s' is not servable: %s", model_id, problem)
        return key

    # --- queries -----------------------------------------------------------------------------

    def packages(self, max_age_s: Optional[float] = None) -> dict[str, ModelPackage]:
        max_age = self.refresh_s if max_age_s is None else max_age_s
        if self.clock() - self._scanned_at >= max_age:
            self.refresh()
        return self._packages

    def resolve(self, model_id: str) -> ModelPackage:
        """The current package of ``model_id``; rescans at once if it is not known yet."""
        packages = self.packages()
        if model_id not in packages and model_id not in self.errors:
            packages = self.packages(max_age_s=0.2)
        if model_id in packages:
            return packages[model_id]
        if model_id in self.errors:
            raise ModelLoadFailed(f"model '{model_id}' cannot be loaded: {public_reason(self.errors[model_id])}",
                                  model_id=model_id)
        known = ", ".join(sorted(packages)) or "none"
        raise UnknownModel(f"Model '{model_id}' not found (known models: {known})", model_id=model_id)

    def summary(self, max_age_s: Optional[float] = None) -> dict[str, dict]:
        """What the broker needs to know of every servable model (``max_age_s=0``: rescan now)."""
        return {
            model_id: {
                "version": p.version,
                "preload": bool(p.preload),
                "num_frames": int(p.num_frames),
                "memory_estimate_mb": p.memory_estimate_mb,
                "fps": p.fps,
                "frame_size": list(p.frame_size),
                "kind": p.kind,
            }
            for model_id, p in self.packages(max_age_s).items()
        }


__all__ = ["Catalog"]
