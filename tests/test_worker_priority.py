"""cluster.worker_nice: the workers run below the broker's CPU priority, every thread of them.

Inference may take every core; the broker's refusals and routing must not wait behind it
(docs/CONFIG.md "Worker priority"). On Linux the nice value belongs to a thread, so the check
reads each thread of each process, after a request has made the worker start ONNX Runtime's.
"""
from __future__ import annotations

import os

import numpy as np
import psutil
import pytest

from lipsync_cluster.client import Client
from lipsync_cluster.config import load_config
from lipsync_cluster.config.schema import ConfigError

SILENCE = np.zeros((32, 16, 16), np.float32)


def thread_nice(pid: int) -> set[int]:
    """The nice value of every thread of ``pid`` (one that ended meanwhile is skipped)."""
    values = set()
    for t in psutil.Process(pid).threads():
        try:
            values.add(os.getpriority(os.PRIO_PROCESS, t.id))
        except ProcessLookupError:
            pass
    return values


@pytest.mark.processes
@pytest.mark.parametrize("nice", [7, 0])
def test_workers_run_at_the_configured_nice_value_and_the_broker_does_not(make_cluster, nice):
    base = os.getpriority(os.PRIO_PROCESS, 0)  # what the supervisor's children start from
    sup = make_cluster(cluster={"worker_nice": nice})
    with Client(sup.config.frontend, timeout=60) as client:
        for model in ("demo_ada", "demo_cleo"):  # a model load per worker, most likely: ONNX Runtime's threads
            client.infer(model, audio_features=SILENCE, format="jpeg")
    broker, workers = sup.children[0], sup.children[1:]
    assert thread_nice(broker.proc.pid) == {base}, "the broker keeps the priority it was started with"
    for w in workers:
        threads = psutil.Process(w.proc.pid).num_threads()
        assert threads > 1, "the worker has started its threads (ZeroMQ's at least)"
        assert thread_nice(w.proc.pid) == {min(19, base + nice)}, f"every thread of worker {w.name}"


def test_worker_nice_is_bounded():
    assert load_config({}).cluster.worker_nice == 10
    for bad in (-1, 20):
        with pytest.raises(ConfigError, match=r"cluster.worker_nice: .* must be in 0..19"):
            load_config({"cluster": {"worker_nice": bad}})
