"""How one UNet session runs: ``session.run``, or ONNX Runtime IO binding.

- ``plain``: ``session.run`` (ONNX Runtime allocates the output and copies it into a new array).
- ``bind_cpu``: IO binding on the CPU provider: the inputs are the caller's arrays, the output is
  written straight into a fresh numpy array (ONNX Runtime's own output buffer and the copy out of
  it are gone). A fresh array per run, not a reused one: the previous batch may still be
  composited on other threads while the next one runs.
- ``bind_cuda``: the CUDA provider with the inputs and the output in device buffers
  (:class:`DeviceBuffers`, one set per batch size, shared by the worker's sessions: one UNet runs
  at a time per worker). The host arrays are copied in once (``update_inplace``) and the output
  copied out once; nothing else crosses the bus.
- ``cuda_graph``: ``bind_cuda`` on a session opened with ``enable_cuda_graph``: each batch size
  is its own graph (``gpu_graph_id``), captured on first use and replayed after. A graph holds
  the device addresses it was captured with, which is why the buffers of a batch size never move.
  Any other run of such a session (the warm-up, a check) passes ``gpu_graph_id = -1``, or it
  would capture a graph around buffers that are gone by the next run.

A bound run is checked against ``session.run`` on its first uses per batch size
(:data:`CHECK_RUNS`); a mismatch or an error turns the runner back into ``plain`` for good and
says so (``note``). The check costs one extra run per batch size per model; the check on the
CPU provider is byte-identical (tests/test_binding.py), on CUDA within :data:`CUDA_TOLERANCE`.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Optional

import numpy as np

log = logging.getLogger("lipsync_cluster.worker.binding")

MODES = ("plain", "bind_cpu", "bind_cuda", "cuda_graph")
CHECK_RUNS = 3            # per batch size: covers ONNX Runtime's warm-up run, the capture, one replay
CUDA_TOLERANCE = 1e-3     # on outputs in 0..1; kernels are the same, a stream race would be far off
NET = 320


def output_shape(batch: int) -> tuple[int, int, int, int]:
    return (batch, 3, NET, NET)


class DeviceBuffers:
    """Device buffers for the UNet's inputs and output, one set per batch size, for a worker's
    sessions to share (their runs are serialized by the workspace lock). ``device="cpu"`` gives
    host buffers: the same binding path on the CPU provider, for the tests."""

    def __init__(self, device_id: int = 0, device: str = "cuda") -> None:
        self.device, self.device_id = device, device_id
        self._sets: dict[int, tuple[Any, Any, Any]] = {}
        self._lock = threading.Lock()

    def get(self, batch: int) -> tuple[Any, Any, Any]:
        import onnxruntime as ort  # noqa: PLC0415

        with self._lock:
            found = self._sets.get(batch)
            if found is None:
                new = ort.OrtValue.ortvalue_from_shape_and_type
                found = (new([batch, 6, NET, NET], np.float32, self.device, self.device_id),
                         new([batch, 32, 16, 16], np.float32, self.device, self.device_id),
                         new(list(output_shape(batch)), np.float32, self.device, self.device_id))
                self._sets[batch] = found
            return found

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(b * (6 * NET * NET + 32 * 256 + 3 * NET * NET) * 4 for b in self._sets)


class UnetRunner:
    """Runs one UNet session in ``mode``; see the module doc."""

    def __init__(self, session: Any, visual_name: str, audio_name: str, mode: str = "plain",
                 buffers: Optional[DeviceBuffers] = None, check: bool = True) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        if mode in ("bind_cuda", "cuda_graph") and buffers is None:
            raise ValueError(f"mode {mode} needs device buffers")
        import onnxruntime as ort  # noqa: PLC0415

        self.session = session
        self.visual_name, self.audio_name = visual_name, audio_name
        self.output_name = session.get_outputs()[0].name
        self.mode = mode
        self.note = ""
        self.buffers = buffers
        self._check = check
        self._checked: dict[int, int] = {}
        self._bindings: dict[int, Any] = {}
        self._run_options: dict[int, Any] = {}
        self._plain_options = ort.RunOptions()
        if mode == "cuda_graph":  # a plain run must neither capture nor replay a graph
            self._plain_options.add_run_config_entry("gpu_graph_id", "-1")
        self._ort = ort

    # --- runs ---------------------------------------------------------------------------------

    def run_plain(self, visual: np.ndarray, feats: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.visual_name: visual, self.audio_name: feats},
                                self._plain_options)[0]

    def run(self, visual: np.ndarray, feats: np.ndarray) -> np.ndarray:
        """The UNet's output [B,3,320,320] float32 for ``visual`` [B,6,320,320], ``feats`` [B,32,16,16]."""
        if self.mode == "plain":
            return self.run_plain(visual, feats)
        visual = np.ascontiguousarray(visual, dtype=np.float32)
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        batch = len(visual)
        try:
            out = self._bound(visual, feats, batch)
        except Exception as exc:  # a binding the runtime refuses: the plain path still serves
            self._give_up(f"{type(exc).__name__}: {exc}")
            return self.run_plain(visual, feats)
        if self._check and self._checked.get(batch, 0) < CHECK_RUNS:
            self._checked[batch] = self._checked.get(batch, 0) + 1
            reference = self.run_plain(visual, feats)
            if not self.agrees(out, reference):
                diff = float(np.max(np.abs(out - reference))) if out.shape == reference.shape else float("nan")
                self._give_up(f"{self.mode} output differs from session.run at batch {batch} (max abs {diff:.3g})")
                return reference
        return out

    def agrees(self, out: np.ndarray, reference: np.ndarray) -> bool:
        if out.shape != reference.shape:
            return False
        if self.mode == "bind_cpu":
            return bool(np.array_equal(out, reference))
        return bool(np.max(np.abs(out - reference)) <= CUDA_TOLERANCE)

    def _bound(self, visual: np.ndarray, feats: np.ndarray, batch: int) -> np.ndarray:
        if self.mode == "bind_cpu":
            binding = self.session.io_binding()
            binding.bind_cpu_input(self.visual_name, visual)
            binding.bind_cpu_input(self.audio_name, feats)
            out = np.empty(output_shape(batch), np.float32)
            binding.bind_output(self.output_name, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
            self.session.run_with_iobinding(binding)
            return out
        vis_dev, aud_dev, out_dev = self.buffers.get(batch)
        vis_dev.update_inplace(visual)
        aud_dev.update_inplace(feats)
        binding = self._bindings.get(batch)
        if binding is None:
            binding = self.session.io_binding()
            binding.bind_ortvalue_input(self.visual_name, vis_dev)
            binding.bind_ortvalue_input(self.audio_name, aud_dev)
            binding.bind_ortvalue_output(self.output_name, out_dev)
            self._bindings[batch] = binding
        self.session.run_with_iobinding(binding, self._options(batch))
        out = out_dev.numpy()  # from a device: a copy to the host
        # Host buffers (the tests run this path on the CPU provider): .numpy() is a view of the
        # buffer the next run overwrites, while this batch may still be composited.
        return out.copy() if self.buffers.device == "cpu" else out

    def _options(self, batch: int) -> Any:
        options = self._run_options.get(batch)
        if options is None:
            options = self._ort.RunOptions()
            if self.mode == "cuda_graph":  # one graph per batch size; ids > 0 (0 is ONNX Runtime's)
                options.add_run_config_entry("gpu_graph_id", str(batch))
            self._run_options[batch] = options
        return options

    def _give_up(self, reason: str) -> None:
        log.warning("UNet IO binding (%s) off for this model, using session.run: %s", self.mode, reason)
        self.note = f"{self.mode} off: {reason}"
        self.mode = "plain"
        self._bindings.clear()

    def warm_up(self, batch: int = 1) -> None:
        """One run with zeros (plain: no graph is captured around the warm-up's buffers)."""
        self.run_plain(np.zeros((batch, 6, NET, NET), np.float32), np.zeros((batch, 32, 16, 16), np.float32))


def runner_mode(engine: str) -> str:
    """The runner mode for a session on ``engine`` (worker/engine.py).

    The CPU provider keeps ``session.run``: binding the output to a fresh array gained nothing that
    held across batch sizes (bench/gpu.py --cpu --raw-only; docs/BENCHMARKS.md, "GPU"); ``bind_cpu``
    stays for the tests and bench/gpu.py, which compare it with ``plain``."""
    if engine == "cpu":
        return "plain"
    return "cuda_graph" if engine == "cuda_graph" else "bind_cuda"


__all__ = ["CHECK_RUNS", "DeviceBuffers", "MODES", "UnetRunner", "runner_mode"]
