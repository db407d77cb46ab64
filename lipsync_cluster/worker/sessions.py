"""ONNX Runtime sessions: CUDA only where this worker was given a GPU, else the CPU provider.

A worker that was given no GPU never names the CUDA provider, so a CPU machine with
onnxruntime-gpu installed shows no wall of CUDA load errors. A worker given a GPU bounds the
CUDA memory arena by its budget (``gpu_mem_limit``) and grows it only as requested, so one
avatar's session cannot take the whole card.

Every session of a worker allocates its activations from one arena per device, registered once
in the process's ONNX Runtime environment (:class:`Workspace`; ``session.use_env_allocators``).
Without it each session keeps a private arena grown to the largest batch it ever ran, and a
worker with three models at batch 25 holds three such arenas (18 GB on the CPU where the models
weigh 150 MB). The UNet runs one at a time per worker, so one arena serves them all. Weights
stay outside the arena (``session.use_device_allocator_for_initializers``), so an evicted
model's weights are freed with its session.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import onnxruntime as ort

from .engine import providers_for_engine, session_matches
from .precision import model_source

log = logging.getLogger(__name__)

# ONNX Runtime prints provider warnings at WARNING level on stderr; keep its own logger quiet
# except for errors, our log lines say what matters.
ort.set_default_logger_severity(3)


@dataclass(frozen=True)
class SessionOptions:
    gpu: Optional[int] = None  # device id inside CUDA_VISIBLE_DEVICES (0 when pinned), None = CPU
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    gpu_mem_limit_bytes: Optional[int] = None
    allow_spinning: bool = False
    precision: str = "fp32"  # fp16: models opened from a path are converted at open (worker/precision.py)

    @property
    def uses_cuda(self) -> bool:
        return self.gpu is not None


_cuda_libraries_loaded = False


def _load_cuda_libraries() -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels (the ``gpu`` extra) before the first CUDA session.

    Without this, onnxruntime-gpu finds the libraries only on the system's library path and
    silently falls back to the CPU when they are missing there.
    """
    global _cuda_libraries_loaded
    if not _cuda_libraries_loaded and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as exc:  # a system-wide CUDA install may still serve
            log.warning("could not preload CUDA libraries from the nvidia wheels: %s", exc)
    _cuda_libraries_loaded = True


def providers_for(opts: SessionOptions) -> list:
    """ONNX Runtime providers for ``opts``: CUDA (bounded arena) then CPU, or only the CPU."""
    if not opts.uses_cuda:
        return ["CPUExecutionProvider"]
    cuda = {
        "device_id": int(opts.gpu),
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC",
        "do_copy_in_default_stream": True,
    }
    if opts.gpu_mem_limit_bytes:
        cuda["gpu_mem_limit"] = int(opts.gpu_mem_limit_bytes)
    return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]


# The environment's shared allocators, registered at most once per process and device: ONNX
# Runtime refuses a second registration for the same memory info.
_env_allocators: set[str] = set()
_env_lock = threading.Lock()


def register_shared_allocators(opts: SessionOptions) -> None:
    """Register the process-wide arenas the sessions of ``opts`` share (CPU, and CUDA when used).

    The CPU arena keeps ONNX Runtime's default extend strategy (next power of two): measured on
    the ``unet`` demo (3 sessions, batch 5), it held 1.48 GB against 1.98 GB with
    kSameAsRequested, whose exact-size regions fragment between batch sizes. The CUDA arena grows
    as requested and is capped at the worker's budget (``gpu_mem_limit``), so the card's memory
    outside this worker is never touched.
    """
    with _env_lock:
        if "cpu" not in _env_allocators:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({}))
            _env_allocators.add("cpu")
        if opts.uses_cuda and "cuda" not in _env_allocators:
            _load_cuda_libraries()
            info = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, int(opts.gpu),
                                     ort.OrtMemType.DEFAULT)
            cfg = {"arena_extend_strategy": 1}  # kSameAsRequested
            if opts.gpu_mem_limit_bytes:
                cfg["max_mem"] = int(opts.gpu_mem_limit_bytes)
            cuda_options = {k: str(int(v)) if isinstance(v, bool) else str(v)
                            for k, v in providers_for(opts)[0][1].items() if k != "gpu_mem_limit"}
            ort.create_and_register_allocator_v2("CUDAExecutionProvider", info, cuda_options, ort.OrtArenaCfg(cfg))
            _env_allocators.add("cuda")


def _session_options(opts: SessionOptions) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = opts.intra_op_threads
    so.inter_op_num_threads = opts.inter_op_threads
    so.log_severity_level = 3
    register_shared_allocators(opts)
    so.add_session_config_entry("session.use_env_allocators", "1")
    so.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    return so


def make_session(path: str | os.PathLike | bytes, opts: SessionOptions, engine: Optional[str] = None,
                 trt_cache_dir: Optional[str] = None) -> ort.InferenceSession:
    """Open ``path`` (or a serialized model) with the providers ``opts`` allows, its activations
    in the worker's shared arena. ``engine`` (worker/engine.py): ``cuda`` (the default with a GPU),
    ``cuda_graph`` or ``tensorrt``. A path is converted to fp16 first when ``opts.precision`` says
    so; serialized bytes are opened as they are. Raises whatever ONNX Runtime raises."""
    if not isinstance(path, bytes) and opts.precision != "fp32":
        path, _ = model_source(path, opts.precision)
    so = _session_options(opts)
    if opts.uses_cuda:
        _load_cuda_libraries()
    else:
        # A worker holds several sessions (UNets, the audio encoder) and composites on other
        # threads: idle intra-op threads must sleep, not spin, or they steal the cores the next
        # stage needs.
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if opts.allow_spinning else "0")
    model = path if isinstance(path, bytes) else str(path)
    engine = engine or ("cuda" if opts.uses_cuda else "cpu")
    if engine != "cpu" and not opts.uses_cuda:
        raise RuntimeError(f"engine {engine} needs a GPU and this worker has none")
    providers = providers_for(opts) if engine in ("cpu", "cuda") else providers_for_engine(
        engine, providers_for(opts)[0][1], precision=opts.precision, trt_cache_dir=trt_cache_dir)
    session = ort.InferenceSession(model, sess_options=so, providers=providers)
    if opts.uses_cuda and not session_matches(engine, session.get_providers()):
        log.warning("%s was requested for %s but ONNX Runtime fell back to %s", engine,
                    "a converted model" if isinstance(path, bytes) else path, session.get_providers()[0])
    return session


def provider_name(session: Any) -> str:
    """``cuda``, ``cpu``, ... for the provider ONNX Runtime actually gave ``session`` (its first)."""
    providers = session.get_providers() or ["CPUExecutionProvider"]
    return providers[0].removesuffix("ExecutionProvider").lower()


def _field(number: int, value: bytes | int) -> bytes:
    """One protobuf field: varint for ints, length-delimited for bytes."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            byte, n = n & 0x7F, n >> 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out)
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    return varint(number << 3 | 2) + varint(len(value)) + value


def _probe_model() -> bytes:
    """A one-node ONNX model (y = Identity(x), float32 [1]), encoded by hand so a worker needs no
    ``onnx`` package to ask ONNX Runtime which provider it really gets."""
    tensor_type = _field(1, _field(1, 1) + _field(2, _field(1, _field(1, 1))))  # FLOAT, shape [1]

    def value_info(name: bytes) -> bytes:
        return _field(1, name) + _field(2, tensor_type)

    node = _field(1, b"x") + _field(2, b"y") + _field(4, b"Identity")
    graph = _field(1, node) + _field(2, b"probe") + _field(11, value_info(b"x")) + _field(12, value_info(b"y"))
    return _field(1, 8) + _field(7, graph) + _field(8, _field(1, b"") + _field(2, 13))  # IR 8, opset 13


def probe_provider(opts: SessionOptions) -> str:
    """The provider a session with ``opts`` really gets (``session.get_providers()`` after
    creation): ``cuda`` only when ONNX Runtime could open the CUDA device, else ``cpu``."""
    if opts.uses_cuda:
        _load_cuda_libraries()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(_probe_model(), sess_options=so, providers=providers_for(opts))
    session.run(None, {"x": np.zeros(1, dtype=np.float32)})
    return provider_name(session)


class Workspace:
    """The worker's one activation workspace: the shared arena, the lock that lets one UNet run in
    it at a time, and a way to hand its unused memory back to the system.

    ONNX Runtime shrinks an arena only at the end of a run that asks for it
    (``memory.enable_memory_arena_shrinkage``); :meth:`shrink` runs a one-node model in the
    shared arena with that option, which frees every region no running session is using.
    Shrinking after every run would cost speed (the next run page-faults its activations back
    in: +40 % CPU time at batch 5 on the ``unet`` demo), so the cache shrinks only when the
    budget needs the room or before measuring a new batch size.
    """

    def __init__(self, opts: SessionOptions, keep_device_arena: bool = False) -> None:
        self.opts = opts
        self.lock = threading.Lock()  # held around every UNet run and every workspace measurement
        self._probe = make_session(_probe_model(), opts)
        self._shrink_options = ort.RunOptions()
        # ``keep_device_arena``: CUDA graphs replay into the device addresses they were captured
        # with, their activations included; a shrink would hand those regions back to CUDA and
        # the next allocation (another model's weights) could land where a replay writes. With
        # graphs the device arena only grows; the host arena still shrinks.
        self.keeps_device_arena = keep_device_arena and opts.uses_cuda
        devices = "gpu:%d;cpu:0" % int(opts.gpu) if opts.uses_cuda and not self.keeps_device_arena else "cpu:0"
        self._shrink_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", devices)
        self.shrinks = 0

    def shrink(self) -> None:
        """Free the arena's unused regions (call with :attr:`lock` held: no run in progress)."""
        self._probe.run(None, {"x": np.zeros(1, dtype=np.float32)}, self._shrink_options)
        self.shrinks += 1
