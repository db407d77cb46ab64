"""The GPU engine a worker's UNets run on (worker/engine.py): chosen from what was asked and what
the installed ONNX Runtime has (provider lists as `get_available_providers()` gives them, checked
here without a GPU), the providers each engine opens a session with, and the fallback that says
which engine a worker really uses (log, stats `engine` / `engine_note`)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid

import pytest

from lipsync_cluster import gpu_select
from lipsync_cluster.common.catalog import Catalog
from lipsync_cluster.common.frame_store import FrameStore
from lipsync_cluster.worker.cache import ModelCache
from lipsync_cluster.worker.engine import (EnginePlan, EngineState, plan_engine, providers_for_engine,
                                           session_matches)
from lipsync_cluster.worker.sessions import SessionOptions

CPU_BUILD = ["AzureExecutionProvider", "CPUExecutionProvider"]
GPU_BUILD = ["CUDAExecutionProvider", "CPUExecutionProvider"]
TRT_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_the_plan_follows_what_the_runtime_has():
    # plain CUDA: what was asked, nothing to fall back to
    assert plan_engine("cuda", True, GPU_BUILD, "1.20.1") == EnginePlan("cuda")
    # CUDA graphs from 1.17 on (one graph per batch size), else plain CUDA with the reason
    assert plan_engine("cuda_graph", True, GPU_BUILD, "1.17.0") == EnginePlan("cuda_graph", ("cuda",))
    old = plan_engine("cuda_graph", True, GPU_BUILD, "1.16.3")
    assert old.engine == "cuda" and old.fallbacks == () and "need onnxruntime >= 1.17" in old.note and "1.16.3" in old.note
    # TensorRT where the build has it, with CUDA graphs then CUDA behind it
    assert plan_engine("tensorrt", True, TRT_BUILD, "1.22.0") == EnginePlan("tensorrt", ("cuda_graph", "cuda"))
    assert plan_engine("tensorrt", True, TRT_BUILD, "1.16.0") == EnginePlan("tensorrt", ("cuda",))
    no_trt = plan_engine("tensorrt", True, GPU_BUILD, "1.22.0")
    assert (no_trt.engine, no_trt.fallbacks) == ("cuda_graph", ("cuda",))
    assert "no TensorrtExecutionProvider" in no_trt.note and "CUDAExecutionProvider" in no_trt.note
    # auto: the best CUDA engine, never TensorRT (its first build of a UNet takes minutes)
    assert plan_engine("auto", True, TRT_BUILD, "1.22.0") == EnginePlan("cuda_graph", ("cuda",))
    assert plan_engine("auto", True, GPU_BUILD, "1.16.0").engine == "cuda"
    assert plan_engine("auto", True, GPU_BUILD, "1.23.0.dev20261201").engine == "cuda_graph"


def test_without_a_gpu_or_a_cuda_build_the_plan_is_the_cpu():
    for asked in ("auto", "cuda"):
        assert plan_engine(asked, False, TRT_BUILD, "1.22.0") == EnginePlan("cpu")
    plan = plan_engine("cuda_graph", False, GPU_BUILD, "1.22.0")
    assert plan.engine == "cpu" and "needs a GPU" in plan.note
    plan = plan_engine("cuda", True, CPU_BUILD, "1.22.0")  # asked for a GPU, onnxruntime (CPU) installed
    assert plan.engine == "cpu" and "no CUDAExecutionProvider" in plan.note and "AzureExecutionProvider" in plan.note
    with pytest.raises(ValueError, match="onnx.gpu_engine: 'trt' is not one of auto, cuda, cuda_graph, tensorrt"):
        plan_engine("trt", True, TRT_BUILD, "1.22.0")


def test_providers_per_engine():
    cuda = {"device_id": 0, "gpu_mem_limit": 2**30}
    assert providers_for_engine("cpu", cuda) == ["CPUExecutionProvider"]
    assert providers_for_engine("cuda", cuda) == [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
    graph = providers_for_engine("cuda_graph", cuda)
    assert graph[0] == ("CUDAExecutionProvider", {**cuda, "enable_cuda_graph": True}) and "enable_cuda_graph" not in cuda
    trt = providers_for_engine("tensorrt", cuda, precision="fp16", trt_cache_dir="/var/cache/trt")
    name, options = trt[0]
    assert name == "TensorrtExecutionProvider" and trt[1] == ("CUDAExecutionProvider", cuda)
    assert options["trt_fp16_enable"] is True and options["trt_engine_cache_path"] == "/var/cache/trt"
    assert providers_for_engine("tensorrt", cuda)[0][1]["trt_engine_cache_enable"] is False
    with pytest.raises(ValueError, match="unknown engine"):
        providers_for_engine("rocm", cuda)


def test_a_session_is_on_its_engine_only_if_onnx_runtime_gave_that_provider():
    assert session_matches("cuda_graph", GPU_BUILD) and session_matches("cuda", GPU_BUILD)
    assert not session_matches("cuda", ["CPUExecutionProvider"])
    assert session_matches("tensorrt", TRT_BUILD) and not session_matches("tensorrt", GPU_BUILD)
    assert session_matches("cpu", ["CPUExecutionProvider"])


def test_the_engine_state_falls_back_and_says_why(caplog):
    with caplog.at_level(logging.WARNING, "lipsync_cluster.worker.engine"):
        state = EngineState(plan_engine("tensorrt", True, TRT_BUILD, "1.22.0"), "tensorrt")
        assert state.engine == "tensorrt" and state.stats() == {"engine": "tensorrt", "engine_requested": "tensorrt",
                                                                "engine_note": ""}
        assert state.fall_back("tensorrt", "libnvinfer.so.10: cannot open shared object file") == "cuda_graph"
        assert state.fall_back("cuda_graph", "capture failed") == "cuda"
        assert state.fall_back("cuda", "out of memory") is None  # nothing left: the load fails as it is
    stats = state.stats()
    assert stats["engine"] == "cuda"
    assert stats["engine_note"] == ("tensorrt failed: libnvinfer.so.10: cannot open shared object file; using "
                                    "cuda_graph; cuda_graph failed: capture failed; using cuda")
    assert "gpu engine fallback: tensorrt failed" in caplog.text


def test_a_worker_whose_engine_fails_loads_on_the_next_and_reports_it(demo_dir):
    """A real load: the plan's first engine cannot open a session here (it needs a GPU), the
    model loads on the next one, and the cache's later loads start there."""
    store = FrameStore(f"test-{uuid.uuid4().hex[:8]}")
    state = EngineState(EnginePlan("cuda_graph", ("cpu",)), "cuda_graph")
    catalog = Catalog(str(demo_dir))
    cache = ModelCache(catalog.resolve, store, max_models=2, max_memory_bytes=4 * 2**30,
                       session_options=SessionOptions(intra_op_threads=1), engine=state)
    try:
        ids = sorted(catalog.packages())
        with cache.use(ids[0]) as (model, loaded_now, _):
            assert loaded_now and model.session.get_providers() == ["CPUExecutionProvider"]
            assert model.runner.mode == "plain"
        assert state.engine == "cpu" and state.candidates() == ["cpu"]
        assert "cuda_graph failed: RuntimeError: engine cuda_graph needs a GPU" in state.stats()["engine_note"]
        assert cache.stats()["models"][0]["runner"] == "plain"
        with cache.use(ids[1]):
            pass
        assert state.stats()["engine_note"].count("failed") == 1  # the second load went straight to the CPU
    finally:
        cache.close()
        store.cleanup()


@pytest.mark.skipif(not gpu_select.probe_physical(), reason="needs a GPU (bench/gpu_check.sh runs it on one)")
def test_on_a_gpu_bound_runs_and_graphs_match_the_cpu_and_fp16_is_within_its_bound(demo_dir):
    """On a real GPU: IO binding into device buffers and CUDA graphs (capture, then replays) give
    what the CPU provider gives (within TF32's rounding), without falling back; fp16 on the GPU --
    where its arithmetic really is fp16 -- stays within the stated bound of fp32 on the CPU."""
    device = gpu_select.probe_physical()[0]
    code = f"""
import dataclasses, json
import numpy as np
from lipsync_cluster.common.model_package import bind_unet_io
from lipsync_cluster.worker.binding import DeviceBuffers, UnetRunner, runner_mode
from lipsync_cluster.worker.precision import model_source, mouth_error, within_bound
from lipsync_cluster.worker.sessions import SessionOptions, make_session
path = {str(demo_dir / "demo_ada" / "model.onnx")!r}
rng = np.random.default_rng(0)
vis = rng.uniform(0, 1, (5, 6, 320, 320)).astype(np.float32)
aud = rng.uniform(0, 1, (5, 32, 16, 16)).astype(np.float32)
cpu = make_session(path, SessionOptions(intra_op_threads=1))
ref = UnetRunner(cpu, *bind_unet_io(cpu.get_inputs())).run(vis, aud)
opts, buffers, result = SessionOptions(gpu=0), DeviceBuffers(0), {{}}
for precision in ("fp32", "fp16"):
    for engine in ("cuda", "cuda_graph"):
        s = make_session(model_source(path, precision)[0], dataclasses.replace(opts, precision=precision), engine=engine)
        r = UnetRunner(s, *bind_unet_io(s.get_inputs()), mode=runner_mode(engine), buffers=buffers)
        outs = [r.run(vis, aud) for _ in range(6)] + [r.run(vis[:2], aud[:2])]
        result[precision + " " + engine] = dict(
            provider=s.get_providers()[0], mode=r.mode, note=r.note,
            max_vs_cpu=float(max(np.abs(o - ref[:len(o)]).max() for o in outs)),
            within=within_bound(mouth_error(ref, outs[-2])))
print(json.dumps(result))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": device.pin, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for name, r in result.items():
        assert r["provider"] == "CUDAExecutionProvider" and r["note"] == "", (name, r)
        assert r["mode"] == ("cuda_graph" if name.endswith("cuda_graph") else "bind_cuda"), (name, r)
        assert r["within"], (name, r)
        if name.startswith("fp32"):
            assert r["max_vs_cpu"] < 2e-2, (name, r)  # TF32 convolutions: ~1e-3 relative
