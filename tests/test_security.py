"""Security: loopback by default, CurveZMQ + ZAP allow-lists, admin-only management, no paths.

A broker in a thread with ``security.curve`` on loopback (CURVE works on any address; only
non-loopback *requires* it), NoopHandler workers, and clients holding listed, unlisted or no keys.
"""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lipsync_cluster.broker import BindError, Broker
from lipsync_cluster.cli import main as cli
from lipsync_cluster.client import Client, Unauthorized
from lipsync_cluster.common.errors import BadRequest
from lipsync_cluster.common.security import (CurveKeys, SecurityError, check_bind_allowed,
                                             client_keys_from_env, generate_keys, is_loopback)
from lipsync_cluster.config.schema import ConfigError, load_config
from lipsync_cluster.worker.loop import WorkerLoop
from lipsync_cluster.worker.noop import NoopHandler

from test_broker_support import catalog_of, wait_for
from waiting import holds_for, wait_until

HB = 0.1


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    generate_keys(folder)
    return folder


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory) -> Path:
    """A second, unrelated set: none of its keys is listed by the first broker."""
    folder = tmp_path_factory.mktemp("other-keys")
    generate_keys(folder)
    return folder


def secure_config(keys: Path, **security):
    return load_config({
        "cluster": {"frontend": "tcp://127.0.0.1:*", "backend": "tcp://127.0.0.1:*",
                    "stats": "tcp://127.0.0.1:*", "heartbeat_interval_s": HB, "heartbeat_liveness": 3},
        "security": {"curve": True, "keys_dir": str(keys), **security},
        "logging": {"stats_report_minutes": 0}})


class SecureCluster:
    """A CURVE broker thread plus helpers to start workers and clients with given keys."""

    def __init__(self, keys: Path, **security) -> None:
        self.keys = keys
        self.broker = Broker(secure_config(keys, **security), lambda: catalog_of("a", "b"))
        self.broker.bind()
        self.frontend = self.broker.frontend_endpoint
        self.backend = self.broker.backend_endpoint
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.broker.run, args=(self._stop,), daemon=True)
        self._thread.start()
        self._workers: list[tuple[threading.Event, threading.Thread]] = []
        self._clients: list[Client] = []

    def worker(self, name: str, curve) -> WorkerLoop:
        loop = WorkerLoop(self.backend, NoopHandler(), name=name, heartbeat_interval_s=HB,
                          heartbeat_liveness=3, curve=curve, drain_timeout_s=2.0)
        stop = threading.Event()
        thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
        thread.start()
        self._workers.append((stop, thread))
        return loop

    def client(self, curve, timeout: float = 3.0) -> Client:
        c = Client(self.frontend, timeout=timeout, curve=curve)
        self._clients.append(c)
        return c

    def close(self) -> None:
        for c in self._clients:
            c.close()
        for stop, thread in self._workers:
            stop.set()
        for stop, thread in self._workers:
            thread.join(5)
        self._stop.set()
        self._thread.join(5)
        assert not self._thread.is_alive()

    def __enter__(self) -> "SecureCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def test_keys_generate_writes_pairs_and_allow_lists(tmp_path):
    runner = CliRunner()
    out = runner.invoke(cli, ["keys", "generate", str(tmp_path / "k")])
    assert out.exit_code == 0, out.output
    k = tmp_path / "k"
    for role in ("broker", "worker", "client", "admin"):
        assert (k / f"{role}.key").is_file() and (k / f"{role}.key_secret").is_file()
        assert (k / f"{role}.key_secret").stat().st_mode & 0o077 == 0, "secret keys are private"
        assert "secret-key" not in (k / f"{role}.key").read_text()
    assert sorted(p.name for p in (k / "allowed_workers").iterdir()) == ["worker.key"]
    assert sorted(p.name for p in (k / "allowed_clients").iterdir()) == ["admin.key", "client.key"]
    assert sorted(p.name for p in (k / "admins").iterdir()) == ["admin.key"]
    again = runner.invoke(cli, ["keys", "generate", str(k)])
    assert again.exit_code != 0 and "--force" in again.output, "keys are never overwritten by accident"
    assert runner.invoke(cli, ["keys", "generate", str(k), "--force"]).exit_code == 0


@pytest.mark.processes
def test_secret_key_files_are_created_private_and_checked_when_loaded(tmp_path):
    """Secret files are created 0600 (never chmodded afterwards: no moment at 0644), a new keys
    folder is 0700, and a secret file others can read is refused when loaded, by a real worker too."""
    import subprocess
    import sys

    code = f"""
import os
os.umask(0o022)
os.chmod = None  # generating must not need a chmod: the files are created with their mode
from lipsync_cluster.common.security import generate_keys
generate_keys({str(tmp_path / "k")!r})
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=str(Path(__file__).resolve().parents[1]))
    assert done.returncode == 0, done.stderr[-2000:]
    k = tmp_path / "k"
    assert k.stat().st_mode & 0o777 == 0o700
    for role in ("broker", "worker", "client", "admin"):
        assert (k / f"{role}.key_secret").stat().st_mode & 0o777 == 0o600
        assert (k / f"{role}.key").stat().st_mode & 0o777 == 0o644
    CurveKeys.from_dir(k, "client")  # loads
    (k / "worker.key_secret").chmod(0o644)
    with pytest.raises(SecurityError, match=r"mode 644: a secret key file must be readable by its owner only"):
        CurveKeys.from_dir(k, "worker")
    worker = subprocess.run([sys.executable, "-m", "lipsync_cluster.cli", "worker", "--broker", "tcp://127.0.0.1:9",
                             "--keys", str(k), "--models-dir", str(tmp_path)], capture_output=True, text=True,
                            timeout=60, cwd=str(Path(__file__).resolve().parents[1]))
    assert worker.returncode != 0 and "chmod 600" in worker.stderr, worker.stderr[-2000:]


def test_loopback_is_the_default_and_anything_else_needs_curve():
    assert load_config({}).frontend == "tcp://127.0.0.1:5555"
    for ep in ("tcp://127.0.0.1:5555", "tcp://127.3.2.1:1", "tcp://localhost:5", "tcp://[::1]:5",
               "ipc:///tmp/x", "inproc://x"):
        assert is_loopback(ep), ep
    for ep in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.200.0.1:5", "tcp://eth0:5",
               "tcp://example.com:5", "tcp://[::]:5"):
        assert not is_loopback(ep), ep
    check_bind_allowed([("frontend", "tcp://0.0.0.0:1")], curve=True)
    cfg = load_config({"cluster": {"frontend": "tcp://0.0.0.0:*", "backend": "tcp://127.0.0.1:*",
                                   "stats": "tcp://127.0.0.1:*"}})
    broker = Broker(cfg, lambda: {})
    with pytest.raises(BindError, match="without CurveZMQ.*keys generate"):
        broker.bind()
    broker.ctx.term()
    with pytest.raises(ConfigError, match="admin_only_management.*curve"):
        load_config({"security": {"admin_only_management": True}})


def test_curve_missing_keys_are_a_clear_bind_error(tmp_path):
    broker = Broker(secure_config(tmp_path / "nothing-here"), lambda: {})
    with pytest.raises(BindError, match="broker_key.*keys generate"):
        broker.bind()
    broker.ctx.term()


def test_listed_keys_are_served_and_unlisted_or_missing_keys_are_refused(keys, other_keys):
    with SecureCluster(keys) as c:
        c.worker("w-good", CurveKeys.from_dir(keys, "worker"))
        client = c.client(CurveKeys.from_dir(keys, "client"))
        wait_for(lambda: client.health()["workers"] == 1, 5, "the listed worker registered")
        header = {"op": "infer", "model_id": "a", "batch_size": 1}
        import numpy as np

        from lipsync_cluster.common.protocol import attach_arrays
        payloads = attach_arrays(header, {"audio_features": np.zeros((1, 32, 16, 16), np.float32)})
        reply, _ = client.request(header, payloads)
        assert reply["ok"] and reply["worker"] == "w-good"

        # Clients: an unlisted key, no key at all, the wrong broker key: refused, and told so.
        for curve in (CurveKeys.from_dir(other_keys, "client"), None,
                      CurveKeys.load(keys / "client.key_secret", other_keys / "broker.key")):
            bad = c.client(curve)
            t0 = time.monotonic()
            with pytest.raises(Unauthorized):
                bad.health()
            assert time.monotonic() - t0 < 2.5, "refusal is reported, not waited out"
        # A worker key is not a client key: the frontend only admits allowed_clients.
        with pytest.raises(Unauthorized):
            c.client(CurveKeys.from_dir(keys, "worker")).health()

        # Workers: an unlisted key or none at all never registers; nothing reaches them.
        intruder = c.worker("w-intruder", CurveKeys.load(other_keys / "worker.key_secret", keys / "broker.key"))
        plain = c.worker("w-plain", None)
        holds_for(lambda: client.health()["workers"] == 1, 1.0, "one worker registered (the listed one)")
        assert {w["worker"] for w in client.model_stats()["workers"]} == {"w-good"}
        assert intruder.served == 0 and plain.served == 0
        assert client.request(dict(header, model_id="b"), payloads)[0]["worker"] == "w-good"


def test_revoking_a_key_takes_effect_without_a_restart(keys, tmp_path):
    folder = tmp_path / "k"
    shutil.copytree(keys, folder)
    with SecureCluster(folder) as c:
        assert c.client(CurveKeys.from_dir(folder, "client")).health()["live"]
        (folder / "allowed_clients" / "client.key").unlink()

        def refused() -> bool:
            try:
                c.client(CurveKeys.from_dir(folder, "client")).health()
            except Unauthorized:
                return True
            return False

        # the allow-list folder is re-read at most once a second
        wait_until(refused, 5, "the revoked client key to be refused")
        assert c.client(CurveKeys.from_dir(folder, "admin")).health()["live"]


def test_load_and_unload_can_be_restricted_to_admin_keys(keys):
    with SecureCluster(keys, admin_only_management=True) as c:
        c.worker("w0", CurveKeys.from_dir(keys, "worker"))
        user = c.client(CurveKeys.from_dir(keys, "client"))
        admin = c.client(CurveKeys.from_dir(keys, "admin"))
        wait_for(lambda: user.health()["workers"] == 1, 5, "worker registered")
        for call in (lambda: user.load_model("a"), lambda: user.unload_model("a")):
            with pytest.raises(Unauthorized, match="admin"):
                call()
        assert admin.load_model("a")["workers"] == ["w0"]
        assert user.list_models() and user.model_stats()["workers"], "read-only ops stay open"
        assert admin.unload_model("a")["workers"] == ["w0"]
        assert c.broker.stats.total_errors.get("unauthorized") == 2


def test_client_keys_from_the_environment(keys, monkeypatch):
    assert client_keys_from_env({}) is None
    k = client_keys_from_env({"LIPSYNC_KEYS_DIR": str(keys)})
    assert k == CurveKeys.from_dir(keys, "client")
    with pytest.raises(SecurityError):
        client_keys_from_env({"LIPSYNC_CLIENT_KEY": str(keys / "client.key_secret")})
    with pytest.raises(SecurityError, match="secret"):
        CurveKeys.load(keys / "client.key", keys / "broker.key")  # a public file is no identity
    with SecureCluster(keys) as c:
        monkeypatch.setenv("LIPSYNC_KEYS_DIR", str(keys))
        with Client(c.frontend, timeout=3) as client:  # picks the keys up by itself
            assert client.health()["live"]


def test_supervisor_config_carries_security(keys, tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"security": {"curve": True, "keys_dir": "keys"}}))
    cfg = load_config(path)
    assert cfg.security.keys_dir == str(tmp_path / "keys"), "paths are relative to the config file"
    from lipsync_cluster.common.security import config_client_keys, worker_keys

    cfg.security.keys_dir = str(keys)
    assert worker_keys(cfg.security) == CurveKeys.from_dir(keys, "worker")
    assert config_client_keys(cfg.security) == CurveKeys.from_dir(keys, "client")
    assert worker_keys(load_config({}).security) is None


# --- no request names a path ------------------------------------------------------------------


@pytest.mark.parametrize("model_id", ["../demo_ada", "/etc/passwd", "demo_ada/../../x", "a/b", "A", "",
                                      ".", "demo ada", "x" * 65, "é", "a\x00b", 5, None])
def test_model_ids_are_validated_by_broker_and_worker(model_id):
    from lipsync_cluster.common.protocol import require_model_id

    with pytest.raises(BadRequest, match="model_id"):
        require_model_id({"model_id": model_id})


def test_worker_never_resolves_a_path_from_a_request(demo_dir):
    from lipsync_cluster.config.schema import load_config as lc
    from lipsync_cluster.worker.service import WorkerService

    service = WorkerService(lc({"models_dir": str(demo_dir), "capacity": {"max_models": 1}}),
                            shm_namespace=f"sec-{time.monotonic_ns()}")
    try:
        for op in ("infer", "load_model", "unload_model"):
            for bad in ("../demo_ada", str(demo_dir / "demo_ada"), "demo_ada/model.onnx"):
                with pytest.raises(BadRequest, match="model_id"):
                    service.handle({"client_op": op, "model_id": bad, "batch_size": 1}, [])
        assert service.cache.loaded_ids() == []
    finally:
        service.close()


def test_a_manifest_cannot_point_outside_its_package(demo_dir, tmp_path):
    from lipsync_cluster.common.catalog import Catalog

    models = tmp_path / "models"
    shutil.copytree(demo_dir / "demo_ada", models / "evil_abs")
    shutil.copytree(demo_dir / "demo_ada", models / "evil_up")
    for name, value in (("evil_abs", str(demo_dir / "demo_ben" / "model.onnx")), ("evil_up", "../../x.onnx")):
        manifest = models / name / "model.yaml"
        data = yaml.safe_load(manifest.read_text())
        data.update(id=name, onnx=value)
        data.pop("version", None)
        manifest.write_text(yaml.safe_dump(data))
    catalog = Catalog(str(models))
    assert catalog.packages() == {}
    for name in ("evil_abs", "evil_up"):
        assert "must stay inside the package folder" in catalog.errors[name]


def test_gateway_static_files_do_not_escape_their_folder():
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer
    from yarl import URL

    from lipsync_cluster.gateway.server import make_app

    async def go():
        client = TestClient(TestServer(make_app("tcp://127.0.0.1:9")))
        await client.start_server()
        try:
            ok = await client.get("/static/app.js")
            assert ok.status == 200
            for raw in ("/static/../server.py", "/static/%2e%2e/server.py", "/static/..%2fserver.py",
                        "/static/%2e%2e%2f%2e%2e%2fcli.py", "/static//etc/passwd"):
                r = await client.get(URL(raw, encoded=True))
                body = await r.read()
                assert r.status in (400, 403, 404), (raw, r.status)
                assert b"import" not in body and b"root:" not in body, raw
        finally:
            await client.close()

    asyncio.run(go())


@pytest.mark.processes
def test_a_whole_cluster_starts_and_serves_under_curve(make_cluster, keys):
    """`start` with security on: the supervisor, its workers and clients all use their keys."""
    import numpy as np

    sup = make_cluster(security={"curve": True, "keys_dir": str(keys)}, cluster={"per_gpu": 1})
    with Client(sup.config.frontend, timeout=30, curve=CurveKeys.from_dir(keys, "client")) as client:
        assert client.health()["workers"] == 1
        result = client.infer("demo_ada", audio_features=np.zeros((32, 16, 16), np.float32), format="jpeg")
        assert result.worker == "w0-cpu"
    with Client(sup.config.frontend, timeout=5) as stranger, pytest.raises(Unauthorized):
        stranger.health()
    # The broker's refusal came before the request was made (the handshake follows the connect):
    # it still answers the request, rather than a silent wait for the timeout.
    with Client(sup.config.frontend, timeout=5) as stranger:
        wait_until(lambda: stranger._transport._handshake.refused, 10, "the broker's refusal, before any request")
        with pytest.raises(Unauthorized):
            stranger.health()


@pytest.mark.processes
def test_a_package_symlinked_out_gets_a_short_reason_and_reads_nothing(make_cluster, demo_dir, tmp_path):
    """A package's crop_rects.json (or a frame) symlinked to a file of the host: a running cluster
    refuses the package, and the client hears a short reason, without the file's content or the
    server's paths (those are in the log)."""
    import json

    import numpy as np

    from lipsync_cluster.client import ModelLoadFailed

    models = tmp_path / "models"
    secret = tmp_path / "host-secret.json"
    secret.write_text(json.dumps([[1, 2, 3, "SECRET-TOKEN-7"]] * 12))
    shutil.copytree(demo_dir / "demo_ada", models / "demo_ada")
    for name, victim in (("evil_rects", "crop_rects.json"), ("evil_frame", "frames/frame_0004.jpg")):
        shutil.copytree(demo_dir / "demo_ben", models / name)
        manifest = models / name / "model.yaml"
        manifest.write_text(manifest.read_text().replace("id: demo_ben", f"id: {name}"))
        (models / name / victim).unlink()
        (models / name / victim).symlink_to(secret)
    sup = make_cluster(models_dir=str(models), cluster={"per_gpu": 1})
    with Client(sup.config.frontend, timeout=30) as client:
        for name in ("evil_rects", "evil_frame"):
            with pytest.raises(ModelLoadFailed) as info:
                client.infer(name, audio_features=np.zeros((32, 16, 16), np.float32))
            said = info.value.message + repr(info.value.details)
            assert "leads outside the package folder" in said, said
            assert "SECRET-TOKEN" not in said and str(tmp_path) not in said, said
        assert client.infer("demo_ada", audio_features=np.zeros((32, 16, 16), np.float32)).worker


def test_a_worker_name_is_bound_to_its_key(tmp_path):
    """CURVE on the workers' socket: a key in allowed_workers/NAME.key is the only one that may
    register as NAME; a name first registered with one key cannot be taken by another admitted key."""
    from lipsync_cluster.common.security import write_key_pair

    keys = tmp_path / "keys"
    generate_keys(keys)
    write_key_pair(keys, "w-named")
    shutil.copyfile(keys / "w-named.key", keys / "allowed_workers" / "w-named.key")
    generic = CurveKeys.from_dir(keys, "worker")
    named = CurveKeys.load(keys / "w-named.key_secret", keys / "broker.key")
    with SecureCluster(keys) as c:
        client = c.client(CurveKeys.from_dir(keys, "client"))

        def names() -> set:
            return {w["worker"] for w in client.model_stats()["workers"]}

        c.worker("w-named", generic)   # an admitted key, but not the one bound to this name
        c.worker("w-first", generic)
        wait_for(lambda: names() == {"w-first"}, 5, "the generic key registered its own name only")
        holds_for(lambda: names() == {"w-first"}, 3 * HB * 3, "only w-first registered (another key cannot take w-named)")
        c.worker("w-named", named)
        c.worker("w-first", named)     # the name's first key was the generic one
        wait_for(lambda: names() == {"w-first", "w-named"}, 5, "the named key registered its name")
        holds_for(lambda: names() == {"w-first", "w-named"}, 3 * HB * 3, "w-first and w-named registered, no more")


IMPOSTOR = """
import os, sys, time
import msgpack, zmq
backend, keys = sys.argv[1], sys.argv[2]
try:
    os.listdir(keys)
    print("read the keys")
except PermissionError:
    print("keys unreadable")
except FileNotFoundError:
    print("no keys")
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(backend)
ready = {"op": "ready", "worker": "w0-cpu", "pid": 4242, "credits": 2, "max_models": 3, "host": "impostor"}
sent = False
end = time.monotonic() + 4
while time.monotonic() < end:
    try:  # a DEALER with no completed handshake has nobody to send to: never block on it
        if not sent:
            sock.send_multipart([b"LSC1", msgpack.packb(ready)], zmq.NOBLOCK)
            sent = True
        sock.send_multipart([b"LSC1", msgpack.packb({"op": "heartbeat", "worker": "w0-cpu"})], zmq.NOBLOCK)
    except zmq.Again:
        pass
    while sock.poll(0):
        sock.recv_multipart()
    time.sleep(0.1)
print("done")
"""


@pytest.mark.processes
def test_another_local_user_cannot_register_as_a_worker(make_cluster):
    """On loopback, an unprivileged local user connects to the workers' socket and registers under
    the real worker's name (then would answer clients' requests with forged frames). `start` makes
    the workers authenticate: the impostor cannot read the keys and is never registered."""
    import os
    import subprocess
    import sys

    import numpy as np

    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv (util-linux) to act as another local user")
    sup = make_cluster(cluster={"per_gpu": 1})
    keys = str(sup.run_dir / "keys") if sup.run_dir is not None else "/nonexistent"
    impostor = subprocess.Popen([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                                 IMPOSTOR, sup.config.backend, keys], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd="/")
    try:
        with Client(sup.config.frontend, timeout=30) as client:
            def only_the_real_worker() -> bool:
                workers = client.model_stats()["workers"]
                assert [(w["worker"], w.get("pid")) for w in workers] == [("w0-cpu", sup.children[1].proc.pid)], \
                    f"an impostor registered: {workers}"
                return True

            holds_for(only_the_real_worker, 3, "only the real worker registered while the impostor tries")
            result = client.infer("demo_ada", audio_features=np.zeros((32, 16, 16), np.float32))
            assert result.worker == "w0-cpu"
        out, err = impostor.communicate(timeout=30)
        assert "done" in out, err[-2000:]
        assert "keys unreadable" in out, "another user could read the workers' keys"
    finally:
        if impostor.poll() is None:
            impostor.kill()
