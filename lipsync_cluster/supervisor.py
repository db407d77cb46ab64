"""Start, watch and stop a cluster on one host: one broker and G x P worker processes.

Each worker is its own process (no GIL shared between avatars), pinned to one GPU with
``CUDA_VISIBLE_DEVICES`` or, with ``--gpus 0``, a CPU worker that never asks for CUDA. A
worker that dies is restarted with exponential backoff; SIGINT/SIGTERM drains the workers
(they finish what they hold), stops the broker and removes the host's shared frames.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlparse

import yaml

from . import gpu_select
from .common.catalog import Catalog
from .common.frame_store import FrameStore, UnsafeStoreError
from .common.security import write_key_pair
from .config import Config, ConfigError

log = logging.getLogger("lipsync_cluster.supervisor")


class StartError(RuntimeError):
    """The cluster cannot start; the message is one line that says what to do."""


def shm_namespace(config: Config) -> str:
    """Shared frames are named per cluster, so a restart finds what a crash left: by the whole
    backend endpoint (address and port, or the ipc path), not the port alone, so two clusters on
    the same ports of different loopback addresses (or on ipc endpoints) never share, or clean up,
    each other's frames."""
    digest = hashlib.sha256(config.backend.encode()).hexdigest()[:12]
    return f"p{urlparse(config.backend).port or 0}-{digest}"


def select_devices(request: gpu_select.GpuRequest) -> list[gpu_select.Device]:
    """The GPUs for ``--gpus`` on this host (``[]`` = CPU workers); a GPU that is not there is a
    :class:`StartError` naming what is visible."""
    if request is None or request == 0:
        return []
    try:
        return gpu_select.select(request, os.environ, gpu_select.probe_physical())
    except gpu_select.GpuSelectionError as exc:
        raise StartError(str(exc)) from None


def check_port_free(endpoint: str) -> None:
    url = urlparse(endpoint)
    if url.scheme != "tcp":
        return
    with socket.socket(socket.AF_INET6 if ":" in (url.hostname or "") else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((url.hostname or "127.0.0.1", url.port or 0))
        except OSError as exc:
            raise StartError(f"{endpoint} is already in use ({exc.strerror}); stop the other cluster or "
                             "choose other ports (server.frontend_port / backend_port / stats_port)") from None


def check_models(config: Config) -> Catalog:
    catalog = Catalog(config.models_dir, config.models)
    packages = catalog.packages()
    if not packages:
        where = config.models_dir or "the config's 'models' section"
        problems = "; ".join(f"{k}: {v}" for k, v in sorted(catalog.errors.items())) or "no model packages"
        raise StartError(f"no servable model found in {where} ({problems}); create demo models with "
                         "'lipsync-cluster demo-models DIR' or prepare some with 'lipsync-cluster prepare'")
    for model_id, reason in sorted(catalog.errors.items()):
        log.warning("model '%s' is not servable: %s", model_id, reason)
    return catalog


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict
    proc: Optional[subprocess.Popen] = None
    restarts: int = 0
    backoff_s: float = 0.0
    next_start: float = 0.0
    started_at: float = 0.0

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env)
        self.started_at = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Supervisor:
    """``gpus``: a count, ``"auto"``, or a list of GPU indices / UUIDs (gpu_select.py); 0 = CPU."""

    config: Config
    gpus: gpu_select.GpuRequest
    per_gpu: int
    devices: Optional[list] = None  # gpu_select.Device per GPU; resolved at start() when not given
    children: list[Child] = field(default_factory=list)
    run_dir: Optional[Path] = None
    _stopping: bool = False

    @property
    def worker_keys_dir(self) -> Optional[Path]:
        """Where `start` keeps the keys it made for its workers (None under operator CURVE keys)."""
        return None if self.config.security.curve or self.run_dir is None else self.run_dir / "keys"

    def _config_file(self) -> str:
        self.run_dir = Path(tempfile.mkdtemp(prefix="lipsync-cluster-"))  # 0700: ours alone
        data = self.config.to_dict()
        keys = self.worker_keys_dir
        if keys is not None:
            # Workers authenticate even on loopback: the broker's workers socket speaks CURVE and
            # admits only keys made here, one per worker, each bound to that worker's name; no
            # other local process can register as a worker (docs/SECURITY.md).
            keys.mkdir(mode=0o700)
            (keys / "allowed_workers").mkdir(mode=0o700)
            write_key_pair(keys, "broker")
            data["security"].update(worker_curve=True, broker_key=str(keys / "broker.key_secret"),
                                    server_key=str(keys / "broker.key"),
                                    allowed_workers=str(keys / "allowed_workers"))
        path = self.run_dir / "effective-config.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return str(path)

    def _worker_key_args(self, name: str) -> list[str]:
        keys = self.worker_keys_dir
        if keys is None:
            return []
        write_key_pair(keys, name)
        shutil.copyfile(keys / f"{name}.key", keys / "allowed_workers" / f"{name}.key")
        return ["--worker-key", str(keys / f"{name}.key_secret"), "--broker-key", str(keys / "broker.key")]

    def _plan(self, config_file: str) -> None:
        base = [sys.executable, "-m", "lipsync_cluster.cli"]
        env = dict(os.environ)
        ns = shm_namespace(self.config)
        self.children.append(Child("broker", base + ["broker", "--config", config_file], env))
        if self.devices is None:
            self.devices = select_devices(self.gpus)
        slots = gpu_select.plan_workers(self.devices, self.per_gpu)
        for index, slot in enumerate(slots):
            # The pin: a worker sees exactly its GPU (as device 0, named by UUID), or none at all.
            wenv = {**env, **slot.env}
            argv = base + ["worker", "--config", config_file, "--broker", self.config.backend, "--name", slot.name,
                           "--shm-namespace", ns, "--workers-on-host", str(len(slots)),
                           "--preload-share", f"{index}/{len(slots)}"]
            if slot.device is not None:
                argv += ["--gpu", "0", "--gpu-index", str(slot.gpu_index)]
            argv += self._worker_key_args(slot.name)
            self.children.append(Child(slot.name, argv, wenv))

    def start(self) -> None:
        cfg = self.config
        for endpoint in (cfg.frontend, cfg.backend, cfg.stats_endpoint):
            check_port_free(endpoint)
        check_models(cfg)
        if self.devices is None:
            self.devices = select_devices(self.gpus)
        try:
            removed = FrameStore(shm_namespace(cfg)).cleanup()
        except UnsafeStoreError as exc:
            raise StartError(f"refusing the shared frame store: {exc}; remove it (it is not this cluster's) "
                             "or run the cluster on other ports") from None
        if removed:
            log.info("removed %d shared frame file(s) left by an earlier run", removed)
        self._plan(self._config_file())
        for child in self.children:
            child.start()
            log.info("started %s (pid %d)", child.name, child.proc.pid)

    def wait_ready(self, timeout_s: float = 180.0) -> dict:
        from .client import Client

        deadline = time.monotonic() + timeout_s
        last: dict = {}
        from .common.security import SecurityError, config_client_keys

        try:  # under CurveZMQ the supervisor is a client like any other: security.client_key
            curve = config_client_keys(self.config.security)
        except SecurityError as exc:
            raise StartError(str(exc)) from None
        with Client(self.config.frontend, timeout=2.0, curve=curve) as client:
            while time.monotonic() < deadline:
                broker = self.children[0]
                if not broker.alive:
                    raise StartError(f"the broker exited with code {broker.proc.returncode}; see the log above")
                try:
                    last = client.health()
                    # Ready means every worker we started has registered, not just the first.
                    if last.get("ready") and last.get("workers", 0) >= len(self.children) - 1:
                        return last
                    if last.get("ready"):
                        last["reason"] = f"{last.get('workers', 0)} of {len(self.children) - 1} workers registered"

                except Exception:
                    pass
                self.watch_once()
                time.sleep(0.2)
        raise StartError(f"the cluster did not become ready within {timeout_s:.0f}s: {last.get('reason', 'no answer')}")

    def watch_once(self) -> None:
        """Restart dead workers with exponential backoff; a dead broker is restarted too."""
        cl = self.config.cluster
        now = time.monotonic()
        for child in self.children:
            if self._stopping or child.alive:
                continue
            if child.proc is not None and child.next_start == 0.0:
                code = child.proc.returncode
                how = f"signal {-code}" if code < 0 else f"code {code}"
                # A child that ran a while before dying starts over with the shortest backoff.
                if now - child.started_at > 60:
                    child.backoff_s = 0.0
                child.backoff_s = min(cl.restart_backoff_max_s, max(cl.restart_backoff_s, child.backoff_s * 2))
                child.next_start = now + child.backoff_s
                log.warning("%s (pid %d) exited with %s; restarting in %.1fs (restart %d)",
                            child.name, child.proc.pid, how, child.backoff_s, child.restarts + 1)
            elif child.next_start and now >= child.next_start:
                child.restarts += 1
                child.next_start = 0.0
                child.start()
                log.info("restarted %s (pid %d)", child.name, child.proc.pid)

    def run_forever(self) -> None:
        while not self._stopping:
            self.watch_once()
            time.sleep(0.2)

    def watch_in_background(self) -> threading.Thread:
        """Restart crashed children from a daemon thread (for embedding, e.g. in tests)."""
        thread = threading.Thread(target=self.run_forever, name="lipsync-supervisor", daemon=True)
        thread.start()
        return thread

    def stop(self, drain_timeout_s: float = 15.0) -> None:
        self._stopping = True
        if not any(child.proc is not None for child in self.children):
            # Nothing of ours ever ran (a start refused before spawning): the shared frames in
            # this namespace may belong to a cluster that is running on these ports. Leave them.
            return
        workers = [c for c in self.children[1:] if c.alive]
        for child in workers:
            child.proc.send_signal(signal.SIGTERM)
        self._wait(workers, drain_timeout_s)
        broker = [c for c in self.children[:1] if c.alive]
        for child in broker:
            child.proc.send_signal(signal.SIGTERM)
        self._wait(broker, 5.0)
        try:
            removed = FrameStore(shm_namespace(self.config)).cleanup()
            log.info("stopped; removed %d shared frame file(s)", removed)
        except UnsafeStoreError as exc:
            log.warning("stopped; left the shared frame store alone: %s", exc)
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    @staticmethod
    def _wait(children: list[Child], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for child in children:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs; killing it", child.name, timeout_s)
                child.proc.kill()
                child.proc.wait()


@contextlib.contextmanager
def demo_cluster(count: int, demo_dir: Optional[str], workers: int, slots: int,
                 gpus: int = 0, eviction_policy: str = "lru", worker_nice: Optional[int] = None) -> Iterator[str]:
    """Build ``count`` light demo models (kept in ``demo_dir``; a temporary folder when None), start a
    local cluster on free loopback ports, yield its client endpoint, stop it (``loadtest --demo-models``).
    ``worker_nice``: ``cluster.worker_nice`` (None: its default).
    """
    from .config import load_config
    from .demo.build import build_demo_models

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    with contextlib.ExitStack() as stack:
        folder = Path(demo_dir) if demo_dir else Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="lipsync-loadtest-")))
        print(f"building {count} demo model(s) in {folder} ...", file=sys.stderr)
        build_demo_models(folder, count=count, kind="light", frames=24, size=(1280, 720), seed=0,
                          progress=sys.stderr.isatty())
        cfg = load_config({
            "server": {"host": "127.0.0.1", "frontend_port": free_port(), "backend_port": free_port(),
                       "stats_port": free_port()},
            "models_dir": str(folder), "audio_encoder": str(folder / "audio_encoder.onnx"),
            "capacity": {"max_models": slots, "max_memory_gb": 8, "eviction_policy": eviction_policy,
                         "idle_unload_minutes": 0},
            "onnx": {"intra_op_threads": 1},
            "cluster": {"gpus": gpus, "per_gpu": workers,
                        **({"worker_nice": worker_nice} if worker_nice is not None else {})},
            "logging": {"level": "warning", "stats_report_minutes": 0},
        })
        sup = Supervisor(cfg, cfg.cluster.gpus, cfg.cluster.per_gpu)
        print(f"starting a local cluster: {workers} worker(s) x {slots} slots at {cfg.frontend} "
              f"(stats {cfg.stats_endpoint}) ...", file=sys.stderr)
        try:
            sup.start()
            sup.wait_ready(timeout_s=180)
            sup.watch_in_background()
            yield cfg.frontend
        finally:
            sup.stop(drain_timeout_s=10)


__all__ = ["Supervisor", "StartError", "ConfigError", "select_devices", "shm_namespace", "check_models", "demo_cluster"]
