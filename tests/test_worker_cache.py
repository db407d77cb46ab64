"""The worker's model cache: LRU vs LFU order, idle unload on a controllable clock, memory
budget, in-use models never evicted, events and log lines for every change."""
from __future__ import annotations

import logging
import threading
import uuid

import pytest

from lipsync_cluster.common.catalog import Catalog
from lipsync_cluster.common.errors import CapacityFull, ModelLoadFailed, UnknownModel
from lipsync_cluster.common.frame_store import FrameStore
from lipsync_cluster.worker.cache import ModelCache
from lipsync_cluster.worker.sessions import SessionOptions


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def store():
    fs = FrameStore(f"test-{uuid.uuid4().hex[:8]}")
    yield fs
    fs.cleanup()


def make_cache(demo_dir, store, clock=None, **kw):
    catalog = Catalog(str(demo_dir))
    events: list[dict] = []
    opts = dict(max_models=2, max_memory_bytes=4 * 2**30, policy="lru", idle_unload_s=0.0)
    opts.update(kw)
    cache = ModelCache(catalog.resolve, store, session_options=SessionOptions(intra_op_threads=1),
                       event_sink=events.append, clock=clock or Clock(), **opts)
    return cache, events, sorted(catalog.packages())


def use(cache, model_id, clock=None, advance=1.0):
    with cache.use(model_id) as (model, loaded_now, _):
        pass
    if clock is not None:
        clock.advance(advance)
    return loaded_now


def test_load_on_first_use_then_hit(demo_dir, store):
    clock = Clock()
    cache, events, ids = make_cache(demo_dir, store, clock)
    assert use(cache, ids[0], clock) is True
    assert use(cache, ids[0], clock) is False
    assert [e["event"] for e in events] == ["loading", "loaded"]
    stats = cache.stats()["models"][0]
    assert stats["usage_count"] == 2 and stats["memory_bytes"] > 12 * 1280 * 720 * 3 - 1


def test_lru_evicts_least_recently_used(demo_dir, store, caplog):
    clock = Clock()
    cache, events, (a, b, c) = make_cache(demo_dir, store, clock, policy="lru")
    use(cache, a, clock)
    use(cache, b, clock)
    use(cache, a, clock)  # a is now more recent than b
    with caplog.at_level(logging.INFO, logger="lipsync_cluster.worker.cache"):
        use(cache, c, clock)
    assert cache.loaded_ids() == sorted([a, c])
    evicted = [e for e in events if e["event"] == "evicted"]
    assert [(e["model_id"], e["reason"]) for e in evicted] == [(b, "policy lru")]
    assert f"Evicting model '{b}' (policy: lru, usage: 1, last used: 2s)" in caplog.text


def test_an_eviction_the_broker_hinted_says_so(demo_dir, store):
    """Eviction has one owner: the event tells a broker's evict_hint from the worker's own policy."""
    clock = Clock()
    cache, events, (a, b, c) = make_cache(demo_dir, store, clock, policy="lru")
    use(cache, a, clock)
    use(cache, b, clock)  # LRU would evict a; the broker's hint names b
    with cache.use(c, evict_hint=b):
        pass
    assert [(e["model_id"], e["reason"]) for e in events if e["event"] == "evicted"] == [(b, "evict_hint")]
    assert cache.loaded_ids() == sorted([a, c])


def test_lfu_evicts_least_frequently_used(demo_dir, store):
    clock = Clock()
    cache, events, (a, b, c) = make_cache(demo_dir, store, clock, policy="lfu")
    for _ in range(3):
        use(cache, a, clock)
    use(cache, b, clock)
    use(cache, a, clock)
    use(cache, b, clock)  # b is the most recent (LRU would evict a) but used 2x against a's 4x
    use(cache, c, clock)
    assert [e["model_id"] for e in events if e["event"] == "evicted"] == [b]
    assert cache.loaded_ids() == sorted([a, c])


def test_idle_unload_on_controllable_clock(demo_dir, store):
    clock = Clock()
    cache, events, (a, b, _) = make_cache(demo_dir, store, clock, idle_unload_s=30 * 60)
    use(cache, a, clock, advance=0)
    clock.advance(20 * 60)
    use(cache, b, clock, advance=0)
    clock.advance(11 * 60)  # a idle 31 min, b idle 11 min
    assert cache.unload_idle() == [a]
    assert cache.loaded_ids() == [b]
    assert [e for e in events if e["event"] == "idle_unloaded"][0]["model_id"] == a


def test_memory_budget_limits_resident_models(demo_dir, store):
    cache2, events, (a, b, c) = make_cache(demo_dir, store, max_models=3)
    use(cache2, a)
    use(cache2, b)
    two = cache2.memory_bytes()
    one = min(m["memory_bytes"] for m in cache2.stats()["models"])
    # The budget holds the whole worker (the process, its workspace, the models): what it holds
    # now and half a model more, so a third model needs an eviction.
    budget = cache2.memory.budget = cache2.memory.used() + one // 2
    use(cache2, c)
    assert len(cache2.loaded_ids()) == 2, "the budget holds two models, not three"
    assert cache2.memory_bytes() <= two + one // 2
    assert cache2.memory.used() <= budget and cache2.stats()["mem_free"] >= 0
    cache3, _, _ = make_cache(demo_dir, store, max_memory_bytes=one // 4)
    with pytest.raises(CapacityFull, match="budget"):
        use(cache3, a)


def test_model_in_use_is_never_evicted(demo_dir, store):
    cache, events, (a, b, c) = make_cache(demo_dir, store, max_models=1)
    with cache.use(a):
        # b needs the only slot, and a is serving a request: capacity full, a stays.
        with pytest.raises(CapacityFull, match="every loaded model is serving a request"):
            with cache.use(b):
                pass
        assert cache.loaded_ids() == [a]
    with cache.use(b):
        assert cache.loaded_ids() == [b]


def test_unload_while_in_use_closes_after_the_request(demo_dir, store):
    cache, events, (a, _, _) = make_cache(demo_dir, store)
    with cache.use(a) as (model, _, _):
        assert cache.unload(a) is True
        assert model.session is not None, "the running request keeps its session"
    assert model.session is None
    assert cache.loaded_ids() == []


def test_concurrent_requests_load_once(demo_dir, store):
    cache, events, (a, _, _) = make_cache(demo_dir, store)
    barrier = threading.Barrier(4)

    def go():
        barrier.wait()
        use(cache, a)

    threads = [threading.Thread(target=go) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert [e["event"] for e in events].count("loaded") == 1
    assert cache.stats()["models"][0]["usage_count"] == 4


def test_unknown_and_broken_models(demo_dir, store, tmp_path):
    cache, events, _ = make_cache(demo_dir, store)
    with pytest.raises(UnknownModel, match="not found"):
        use(cache, "nobody")
    # a package whose UNet is corrupt: model_load_failed naming the reason, and an event
    import shutil

    broken_root = tmp_path / "models"
    shutil.copytree(demo_dir, broken_root)
    victim = sorted(p.name for p in broken_root.iterdir() if (p / "model.yaml").exists())[0]
    onnx = broken_root / victim / "model.onnx"
    onnx.unlink()
    onnx.write_bytes(b"not an onnx file")
    cache2, events2, _ = make_cache(broken_root, store)
    with pytest.raises(ModelLoadFailed) as info:
        use(cache2, victim)
    assert victim in info.value.message


def test_a_request_holds_its_model_from_the_moment_it_is_published(demo_dir, store):
    """The hold is taken under the lock that publishes a freshly loaded model: an unload that runs
    the instant the model is visible (here from the "loaded" event, which is sent after
    publication) retires it instead of closing it under the request."""
    catalog = Catalog(str(demo_dir))
    a = sorted(catalog.packages())[0]
    unloaded: list[bool] = []

    def unload_on_loaded(event):
        if event["event"] == "loaded":
            unloaded.append(cache.unload(a))

    cache = ModelCache(catalog.resolve, store, max_models=2, max_memory_bytes=4 * 2**30,
                       session_options=SessionOptions(intra_op_threads=1), event_sink=unload_on_loaded)
    with cache.use(a) as (model, loaded_now, _):
        assert loaded_now and unloaded == [True]
        assert model.session is not None, "the unload closed the model the request holds"
        assert model.frames[0].shape == (720, 1280, 3)
    assert model.session is None, "retired, then closed when the request let go"
    assert cache.loaded_ids() == []


def test_unload_and_load_floods_against_concurrent_requests(demo_dir, store):
    """Threads using two models while others unload and force-reload them as fast as they can:
    every request runs on an open model (no 'shared frames were closed'), nothing leaks."""
    cache, _, (a, b, _) = make_cache(demo_dir, store, max_models=2)
    stop = threading.Event()
    failures: list[BaseException] = []
    served = [0]

    def infer_loop(model_id):
        while not stop.is_set():
            try:
                with cache.use(model_id) as (model, _, _):
                    assert model.session is not None
                    model.frames[served[0] % 12]
                served[0] += 1
            except CapacityFull:
                pass  # both slots held by other requests' loads: an honest refusal, not a race
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
                failures.append(exc)

    def flood():
        i = 0
        while not stop.is_set():
            target = (a, b)[i % 2]
            try:
                cache.unload(target) if i % 3 else cache.load(target, force_reload=True)
            except CapacityFull:
                pass
            i += 1

    threads = [threading.Thread(target=infer_loop, args=(m,)) for m in (a, a, b)]
    threads += [threading.Thread(target=flood) for _ in range(2)]
    [t.start() for t in threads]
    deadline = threading.Event()
    deadline.wait(4.0)
    stop.set()
    [t.join(30) for t in threads]
    assert not failures, failures[:3]
    assert served[0] > 20
    with cache._lock:
        assert all(m.in_use == 0 for m in cache._models.values())
        assert cache._retired == [], "every retired model was closed when its last request ended"


def test_a_re_prepare_between_resolve_and_read_never_pairs_versions(demo_dir, store, tmp_path):
    """Replays the window deterministically: the package is resolved (version v1), then the folder
    is re-prepared with other pictures, then the load reads the files. The load must not serve,
    or publish to the host's shared copy, v1 with the new pictures: it fails, saying why, and the
    next resolve (the new version) loads the new files."""
    import shutil

    from lipsync_cluster.common.model_package import load_package

    root = tmp_path / "models"
    shutil.copytree(demo_dir / "demo_ada", root / "demo_ada")
    stale = load_package(root / "demo_ada")
    # Re-prepare in place: ben's pictures and face boxes under ada's name (same sizes).
    for name in ("frames", "crop_rects.json"):
        target = root / "demo_ada" / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        (shutil.copytree if name == "frames" else shutil.copy)(demo_dir / "demo_ben" / name, target)
    manifest = root / "demo_ada" / "model.yaml"
    manifest.write_text(manifest.read_text().replace(f"version: {stale.version}", "version: reprepared2"))
    fresh = load_package(root / "demo_ada")
    assert fresh.version != stale.version
    packages = {"demo_ada": stale}
    cache = ModelCache(lambda mid: packages[mid], store, max_models=2, max_memory_bytes=4 * 2**30,
                       session_options=SessionOptions(intra_op_threads=1))
    with pytest.raises(ModelLoadFailed, match="changed since version .* was read"):
        with cache.use("demo_ada"):
            pass
    assert not store.exists("demo_ada", stale.version), "no shared copy of v1 made from the new files"
    packages["demo_ada"] = fresh  # the catalog's next look: the new version, not backed off
    with cache.use("demo_ada") as (model, loaded_now, _):
        assert loaded_now and model.version == fresh.version
        import cv2
        assert (model.frames[0] == cv2.imread(str(fresh.frame_paths[0]))).all()


def test_lfu_counts_decay_as_the_brokers_do(demo_dir, store):
    """The worker's LFU is the broker's score (common/heat.py): uses long ago count for less."""
    clock = Clock()
    cache, events, (a, b, c) = make_cache(demo_dir, store, clock, policy="lfu", lfu_half_life_s=10.0)
    for _ in range(4):
        use(cache, a, clock)
    clock.advance(60)  # six half-lives: a's 4 uses now weigh less than b's one
    use(cache, b, clock)
    use(cache, c, clock)
    assert [e["model_id"] for e in events if e["event"] == "evicted"] == [a]
