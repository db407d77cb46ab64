"""Shared fixtures: demo model packages built once per session, free ports, a running cluster."""
from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

import file_order
import process_guard

process_guard.install()
_window = pytest.StashKey[process_guard.Window]()
_started = pytest.StashKey[list]()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """Three `light` demo models at 1280x720, 12 frames each, plus the audio encoder."""
    from lipsync_cluster.demo.build import build_demo_models

    out = tmp_path_factory.mktemp("demo_models")
    build_demo_models(out, count=3, kind="light", frames=12, size=(1280, 720), seed=0, progress=False)
    return out


def cluster_config(demo_dir: Path, tmp_path: Path, **sections) -> Path:
    """A cluster.yaml on free ports serving ``demo_dir``; ``sections`` override/extend the YAML."""
    import yaml

    cfg = {
        "server": {"frontend_port": free_port(), "backend_port": free_port(), "stats_port": free_port()},
        "models_dir": str(demo_dir),
        "audio_encoder": str(demo_dir / "audio_encoder.onnx"),
        "capacity": {"max_models": 3, "max_memory_gb": 4, "eviction_policy": "lru", "idle_unload_minutes": 30},
        "onnx": {"cuda_enabled": True, "intra_op_threads": 1},
        "cluster": {"gpus": 0, "per_gpu": 2, "heartbeat_interval_s": 0.25, "heartbeat_liveness": 3},
        "logging": {"level": "info", "stats_report_minutes": 0},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    path = tmp_path / f"cluster-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def make_cluster(demo_dir, tmp_path):
    """Start real clusters (broker + worker processes via the Supervisor); stopped at teardown."""
    from lipsync_cluster.config import load_config
    from lipsync_cluster.supervisor import Supervisor

    started = []

    def start(**sections):
        cfg = load_config(cluster_config(demo_dir, tmp_path, **sections))
        sup = Supervisor(cfg, cfg.cluster.gpus, cfg.cluster.per_gpu)
        started.append(sup)
        sup.start()
        sup.wait_ready(timeout_s=120)
        sup.watch_in_background()
        return sup

    yield start
    for sup in started:
        sup.stop(drain_timeout_s=10)


def _whole_module_in_process_tier_only(path: Path) -> bool:
    """True when the module says ``pytestmark = pytest.mark.processes`` at its top level (read, not imported)."""
    import ast

    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except (OSError, SyntaxError):
        return False  # let the normal collection report it
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)
                and ast.unparse(node.value) == f"pytest.mark.{process_guard.MARKER}"):
            return True
    return False


def pytest_ignore_collect(collection_path: Path, config):
    # `make test-fast` (-m "not processes") would deselect every test of a module marked `processes`
    # as a whole, after importing it (pipecat, hypothesis, ...) in each xdist worker: not imported
    # at all, it costs nothing. Only for that exact expression; any other -m collects as usual.
    if (config.option.markexpr == f"not {process_guard.MARKER}" and collection_path.suffix == ".py"
            and collection_path.name.startswith("test_") and _whole_module_in_process_tier_only(collection_path)):
        return True
    return None


def pytest_configure(config):
    file_order.register(config)  # the longest files first under --dist loadfile (tests/file_order.py)


@pytest.fixture(autouse=True)
def _no_gpu_env(monkeypatch):
    # Tests run on CPU machines; never let a stray CUDA setting change what they measure.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))


# The tier check (tests/process_guard.py): a test without the `processes` marker that starts a
# process fails, naming what it started. Marked tests are not watched.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker(process_guard.MARKER) is None:
        item.stash[_window] = process_guard.open_window()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    finally:
        window = item.stash.get(_window, None)
        if window is not None:
            del item.stash[_window]
            item.stash[_started] = process_guard.close_window(window)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    window = item.stash.get(_window, None)
    if window is not None:  # setup failed or skipped: the call never ran; stop recording
        del item.stash[_window]
        process_guard.close_window(window)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    started = item.stash.get(_started, None) if call.when == "call" else None
    if started:
        message = process_guard.verdict(item.nodeid, started)
        if report.passed:
            report.outcome = "failed"
            report.longrepr = message
        else:
            report.sections.append(("process tier check", message))
    return report
