"""`lipsync-cluster loadtest`: closed and open loop runs produce the report; errors counted by code."""
from __future__ import annotations

import json
from urllib.parse import urlparse

import pytest
from click.testing import CliRunner

from lipsync_cluster.cli import main
from lipsync_cluster.tools.loadtest import zipf_weights

REPORT_KEYS = {"requests", "ok", "errors", "requests_per_s", "frames_per_s", "latency_ms", "cold_loads",
               "hit_ratio", "per_model", "timeline", "duration_s", "config"}


@pytest.fixture(scope="module")
def cluster(demo_dir, tmp_path_factory):
    from conftest import cluster_config
    from lipsync_cluster.config import load_config
    from lipsync_cluster.supervisor import Supervisor

    cfg = load_config(cluster_config(demo_dir, tmp_path_factory.mktemp("lt")))
    sup = Supervisor(cfg, cfg.cluster.gpus, cfg.cluster.per_gpu)
    sup.start()
    try:
        sup.wait_ready(timeout_s=120)
        yield cfg
    finally:
        sup.stop(drain_timeout_s=10)


def run(*args) -> tuple[int, str, dict]:
    result = CliRunner().invoke(main, ["loadtest", "-q", "--json", "-", *args])
    report = json.loads(result.stdout) if result.stdout.strip().startswith("{") else {}
    return result.exit_code, result.output, report


def test_zipf_weights():
    w = zipf_weights(4, 1.0)
    assert w.sum() == pytest.approx(1.0) and w[0] / w[1] == pytest.approx(2.0) and w[0] / w[3] == pytest.approx(4.0)
    assert list(zipf_weights(3, None)) == pytest.approx([1 / 3] * 3)


@pytest.mark.processes
def test_closed_loop_report_and_plot(cluster, tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    result = CliRunner().invoke(main, ["loadtest", "-q", "--broker", cluster.frontend, "--model-count", "3",
                                       "--zipf", "1", "-c", "3", "-n", "24", "--batch", "2",
                                       "--json", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert "req/s" in result.stdout and "per model" in result.stdout
    rep = json.loads(out.read_text())
    assert REPORT_KEYS <= set(rep)
    assert rep["requests"] == rep["ok"] == 24 and rep["errors"] == {}
    assert rep["config"]["mode"] == "closed" and rep["config"]["concurrency"] == 3
    assert rep["frames_per_s"] == pytest.approx(2 * rep["requests_per_s"])
    lat = rep["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert 1 <= rep["cold_loads"] <= 6 and 0 < rep["hit_ratio"] < 1
    assert sum(m["requests"] for m in rep["per_model"].values()) == 24
    assert sum(row["ok"] for row in rep["timeline"]) == 24
    assert len(rep["load_events"]) == rep["cold_loads"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.processes
def test_open_loop_counts_errors_by_code(cluster):
    code, output, rep = run("--broker", cluster.frontend, "--models", "demo_ada,no_such_model", "--rate", "20",
                            "--duration", "1.5", "--batch", "1", "--format", "raw")
    assert code == 0, output
    assert REPORT_KEYS <= set(rep)
    assert rep["config"]["mode"] == "open"
    unknown = rep["per_model"]["no_such_model"]
    assert unknown["ok"] == 0 and unknown["errors"] == {"unknown_model": unknown["requests"]} and unknown["requests"] > 0
    assert rep["errors"] == {"unknown_model": unknown["requests"]}
    assert rep["per_model"]["demo_ada"]["ok"] == rep["ok"] > 0
    assert 10 <= rep["requests"] <= 60  # ~30 Poisson arrivals


@pytest.mark.processes
def test_seed_aliases_and_errors(cluster):
    port = urlparse(cluster.frontend).port
    code, output, rep = run("--ports", str(port), "--model-names", "demo_ada", "--num-requests", "3")
    assert code == 0, output
    assert rep["ok"] == 3 and rep["config"]["models"] == ["demo_ada"]
    code, output, _ = run("--models", "no_such_model", "-n", "2", "--broker", cluster.frontend)
    assert code == 1 and "no request succeeded" in output


def test_no_broker_is_a_clear_error():
    from conftest import free_port

    result = CliRunner().invoke(main, ["loadtest", "-q", "--broker", f"tcp://127.0.0.1:{free_port()}", "-n", "1", "--timeout", "1"])
    assert result.exit_code == 1 and "no broker answered" in result.output


@pytest.mark.processes
def test_records_say_when_each_request_was_handed_to_the_client(cluster):
    # bench/admission.py splits a refusal's latency at this moment: the driver's lag behind its
    # schedule before it, the client library, the broker and the loopback after it.
    from lipsync_cluster.client import Client
    from lipsync_cluster.tools.loadtest import LoadSpec, _Run

    with Client(cluster.frontend, timeout=30) as client:
        r = _Run(client, LoadSpec(models=["demo_ada", "no_such_model"], rate=20.0, duration=1.0, batch=1,
                                  format="raw"), lambda done: None)
        r.run()
    assert r.records and any(rec.code == "unknown_model" for rec in r.records)
    for rec in r.records:
        assert rec.sent <= rec.submitted <= rec.done, rec
