"""The broker's Prometheus exporter and HTTP health checks (docs/METRICS.md)."""
from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port
from lipsync_cluster.broker.metrics import MetricsServer
from lipsync_cluster.client import Client
from lipsync_cluster.tools.loadtest import LoadSpec, run_loadtest

DOC = Path(__file__).resolve().parents[1] / "docs" / "METRICS.md"


def documented() -> set[str]:
    """Metric family names in the tables of docs/METRICS.md (first column, in backticks; a
    counter's family is its name without ``_total``, as the Prometheus parser reports it)."""
    names = re.findall(r"^\| `(lipsync_[a-z_]+)`", DOC.read_text(), flags=re.M)
    return {n.removesuffix("_total") for n in names}


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
        server.update({"health": {"live": True, "ready": True, "workers": 2}}, {})
        assert get(base + "/health/ready") == (200, json.dumps({"live": True, "ready": True, "workers": 2}))
        server.latest = (server.latest[0], {}, time.monotonic() - 60)  # the broker loop stopped publishing
        assert get(base + "/health/live")[0] == 503 and get(base + "/health/ready")[0] == 503
        assert get(base + "/nothing")[0] == 404
    finally:
        server.stop()


@pytest.fixture
def metrics_cluster(make_cluster):
    port = free_port()
    sup = make_cluster(cluster={"metrics_port": port})
    return sup.config, port


def test_metrics_expose_the_documented_names_with_sane_values(metrics_cluster):
    cfg, port = metrics_cluster
    deadline = time.monotonic() + 10
    while get(f"http://127.0.0.1:{port}/health/ready")[0] != 200:  # the next snapshot says ready
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.2)
    assert get(f"http://127.0.0.1:{port}/health/live")[0] == 200
    with Client(cfg.frontend, timeout=30) as client:
        models = sorted(m["model_id"] for m in client.list_models())[:2]
        rep = run_loadtest(client, LoadSpec(models=models + ["no_such_model"], concurrency=3, requests=15, batch=3))
    ok_by_model = {m: s["ok"] for m, s in rep["per_model"].items()}
    unknown = rep["errors"].get("unknown_model", 0)
    assert unknown >= 1 and sum(ok_by_model.values()) == rep["ok"] == 15 - unknown

    deadline = time.monotonic() + 10
    while True:  # at most one snapshot period behind
        m = scrape(port)
        if value(m, "lipsync_request_success", "_total") == rep["ok"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)

    names = set(m)
    missing = documented() - names
    assert not missing, f"documented but not exposed: {sorted(missing)}"
    undocumented = {n for n in names if n.startswith("lipsync_")} - documented()
    assert not undocumented, f"exposed but not in docs/METRICS.md: {sorted(undocumented)}"

    for model in models:
        ok = ok_by_model[model]
        assert value(m, "lipsync_request_success", "_total", model=model) == ok
        assert value(m, "lipsync_frames_generated", "_total", model=model) == 3 * ok
        for hist in ("lipsync_request_duration_seconds", "lipsync_queue_duration_seconds",
                     "lipsync_compute_duration_seconds"):
            if ok:
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
    assert value(m, "lipsync_request_failure", "_total", model="", code="unknown_model") == unknown
    req = value(m, "lipsync_request_duration_seconds", "_sum", model=models[0]) / max(1, ok_by_model[models[0]])
    comp = value(m, "lipsync_compute_duration_seconds", "_sum", model=models[0]) / max(1, ok_by_model[models[0]])
    assert 0 < comp <= req  # compute is a part of the whole request
    assert value(m, "lipsync_model_load_duration_seconds", "_count") >= 1
    assert value(m, "lipsync_workers") == 2
    for w in ("w0-cpu", "w1-cpu"):
        assert value(m, "lipsync_worker_up", worker=w) == 1
        assert 0 <= value(m, "lipsync_models_loaded", worker=w) <= 3
        assert value(m, "lipsync_worker_model_slots", worker=w) == 3
        assert value(m, "lipsync_worker_credits", worker=w) == 2
        assert value(m, "lipsync_worker_memory_budget_bytes", worker=w) == 4 * 2**30
        assert value(m, "lipsync_worker_restarts", "_total", worker=w) == 0
    assert value(m, "lipsync_broker_ready") == 1 and value(m, "lipsync_broker_up") == 1
    assert value(m, "lipsync_models_configured") == 3
