"""The worker's memory budget with real ONNX Runtime sessions of the `unet` demo model: one shared
workspace, measured model costs, batches that do not fit run in chunks (the same frames out), and a
frame that cannot fit is refused with the numbers; the process's peak RSS stays in the budget."""
from __future__ import annotations

import uuid

import numpy as np
import pytest

from lipsync_cluster.common.catalog import Catalog
from lipsync_cluster.common.errors import CapacityFull
from lipsync_cluster.common.frame_store import FrameStore
from lipsync_cluster.demo.build import build_demo_models
from lipsync_cluster.worker.cache import ModelCache
from lipsync_cluster.worker.memory import process_rss
from lipsync_cluster.worker.pipeline import Pipeline
from lipsync_cluster.worker.sessions import SessionOptions

MB = 2**20


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("unet_models")
    build_demo_models(out, count=2, kind="unet", frames=4, size=(640, 360), seed=0, progress=False)
    return out


@pytest.fixture
def store():
    fs = FrameStore(f"test-mem-{uuid.uuid4().hex[:8]}")
    yield fs
    fs.cleanup()


def peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident size (Linux >= 4.0)


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def inputs(batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return (rng.uniform(0, 1, (batch, 6, 320, 320)).astype(np.float32),
            rng.uniform(-1, 1, (batch, 32, 16, 16)).astype(np.float32))


def test_budget_holds_and_a_big_batch_runs_in_chunks_with_the_same_frames(unet_dir, store):
    catalog = Catalog(str(unet_dir))
    a, b = sorted(catalog.packages())
    # The process as it is, two models (weights ~50 MB, prepacked kernels, frames ~3 MB: ~110 MB
    # each, measured at load) and a workspace for two or three frames (~160 MB each on the CPU):
    # batch 6 cannot run at once.
    budget = process_rss() + 2 * 120 * MB + 450 * MB
    cache = ModelCache(catalog.resolve, store, max_models=2, max_memory_bytes=budget,
                       session_options=SessionOptions(intra_op_threads=1))
    pipeline = Pipeline(None, threads=1, memory=cache.memory)
    visual, feats = inputs(6)
    outs = {}
    try:
        for batch in (1, 2, 6):  # growing batch sizes: each size's workspace is measured on its first runs
            for model_id in (a, b):
                with cache.use(model_id) as (model, _, _):
                    peak_rss_reset()
                    outs[model_id, batch] = pipeline.unet(model, visual[:batch], feats[:batch])[0]
                    peak = peak_rss()
                assert peak <= budget * 1.1, f"{model_id} batch {batch}: peak RSS {peak / MB:.0f} MB > budget"
                assert outs[model_id, batch].shape == (batch, 3, 320, 320)
        stats = cache.stats()
        assert stats["mem_chunked_batches"] == 2, "batch 6 ran in chunks on both models"
        assert stats["mem_used"] <= budget and stats["mem_free"] == budget - stats["mem_used"]
        assert stats["mem_budget"] == budget and stats["loaded_models"] == 2
        for m in stats["models"]:  # weights measured at load (more than nothing) plus the frames
            assert 20 * MB < m["memory_bytes"] < 200 * MB, m
        # The same session without a budget runs batch 6 at once: the chunks gave the same frames.
        with cache.use(a) as (model, _, _):
            whole = Pipeline(None, threads=1).unet(model, visual, feats)[0]
        np.testing.assert_allclose(outs[a, 6], whole, rtol=0, atol=1e-5)
        np.testing.assert_allclose(outs[a, 6][:1], outs[a, 1], rtol=0, atol=1e-5)
    finally:
        cache.close()
        pipeline.close()


def test_a_frame_that_cannot_fit_evicts_idle_models_then_answers_capacity_full(unet_dir, store):
    catalog = Catalog(str(unet_dir))
    a, b = sorted(catalog.packages())
    # Room for both models and one frame's workspace, measured at load: nothing to spare.
    budget = process_rss() + 2 * 120 * MB + 260 * MB
    cache = ModelCache(catalog.resolve, store, max_models=2, max_memory_bytes=budget,
                       session_options=SessionOptions(intra_op_threads=1))
    pipeline = Pipeline(None, threads=1, memory=cache.memory)
    visual, feats = inputs(1)
    try:
        cache.load(a)
        cache.load(b)
        one_frame = cache.memory.estimate((a, catalog.resolve(a).version), 1)
        assert one_frame > 50 * MB, "the warm-up at load measured a frame's workspace"
        # Shrink the budget under the running worker: a frame of `a` no longer fits next to both
        # models, so the idle `b` goes; with `b` also serving, the answer is capacity_full.
        cache.memory.budget = cache.memory.used() - cache.memory.held + one_frame - 40 * MB
        with cache.use(a) as (model_a, _, _), cache.use(b):
            with pytest.raises(CapacityFull) as info:
                pipeline.unet(model_a, visual, feats)
        d = info.value.details
        assert d["needed_bytes"] == one_frame and d["available_bytes"] < d["needed_bytes"]
        assert d["max_memory_bytes"] == cache.memory.budget and "workspace for one frame" in info.value.message
        with cache.use(a) as (model_a, _, _):
            out = pipeline.unet(model_a, visual, feats)[0]
        assert out.shape == (1, 3, 320, 320) and cache.loaded_ids() == [a], "b was evicted to make room"
    finally:
        cache.close()
        pipeline.close()


def test_the_worker_reports_its_budget_used_and_free_memory(unet_dir):
    from lipsync_cluster.config import load_config
    from lipsync_cluster.worker.service import WorkerService

    cfg = load_config({"models_dir": str(unet_dir), "capacity": {"max_memory_gb": 2, "max_models": 2},
                       "onnx": {"intra_op_threads": 1}})
    service = WorkerService(cfg, shm_namespace=f"test-mem-{uuid.uuid4().hex[:8]}")
    try:
        before = service.describe()
        service.cache.load(sorted(service.catalog.packages())[0])
        after, stats = service.describe(), service.stats()
    finally:
        service.close()
        service.cache.frame_store.cleanup()
    for d in (before, after, stats):
        assert d["mem_budget"] == 2 * 2**30 and d["mem_free"] == d["mem_budget"] - d["mem_used"]
    assert after["mem_used"] - before["mem_used"] > 20 * MB and stats["total_memory_bytes"] > 20 * MB, \
        "a model's cost is counted"
    model_id = stats["models"][0]["model_id"]
    assert service.cache.memory.estimate((model_id, stats["models"][0]["version"]), 1) > 50 * MB, \
        "the load's warm-up measured a frame's workspace"
    assert stats["mem_process_bytes"] > 0 and stats["mem_workspace_bytes"] >= 0


def test_the_idle_frames_count_in_the_budget_and_go_before_a_model(unet_dir, store):
    """The idle-frame cache (worker/idle.py) is part of what the budget holds; a load that needs
    its room clears it rather than evicting a resident model."""
    from lipsync_cluster.worker.idle import IdleCache

    catalog = Catalog(str(unet_dir))
    a, b = sorted(catalog.packages())
    cache = ModelCache(catalog.resolve, store, max_models=2, max_memory_bytes=8 * 2**30,
                       session_options=SessionOptions(intra_op_threads=1))
    idle = IdleCache()
    pipeline = Pipeline(None, threads=1, idle_cache=idle, memory=cache.memory)
    try:
        cache.load(a)
        before = cache.stats()
        plane = np.ones((3, 320, 320), dtype=np.uint8)  # a silent frame's UNet output, as kept
        for i in range(200):
            idle.put((a, "v", i), plane.copy(), plane.nbytes)
        assert idle.bytes == 200 * plane.nbytes
        after = cache.stats()
        assert after["mem_idle_cache_bytes"] == idle.bytes
        assert after["mem_used"] >= before["mem_used"] + idle.bytes - 8 * MB, "the idle frames are counted"
        # Room for b only once the idle frames are gone: they go, the resident a stays.
        needed = cache._estimate_bytes(catalog.resolve(b)) + cache.memory.one_frame_guess()
        cache.memory.budget = cache.memory.used() + needed - idle.bytes // 2
        cache.load(b)
        assert cache.loaded_ids() == [a, b] and idle.bytes == 0
    finally:
        cache.close()
        pipeline.close()
