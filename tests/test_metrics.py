"""The broker's Prometheus exporter and HTTP health checks (docs/METRICS.md)."""
from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port
from lipsync_cluster.broker import metrics as metrics_module
from lipsync_cluster.broker.metrics import MetricsServer, metrics_bind
from lipsync_cluster.config import load_config
from lipsync_cluster.client import Client
from lipsync_cluster.tools.loadtest import LoadSpec, run_loadtest
from waiting import wait_until

DOC = Path(__file__).resolve().parents[1] / "docs" / "METRICS.md"


def documented() -> set[str]:
    """Metric family names in the tables of docs/METRICS.md (first column, in backticks; a
    counter's family is its name without ``_total``, as the Prometheus parser reports it)."""
    names = re.findall(r"^\| `(lipsync_[a-z_]+)`", DOC.read_text(), flags=re.M)
    return {n.removesuffix("_total") for n in names}


GPU_ONLY = {"lipsync_worker_gpu_memory_used_bytes", "lipsync_worker_gpu_device_memory_used_bytes",
            "lipsync_worker_gpu_memory_total_bytes", "lipsync_worker_gpu_utilization"}


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(port: int) -> dict[str, list]:
    """{family name: [(sample name, labels, value), ...]} (counters keyed without _total)."""
    status, text = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = [(s.name, s.labels, s.value) for s in fam.samples]
    return out


def value(metrics: dict, family: str, suffix: str = "", **labels) -> float:
    total = 0.0
    for name, lab, v in metrics.get(family, []):
        if name == family + suffix and all(lab.get(k) == str(x) for k, x in labels.items()):
            total += v
    return total


def series_of(metrics: dict, label: str, val: str) -> list[str]:
    """Names of the samples that carry ``label=val`` (one per series)."""
    return [name for fam in metrics.values() for name, lab, _ in fam if lab.get(label) == val]


def test_health_ready_flips_when_the_snapshot_says_ready():
    server = MetricsServer("127.0.0.1", 0).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert get(base + "/health/live")[0] == 200           # starting: live, not ready
        status, body = get(base + "/health/ready")
        assert status == 503 and "starting" in json.loads(body)["reason"]
        server.update({"health": {"live": True, "ready": False, "reason": "no worker registered"}}, {})
        status, body = get(base + "/health/ready")
        assert status == 503 and json.loads(body)["reason"] == "no worker registered"
        assert get(base + "/v2/health/ready")[0] == 503 and get(base + "/v2/health/live")[0] == 200
        server.update({"health": {"live": True, "ready": True, "workers": 2}}, {})
        assert get(base + "/health/ready") == (200, json.dumps({"live": True, "ready": True, "workers": 2}))
        assert get(base + "/v2/health/ready") == get(base + "/health/ready")  # Triton's paths
        server.latest = (server.latest[0], {}, time.monotonic() - 60)  # the broker loop stopped publishing
        assert get(base + "/health/live")[0] == 503 and get(base + "/health/ready")[0] == 503
        assert get(base + "/v2/health/live")[0] == 503 and get(base + "/v2/health/ready")[0] == 503
        assert get(base + "/nothing")[0] == 404
    finally:
        server.stop()


@pytest.fixture
def metrics_cluster(make_cluster):
    port = free_port()
    sup = make_cluster(cluster={"metrics_port": port, "metrics_model_histograms": 1})
    return sup.config, port


@pytest.mark.processes
def test_metrics_expose_the_documented_names_with_sane_values(metrics_cluster):
    cfg, port = metrics_cluster
    # the next snapshot says ready
    wait_until(lambda: get(f"http://127.0.0.1:{port}/health/ready")[0] == 200, 10, "/health/ready to answer 200")
    assert get(f"http://127.0.0.1:{port}/health/live")[0] == 200
    with Client(cfg.frontend, timeout=30) as client:
        models = sorted(m["model_id"] for m in client.list_models())[:2]
        rep = run_loadtest(client, LoadSpec(models=models + ["no_such_model"], concurrency=3, requests=15, batch=3))
    ok_by_model = {m: s["ok"] for m, s in rep["per_model"].items()}
    unknown = rep["errors"].get("unknown_model", 0)
    assert unknown >= 1 and sum(ok_by_model.values()) == rep["ok"] == 15 - unknown

    def caught_up() -> dict | None:  # at most one snapshot period behind
        m = scrape(port)
        return m if (value(m, "lipsync_request_success", "_total") == rep["ok"]
                     and value(m, "lipsync_request_failure", "_total", model="", code="unknown_model") == unknown) \
            else None

    m = wait_until(caught_up, 10, f"the scraped counters to reach {rep['ok']} ok and {unknown} unknown_model")

    names = set(m)
    missing = documented() - names - GPU_ONLY  # (GPU series: test_gpu_series_come_from_the_workers_stats)
    assert not missing, f"documented but not exposed: {sorted(missing)}"
    undocumented = {n for n in names if n.startswith("lipsync_")} - documented()
    assert not undocumented, f"exposed but not in docs/METRICS.md: {sorted(undocumented)}"

    busiest = sorted(models, key=lambda mid: (-ok_by_model[mid], mid))[0]
    for model in models:
        ok = ok_by_model[model]
        assert value(m, "lipsync_request_success", "_total", model=model) == ok
        assert value(m, "lipsync_frames_generated", "_total", model=model) == 3 * ok
        for hist in ("lipsync_model_request_duration_seconds", "lipsync_model_queue_duration_seconds",
                     "lipsync_model_compute_duration_seconds"):
            if model != busiest:  # metrics_model_histograms: 1 -> the busiest model only
                assert value(m, hist, "_count", model=model) == 0
                continue
            assert value(m, hist, "_count", model=model) == ok
            # (a request dispatched on arrival waited 0 s in the queue)
            assert value(m, hist, "_sum", model=model) >= (0 if "queue" in hist else 1e-6)
            buckets = [(float(lab["le"]), v) for name, lab, v in m[hist]
                       if name == hist + "_bucket" and lab["model"] == model]
            counts = [v for _, v in sorted(buckets)]
            assert counts == sorted(counts) and counts[-1] == ok  # cumulative, +Inf = count
        if ok:
            assert value(m, "lipsync_model_loads", "_total", model=model) >= 1
            assert value(m, "lipsync_request_cold_start", "_total", model=model) >= 1
        assert value(m, "lipsync_queue_depth", model=model) == 0
    for hist in ("lipsync_request_duration_seconds", "lipsync_queue_duration_seconds",
                 "lipsync_compute_duration_seconds"):  # cluster-wide: every model's requests
        assert value(m, hist, "_count") == rep["ok"]
        assert all(not lab for name, lab, v in m[hist] if name != hist + "_bucket")
    assert value(m, "lipsync_request_failure", "_total", model="", code="unknown_model") == unknown
    req = value(m, "lipsync_request_duration_seconds", "_sum") / rep["ok"]
    comp = value(m, "lipsync_compute_duration_seconds", "_sum") / rep["ok"]
    assert 0 < comp <= req  # compute is a part of the whole request
    assert value(m, "lipsync_model_load_duration_seconds", "_count") >= 1
    # Every catalog model has its info series with its version; an idle one has nothing else.
    versions = {mm["model_id"]: mm["version"] for mm in Client(cfg.frontend, timeout=10).list_models()}
    info = {lab["model"]: lab["version"] for _, lab, v in m["lipsync_model_info"] if v == 1}
    assert info == versions and len(info) == 3
    idle = (set(versions) - set(models)).pop()
    assert series_of(m, "model", idle) == ["lipsync_model_info"]
    for model in models:  # documented: 11 + one per error code, + 57 for a model with histograms
        codes = [lab["code"] for _, lab, _ in m["lipsync_request_failure"] if lab["model"] == model]
        assert len(series_of(m, "model", model)) == 11 + len(codes) + (57 if model == busiest else 0)
    assert value(m, "lipsync_workers") == 2
    for w in ("w0-cpu", "w1-cpu"):
        assert value(m, "lipsync_worker_up", worker=w) == 1
        (labels,) = [lab for _, lab, _ in m["lipsync_worker_info"] if lab["worker"] == w]
        assert "pid" not in labels and labels["provider"] == "cpu" and labels["gpu"] == ""
        assert 0 <= value(m, "lipsync_models_loaded", worker=w) <= 3
        assert value(m, "lipsync_worker_model_slots", worker=w) == 3
        assert value(m, "lipsync_worker_credits", worker=w) == 2
        assert value(m, "lipsync_worker_memory_budget_bytes", worker=w) == 4 * 2**30
        used, free = (value(m, f"lipsync_worker_memory_{k}_bytes", worker=w) for k in ("used", "free"))
        assert used > 0 and used + free == 4 * 2**30, "the worker's measured memory, as its stats say"
        assert len(series_of(m, "worker", w)) == 12, "documented: 12 series per CPU worker"
        assert value(m, "lipsync_worker_restarts", "_total", worker=w) == 0
    assert value(m, "lipsync_broker_ready") == 1 and value(m, "lipsync_broker_up") == 1
    assert value(m, "lipsync_models_configured") == 3


def test_gpu_series_come_from_the_workers_stats():
    """A GPU worker's NVML readings (worker/gpu_monitor.py, in its stats) become per-worker gauges;
    a CPU worker has none of them."""
    server = MetricsServer("127.0.0.1", 0).start()
    try:
        gpu_worker = {"worker": "w0-gpu0", "gpu": 0, "device": "GPU-1234", "provider": "cuda",
                      "gpu_memory_used_bytes": 3 * 2**30, "gpu_device_memory_used_bytes": 5 * 2**30,
                      "gpu_memory_total_bytes": 141 * 2**30, "gpu_utilization": 0.42}
        server.update({"workers": [gpu_worker, {"worker": "w1-cpu", "provider": "cpu"}], "models": []}, {})
        m = scrape(server.port)
        assert value(m, "lipsync_worker_gpu_memory_used_bytes", worker="w0-gpu0") == 3 * 2**30
        assert value(m, "lipsync_worker_gpu_device_memory_used_bytes", worker="w0-gpu0") == 5 * 2**30
        assert value(m, "lipsync_worker_gpu_memory_total_bytes", worker="w0-gpu0") == 141 * 2**30
        assert value(m, "lipsync_worker_gpu_utilization", worker="w0-gpu0") == 0.42
        assert not [lab for fam in GPU_ONLY for _, lab, _ in m.get(fam, []) if lab["worker"] == "w1-cpu"]
        (labels,) = [lab for _, lab, _ in m["lipsync_worker_info"] if lab["worker"] == "w0-gpu0"]
        assert labels == {"worker": "w0-gpu0", "host": "", "gpu": "0", "device": "GPU-1234", "provider": "cuda"}
        assert GPU_ONLY <= documented()
    finally:
        server.stop()


def test_half_open_connections_hold_a_bounded_number_of_threads(monkeypatch):
    """Issue 12: 400 half-open requests held 410 threads. Now at most MAX_CONNECTIONS are served
    at once (the rest answered 503 at once), and each is cut at its deadline."""
    monkeypatch.setattr(metrics_module, "CONNECTION_DEADLINE_S", 1.5)
    server = MetricsServer("127.0.0.1", 0).start()
    conns: list[socket.socket] = []
    try:
        before = threading.active_count()
        for _ in range(100):
            c = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            c.sendall(b"GET /metr")  # and never the rest
            conns.append(c)
        # the server accepts them one by one: the first MAX_CONNECTIONS get a thread, the rest a 503
        refused = [c for c in conns[metrics_module.MAX_CONNECTIONS:] if c.recv(100).startswith(b"HTTP/1.0 503")]
        assert len(refused) == 100 - metrics_module.MAX_CONNECTIONS
        assert server._httpd.open_connections() == metrics_module.MAX_CONNECTIONS
        assert threading.active_count() <= before + metrics_module.MAX_CONNECTIONS
        wait_until(lambda: server._httpd.open_connections() == 0, 5, "the half-open connections cut")
        assert server._httpd.open_connections() == 0  # every half-open one cut at its deadline
        for c in conns[:metrics_module.MAX_CONNECTIONS]:  # closed by the server (perhaps after a 400)
            while c.recv(4096):
                pass
        assert get(f"http://127.0.0.1:{server.port}/health/live")[0] == 200  # and it serves again
    finally:
        for c in conns:
            c.close()
        server.stop()


def test_the_metrics_port_follows_the_loopback_rule():
    base = {"cluster": {"metrics_port": 5558}}
    assert metrics_bind(load_config(base)) == ("127.0.0.1", 5558)
    with pytest.raises(OSError, match=r"refusing to serve metrics on http://0.0.0.0:5558 \(server.host\) without CurveZMQ"):
        metrics_bind(load_config({**base, "server": {"host": "0.0.0.0"}}))
    # named explicitly, or on a CurveZMQ cluster (meant to be reached from other hosts): allowed
    assert metrics_bind(load_config({"server": {"host": "0.0.0.0"},
                                     "cluster": {"metrics_port": 5558, "metrics_host": "0.0.0.0"}})) == ("0.0.0.0", 5558)
    assert metrics_bind(load_config({**base, "server": {"host": "10.1.2.3"}, "security": {"curve": True}}))[0] == "10.1.2.3"
    server = MetricsServer.from_config(load_config({"cluster": {"metrics_port": free_port(),
                                                                "metrics_model_histograms": 4}})).start()
    try:
        assert server.host == "127.0.0.1" and server.model_histograms == 4
        assert get(f"http://127.0.0.1:{server.port}/health/live")[0] == 200
    finally:
        server.stop()
