"""The configuration schema.

Each section is a dataclass; :func:`load_config` reads YAML (or a dict), fills defaults and
checks every key and type. An unknown key or a wrong type raises :class:`ConfigError` naming the
key path and what is allowed, e.g. ``capacity.eviction_policy: 'mru' is not one of lru, lfu``.

Relative paths in the file are resolved against the file's folder, so a config can travel with
its models.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from ..common.protocol import MODEL_ID_RE  # config sits above common; common never imports config


class ConfigError(ValueError):
    """The configuration is wrong; the message names the key path and what is allowed."""


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    frontend_port: int = 5555
    backend_port: int = 5556
    stats_port: int = 5557
    max_message_size_mb: int = 200

    def endpoint(self, port: int) -> str:
        return f"tcp://{self.host}:{port}"


@dataclass
class CapacityConfig:
    max_models: int = 3
    max_memory_gb: float = 8.0
    # lfu: the broker evicts the model with the lowest cluster-wide request rate (decayed, half-life
    # 300 s, remembered for unloaded models too); about 1.3x the offline optimum's loads on a Zipf
    # trace where lru makes about 1.7x (docs/BENCHMARKS.md, Routing).
    eviction_policy: Literal["lru", "lfu"] = "lfu"
    idle_unload_minutes: float = 30.0  # 0 = disabled


@dataclass
class OnnxConfig:
    cuda_enabled: bool = True
    intra_op_threads: int = 0  # 0 = let ONNX Runtime decide (CPU workers get cores // workers)
    inter_op_threads: int = 1
    library_path: Optional[str] = None  # accepted in the earlier server's configs; unused by the Python runtime
    # fp16: the UNet and the audio encoder converted at load (worker/precision.py; docs/CONFIG.md).
    # fp32 by default on CPU and GPU alike: fp16's error on a GPU is measured by bench/gpu.py, not yet here.
    precision: Literal["fp32", "fp16"] = "fp32"
    # GPU workers' UNet engine (worker/engine.py): cuda (IO binding), cuda_graph, tensorrt, or auto.
    gpu_engine: Literal["auto", "cuda", "cuda_graph", "tensorrt"] = "cuda"
    tensorrt_cache_dir: Optional[str] = None  # TensorRT engine/timing cache (gpu_engine: tensorrt)


@dataclass
class ModelEntry:
    """The earlier server's explicit model form (model_path, background_dir, crop_rects_path). ``package`` may point at a package folder instead."""

    package: Optional[str] = None
    model_path: Optional[str] = None
    background_dir: Optional[str] = None
    crop_rects_path: Optional[str] = None
    audio_encoder_path: Optional[str] = None
    num_frames: Optional[int] = None
    fps: float = 25.0
    preload: bool = False
    memory_estimate_mb: Optional[float] = None


@dataclass
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    log_model_operations: bool = True
    stats_report_minutes: float = 5.0  # 0 = disabled


@dataclass
class ClusterConfig:
    gpus: int = 0
    per_gpu: int = 2
    frontend: Optional[str] = None  # default: server.host + server.frontend_port
    backend: Optional[str] = None
    stats: Optional[str] = None
    worker_credits: int = 2
    heartbeat_interval_s: float = 1.0
    heartbeat_liveness: int = 3
    max_batch_size: int = 25
    queue_limit_per_model: int = 256
    queue_limit_total: int = 4096
    # An operator's cap on the workers one model may be loaded on (0 = no cap: copies follow the
    # model's share of demand, up to every worker; broker/routing.py).
    max_copies_per_model: int = 0
    # x a model's load time: a request to be placed may wait that long for a busy worker holding a
    # colder model instead of evicting a more valuable one (fewer loads, more latency; 0 = off).
    placement_patience: float = 0.0
    # A model that fails to load is not tried again for this long (doubling per failure, up to
    # the max); requests meanwhile get the same `model_load_failed` at once (docs/RELIABILITY.md).
    load_failure_backoff_s: float = 2.0
    load_failure_backoff_max_s: float = 300.0
    restart_backoff_s: float = 0.5
    restart_backoff_max_s: float = 30.0
    metrics_port: int = 0  # the broker's Prometheus /metrics + /health/* HTTP port; 0 = off (5558 suggested)
    # Where it binds: default server.host; another address than loopback only when named here (or
    # with security.curve on), as for the ZeroMQ sockets (docs/SECURITY.md).
    metrics_host: Optional[str] = None
    # Per-model latency histograms for this many of the busiest models (57 series each); 0 = the
    # cluster-wide histograms only (docs/METRICS.md, series per model).
    metrics_model_histograms: int = 0
    # Added to each worker process's nice value (Unix; 0 = the broker's priority): inference may
    # take every core, and the broker's decisions (refusals, routing, replies) must not wait behind it.
    worker_nice: int = 10


@dataclass
class SecurityConfig:
    """CurveZMQ (docs/SECURITY.md). Required to bind any non-loopback address.

    Paths default to files inside ``keys_dir`` (as written by ``lipsync-cluster keys generate``).
    """

    curve: bool = False
    keys_dir: Optional[str] = None
    broker_key: Optional[str] = None        # broker's secret key file (keys_dir/broker.key_secret)
    server_key: Optional[str] = None        # broker's public key, for workers/clients (keys_dir/broker.key)
    worker_key: Optional[str] = None        # a worker's own secret key (keys_dir/worker.key_secret)
    client_key: Optional[str] = None        # the supervisor's client secret key (keys_dir/client.key_secret)
    allowed_workers: Optional[str] = None   # folder of worker public keys (keys_dir/allowed_workers)
    allowed_clients: Optional[str] = None   # folder of client public keys (keys_dir/allowed_clients)
    admin_keys: Optional[str] = None        # folder of admin public keys (keys_dir/admins)
    admin_only_management: bool = False     # load_model / unload_model for admin keys only
    # CURVE on the workers' socket only (clients stay plain on loopback): set by `start`, which
    # makes a key per worker in its private run folder; needs broker_key and allowed_workers.
    worker_curve: bool = False


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    onnx: OnnxConfig = field(default_factory=OnnxConfig)
    models: dict[str, ModelEntry] = field(default_factory=dict)
    models_dir: Optional[str] = None
    audio_encoder: Optional[str] = None  # shared audio-encoder ONNX (mel -> 512), for audio_pcm
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    source: Optional[str] = None  # the file this came from, for messages

    @property
    def frontend(self) -> str:
        return self.cluster.frontend or self.server.endpoint(self.server.frontend_port)

    @property
    def backend(self) -> str:
        return self.cluster.backend or self.server.endpoint(self.server.backend_port)

    @property
    def stats_endpoint(self) -> str:
        return self.cluster.stats or self.server.endpoint(self.server.stats_port)

    @property
    def max_memory_bytes(self) -> int:
        return int(self.capacity.max_memory_gb * 1024**3)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("source", None)
        return data


# --- validation ------------------------------------------------------------------------

_PATH_FIELDS = {"model_path", "background_dir", "crop_rects_path", "audio_encoder_path", "package"}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " or null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], path)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, str) and value.lower() in allowed:
            return value.lower()
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(allowed)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    raise ConfigError(f"{path}: unsupported type {tp}")  # pragma: no cover - schema bug


def _build(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key; allowed keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        key_path = f"{path}.{name}" if path else name
        tp = hints[name]
        if name == "models":
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{key_path}: expected a mapping of model id -> settings")
            kwargs[name] = {str(mid): _build(ModelEntry, entry, f"{key_path}.{mid}") for mid, entry in value.items()}
        else:
            kwargs[name] = _convert(value, tp, key_path)
    return cls(**kwargs)


def _check_ranges(cfg: Config) -> None:
    def need(cond: bool, message: str) -> None:
        if not cond:
            raise ConfigError(message)

    c, cl, s = cfg.capacity, cfg.cluster, cfg.server
    need(c.max_models >= 1, f"capacity.max_models: {c.max_models} must be at least 1")
    need(c.max_memory_gb > 0, f"capacity.max_memory_gb: {c.max_memory_gb} must be positive")
    need(c.idle_unload_minutes >= 0, "capacity.idle_unload_minutes: must be >= 0 (0 disables)")
    for name in ("frontend_port", "backend_port", "stats_port"):
        port = getattr(s, name)
        need(0 < port < 65536, f"server.{name}: {port} is not a TCP port (1..65535)")
    need(1 <= s.max_message_size_mb <= 4096, f"server.max_message_size_mb: {s.max_message_size_mb} must be in 1..4096")
    need(cl.gpus >= 0, f"cluster.gpus: {cl.gpus} must be >= 0 (0 runs CPU workers)")
    need(cl.per_gpu >= 1, f"cluster.per_gpu: {cl.per_gpu} must be at least 1")
    need(1 <= cl.worker_credits <= 64, f"cluster.worker_credits: {cl.worker_credits} must be in 1..64")
    need(cl.heartbeat_interval_s > 0, "cluster.heartbeat_interval_s: must be positive")
    need(cl.heartbeat_liveness >= 1, "cluster.heartbeat_liveness: must be at least 1")
    need(1 <= cl.max_batch_size <= 256, f"cluster.max_batch_size: {cl.max_batch_size} must be in 1..256")
    need(cl.queue_limit_per_model >= 1, "cluster.queue_limit_per_model: must be at least 1")
    need(cl.queue_limit_total >= cl.queue_limit_per_model,
         "cluster.queue_limit_total: must be >= cluster.queue_limit_per_model")
    need(cl.max_copies_per_model >= 0, "cluster.max_copies_per_model: must be >= 0 (0 = no cap)")
    need(cl.placement_patience >= 0, "cluster.placement_patience: must be >= 0 (0 disables)")
    need(0 <= cl.metrics_port < 65536, f"cluster.metrics_port: {cl.metrics_port} is not a TCP port (1..65535, or 0 for off)")
    need(0 <= cl.metrics_model_histograms <= 1000,
         f"cluster.metrics_model_histograms: {cl.metrics_model_histograms} must be in 0..1000 (0 = cluster-wide only)")
    need(0 <= cl.worker_nice <= 19, f"cluster.worker_nice: {cl.worker_nice} must be in 0..19 (0 = the broker's priority)")
    need(cfg.onnx.intra_op_threads >= 0, "onnx.intra_op_threads: must be >= 0")
    need(cfg.onnx.inter_op_threads >= 1, "onnx.inter_op_threads: must be >= 1")
    need(0 < cl.load_failure_backoff_s <= cl.load_failure_backoff_max_s,
         "cluster.load_failure_backoff_s: must be positive and <= cluster.load_failure_backoff_max_s")
    need(cfg.security.curve or not cfg.security.admin_only_management,
         "security.admin_only_management: needs security.curve: true (without CURVE no key says who sent a request)")
    for mid, entry in cfg.models.items():
        need(bool(MODEL_ID_RE.fullmatch(mid)),
             f"models.{mid}: {mid!r} is not a valid model id ({MODEL_ID_RE.pattern})")
        need(entry.package is not None or entry.model_path is not None,
             f"models.{mid}: give either 'package' (a package folder) or 'model_path' + 'background_dir' + 'crop_rects_path'")
        if entry.package is None:
            for req in ("background_dir", "crop_rects_path"):
                need(getattr(entry, req) is not None, f"models.{mid}.{req}: required with model_path")
        need(entry.num_frames is None or entry.num_frames >= 1, f"models.{mid}.num_frames: must be at least 1")
        need(entry.fps > 0, f"models.{mid}.fps: must be positive")


def _resolve_paths(cfg: Config, base: Path) -> None:
    def res(p: Optional[str]) -> Optional[str]:
        if p is None:
            return None
        p = os.path.expanduser(p)
        return str((base / p).resolve()) if not os.path.isabs(p) else p

    cfg.models_dir = res(cfg.models_dir)
    cfg.audio_encoder = res(cfg.audio_encoder)
    for name in ("keys_dir", "broker_key", "server_key", "worker_key", "client_key", "allowed_workers",
                 "allowed_clients", "admin_keys"):
        setattr(cfg.security, name, res(getattr(cfg.security, name)))
    for entry in cfg.models.values():
        for name in _PATH_FIELDS:
            setattr(entry, name, res(getattr(entry, name)))


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: cannot override inside a non-mapping")
    node[parts[-1]] = value


def load_config(source: str | os.PathLike | dict | None = None, overrides: Optional[dict[str, Any]] = None) -> Config:
    """Read a config from a YAML file (or a dict, or nothing for all defaults).

    ``overrides`` maps dotted key paths to values, e.g. ``{"cluster.gpus": 2}`` (the CLI's flags).
    """
    base = Path.cwd()
    origin = None
    if source is None:
        data: Any = {}
    elif isinstance(source, dict):
        data = dict(source)
    else:
        path = Path(source)
        origin = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        base = path.resolve().parent
    if not isinstance(data, dict):
        raise ConfigError(f"{origin or 'config'}: the top level must be a mapping of sections")
    import copy

    data = copy.deepcopy(data)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, dotted, value)
    try:
        cfg = _build(Config, data, "")
        _check_ranges(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}" if origin else str(exc)) from None
    cfg.source = origin
    _resolve_paths(cfg, base)
    return cfg
