"""bench/gpu.py cannot rot: its CPU smoke mode (`--cpu --quick`) runs every code path but NVML --
raw ONNX Runtime fp32/fp16 with and without IO binding and fp16's error, a real cluster's
end-to-end cell with per-stage CPU, a real-time StreamSession level, the memory readings -- and
writes its JSON and markdown report into the folder it is given."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_benchmark_smoke_run_writes_its_report(demo_dir, tmp_path):
    out = tmp_path / "report"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--cpu", "--quick", "--out", str(out),
                          "--models", str(demo_dir)], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "gpu.json").read_text())
    assert report["env"]["gpu"] is None and report["env"]["nvml"] == "not read (--cpu)"
    timed = [r for r in report["raw"]["rows"] if "fps" in r]
    assert {(r["precision"], r["engine"], r["mode"]) for r in timed} == {
        ("fp32", "cpu", "plain"), ("fp32", "cpu+bind", "bind_cpu"), ("fp16", "cpu", "plain"), ("fp16", "cpu+bind", "bind_cpu")}
    assert all(r["fps"] > 0 and r["gpu_util"] is None for r in timed)
    assert report["raw"]["notes"] == []  # the bound runs agreed with session.run
    error = report["raw"]["fp16_error"]
    assert error["within_bound"] is True and error["max_abs"] > 0
    (row,) = report["cluster"]
    (cell,) = row["cells"]
    assert row["workers"] == 1 and cell["batch"] == 1 and cell["fps"] > 0 and cell["errors"] == 0
    assert set(cell["stage_ms_per_frame"]) == {"features", "inputs", "inference", "composite", "encode"}
    assert cell["host_cpu_ms_per_frame"] > 0 and cell["gpu_util"] is None
    assert len(row["realtime"]["levels"]) == 1 and row["realtime"]["levels"][0]["sessions"] == 1
    (worker,) = row["memory"]["workers"]
    assert (worker["engine"], worker["precision"], worker["provider"]) == ("cpu", "fp32", "cpu")
    assert row["memory"]["models"] and all(m["memory_bytes"] > 0 for m in row["memory"]["models"])
    md = (out / "gpu.md").read_text()
    assert "## GPU: avatars per GPU" in md and "| fp16 | cpu+bind (bind_cpu) |" in md
    assert "| 1 | 1 | " in md and "sessions sustained" in md
