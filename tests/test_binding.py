"""The UNet runner (worker/binding.py): IO binding gives byte-identical results to session.run on
the CPU provider, a binding that disagrees with session.run is switched off (the plain path serves
and says why), and a worker's models report how they run."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from lipsync_cluster.common.model_package import bind_unet_io
from lipsync_cluster.worker.binding import CHECK_RUNS, UnetRunner, runner_mode
from lipsync_cluster.worker.precision import to_fp16


def _runner(path_or_bytes, mode: str, **kw) -> UnetRunner:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])
    visual, audio = bind_unet_io(session.get_inputs())
    return UnetRunner(session, visual, audio, mode, **kw)


def _inputs(batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0, 1, (batch, 6, 320, 320)).astype(np.float32),
            rng.standard_normal((batch, 32, 16, 16)).astype(np.float32))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_io_binding_on_the_cpu_is_byte_identical_to_session_run(demo_dir, precision):
    path = demo_dir / "demo_ada" / "model.onnx"
    source = str(path) if precision == "fp32" else to_fp16(path)
    plain, bound = _runner(source, "plain"), _runner(source, "bind_cpu", check=False)
    outs = []
    for batch in (1, 3, 1, 5):  # sizes change between runs, as chunked and mixed requests do
        visual, feats = _inputs(batch, seed=batch)
        a, b = plain.run(visual, feats), bound.run(visual, feats)
        assert a.shape == b.shape == (batch, 3, 320, 320) and b.dtype == np.float32
        assert np.array_equal(a, b)
        outs.append(b)
    # every bound run wrote into its own array: an earlier batch (still being composited on
    # another thread in a worker) is not overwritten by the next run
    assert not np.shares_memory(outs[0], outs[2])
    assert np.array_equal(outs[0], plain.run(*_inputs(1, seed=1)))
    assert bound.mode == "bind_cpu" and bound.note == ""
    # slices of a larger batch (the memory budget's chunks) bind as they are
    visual, feats = _inputs(4, seed=9)
    assert np.array_equal(bound.run(visual[2:], feats[2:]), plain.run(visual, feats)[2:])


def test_a_binding_that_disagrees_with_session_run_is_switched_off(demo_dir):
    runner = _runner(str(demo_dir / "demo_ada" / "model.onnx"), "bind_cpu")
    visual, feats = _inputs(2)
    good = runner.run(visual, feats)  # checked against session.run: agrees
    assert runner.mode == "bind_cpu" and runner._checked[2] == 1
    runner._bound = lambda v, f, b: np.zeros((b, 3, 320, 320), np.float32)  # a broken binding
    out = runner.run(visual, feats)
    assert np.array_equal(out, good), "the caller gets session.run's answer, not the broken one"
    assert runner.mode == "plain" and "differs from session.run at batch 2" in runner.note
    assert np.array_equal(runner.run(visual, feats), good)


def test_a_binding_that_raises_falls_back_to_session_run(demo_dir):
    runner = _runner(str(demo_dir / "demo_ada" / "model.onnx"), "bind_cpu")

    def refuse(*_):
        raise RuntimeError("no such device")

    runner._bound = refuse
    visual, feats = _inputs(1)
    out = runner.run(visual, feats)
    assert out.shape == (1, 3, 320, 320) and runner.mode == "plain"
    assert runner.note == "bind_cpu off: RuntimeError: no such device"


def test_checks_stop_after_the_first_runs_of_each_batch_size(demo_dir):
    runner = _runner(str(demo_dir / "demo_ada" / "model.onnx"), "bind_cpu")
    calls = []
    plain = runner.run_plain
    runner.run_plain = lambda v, f: calls.append(len(v)) or plain(v, f)
    for _ in range(CHECK_RUNS + 2):
        runner.run(*_inputs(1))
    runner.run(*_inputs(2))
    assert calls == [1] * CHECK_RUNS + [2]


def test_modes_per_engine_and_what_they_need():
    assert runner_mode("cpu") == "plain"  # measured: no gain from binding on the CPU provider
    assert runner_mode("cuda") == runner_mode("tensorrt") == "bind_cuda"
    assert runner_mode("cuda_graph") == "cuda_graph"
    with pytest.raises(ValueError, match="needs device buffers"):
        UnetRunner(object(), "input", "audio", "cuda_graph")
    with pytest.raises(ValueError, match="is not one of"):
        UnetRunner(object(), "input", "audio", "fast")


@pytest.mark.parametrize("mode", ["bind_cuda", "cuda_graph"])
def test_the_gpu_binding_path_on_host_buffers_is_byte_identical(demo_dir, mode):
    """The CUDA modes' code (buffers per batch size shared by sessions, one binding per batch size,
    inputs copied in with update_inplace, the graph id run option, plain runs with graphs off)
    run on the CPU provider with host buffers: only the device differs from a GPU worker."""
    from lipsync_cluster.worker.binding import DeviceBuffers

    path = str(demo_dir / "demo_ada" / "model.onnx")
    buffers = DeviceBuffers(0, device="cpu")
    plain = _runner(path, "plain")
    first, second = _runner(path, mode, buffers=buffers), _runner(str(demo_dir / "demo_ben" / "model.onnx"), mode,
                                                                   buffers=buffers)
    other = _runner(str(demo_dir / "demo_ben" / "model.onnx"), "plain")
    kept = []
    for batch in (2, 1, 2, 5, 2):
        visual, feats = _inputs(batch, seed=10 + batch + len(kept))
        a = first.run(visual, feats)
        b = second.run(visual, feats)  # another model on the same buffers, between runs of the first
        assert np.array_equal(a, plain.run(visual, feats)) and np.array_equal(b, other.run(visual, feats))
        kept.append((visual, feats, a))
    for visual, feats, a in kept:  # every answer is the caller's own: later runs did not overwrite it
        assert np.array_equal(a, plain.run(visual, feats))
    assert first.mode == second.mode == mode and first.note == "" and sorted(buffers._sets) == [1, 2, 5]
    assert buffers.nbytes == 8 * (6 * 320 * 320 + 32 * 256 + 3 * 320 * 320) * 4
    assert sorted(first._bindings) == [1, 2, 5]  # one binding per batch size, reused
