"""The worker process's CPU priority (``cluster.worker_nice``).

Inference may take every core of the host; the broker's decisions (refusals, routing, replies)
must not wait behind it. A worker therefore lowers its own priority once, at start. On Linux the
nice value belongs to a thread and a new thread inherits its creator's: the threads that exist
already (numpy's BLAS pool starts at import) are lowered one by one, and the ones started later
(ONNX Runtime's, ZeroMQ's) inherit the main thread's. Lowering a priority needs no privileges.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("lipsync_cluster.worker")

_TASKS = "/proc/self/task"  # Linux: one entry per thread of this process


def lower_priority(increment: int) -> int:
    """Add ``increment`` (0..19) to the nice value of this process's every thread; returns the
    main thread's nice value now. A platform without ``setpriority`` (Windows) leaves the priority
    as it was; so does a refusal by the OS, with a warning: a broker slowed by inference is a
    degraded service, not a reason not to serve."""
    if not hasattr(os, "setpriority"):
        return 0
    now = os.getpriority(os.PRIO_PROCESS, 0)
    if increment <= 0:
        return now
    target = min(19, now + increment)
    threads = [int(t) for t in os.listdir(_TASKS)] if os.path.isdir(_TASKS) else [0]
    try:
        for tid in threads:
            try:
                if os.getpriority(os.PRIO_PROCESS, tid) < target:
                    os.setpriority(os.PRIO_PROCESS, tid, target)
            except ProcessLookupError:
                pass  # the thread ended meanwhile
        os.setpriority(os.PRIO_PROCESS, 0, target)  # this (main) thread: later threads inherit it
    except OSError as exc:
        log.warning("cannot lower the worker's CPU priority by %d (cluster.worker_nice): %s", increment, exc)
        return os.getpriority(os.PRIO_PROCESS, 0)
    log.info("worker CPU priority: nice %d (cluster.worker_nice %d)", target, increment)
    return target
