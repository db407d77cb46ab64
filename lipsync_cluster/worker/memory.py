"""What a worker's memory really holds, measured, and the batch chunks that keep it in its budget.

The budget (``capacity.max_memory_gb``) holds the worker's whole footprint as the system sees it
(RSS on the CPU; the process's GPU memory on a GPU, read through NVML):

    process (measured at start) + models (weights measured at load + their frames)
    + workspace (the one shared activation arena, measured run by run) <= budget

The workspace a UNet run needs grows with its batch: on the CPU the ``unet`` demo needs about
200 MB per frame. It is measured, per model and chunk size, on the first run of that size (from
a shrunk arena, so the number is the run's whole need, not what the arena happened to lack). A
batch whose workspace would not fit next to the resident models runs in equal chunks that do
(same frames out, in order); one that cannot fit even one frame evicts idle models, or is
refused with ``capacity_full`` and the numbers.
"""
from __future__ import annotations

import logging
import math
import threading
from typing import Any, Callable, Optional

import psutil

from ..common import vocab
from ..common.errors import CapacityFull
from .sessions import Workspace

log = logging.getLogger("lipsync_cluster.worker.memory")

MB = 2**20

# ONNX Runtime plans a shape's memory on its first run and allocates by that plan (one block) from
# the second on: both layouts are measured, each from a shrunk arena, so the first run's scattered
# blocks never sit next to the planned one.
MEASURED_RUNS = 2



# Before a model's run at a size is measured, a frame is assumed to need this much more workspace
# than the most per frame it measured at other sizes (layouts differ between batch sizes).
FIRST_GUESS_MARGIN = 1.25

# glibc's dynamic mmap threshold rises with every large free: after a big batch, arena regions
# of tens of MB would come from (and go back to) the heap, where a shrink does not show in RSS.
# A fixed threshold at glibc's own maximum (32 MB) keeps the workspace's large regions on mmap,
# given back when shrunk, while the pipeline's frame-sized buffers (a few MB) still reuse the
# heap without page faults.
MMAP_THRESHOLD = 32 << 20
_M_MMAP_THRESHOLD = -3


def _libc() -> Optional[Any]:
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def follow_rss() -> None:
    """Make freed large blocks go back to the system at once (glibc; elsewhere a no-op)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


_malloc_trim = getattr(_libc(), "malloc_trim", None)


def settle_heap() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``, every arena; elsewhere
    a no-op), so that RSS read next is what is allocated, nothing else.

    Without it an RSS difference measures the heap's history, not the allocation: memory freed
    earlier (a previous model's temporaries, another test's buffers, the arena's small regions
    after a shrink) stays resident, a new allocation reuses it without growing RSS (a model
    measured at 0 bytes, a frame's workspace at a few MB), and a load's own freed temporaries
    stay resident after it (a model measured at twice its size). Called before each reading a
    measurement subtracts: at loads, shrinks and first runs of a size, never on the hot path.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


def process_rss() -> int:
    """This process's resident memory in bytes (what the host's OOM killer counts)."""
    return psutil.Process().memory_info().rss


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM; Linux >= 4.0). False where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class WorkerMemory:
    """The budget and the shared workspace of one worker.

    ``resident()`` gives the bytes held outside the workspace by models (resident, and promised
    to loads in progress); ``evict_for(model_id, bytes)`` asks the cache to free that much by
    evicting idle models other than ``model_id`` and returns whether it could; ``meter()`` reads
    the process's memory (``None`` where it cannot be read: then the workspace is not measured).
    """

    def __init__(self, budget_bytes: int, workspace: Workspace,
                 meter: Callable[[], Optional[int]] = process_rss) -> None:
        self.budget = int(budget_bytes)
        self.workspace = workspace
        self.meter = meter
        self.resident: Callable[[], int] = lambda: 0
        self.evict_for: Callable[[str, int], bool] = lambda model_id, needed: False
        self._lock = threading.Lock()  # the tables below; the workspace lock orders runs
        self._chunk_bytes: dict[tuple[str, str, int], int] = {}  # (model, version, chunk) -> measured
        self._measured_runs: dict[tuple[str, str, int], int] = {}
        self._fits: set[tuple[str, str, int]] = set()  # ran in the arena as it is (since its last shrink)
        self.held = 0  # bytes the arena holds (grown by runs, given back by shrinks), measured
        self._caches: list[Any] = []  # clearable caches in the budget (the idle-frame cache)
        if meter is process_rss:
            follow_rss()
        self.base = int(meter() or 0)  # the process before any model: interpreter, libraries, sessions
        self.chunked_batches = 0

    # --- caches that can be given back -----------------------------------------------------

    def add_cache(self, cache: Any) -> None:
        """Count ``cache`` in the budget (``cache.bytes``; ``cache.clear()`` returns the bytes it
        freed): the idle-frame cache (worker/idle.py, up to 96 MB). It is cleared before any model
        is evicted for room: a cached idle frame costs one UNet run to make again, a model a load."""
        with self._lock:
            self._caches.append(cache)

    def remove_cache(self, cache: Any) -> None:
        with self._lock:
            if cache in self._caches:
                self._caches.remove(cache)

    def cache_bytes(self) -> int:
        """Bytes the clearable caches hold (a sum of counters: cheap, no lock but theirs)."""
        return sum(c.bytes for c in tuple(self._caches))

    def clear_caches(self) -> int:
        """Empty the clearable caches and give their pages back; the bytes freed (0: none held)."""
        freed = sum(c.clear() for c in tuple(self._caches))
        if freed:
            self._settle()
        return freed

    # --- numbers ---------------------------------------------------------------------------

    def used(self, reading: Optional[int] = None) -> int:
        """What the budget is holding: the process, the models and the workspace as counted, or
        the process as measured when that is more (what the system sees is what the budget holds)."""
        reading = self.meter() if reading is None else reading
        return max(self.base + self.resident() + self.cache_bytes() + self.held, reading or 0)

    def _outside_workspace(self) -> int:
        """Bytes held outside the workspace: counted, or measured (the reading less the arena)."""
        reading = self.meter()
        counted = self.base + self.resident() + self.cache_bytes()
        return counted if reading is None else max(counted, reading - self.held)

    def measured(self) -> Optional[int]:
        return self.meter()

    def free(self, reading: Optional[int] = None) -> dict:
        """``mem_budget``, ``mem_used``, ``mem_free`` in bytes, as heartbeats carry them. Used is the
        larger of the account and the reading, so a worker never claims room it does not have."""
        used = self.used(reading)
        return {vocab.MEM_BUDGET: self.budget, vocab.MEM_USED: used, vocab.MEM_FREE: max(0, self.budget - used)}

    def snapshot(self) -> dict:
        """:meth:`free` and its parts: the process, the workspace, the reading, chunked batches."""
        reading = self.meter()
        return {**self.free(reading or 0), "mem_process_bytes": self.base, "mem_workspace_bytes": self.held,
                "mem_idle_cache_bytes": self.cache_bytes(),
                "mem_measured_bytes": reading, "mem_chunked_batches": self.chunked_batches}

    def estimate(self, key: tuple[str, str], chunk: int) -> int:
        """Workspace bytes a run of ``chunk`` frames of model ``key`` needs: measured where it ran
        at that size, else the largest measured bytes per frame of that model times ``chunk`` (an
        upper bound: the batch-1 figure carries the run's fixed costs too)."""
        with self._lock:
            exact = self._chunk_bytes.get((*key, chunk))
            if exact is not None:
                return exact
            per_frame = [b / c for (m, v, c), b in self._chunk_bytes.items() if (m, v) == key]
        if not per_frame:
            return 0
        return int(max(per_frame) * FIRST_GUESS_MARGIN * chunk)

    def one_frame_guess(self) -> int:
        """Workspace a model not yet run here will need for its first frame: the most any model
        measured at batch 1 (0 before the first): a load keeps room for its own warm-up run."""
        with self._lock:
            return max((b for (_, _, c), b in self._chunk_bytes.items() if c == 1), default=0)

    # --- the workspace ---------------------------------------------------------------------

    def _settle(self) -> None:
        """Before a reading a measurement subtracts: the heap's free pages go back (RSS only)."""
        if self.meter is process_rss:
            settle_heap()

    def shrink(self) -> None:
        """Give the arena's unused memory back (hold ``workspace.lock``)."""
        self._settle()
        before = self.meter()
        self.workspace.shrink()
        self._settle()  # the arena's regions under the mmap threshold went to the heap's free lists
        after = self.meter()
        with self._lock:
            self._fits.clear()
            if before is not None and after is not None:
                self.held = max(0, self.held - max(0, before - after))
            else:
                self.held = 0

    def _measured(self, run: Callable[[], Any]) -> tuple[Any, Optional[int]]:
        """``run()`` and the most memory it added at any moment: the peak (RSS high-water mark)
        where the meter is RSS and Linux can reset it, else the reading after it."""
        self._settle()
        before = self.meter()
        peak = self.meter is process_rss and _reset_peak()
        out = run()
        after = _peak_rss() if peak else self.meter()
        if peak and after is not None:
            after = max(after, self.meter() or 0)
        if before is None or after is None:
            return out, None
        return out, max(0, after - before)

    def measure_load(self, key: tuple[str, str], create: Callable[[], Any],
                     warm_up: Callable[[Any], None]) -> tuple[Any, Optional[int]]:
        """Create a model's session (while other models run), then run it at batch 1 in a quiet,
        shrunk workspace (``workspace.lock`` taken here). Returns the session and the model's own
        bytes (weights, prepacked kernels: what its creation added outside the arena), or None
        where nothing can be read; the batch-1 workspace is recorded for the chunk sizes to come.

        The model's bytes are read right after its creation, not after its warm-up runs: a
        shrink frees only the arena's regions that are wholly free, and a run's region can stay
        (measured on the ``unet`` demo: the second model's 150 MB batch-1 region, every time).
        What the runs leave after the last shrink is the workspace's, and counted as held.
        """
        self._settle()
        reading = self.meter()
        outside = None if reading is None else reading - self.held  # all but the arena, before
        session = create()
        with self.workspace.lock:
            self._settle()
            created = self.meter()
            own = None if outside is None or created is None else max(0, created - self.held - outside)
            grown = 0
            for _ in range(MEASURED_RUNS):
                self.shrink()
                grown = max(grown, self._measured(lambda: warm_up(session))[1] or 0)
            self.shrink()
            self._settle()
            again = self.meter()
            if own is not None and again is not None:
                with self._lock:  # the arena is all the process holds beyond the rest and this model
                    self.held = max(0, again - outside - own)
        if own is None:
            return session, None
        with self._lock:
            self._chunk_bytes[(*key, 1)] = grown
            self._measured_runs[(*key, 1)] = MEASURED_RUNS
        return session, own

    def measure_run(self, key: tuple[str, str], chunk: int, run: Callable[[], object]) -> object:
        """Run ``run`` (one UNet run of ``chunk`` frames, ``workspace.lock`` held), measuring it the
        first times this model runs at this size (:data:`MEASURED_RUNS`): each from a shrunk arena,
        so its growth is its need."""
        fresh = self._measured_runs.get((*key, chunk), 0) < MEASURED_RUNS
        if fresh:
            self.shrink()
        elif (*key, chunk) in self._fits:
            return run()  # ran at this size in the arena as it is: it grows nothing, no reading needed
        before = self.meter()
        out, peak = self._measured(run)
        after = self.meter()
        with self._lock:
            if before is not None and after is not None:
                self.held += max(0, after - before)
                if fresh and peak is not None:
                    self._chunk_bytes[(*key, chunk)] = max(peak, self._chunk_bytes.get((*key, chunk), 0))
            if fresh:
                self._measured_runs[(*key, chunk)] = self._measured_runs.get((*key, chunk), 0) + 1
            self._fits.add((*key, chunk))
        return out

    def chunk_for(self, model_id: str, key: tuple[str, str], batch: int) -> int:
        """The frames per UNet run for a batch of ``batch`` (hold ``workspace.lock``): the whole
        batch if it fits, else equal chunks that do. Shrinks the arena or evicts idle models when
        the room is there only without them; raises CapacityFull when one frame cannot fit."""
        room = self.budget - self._outside_workspace()
        fits = [c for c in range(batch, 0, -1) if self.estimate(key, c) <= room]
        if not fits:
            needed = self.estimate(key, 1)
            if self.evict_for(model_id, needed - room):
                room = self.budget - self._outside_workspace()
            if needed > room:
                raise CapacityFull(
                    f"model '{model_id}' needs {needed / MB:.0f} MB of workspace for one frame and "
                    f"{room / MB:.0f} MB of the worker's {self.budget / MB:.0f} MB budget is free "
                    "(every other model is serving a request)", model_id=model_id, needed_bytes=needed,
                    available_bytes=max(0, room), max_memory_bytes=self.budget)
            best = 1
        else:
            best = fits[0]
        runs = math.ceil(batch / best)
        chunk = math.ceil(batch / runs)  # equal chunks: 25 in runs of at most 7 -> 7, 7, 7, 4
        expected_growth = 0 if (*key, chunk) in self._fits else self.estimate(key, chunk)
        if self.held + expected_growth > room:
            self.shrink()
        if runs > 1:
            with self._lock:
                self.chunked_batches += 1
        return chunk
