"""Which engine a GPU worker's UNet sessions run on: plain CUDA, CUDA graphs, or TensorRT.

``onnx.gpu_engine`` asks (``cuda`` | ``cuda_graph`` | ``tensorrt`` | ``auto``); what the installed
ONNX Runtime has decides. Everything here is a pure function of the request, the worker's
device and ``onnxruntime.get_available_providers()`` / ``__version__``, so the choice is tested
on machines without a GPU (tests/test_gpu_engine.py). A session that then fails to open on the
chosen engine, or whose IO binding check fails (worker/binding.py), falls back to the next
engine of the plan; :class:`EngineState` keeps what the worker really uses and why, for its log
line and its stats (``engine``, ``engine_note``).

- ``cuda``: the CUDA provider, inputs and outputs through IO binding into per-batch-size device
  buffers.
- ``cuda_graph``: the same plus ``enable_cuda_graph``: one captured graph per batch size
  (``gpu_graph_id``, ONNX Runtime >= 1.17), replayed with one launch; the kernel launches leave
  the host CPU, which feeds the other stages instead.
- ``tensorrt``: the TensorRT provider (CUDA behind it for what TensorRT does not take), engines
  cached on disk. Only when asked by name: its first build of a UNet takes minutes, which a
  worker that loads models on demand cannot hide.
- ``auto``: ``cuda_graph`` where the runtime has it, else ``cuda``.
"""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

log = logging.getLogger("lipsync_cluster.worker.engine")

ENGINES = ("auto", "cuda", "cuda_graph", "tensorrt")
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
CUDA_GRAPH_MIN_ORT = (1, 17)  # gpu_graph_id: one graph per batch size in a session


@dataclass(frozen=True)
class EnginePlan:
    engine: str                      # tried first: cpu | cuda | cuda_graph | tensorrt
    fallbacks: tuple[str, ...] = ()  # tried next, in order, when a session fails on it
    note: str = ""                   # why the plan differs from what was asked ("" when it does not)


def ort_version_tuple(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def plan_engine(requested: str, uses_cuda: bool, available: Sequence[str], ort_version: str) -> EnginePlan:
    """The engines to try for ``requested`` on a worker with (``uses_cuda``) or without a GPU,
    given the providers this onnxruntime build has and its version."""
    if requested not in ENGINES:
        raise ValueError(f"onnx.gpu_engine: {requested!r} is not one of {', '.join(ENGINES)}")
    if not uses_cuda:
        note = "" if requested in ("auto", "cuda") else f"gpu_engine {requested} needs a GPU; this worker has none"
        return EnginePlan("cpu", (), note)
    if CUDA not in available:
        return EnginePlan("cpu", (), f"this onnxruntime has no {CUDA} (providers: {', '.join(available) or 'none'})")
    graphs = ort_version_tuple(ort_version) >= CUDA_GRAPH_MIN_ORT
    no_graphs = (f"CUDA graphs need onnxruntime >= {'.'.join(map(str, CUDA_GRAPH_MIN_ORT))} "
                 f"(one graph per batch size), this is {ort_version}")
    best_cuda = ("cuda_graph", "cuda") if graphs else ("cuda",)
    if requested == "tensorrt":
        if TENSORRT in available:
            return EnginePlan("tensorrt", best_cuda)
        return EnginePlan(best_cuda[0], best_cuda[1:],
                          f"this onnxruntime has no {TENSORRT} (providers: {', '.join(available)})")
    if requested == "cuda_graph":
        return EnginePlan("cuda_graph", ("cuda",)) if graphs else EnginePlan("cuda", (), no_graphs)
    if requested == "auto":
        return EnginePlan(best_cuda[0], best_cuda[1:], "" if graphs else no_graphs)
    return EnginePlan("cuda")


def providers_for_engine(engine: str, cuda_options: dict, *, precision: str = "fp32",
                         trt_cache_dir: Optional[str] = None) -> list:
    """The ``providers`` list for an InferenceSession on ``engine``. ``cuda_options``: the CUDA
    provider's options (device, arena; worker/sessions.providers_for). TensorRT gets no shape
    profile: it builds an engine per batch size it meets (cached in ``trt_cache_dir``)."""
    if engine == "cpu":
        return ["CPUExecutionProvider"]
    cuda = dict(cuda_options)
    if engine == "cuda_graph":
        cuda["enable_cuda_graph"] = True
    providers: list = [(CUDA, cuda), "CPUExecutionProvider"]
    if engine == "tensorrt":
        trt = {"device_id": cuda.get("device_id", 0), "trt_fp16_enable": precision == "fp16",
               "trt_engine_cache_enable": bool(trt_cache_dir), "trt_timing_cache_enable": bool(trt_cache_dir)}
        if trt_cache_dir:
            trt["trt_engine_cache_path"] = trt["trt_timing_cache_path"] = trt_cache_dir
        providers.insert(0, (TENSORRT, trt))
    elif engine not in ("cuda", "cuda_graph"):
        raise ValueError(f"unknown engine {engine!r}")
    return providers


def session_matches(engine: str, session_providers: Sequence[str]) -> bool:
    """Whether a session opened for ``engine`` really got it (``session.get_providers()``): ONNX
    Runtime drops a provider it cannot start and carries on with the next one."""
    first = session_providers[0] if session_providers else "CPUExecutionProvider"
    return {"tensorrt": first == TENSORRT, "cpu": True}.get(engine, first == CUDA)


class EngineState:
    """The engine this worker's UNet sessions use now, and why (what was asked, what fell back).

    A fallback is for the worker, not one model: a runtime that cannot start TensorRT or capture a
    graph for one UNet will not for the next, so later loads go straight to what works."""

    def __init__(self, plan: EnginePlan, requested: str) -> None:
        self.requested = requested
        self._order = [plan.engine, *plan.fallbacks]
        self.notes = [plan.note] if plan.note else []
        self._lock = threading.Lock()
        if plan.note:
            log.warning("gpu_engine %s: using %s (%s)", requested, plan.engine, plan.note)

    @property
    def engine(self) -> str:
        return self._order[0]

    def candidates(self) -> list[str]:
        with self._lock:
            return list(self._order)

    def fall_back(self, failed: str, reason: str) -> Optional[str]:
        """``failed`` did not work (``reason``): the next engine, or None when none is left."""
        with self._lock:
            if failed in self._order and len(self._order) > 1:
                self._order.remove(failed)
            elif failed in self._order:
                return None
            note = f"{failed} failed: {reason}; using {self._order[0]}"
            if note not in self.notes:
                self.notes.append(note)
                log.warning("gpu engine fallback: %s", note)
            return self._order[0]

    def stats(self) -> dict:
        return {"engine": self.engine, "engine_requested": self.requested, "engine_note": "; ".join(self.notes)}


__all__ = ["ENGINES", "EnginePlan", "EngineState", "plan_engine", "providers_for_engine", "session_matches"]
