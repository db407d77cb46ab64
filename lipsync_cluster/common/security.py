"""CurveZMQ keys, the loopback rule, and the broker's ZAP authenticator.

By default every socket binds to loopback and speaks plain ZMTP. Binding any other address
requires CurveZMQ (encryption + authentication): the broker's sockets become CURVE servers, and a
ZAP handler (``zmq.auth.thread.ThreadAuthenticator``) admits only peers whose public key is in an
allow-list folder: workers on the backend, clients (and stats subscribers) on the frontend and the
PUB socket. ``load_model`` / ``unload_model`` can further be limited to admin keys; the broker
learns which key sent a message from the frame property ``User-Id`` that ZAP set (the key in Z85).

``lipsync-cluster keys generate DIR`` writes (``zmq.auth.create_certificates``)::

    DIR/broker.key  DIR/broker.key_secret       the broker's pair (.key = public only)
    DIR/worker.key  DIR/worker.key_secret       for every worker (or make one per worker)
    DIR/client.key  DIR/client.key_secret       for applications and gateways
    DIR/admin.key   DIR/admin.key_secret        for operators (load/unload)
    DIR/allowed_workers/worker.key              public keys the backend admits
    DIR/allowed_clients/client.key, admin.key   public keys the frontend and stats PUB admit
    DIR/admins/admin.key                        public keys allowed to load_model / unload_model

A ``*.key_secret`` file holds a secret key: it never leaves the machine it is meant for. The
allow-list folders are read again when they change (checked at most once a second), so a key is
added or revoked by adding or deleting a file, without a restart.

This module sits in ``common``: it imports nothing from the rest of the package, and takes the
``security`` config section duck-typed.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional
from urllib.parse import urlparse

import zmq

from .errors import Unauthorized

log = logging.getLogger("lipsync_cluster.security")

ROLES = ("broker", "worker", "client", "admin")
ALLOW_DIRS = {"allowed_workers": ("worker",), "allowed_clients": ("client", "admin"), "admins": ("admin",)}
CLIENT_DOMAIN = "lipsync-clients"     # frontend and stats PUB
WORKER_DOMAIN = "lipsync-workers"     # backend
ADMIN_OPS = ("load_model", "unload_model")

# Environment for programs that have no config file (Client, management CLI commands, gateway).
ENV_KEYS_DIR = "LIPSYNC_KEYS_DIR"          # DIR from `keys generate`: client.key_secret + broker.key
ENV_CLIENT_KEY = "LIPSYNC_CLIENT_KEY"      # a *.key_secret file (overrides the one in the folder)
ENV_BROKER_KEY = "LIPSYNC_BROKER_KEY"      # the broker's public *.key file


class SecurityError(RuntimeError):
    """A security setting is missing or wrong; the message says what to do."""


# --- keys ---------------------------------------------------------------------------------


def generate_keys(directory: str | os.PathLike, *, force: bool = False) -> dict[str, Path]:
    """Write a key pair per role plus the allow-list folders; returns ``{role: secret file}``.

    Refuses to overwrite existing keys unless ``force`` (a new broker key locks every peer out).
    """
    import zmq.auth

    out = Path(directory)
    existing = [out / f"{role}.key_secret" for role in ROLES if (out / f"{role}.key_secret").exists()]
    if existing and not force:
        raise SecurityError(f"{existing[0]} already exists; pass --force to replace every key in {out}")
    out.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    for role in ROLES:
        for suffix in (".key", ".key_secret"):
            (out / f"{role}{suffix}").unlink(missing_ok=True)
        public, secret = zmq.auth.create_certificates(str(out), role)
        os.chmod(secret, 0o600)
        made[role] = Path(secret)
    for folder, roles in ALLOW_DIRS.items():
        d = out / folder
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        for role in roles:
            shutil.copyfile(out / f"{role}.key", d / f"{role}.key")
    return made


def load_public(path: str | os.PathLike) -> bytes:
    """The public key (Z85) from a ``.key`` or ``.key_secret`` file."""
    import zmq.auth

    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read a CurveZMQ key from {path}: {exc}") from None
    if not public:
        raise SecurityError(f"{path} holds no public key")
    return public


def load_secret(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file."""
    import zmq.auth

    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read a CurveZMQ key pair from {path}: {exc}") from None
    if not secret:
        raise SecurityError(f"{path} holds no secret key (use the .key_secret file, not the public .key)")
    return public, secret


@dataclass(frozen=True)
class CurveKeys:
    """A CURVE client's identity: its own pair and the broker's public key."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def load(cls, secret_file: str | os.PathLike, server_public_file: str | os.PathLike) -> "CurveKeys":
        public, secret = load_secret(secret_file)
        return cls(public, secret, load_public(server_public_file))

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, role: str = "client") -> "CurveKeys":
        d = Path(directory)
        return cls.load(d / f"{role}.key_secret", d / "broker.key")

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client of the broker (before ``connect``)."""
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server)


def client_keys_from_env(environ: Optional[dict] = None) -> Optional[CurveKeys]:
    """Client keys named by the environment, or None (plain ZMTP, for a loopback cluster)."""
    env = os.environ if environ is None else environ
    folder, secret, server = env.get(ENV_KEYS_DIR), env.get(ENV_CLIENT_KEY), env.get(ENV_BROKER_KEY)
    if not (folder or secret or server):
        return None
    secret = secret or (os.path.join(folder, "client.key_secret") if folder else None)
    server = server or (os.path.join(folder, "broker.key") if folder else None)
    if not secret or not server:
        raise SecurityError(f"set {ENV_KEYS_DIR}, or both {ENV_CLIENT_KEY} and {ENV_BROKER_KEY}")
    return CurveKeys.load(secret, server)


# --- the security config section -------------------------------------------------------------

_DEFAULT_FILES = {
    "broker_key": "broker.key_secret", "server_key": "broker.key", "worker_key": "worker.key_secret",
    "client_key": "client.key_secret", "allowed_workers": "allowed_workers",
    "allowed_clients": "allowed_clients", "admin_keys": "admins",
}


def setting_path(security: Any, name: str) -> Optional[str]:
    """A path setting of the ``security`` section: given explicitly, else inside ``keys_dir``."""
    value = getattr(security, name, None)
    if value:
        return str(value)
    folder = getattr(security, "keys_dir", None)
    return os.path.join(folder, _DEFAULT_FILES[name]) if folder else None


def _need(security: Any, name: str, what: str) -> str:
    path = setting_path(security, name)
    if not path:
        raise SecurityError(f"security.{name} is not set ({what}); set security.keys_dir to the folder "
                            "written by 'lipsync-cluster keys generate DIR', or security.{name} itself")
    if not os.path.exists(path):
        raise SecurityError(f"security.{name}: {path} does not exist ({what}); "
                            "create keys with 'lipsync-cluster keys generate DIR'")
    return path


def worker_keys(security: Any) -> Optional[CurveKeys]:
    """A worker's CURVE identity from the config (None without ``security.curve``)."""
    if security is None or not getattr(security, "curve", False):
        return None
    return CurveKeys.load(_need(security, "worker_key", "this worker's secret key"),
                          _need(security, "server_key", "the broker's public key"))


def config_client_keys(security: Any) -> Optional[CurveKeys]:
    """Client keys for programs that read the config (supervisor): ``security.client_key``."""
    if security is None or not getattr(security, "curve", False):
        return client_keys_from_env()
    return CurveKeys.load(_need(security, "client_key", "a client secret key"),
                          _need(security, "server_key", "the broker's public key"))


# --- the loopback rule ----------------------------------------------------------------------


def is_loopback(endpoint: str) -> bool:
    """True for endpoints only this host can reach: 127.0.0.0/8, ::1, localhost, ipc, inproc."""
    url = urlparse(endpoint)
    if url.scheme in ("ipc", "inproc"):
        return True
    if url.scheme != "tcp":
        return False
    host = url.netloc.rsplit(":", 1)[0] if url.netloc else ""
    if ";" in host:  # "source;destination" form: judge the part we bind/connect to
        host = host.split(";")[-1]
    host = host.strip("[]")
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # *, 0.0.0.0 (ip_address says unspecified), interface names, host names


def check_bind_allowed(endpoints: Iterable[tuple[str, str]], curve: bool) -> None:
    """Raise :class:`SecurityError` when a non-loopback endpoint would be bound without CURVE."""
    if curve:
        return
    for role, endpoint in endpoints:
        if not is_loopback(endpoint):
            raise SecurityError(
                f"refusing to bind the broker {role} socket to {endpoint} without CurveZMQ: only loopback "
                "is allowed in the clear. Create keys with 'lipsync-cluster keys generate DIR' and set "
                "security.curve: true and security.keys_dir: DIR (see docs/SECURITY.md)")


# --- the broker side ---------------------------------------------------------------------------


class KeyFolder:
    """The Z85 public keys of the ``*.key`` files in a folder, re-read when the folder changes."""

    def __init__(self, path: Optional[str], min_gap_s: float = 1.0) -> None:
        self.path = path
        self.min_gap_s = min_gap_s
        self._lock = threading.Lock()
        self._keys: frozenset[bytes] = frozenset()
        self._stamp: Any = None
        self._checked = -1e18
        self._warned: dict[bytes, float] = {}
        self.refresh(force=True)

    def _fingerprint(self) -> Any:
        if not self.path:
            return None
        try:
            st = os.stat(self.path)
            names = sorted(os.listdir(self.path))
        except OSError:
            return None
        stamps = []
        for name in names:
            try:
                fst = os.stat(os.path.join(self.path, name))
                stamps.append((name, fst.st_mtime_ns, fst.st_size))
            except OSError:
                pass
        return (st.st_mtime_ns, tuple(stamps))

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if not force and now - self._checked < self.min_gap_s:
                return
            self._checked = now
            stamp = self._fingerprint()
            if stamp == self._stamp and not force:
                return
            self._stamp = stamp
            keys = set()
            if self.path and os.path.isdir(self.path):
                for name in sorted(os.listdir(self.path)):
                    if name.endswith(".key"):
                        try:
                            keys.add(load_public(os.path.join(self.path, name)))
                        except SecurityError as exc:
                            log.warning("ignoring %s: %s", name, exc)
            self._keys = frozenset(keys)

    def __contains__(self, z85_key: object) -> bool:
        self.refresh()
        if isinstance(z85_key, str):
            z85_key = z85_key.encode("ascii")
        return z85_key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    # zmq.auth's credentials provider protocol
    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key in self
        now = time.monotonic()
        if not allowed and now - self._warned.get(key, -1e18) > 60.0:  # a refused peer retries often
            if len(self._warned) > 1000:
                self._warned.clear()
            self._warned[key] = now
            log.warning("refused a CurveZMQ peer on %s: key %s is not in %s", domain,
                        key.decode("ascii", "replace"), self.path)
        return allowed


class BrokerSecurity:
    """What the broker needs when ``security.curve`` is on: its key, the ZAP thread, the lists."""

    def __init__(self, security: Any) -> None:
        self.curve = bool(getattr(security, "curve", False)) if security is not None else False
        self.admin_only = bool(getattr(security, "admin_only_management", False)) if security is not None else False
        self.auth: Any = None
        self.public = self.secret = b""
        self.workers = self.clients = self.admins = None
        if not self.curve:
            if self.admin_only:
                raise SecurityError("security.admin_only_management needs security.curve: true "
                                    "(without CURVE the broker cannot tell who sent a request)")
            return
        self.public, self.secret = load_secret(_need(security, "broker_key", "the broker's secret key"))
        self.workers = KeyFolder(_need(security, "allowed_workers", "public keys of the workers allowed in"))
        self.clients = KeyFolder(_need(security, "allowed_clients", "public keys of the clients allowed in"))
        self.admins = KeyFolder(_need(security, "admin_keys", "public keys allowed to load/unload models")
                                if self.admin_only else setting_path(security, "admin_keys"))
        if not len(self.workers):
            log.warning("security: %s lists no worker key; no worker can join", self.workers.path)

    def start(self, ctx: zmq.Context) -> None:
        """Start the ZAP handler (before any CURVE socket binds)."""
        if not self.curve or self.auth is not None:
            return
        from zmq.auth.thread import ThreadAuthenticator

        self.auth = ThreadAuthenticator(ctx, log=logging.getLogger("lipsync_cluster.security.zap"))
        self.auth.start()
        self.auth.configure_curve_callback(domain=WORKER_DOMAIN, credentials_provider=self.workers)
        self.auth.configure_curve_callback(domain=CLIENT_DOMAIN, credentials_provider=self.clients)

    def stop(self) -> None:
        if self.auth is not None:
            try:
                self.auth.stop()
            finally:
                self.auth = None

    def apply_server(self, sock: zmq.Socket, role: str) -> None:
        """Make ``sock`` a CURVE server whose peers ZAP checks (``role``: frontend/backend/stats)."""
        if not self.curve:
            return
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.ZAP_DOMAIN, (WORKER_DOMAIN if role == "backend" else CLIENT_DOMAIN).encode())
        try:  # no ZAP handler -> refuse, never admit (libzmq >= 4.3)
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        except (AttributeError, zmq.ZMQError):
            pass

    def authorize(self, op: Any, frame: Any) -> None:
        """Raise :class:`Unauthorized` when ``op`` is admin-only and the sender's key is no admin's.

        ``frame``: any received zmq Frame of the message (its ``User-Id`` property is the key).
        """
        if not self.admin_only or op not in ADMIN_OPS:
            return
        user = user_id(frame)
        if user is None or user not in self.admins:
            raise Unauthorized(f"'{op}' is restricted to admin keys (security.admin_only_management); "
                               f"this client's key {'is not an admin key' if user else 'is unknown'}",
                               op=op)


class HandshakeDiagnosis:
    """Reads a broker peer's socket-monitor events and says, in words, why the broker is not heard
    from. The one reading of CurveZMQ handshakes: the client transport and the worker loop both use it.
    """

    EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
              | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    # A broker dying mid-handshake also fails one; only a run of failures means the keys are wrong
    # (a CURVE server cannot read a HELLO sealed for another server key).
    FAILURES_IN_A_ROW = 3
    KEYS_FROM = {"client": "LIPSYNC_KEYS_DIR", "worker": "--keys, or security.keys_dir in the config"}

    def __init__(self, role: str, curve: bool) -> None:
        self.role = role                  # "client" or "worker": names the allow-list folder
        self.curve = curve                # whether this peer holds keys
        self.last: Optional[str] = None   # the latest failure since the last success
        self.failures = 0

    def feed(self, event: dict) -> Optional[str]:
        """Read one monitor event; return the failure in words once it is certain (a refused key, a
        security mechanism that differs, or a run of failed handshakes), else None."""
        kind = event.get("event")
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.last, self.failures = None, 0
            return None
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:  # ZAP said no: definitive
            self.last = (f"the broker refused this key (this {self.role}'s CurveZMQ key is not in the broker's "
                         f"security.allowed_{self.role}s folder)")
            return self.last
        if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and \
                event.get("value") == getattr(zmq, "PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH", -1):
            self.last = ("the broker does not use CurveZMQ but this peer has keys" if self.curve else
                         f"the broker requires CurveZMQ: give the {self.role} keys ({self.KEYS_FROM[self.role]})")
            return self.last
        if kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
            self.failures += 1
            self.last = ("the CurveZMQ handshake with the broker keeps failing (is broker.key the broker's "
                         "current public key?)")
            return self.last if self.curve and self.failures >= self.FAILURES_IN_A_ROW else None
        return None


def read_monitor(monitor: zmq.Socket) -> Iterator[dict]:
    """The events waiting on a socket monitor, without blocking."""
    from zmq.utils.monitor import recv_monitor_message

    while True:
        try:
            yield recv_monitor_message(monitor, zmq.NOBLOCK)
        except zmq.ZMQError:  # Again: nothing more; any other: the monitor is gone
            return


class HandshakeWatch:
    """Watches a worker's CURVE socket's handshakes, to say *why* the broker is not heard from."""

    def __init__(self, sock: zmq.Socket, role: str = "worker") -> None:
        self.sock = sock
        self.monitor = sock.get_monitor_socket(HandshakeDiagnosis.EVENTS)
        self.diagnosis = HandshakeDiagnosis(role, curve=True)

    def failure(self) -> Optional[str]:
        """The latest handshake failure since the last success, in words (None: none seen)."""
        for event in read_monitor(self.monitor):
            self.diagnosis.feed(event)
        return self.diagnosis.last

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(0)


def user_id(frame: Any) -> Optional[str]:
    """The ZAP User-Id (the peer's public key in Z85) of a received message, if any."""
    get = getattr(frame, "get", None)
    if get is None:
        return None
    try:
        value = get("User-Id")
    except (zmq.ZMQError, KeyError, TypeError, ValueError):
        return None
    return value or None


__all__ = ["BrokerSecurity", "CurveKeys", "HandshakeDiagnosis", "HandshakeWatch", "KeyFolder", "SecurityError", "check_bind_allowed",
           "client_keys_from_env", "config_client_keys", "generate_keys", "is_loopback", "load_public",
           "load_secret", "read_monitor", "setting_path", "user_id", "worker_keys"]
