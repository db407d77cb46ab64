"""A worker on "another host": its own network namespace, joined to the broker over a veth pair.

The broker runs in the root namespace bound to the veth address (10.200.N.1, a private /30 made
for this test) with CurveZMQ; the worker runs inside the namespace (``ip netns exec``) with the
``lipsync-cluster worker`` command, joins over TCP, and serves. Workers without a listed key are
refused. Needs root (CAP_NET_ADMIN); skipped, saying why, where namespaces cannot be made. The
namespace and the veth pair are always removed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from lipsync_cluster.client import Client
from lipsync_cluster.common.frame_store import FrameStore
from lipsync_cluster.common.security import CurveKeys, generate_keys

from conftest import free_port
from waiting import holds_for, wait_until

pytestmark = pytest.mark.processes  # a broker and remote workers as processes

TAG = f"{os.getpid() % 100000}"
NS = f"lsc-ns{TAG}"
VETH_ROOT, VETH_NS = f"lscr{TAG}", f"lscn{TAG}"
SUBNET = 4 + (os.getpid() % 60) * 4               # 10.200.7.<SUBNET>/30: two usable addresses
BROKER_IP, WORKER_IP = f"10.200.7.{SUBNET + 1}", f"10.200.7.{SUBNET + 2}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def _cleanup() -> None:
    _ip("netns", "del", NS, check=False)          # takes the namespace's end of the pair with it
    _ip("link", "del", VETH_ROOT, check=False)


@pytest.fixture
def netns():
    why = None
    if shutil.which("ip") is None:
        why = "the 'ip' command (iproute2) is not installed"
    elif os.geteuid() != 0:
        why = "network namespaces need root (CAP_NET_ADMIN)"
    else:
        _cleanup()
        made = _ip("netns", "add", NS, check=False)
        if made.returncode != 0:
            why = f"'ip netns add' is not permitted here: {made.stderr.strip()}"
    if why:
        print(f"SKIP test_netns: {why}")
        pytest.skip(why)
    try:
        _ip("link", "add", VETH_ROOT, "type", "veth", "peer", "name", VETH_NS)
        _ip("link", "set", VETH_NS, "netns", NS)
        _ip("addr", "add", f"{BROKER_IP}/30", "dev", VETH_ROOT)
        _ip("link", "set", VETH_ROOT, "up")
        _ip("netns", "exec", NS, "ip", "addr", "add", f"{WORKER_IP}/30", "dev", VETH_NS)
        _ip("netns", "exec", NS, "ip", "link", "set", VETH_NS, "up")
        _ip("netns", "exec", NS, "ip", "link", "set", "lo", "up")
        ping = subprocess.run(["ip", "netns", "exec", NS, "ping", "-c", "1", "-W", "2", BROKER_IP],
                              capture_output=True, text=True, timeout=10)
        if shutil.which("ping") and ping.returncode != 0:
            pytest.fail(f"the namespace cannot reach {BROKER_IP}: {ping.stdout} {ping.stderr}")
        yield NS
    except subprocess.CalledProcessError as exc:
        print(f"SKIP test_netns: setting up the veth pair failed: {exc.stderr}")
        pytest.skip(f"setting up the veth pair failed: {exc.stderr}")
    finally:
        _cleanup()
        assert NS not in _ip("netns", "list", check=False).stdout, "the namespace was removed"


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _proc(argv: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), CUDA_VISIBLE_DEVICES="")
    return subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def test_worker_in_another_namespace_joins_over_curve_and_strangers_are_refused(netns, demo_dir, tmp_path):
    keys, strangers = tmp_path / "keys", tmp_path / "stranger-keys"
    generate_keys(keys)
    generate_keys(strangers)
    fe, be, st = free_port(), free_port(), free_port()
    common = {"models_dir": str(demo_dir), "audio_encoder": str(demo_dir / "audio_encoder.onnx"),
              "onnx": {"intra_op_threads": 1}, "capacity": {"max_models": 2, "max_memory_gb": 2},
              "cluster": {"heartbeat_interval_s": 0.25, "heartbeat_liveness": 3},
              "logging": {"stats_report_minutes": 0}}
    endpoints = {"frontend": f"tcp://127.0.0.1:{fe}", "backend": f"tcp://{BROKER_IP}:{be}",
                 "stats": f"tcp://127.0.0.1:{st}"}
    py = [sys.executable, "-m", "lipsync_cluster.cli"]

    # Without CURVE the broker refuses the veth address (it is not loopback).
    plain = _write(tmp_path / "plain.yaml", {**common, "cluster": {**common["cluster"], **endpoints}})
    out = subprocess.run([*py, "broker", "--config", str(plain)], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert out.returncode != 0 and "without CurveZMQ" in out.stderr, out.stderr[-2000:]

    secure = _write(tmp_path / "broker.yaml", {**common, "cluster": {**common["cluster"], **endpoints},
                                               "security": {"curve": True, "keys_dir": str(keys)}})
    worker_cfg = _write(tmp_path / "worker.yaml", common)
    procs: list[subprocess.Popen] = []
    try:
        broker = _proc([*py, "broker", "--config", str(secure)], tmp_path / "broker.log")
        procs.append(broker)

        def remote_worker(name: str, *key_args: str) -> subprocess.Popen:
            p = _proc(["ip", "netns", "exec", netns, *py, "worker", "--config", str(worker_cfg),
                       "--broker", f"tcp://{BROKER_IP}:{be}", "--name", name, *key_args],
                      tmp_path / f"{name}.log")
            procs.append(p)
            return p

        good = remote_worker("remote-w", "--keys", str(keys))
        with Client(f"tcp://127.0.0.1:{fe}", timeout=60, curve=CurveKeys.from_dir(keys, "client")) as client:
            def registered() -> bool:
                assert broker.poll() is None, (tmp_path / "broker.log").read_text()[-3000:]
                assert good.poll() is None, (tmp_path / "remote-w.log").read_text()[-3000:]
                return client.health().get("workers", 0) >= 1

            wait_until(registered, 60, "the remote worker to register")
            stats = client.model_stats()
            (entry,) = stats["workers"]
            assert entry["worker"] == "remote-w"
            # It really lives in the other namespace (ip netns exec keeps the pid).
            assert os.readlink(f"/proc/{entry['pid']}/ns/net") != os.readlink("/proc/self/ns/net")
            result = client.infer("demo_ada", audio_features=np.zeros((2, 32, 16, 16), np.float32),
                                  batch_size=2, format="jpeg")
            assert result.worker == "remote-w" and len(result.frames) == 2

            # Strangers: a worker with keys the broker does not list, and one with no keys.
            stranger = remote_worker("stranger", "--worker-key", str(strangers / "worker.key_secret"),
                                     "--broker-key", str(keys / "broker.key"))
            keyless = remote_worker("keyless")
            # started, connected and refused: both sides say so in their logs
            wait_until(lambda: "refused a CurveZMQ peer on lipsync-workers" in (tmp_path / "broker.log").read_text()
                       and "the broker refused this key" in (tmp_path / "stranger.log").read_text(), 60,
                       "the broker to refuse the stranger, and the stranger to say so")
            holds_for(lambda: stranger.poll() is None and keyless.poll() is None, 2.0,
                      "the refused workers running (refused, not crashed)")
            names = {w["worker"] for w in client.model_stats()["workers"]}
            assert names == {"remote-w"}, names
            assert client.infer("demo_ben", audio_features=np.zeros((32, 16, 16), np.float32)).worker == "remote-w"
        assert "refused a CurveZMQ peer on lipsync-workers" in (tmp_path / "broker.log").read_text()
        assert "the broker refused this key" in (tmp_path / "stranger.log").read_text(), "the worker says why"
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        from lipsync_cluster.config import load_config
        from lipsync_cluster.supervisor import shm_namespace

        worker_view = load_config(worker_cfg)  # the remote worker's namespace: its --broker endpoint
        worker_view.cluster.backend = f"tcp://{BROKER_IP}:{be}"
        FrameStore(shm_namespace(worker_view)).cleanup()
