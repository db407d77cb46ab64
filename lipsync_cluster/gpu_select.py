"""Which GPU each worker gets: ``--gpus N | auto | 2,3 | GPU-uuid,...`` against what is visible.

The *universe* is what this process may use: an inherited ``CUDA_VISIBLE_DEVICES`` (set by
Kubernetes, Slurm, a MIG setup or the operator) when there is one, else every GPU that
``nvidia-smi -L`` lists (a GPU split into MIG instances counts as its instances). The supervisor
splits the universe between its workers and never widens it.

Numbering follows CUDA inside this process: ``--gpus 2,3`` names positions in the universe, as
device ordinals 2 and 3 would be here, with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (the order
nvidia-smi uses). A worker is pinned by the device's UUID when it is known, so the pin means the
same GPU whatever order a library enumerates in.

Everything here is a pure function of its inputs (the environment and the nvidia-smi listing),
so plans are tested on machines without a GPU. Only :func:`probe_physical` runs a program.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

UUID_RE = re.compile(r"^(GPU|MIG)-[A-Za-z0-9/_-]+$")
_SMI_GPU = re.compile(r"^GPU (\d+): (.*?) \(UUID: (GPU-[^)]+)\)\s*$")
_SMI_MIG = re.compile(r"^\s+MIG (\S+)\s+Device\s+(\d+): \(UUID: (MIG-[^)]+)\)\s*$")


class GpuSelectionError(ValueError):
    """A GPU request that cannot be met; the message names what was asked and what is visible."""


@dataclass(frozen=True)
class Device:
    """One CUDA device this process may use."""

    id: str                       # what CUDA_VISIBLE_DEVICES names it by (an index or a UUID)
    uuid: Optional[str] = None    # GPU-... or MIG-..., when known
    name: str = ""                # "NVIDIA H200", "MIG 1g.18gb", ...

    @property
    def pin(self) -> str:
        """The CUDA_VISIBLE_DEVICES value that pins a worker to this device (UUID when known)."""
        return self.uuid or self.id

    def describe(self) -> str:
        extra = ", ".join(x for x in (self.name, self.uuid if self.uuid != self.id else None) if x)
        return f"{self.id} ({extra})" if extra else self.id


def parse_nvidia_smi(text: str) -> list[Device]:
    """``nvidia-smi -L`` -> physical devices; a GPU with MIG instances is replaced by its instances
    (CUDA cannot use a MIG-enabled GPU as a whole)."""
    out: list[Device] = []
    parent: Optional[Device] = None
    for line in text.splitlines():
        gpu = _SMI_GPU.match(line)
        if gpu:
            parent = Device(gpu.group(1), gpu.group(3), gpu.group(2))
            out.append(parent)
            continue
        mig = _SMI_MIG.match(line)
        if mig and parent is not None:
            if parent in out:
                out.remove(parent)  # listed only while no instance was found under it
            out.append(Device(mig.group(3), mig.group(3), f"MIG {mig.group(1)} on GPU {parent.id}"))
    return out


def probe_physical(timeout_s: float = 10.0) -> Optional[list[Device]]:
    """The host's devices from ``nvidia-smi -L``; ``[]`` when there is none; ``None`` when there
    are device files (/dev/nvidiaN) but nvidia-smi cannot list them."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=timeout_s)
        if out.returncode == 0:
            return parse_nvidia_smi(out.stdout)
    except (OSError, subprocess.TimeoutExpired):
        pass
    # No answer from the driver's tool: with device nodes there are GPUs we cannot name (an
    # inherited CUDA_VISIBLE_DEVICES is then trusted), without them there is none.
    return None if any(Path("/dev").glob("nvidia[0-9]*")) else []


def parse_visible(value: str) -> list[str]:
    """CUDA_VISIBLE_DEVICES entries, as CUDA reads them: comma separated, and ``-1`` or a blank
    value hides every device."""
    entries = [e.strip() for e in value.split(",")]
    entries = [e for e in entries if e]
    return [] if not entries or entries[0] == "-1" else entries


def universe(env: Mapping[str, str], physical: Optional[Sequence[Device]]) -> tuple[list[Device], list[str]]:
    """(devices this process may use, entries of an inherited CUDA_VISIBLE_DEVICES that name no
    device here). ``physical`` is :func:`probe_physical`'s answer (``None`` = unknown: an
    inherited list is then trusted as it is)."""
    inherited = env.get("CUDA_VISIBLE_DEVICES")
    if inherited is None:
        return list(physical or ()), []
    found: list[Device] = []
    missing: list[str] = []
    for entry in parse_visible(inherited):
        device = _lookup(entry, physical) if physical is not None else Device(entry, entry if UUID_RE.match(entry) else None)
        if device is None:
            missing.append(entry)
        elif device not in found:
            found.append(device)
    return found, missing


def _lookup(entry: str, physical: Sequence[Device]) -> Optional[Device]:
    for d in physical:
        if entry in (d.id, d.uuid):
            return d
    if UUID_RE.match(entry):  # nvidia-smi also accepts UUID prefixes; CUDA does too
        matches = [d for d in physical if d.uuid and d.uuid.startswith(entry)]
        if len(matches) == 1:
            return matches[0]
    return None


GpuRequest = Union[None, int, str, Sequence[str]]


def parse_request(text: Optional[str]) -> Union[None, int, str, list[str]]:
    """``--gpus`` as typed: None, a count, ``"auto"``, or a list of indices / UUIDs."""
    if text is None:
        return None
    text = text.strip()
    if text.lower() == "auto":
        return "auto"
    if text.isdigit():
        return int(text)
    items = [t.strip() for t in text.split(",")]
    if not items or any(not t for t in items) or any(not (t.isdigit() or UUID_RE.match(t)) for t in items):
        raise GpuSelectionError(f"--gpus {text!r}: expected a number, 'auto', or a comma-separated list of GPU "
                                "indices or GPU-/MIG- UUIDs (e.g. 2,3 or GPU-8f6c...,GPU-1a2b...)")
    return items


def _visible_text(devices: Sequence[Device], missing: Sequence[str], env: Mapping[str, str]) -> str:
    where = (f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r}" if "CUDA_VISIBLE_DEVICES" in env
             else "nvidia-smi -L")
    seen = "; ".join(f"{i}: {d.describe()}" for i, d in enumerate(devices)) or "none"
    gone = f"; not on this host: {', '.join(missing)}" if missing else ""
    return f"{len(devices)} GPU(s) visible ({where}): {seen}{gone}"


def select(request: GpuRequest, env: Mapping[str, str], physical: Optional[Sequence[Device]]) -> list[Device]:
    """The devices to run GPU workers on (``[]`` = CPU workers). Raises :class:`GpuSelectionError`
    naming what was asked and what is visible when a requested GPU is not there."""
    if request is None or request == 0:
        return []
    devices, missing = universe(env, physical)
    if request == "auto":
        return devices
    if isinstance(request, int):
        if request < 0:
            raise GpuSelectionError(f"--gpus {request}: must be >= 0 (0 runs CPU workers)")
        if request > len(devices):
            raise GpuSelectionError(f"--gpus {request}: only {_visible_text(devices, missing, env)}")
        return devices[:request]
    chosen: list[Device] = []
    for item in request:
        if item.isdigit():
            device = devices[int(item)] if int(item) < len(devices) else None
        else:
            device = _lookup(item, devices)
        if device is None:
            raise GpuSelectionError(f"--gpus {','.join(request)}: GPU {item} is not visible; {_visible_text(devices, missing, env)}")
        if device in chosen:
            raise GpuSelectionError(f"--gpus {','.join(request)}: GPU {item} is named twice")
        chosen.append(device)
    return chosen


@dataclass(frozen=True)
class WorkerSlot:
    """What one worker process gets: its name, its GPU (None = CPU) and its environment changes."""

    name: str
    gpu_index: Optional[int]      # position among the selected GPUs (stats, `load --gpu`)
    device: Optional[Device]
    env: dict


def plan_workers(devices: Sequence[Device], per_gpu: int) -> list[WorkerSlot]:
    """``per_gpu`` workers per device (or ``per_gpu`` CPU workers when ``devices`` is empty), each
    with the environment entries that pin it: one device by UUID, in PCI bus order, or none."""
    slots: list[WorkerSlot] = []
    if not devices:
        for p in range(per_gpu):
            slots.append(WorkerSlot(f"w{p}-cpu", None, None, {"CUDA_VISIBLE_DEVICES": ""}))
        return slots
    for g, device in enumerate(devices):
        for _ in range(per_gpu):
            env = {"CUDA_VISIBLE_DEVICES": device.pin, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
            slots.append(WorkerSlot(f"w{len(slots)}-gpu{g}", g, device, env))
    return slots


def pin_one(gpu: str, env: Mapping[str, str], physical: Optional[Sequence[Device]]) -> Device:
    """A worker started by hand with ``--gpu X``: X resolved within the visible universe."""
    request = parse_request(gpu)
    if not isinstance(request, (int, list)) or isinstance(request, list) and len(request) != 1:
        raise GpuSelectionError(f"--gpu {gpu!r}: expected one GPU index or one GPU-/MIG- UUID")
    item = str(request) if isinstance(request, int) else request[0]
    return select([item], env, physical)[0]


__all__ = ["Device", "GpuSelectionError", "WorkerSlot", "parse_nvidia_smi", "parse_request", "parse_visible",
           "pin_one", "plan_workers", "probe_physical", "select", "universe"]
