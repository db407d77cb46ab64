"""The whole cluster with real processes on loopback: supervisor, broker, CPU workers, client."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from lipsync_cluster.client import Client, LipsyncError, UnknownModel
from lipsync_cluster.common.model_package import load_package

from conftest import cluster_config
from waiting import wait_until

pytestmark = pytest.mark.processes  # a cluster (supervisor, broker and worker processes) each

SILENCE = np.zeros((32, 16, 16), np.float32)


def client_for(sup) -> Client:
    return Client(sup.config.frontend, timeout=60)


def workers_of(sup):
    return {c.name: c for c in sup.children[1:]}


def test_every_op_and_full_frames(make_cluster, demo_dir):
    sup = make_cluster()
    with client_for(sup) as client:
        health = client.health()
        assert health["live"] and health["ready"] and health["workers"] == 2
        models = {m["model_id"]: m for m in client.list_models()}
        assert sorted(models) == ["demo_ada", "demo_ben", "demo_cleo"]
        assert not any(m["loaded"] for m in models.values())

        loud = np.full((3, 32, 16, 16), 1.0, np.float32)
        result = client.infer("demo_ada", audio_features=loud, start_frame_idx=2, batch_size=3, format="png")
        assert result.model_loaded and result.frame_indices == [2, 3, 4] and result.worker
        pkg = load_package(demo_dir / "demo_ada")
        for i, bg_index in enumerate(result.background_indices):
            image = result.image(i)
            assert image.shape == (720, 1280, 3)
            background = cv2.imread(str(pkg.frame_paths[bg_index]))
            x1, y1, x2, y2 = pkg.crop_rects[bg_index]
            inside = np.zeros(image.shape[:2], bool)
            inside[y1:y2, x1:x2] = True
            assert np.array_equal(image[~inside], background[~inside])
            assert (image[inside] != background[inside]).any()

        stats = client.model_stats("demo_ada")
        assert stats["loaded_models"] == 1 and stats["max_models"] == 6
        assert stats["max_memory_bytes"] == 2 * 4 * 2**30
        assert any(w["loaded_models"] == 1 for w in stats["workers"])
        for w in stats["workers"]:  # each worker's memory as it measures it (worker/memory.py)
            assert w["mem_budget"] == 4 * 2**30 and 0 < w["mem_used"] <= w["mem_budget"], w
            assert w["mem_free"] == w["mem_budget"] - w["mem_used"] and w["mem_process_bytes"] > 0, w

        loaded = client.load_model("demo_ben")
        assert loaded["model_id"] == "demo_ben"
        assert "demo_ben" in {m["model_id"] for m in client.list_models() if m["loaded"]}
        unloaded = client.unload_model("demo_ben")
        assert unloaded["workers"], "the model was unloaded from the worker that had it"
        assert "demo_ben" not in {m["model_id"] for m in client.list_models() if m["loaded"]}

        with pytest.raises(UnknownModel, match="nobody"):
            client.infer("nobody", audio_features=SILENCE)
        # jpeg and raw formats
        assert client.infer("demo_ada", audio_features=SILENCE, format="jpeg", quality=70).frames[0][:2] == b"\xff\xd8"
        raw = client.infer("demo_ada", audio_features=SILENCE, format="raw").frames[0]
        assert raw.shape == (720, 1280, 3) and raw.dtype == np.uint8


def test_affinity_one_load_and_same_worker(make_cluster):
    sup = make_cluster()
    with client_for(sup) as client:
        results = [client.infer("demo_cleo", audio_features=SILENCE, start_frame_idx=i, format="jpeg")
                   for i in range(10)]
        models = {m["model_id"]: m for m in client.list_models()}
    assert sum(r.model_loaded for r in results) == 1, "ten requests for one model cause one load"
    assert len({r.worker for r in results}) == 1, "and all land on the worker that has it"
    assert models["demo_cleo"]["loaded_on"] == [results[0].worker]


def test_a_waiting_queue_earns_a_second_copy_but_no_more(make_cluster):
    from lipsync_cluster.client.results import infer_request

    sup = make_cluster()
    feats = np.full((10, 32, 16, 16), 0.5, np.float32)
    with client_for(sup) as client:
        futures = []
        for i in range(16):
            header, payloads = infer_request("demo_cleo", audio_features=feats, start_frame_idx=i, format="png")
            futures.append(client.submit(header, payloads))
        replies = [client.wait(f)[0] for f in futures]
        models = {m["model_id"]: m for m in client.list_models()}
    workers = {r["worker"] for r in replies}
    assert len(workers) == 2, "a burst that keeps the queue waiting while a worker idles gets a second copy"
    assert sum(r["model_loaded"] for r in replies) == 2
    assert len(models["demo_cleo"]["loaded_on"]) <= (sup.config.cluster.max_copies_per_model or 2)


def test_placement_and_eviction_with_one_slot_per_worker(make_cluster):
    sup = make_cluster(capacity={"max_models": 1})
    with client_for(sup) as client:
        a = client.infer("demo_ada", audio_features=SILENCE)
        b = client.infer("demo_ben", audio_features=SILENCE)
        assert a.worker != b.worker, "the second model goes to the worker with a free slot"
        # LRU orders by the broker's arrival time of each request; these calls follow one another.
        client.infer("demo_ada", audio_features=SILENCE)  # ada is now the hotter one
        c = client.infer("demo_cleo", audio_features=SILENCE)
        assert c.worker == b.worker, "the coldest model (ben) is evicted"
        where = {m["model_id"]: m["loaded_on"] for m in client.list_models()}
    assert where["demo_ben"] == [] and where["demo_ada"] == [a.worker] and where["demo_cleo"] == [b.worker]


def test_two_models_served_concurrently_by_different_workers(make_cluster):
    sup = make_cluster()
    with client_for(sup) as client:
        client.load_model("demo_ada")
        client.load_model("demo_ben")
        feats = np.full((10, 32, 16, 16), 0.5, np.float32)

        def run(model):
            return [client.infer(model, audio_features=feats, format="jpeg").worker for _ in range(4)]

        with ThreadPoolExecutor(2) as pool:
            ada, ben = pool.map(run, ["demo_ada", "demo_ben"])
    assert len(set(ada)) == 1 and len(set(ben)) == 1 and set(ada) != set(ben)


def test_unload_and_load_floods_never_close_a_model_under_a_request(make_cluster):
    """Infers on two models while other clients flood unload_model / load_model(force_reload) at
    the same worker: every answer is a result or an honest refusal, never ``internal`` (a model
    closed between its load and the request's hold answered "these shared frames were closed")."""
    sup = make_cluster(cluster={"per_gpu": 1, "worker_credits": 4}, capacity={"max_models": 2})
    stop = threading.Event()
    codes: dict[str, int] = {}
    served = [0]
    lock = threading.Lock()

    def count(code: str) -> None:
        with lock:
            codes[code] = codes.get(code, 0) + 1

    def infers(model: str) -> None:
        with client_for(sup) as client:
            while not stop.is_set():
                try:
                    client.infer(model, audio_features=SILENCE, format="jpeg")
                    served[0] += 1
                except LipsyncError as exc:
                    count(exc.code)

    def flood(model: str) -> None:
        with client_for(sup) as client:
            i = 0
            while not stop.is_set():
                try:
                    client.unload_model(model) if i % 3 else client.load_model(model, force_reload=True)
                except LipsyncError as exc:
                    count(exc.code)
                i += 1

    threads = [threading.Thread(target=infers, args=(m,)) for m in ("demo_ada", "demo_ada", "demo_ben")]
    threads += [threading.Thread(target=flood, args=(m,)) for m in ("demo_ada", "demo_ben")]
    [t.start() for t in threads]
    stop.wait(6.0)
    stop.set()
    [t.join(60) for t in threads]
    assert "internal" not in codes, codes
    assert served[0] > 10, (served, codes)


def test_two_clusters_on_the_same_ports_keep_their_own_shared_frames(make_cluster):
    """Clusters on the same ports of different loopback addresses are different clusters: the
    second one's start-up cleanup (which removes what a crashed run of *its own* left) must not
    delete the frames the first one is serving from."""
    from lipsync_cluster.common.frame_store import FrameStore
    from lipsync_cluster.supervisor import shm_namespace

    first = make_cluster(server={"host": "127.0.0.2"}, cluster={"per_gpu": 1})
    with client_for(first) as client:
        client.infer("demo_ada", audio_features=SILENCE)
    store = FrameStore(shm_namespace(first.config))
    before = store.list()
    assert [e["model_id"] for e in before] == ["demo_ada"]
    ports = {k: getattr(first.config.server, k) for k in ("frontend_port", "backend_port", "stats_port")}
    second = make_cluster(server={"host": "127.0.0.1", **ports}, cluster={"per_gpu": 1})
    assert store.list() == before, "the second cluster's start-up cleanup removed the first one's frames"
    assert shm_namespace(second.config) != shm_namespace(first.config)
    with client_for(first) as client:
        assert client.infer("demo_ada", audio_features=SILENCE, start_frame_idx=3).frame_indices == [3]


def test_killed_worker_is_restarted_and_its_request_answered(make_cluster):
    sup = make_cluster()
    with client_for(sup) as client:
        first = client.infer("demo_ada", audio_features=SILENCE)
        victim = workers_of(sup)[first.worker]
        old_pid = victim.proc.pid
        # a long request (25 png frames at 1280x720) on the worker that holds the model
        from lipsync_cluster.client.results import infer_request

        header, payloads = infer_request("demo_ada", audio_features=np.full((25, 32, 16, 16), 0.8, np.float32),
                                         batch_size=25, format="png", quality=9)
        future = client.submit(header, payloads)
        wait_until(lambda: future.done() or any(w["worker"] == first.worker and w["in_flight"]
                                                for w in client.model_stats()["workers"]),
                   30, "the long request in flight on the worker that holds the model")
        assert not future.done(), "the request finished before the worker could be killed under it"
        os.kill(old_pid, signal.SIGKILL)
        reply, frames = client.wait(future, timeout=60)
        assert reply["ok"] and len(frames) == 25
        wait_until(lambda: victim.alive and victim.proc.pid != old_pid, 30, "the supervisor to restart the worker")
        assert victim.restarts == 1 and victim.proc.pid != old_pid, "the supervisor restarted the worker"
        # and the cluster keeps serving with both workers
        wait_until(lambda: client.health()["workers"] >= 2, 30, "both workers registered again")
        assert client.health()["workers"] == 2


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "lipsync_cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_start_errors_are_one_clear_line(demo_dir, tmp_path):
    # port taken
    path = cluster_config(demo_dir, tmp_path)
    import yaml

    port = yaml.safe_load(path.read_text())["server"]["frontend_port"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        out = run_cli("start", "--config", str(path), "--gpus", "0", "--per-gpu", "1")
    assert out.returncode != 0
    assert f"tcp://127.0.0.1:{port} is already in use" in out.stderr
    assert "removed" not in out.stderr, "a refused start must not touch another cluster's shared frames"
    # bad config
    bad = tmp_path / "bad.yaml"
    bad.write_text("capacity:\n  eviction_policy: mru\n")
    out = run_cli("start", "--config", str(bad), "--gpus", "0")
    assert out.returncode != 0 and "capacity.eviction_policy: 'mru' is not one of lru, lfu" in out.stderr
    # no models
    empty = cluster_config(tmp_path / "nothing-here", tmp_path)
    out = run_cli("start", "--config", str(empty), "--gpus", "0")
    assert out.returncode != 0 and "no servable model found" in out.stderr
    # a bad --gpus value
    out = run_cli("start", "--config", str(path), "--gpus", "many")
    assert out.returncode != 0 and "--gpus" in out.stderr
