"""The GPU path, checked on a machine without one: what each worker is given and asks for."""
from __future__ import annotations

import os
import subprocess
import sys

from lipsync_cluster.config import load_config
from lipsync_cluster.supervisor import Supervisor
from lipsync_cluster.worker.sessions import SessionOptions, make_session, providers_for


def plan(gpus: int, per_gpu: int):
    cfg = load_config({"cluster": {"gpus": gpus, "per_gpu": per_gpu}})
    sup = Supervisor(cfg, gpus, per_gpu)
    sup._plan("/nonexistent/effective-config.yaml")
    return sup.children[0], sup.children[1:]


def test_each_gpu_worker_is_pinned_to_its_gpu():
    broker, workers = plan(gpus=4, per_gpu=6)
    assert broker.name == "broker" and "CUDA_VISIBLE_DEVICES" not in broker.argv
    assert len(workers) == 24
    by_gpu: dict[str, int] = {}
    for w in workers:
        visible = w.env["CUDA_VISIBLE_DEVICES"]
        by_gpu[visible] = by_gpu.get(visible, 0) + 1
        # the pinned GPU is device 0 inside the worker
        assert w.argv[w.argv.index("--gpu") + 1] == "0"
        assert w.name.endswith(f"-gpu{visible}")
    assert by_gpu == {"0": 6, "1": 6, "2": 6, "3": 6}
    assert len({w.name for w in workers}) == 24


def test_cpu_workers_see_no_gpu_and_ask_for_none():
    _, workers = plan(gpus=0, per_gpu=3)
    assert len(workers) == 3
    for w in workers:
        assert w.env["CUDA_VISIBLE_DEVICES"] == "" and "--gpu" not in w.argv
        assert w.argv[w.argv.index("--workers-on-host") + 1] == "3"


def test_providers_cuda_arena_bounded_by_budget_cpu_alone():
    cuda = providers_for(SessionOptions(gpu=0, gpu_mem_limit_bytes=4 * 2**30))
    name, options = cuda[0]
    assert name == "CUDAExecutionProvider" and cuda[1] == "CPUExecutionProvider"
    assert options["device_id"] == 0 and options["gpu_mem_limit"] == 4 * 2**30
    assert options["arena_extend_strategy"] == "kSameAsRequested"
    assert providers_for(SessionOptions()) == ["CPUExecutionProvider"]


def test_cpu_session_uses_only_the_cpu_provider_and_prints_nothing(demo_dir):
    session = make_session(demo_dir / "demo_ada" / "model.onnx", SessionOptions(intra_op_threads=1))
    assert session.get_providers() == ["CPUExecutionProvider"]
    # a whole worker start on a CPU machine: no CUDA error lines on stderr
    code = ("from lipsync_cluster.worker.sessions import make_session, SessionOptions;"
            f"make_session({str(demo_dir / 'demo_ada' / 'model.onnx')!r}, SessionOptions(intra_op_threads=1))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0
    assert "CUDA" not in out.stderr and "cuda" not in out.stderr.lower(), out.stderr
