"""A GPU worker's readings of its own GPU through NVML (``nvidia-ml-py``, in the ``gpu`` extra).

The worker sends them with its periodic stats; the broker exports them per worker
(``lipsync_worker_gpu_*``, docs/METRICS.md). Readings NVML cannot give (utilisation of a MIG
instance, this process's memory when NVML reports host pids from inside a container) are left
out rather than guessed. A CPU worker, or one without NVML, sends none.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

log = logging.getLogger("lipsync_cluster.worker.gpu")


class GpuMonitor:
    """Reads one device, named as CUDA_VISIBLE_DEVICES names it: an index or a GPU-/MIG- UUID."""

    def __init__(self, device: Optional[str]) -> None:
        self.device = device
        self.reason = ""           # why there are no readings, for logs and tests
        self._nvml: Any = None
        self._handle: Any = None
        if device is None:
            self.reason = "no GPU"
            return
        try:
            import pynvml  # noqa: PLC0415 - the gpu extra; CPU installs go without
        except ImportError:
            self.reason = "nvidia-ml-py is not installed (pip install 'lipsync-cluster[gpu]')"
            log.info("GPU readings off: %s", self.reason)
            return
        try:
            pynvml.nvmlInit()
            if device.startswith(("GPU-", "MIG-")):
                self._handle = pynvml.nvmlDeviceGetHandleByUUID(device)
            else:
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(int(device))
            self._nvml = pynvml
        except (pynvml.NVMLError, ValueError) as exc:
            self.reason = f"NVML cannot read GPU {device}: {exc}"
            log.warning("GPU readings off: %s", self.reason)

    @property
    def available(self) -> bool:
        return self._handle is not None

    def read(self) -> dict:
        """``gpu_memory_used_bytes`` (this process), ``gpu_device_memory_used_bytes``,
        ``gpu_memory_total_bytes`` and ``gpu_utilization`` (0..1, the whole device), as far as
        NVML answers; ``{}`` without a GPU."""
        if self._handle is None:
            return {}
        nvml, handle, out = self._nvml, self._handle, {}
        try:
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            out["gpu_device_memory_used_bytes"] = int(mem.used)
            out["gpu_memory_total_bytes"] = int(mem.total)
        except nvml.NVMLError:
            pass
        try:
            out["gpu_utilization"] = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
        except nvml.NVMLError:
            pass  # MIG instances have no utilisation counter of their own
        try:
            pid = os.getpid()
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    out["gpu_memory_used_bytes"] = int(proc.usedGpuMemory)
        except nvml.NVMLError:
            pass
        return out


__all__ = ["GpuMonitor"]
