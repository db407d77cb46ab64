"""`lipsync-cluster stats`: one snapshot from a running cluster (JSON and rendered), and the clear
error when no broker answers."""
from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from conftest import free_port
from waiting import wait_until
from lipsync_cluster.cli import main
from lipsync_cluster.client import Client
from lipsync_cluster.tools.loadtest import LoadSpec, run_loadtest


@pytest.fixture
def busy_cluster(make_cluster):  # tests using it carry the `processes` marker
    sup = make_cluster()
    cfg = sup.config
    with Client(cfg.frontend, timeout=30) as client:
        models = sorted(m["model_id"] for m in client.list_models())[:2]
        rep = run_loadtest(client, LoadSpec(models=models, concurrency=2, requests=8, batch=2))
    assert rep["ok"] == 8, rep["errors"]
    return cfg, models


def _snapshot(cfg, *extra) -> dict:
    # A snapshot published just before the requests finished may not count them yet: wait for one that does.
    def counted() -> dict | None:
        result = CliRunner().invoke(main, ["stats", "--once", "--json", "--broker-stats", cfg.stats_endpoint,
                                           "--timeout", "5", *extra])
        assert result.exit_code == 0, result.output
        snap = json.loads(result.stdout)
        return snap if snap.get("totals", {}).get("ok", 0) >= 8 else None

    return wait_until(counted, 10, "a stats snapshot that counts the 8 requests")


@pytest.mark.processes
def test_once_json_shows_workers_and_models(busy_cluster):
    cfg, models = busy_cluster
    snap = _snapshot(cfg)
    assert snap["source"] == "pub"
    workers = snap["workers"]
    assert len(workers) == 2
    for w in workers:
        assert w["host"] and w["pid"] > 0 and w["credits"] >= 1 and w["max_models"] == 3
        assert "restarts" in w and "total_memory_bytes" in w and "max_memory_bytes" in w
    by_id = {m["model_id"]: m for m in snap["models"]}
    used = sum(by_id[m]["stats"]["requests"] for m in models)
    assert used == 8
    for m in models:
        entry = by_id[m]
        s = entry["stats"]
        if s["requests"]:
            assert entry["loaded_on"], entry
            assert s["ok"] == s["requests"] and s["frames"] == 2 * s["requests"]
            assert s["latency_p50_ms"] > 0 and s["latency_p99_ms"] >= s["latency_p50_ms"]
            assert s["loads"] >= 1 and s["load_ms_avg"] > 0
            assert "requests_per_s" in s and "frames_per_s" in s and "last_used_s" in s
    assert snap["totals"]["ok"] == 8 and snap["totals"]["frames"] == 16
    assert snap["health"]["ready"] is True
    assert any(e.get("event") == "loaded" for e in snap["events"])


@pytest.mark.processes
def test_once_rendered_names_workers_and_models(busy_cluster):
    cfg, models = busy_cluster
    _snapshot(cfg)
    result = CliRunner().invoke(main, ["stats", "--once", "--broker-stats", cfg.stats_endpoint, "--timeout", "5"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for name in ("Workers", "Models", "Recent model events", "w0-cpu", "w1-cpu", *models):
        assert name in out, (name, out)


@pytest.mark.processes
def test_falls_back_to_the_client_endpoint_and_filters_one_model(busy_cluster):
    cfg, models = busy_cluster
    silent = f"tcp://127.0.0.1:{free_port()}"  # nothing publishes here
    result = CliRunner().invoke(main, ["stats", models[0], "--once", "--json", "--broker-stats", silent,
                                       "--broker", cfg.frontend, "--timeout", "1"])
    assert result.exit_code == 0, result.output
    snap = json.loads(result.stdout)
    assert snap["source"] == "model_stats"
    assert [m["model_id"] for m in snap["models"]] == [models[0]]
    assert len(snap["workers"]) == 2


def test_says_clearly_when_no_broker_answers():
    stats_ep, broker_ep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = CliRunner().invoke(main, ["stats", "--once", "--json", "--broker-stats", stats_ep,
                                       "--broker", broker_ep, "--timeout", "0.5"])
    assert result.exit_code == 1
    assert "no broker answered" in result.stderr and stats_ep in result.stderr and broker_ep in result.stderr
    assert result.stdout == ""
    assert time.monotonic() - started < 5
