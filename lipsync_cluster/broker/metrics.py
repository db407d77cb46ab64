"""Prometheus exporter and HTTP health checks for the broker (``cluster.metrics_port``).

    GET /metrics             Prometheus text format (OpenMetrics when asked), see docs/METRICS.md
    GET /health/live         200 while the broker loop is running (it published a snapshot lately)
    GET /health/ready        200 when a worker is registered and every preload model is loaded, else 503
    GET /v2/health/live|ready  the same, at Triton's paths (probes written for Triton work unchanged)

Threading: the HTTP server runs on its own daemon threads and never touches the broker's state
or its zmq sockets. About once a second the broker thread builds its stats snapshot (the same
body it PUBs on ``b"stats"``) plus copies of its histograms and hands both over with
:meth:`MetricsServer.update` -- one attribute assignment of a new tuple, atomic in Python. A
scrape reads whichever snapshot is current, so values are at most about a second old.

Cardinality: a model that has seen no traffic costs one series (``lipsync_model_info``); a model
in use about a dozen; latency histograms are cluster-wide, per model only for the
``cluster.metrics_model_histograms`` busiest models. No label carries a process id.

The HTTP server is bounded: at most :data:`MAX_CONNECTIONS` connections at once (more are
answered 503 and closed), each closed after :data:`CONNECTION_DEADLINE_S` whatever it sends, and
it binds loopback unless the operator opened it (:func:`metrics_bind`).
"""
from __future__ import annotations

import json
import logging
import socket
import socketserver
import threading
import time
from typing import Any, Iterable, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.process_collector import ProcessCollector

from ..common import vocab

log = logging.getLogger("lipsync_cluster.broker.metrics")

LIVE_STALE_S = 10.0     # no snapshot for this long: the broker loop is stuck -> /health/live 503
START_GRACE_S = 10.0    # before the first snapshot, live is assumed for this long
MAX_CONNECTIONS = 16    # HTTP connections served at once; more are answered 503 and closed
CONNECTION_DEADLINE_S = 10.0  # a connection is closed this long after it was accepted, whatever it sends
IO_TIMEOUT_S = 5.0      # one read or write on a connection
HEALTH_PATHS = {"/health": "live", "/health/live": "live", "/health/ready": "ready",
                "/v2/health/live": "live", "/v2/health/ready": "ready"}


def _num(value: Any, default: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    return float(value)


def _buckets(h: dict) -> list[tuple[str, float]]:
    """Non-cumulative counts over ``bounds`` (+Inf last) -> Prometheus cumulative buckets."""
    out, total = [], 0.0
    bounds = list(h.get("bounds", ())) + [float("inf")]
    for bound, count in zip(bounds, h.get("counts", ())):
        total += count
        out.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
    return out


class BrokerCollector:
    """Builds every metric family from the latest (snapshot, histograms) pair at scrape time."""

    def __init__(self, server: "MetricsServer") -> None:
        self.server = server

    def describe(self) -> Iterable:
        return []  # families are dynamic; nothing to check at registration

    def collect(self) -> Iterable:
        snap, hist, received = self.server.latest
        yield from self._broker(snap, received)
        if snap is None:
            return
        yield from self._requests(snap, hist)
        yield from self._models(snap, hist)
        yield from self._workers(snap, hist)

    # --- families ----------------------------------------------------------------------------

    def _broker(self, snap: Optional[dict], received: float) -> Iterable:
        up = GaugeMetricFamily("lipsync_broker_up", "1 while the broker publishes snapshots (see /health/live)")
        up.add_metric([], 1.0 if self.server.live()[0] else 0.0)
        yield up
        ready = GaugeMetricFamily("lipsync_broker_ready", "1 when the cluster is ready (see /health/ready)")
        ready.add_metric([], 1.0 if self.server.ready()[0] else 0.0)
        yield ready
        age = GaugeMetricFamily("lipsync_broker_snapshot_age_seconds",
                                "Seconds since the broker handed over the snapshot these values come from")
        age.add_metric([], time.monotonic() - received if snap is not None else -1.0)
        yield age
        if snap is None:
            return
        totals = snap.get("totals") or {}
        uptime = GaugeMetricFamily("lipsync_broker_uptime_seconds", "Seconds since the broker started")
        uptime.add_metric([], _num(totals.get("uptime_s")))
        yield uptime
        for name, key, doc in (
                ("lipsync_broker_late_replies", "late_replies",
                 "Worker replies dropped because the request was already answered or the worker was unknown"),
                ("lipsync_broker_undeliverable_replies", "undeliverable",
                 "Replies the broker could not deliver because the client went away"),
                ("lipsync_broker_worker_legs", "legs", "Requests the broker sent to workers"),
                ("lipsync_broker_worker_leg_messages", "leg_messages",
                 "Messages that carried them (several legs share one in a batch)")):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], _num(totals.get(key)))
            yield c
        configured = GaugeMetricFamily("lipsync_models_configured", "Models in the catalog (loaded or not)")
        configured.add_metric([], float(len(snap.get("models") or ())))
        yield configured

    def _requests(self, snap: dict, hist: dict) -> Iterable:
        models = snap.get("models") or []
        success = CounterMetricFamily("lipsync_request_success", "Successful infer requests", labels=["model"])
        failure = CounterMetricFamily("lipsync_request_failure",
                                      "Failed requests by error code (model \"\" = not attributable to a model)",
                                      labels=["model", "code"])
        frames = CounterMetricFamily("lipsync_frames_generated", "Video frames returned by successful requests",
                                     labels=["model"])
        cold = CounterMetricFamily("lipsync_request_cold_start",
                                   "Successful requests whose worker had to load the model first", labels=["model"])
        retries = CounterMetricFamily("lipsync_request_retries",
                                      "Requests sent again because their worker died", labels=["model"])
        for m in models:
            if not _active(m, snap):
                continue  # an idle model costs lipsync_model_info alone
            model = m["model_id"]
            s = m.get("stats") or {}
            success.add_metric([model], _num(s.get("ok")))
            frames.add_metric([model], _num(s.get("frames")))
            cold.add_metric([model], _num(s.get("cold_loads")))
            retries.add_metric([model], _num(s.get("retried")))
            for code, n in sorted((s.get("errors") or {}).items()):
                failure.add_metric([model, str(code)], _num(n))
        for code, n in sorted(((hist or {}).get("errors_no_model") or {}).items()):
            failure.add_metric(["", str(code)], _num(n))
        yield from (success, failure, frames, cold, retries)
        per_model_h = (hist or {}).get("models", {})
        top = self._top_models(models, per_model_h)
        for key, name, doc in HISTOGRAMS:
            whole = HistogramMetricFamily(name, doc + " (all models)")
            merged = _merge([per_model_h[m].get(key) for m in sorted(per_model_h)])
            if merged is not None:
                whole.add_metric([], _buckets(merged), sum_value=_num(merged.get("sum")))
            yield whole
            if not self.server.model_histograms:
                continue
            per_model = HistogramMetricFamily(name.replace("lipsync_", "lipsync_model_", 1),
                                              doc + f" (the {self.server.model_histograms} busiest models)",
                                              labels=["model"])
            for model in top:
                h = per_model_h[model].get(key)
                if h and sum(h.get("counts", ())):
                    per_model.add_metric([model], _buckets(h), sum_value=_num(h.get("sum")))
            yield per_model

    def _top_models(self, models: list, per_model_h: dict) -> list[str]:
        """The ``model_histograms`` models with the most successful requests (ties by id)."""
        k = self.server.model_histograms
        if not k:
            return []
        ok = {m["model_id"]: _num((m.get("stats") or {}).get("ok")) for m in models}
        ranked = sorted((m for m in per_model_h if ok.get(m, 0) > 0), key=lambda m: (-ok.get(m, 0), m))
        return sorted(ranked[:k])

    def _models(self, snap: dict, hist: dict) -> Iterable:
        models = snap.get("models") or []
        queues = snap.get("queues") or {}
        info = GaugeMetricFamily("lipsync_model_info", "Every model of the catalog (value 1), with its version",
                                 labels=["model", "version"])
        depth = GaugeMetricFamily("lipsync_queue_depth", "Requests waiting in the broker for this model",
                                  labels=["model"])
        copies = GaugeMetricFamily("lipsync_model_copies", "Workers that have this model loaded",
                                   labels=["model"])
        loads = CounterMetricFamily("lipsync_model_loads", "Model loads (worker 'loaded' events)", labels=["model"])
        unloads = CounterMetricFamily("lipsync_model_unloads",
                                      "Model unloads on request or after idling (worker 'unloaded'/'idle_unloaded' events)",
                                      labels=["model"])
        evictions = CounterMetricFamily("lipsync_model_evictions",
                                        "Models evicted to make room for another (worker 'evicted' events)",
                                        labels=["model"])
        failures = CounterMetricFamily("lipsync_model_load_failures", "Model loads that failed", labels=["model"])
        for m in models:
            model = m["model_id"]
            info.add_metric([model, str(m.get("version") or "")], 1.0)
            if not _active(m, snap):
                continue
            s = m.get("stats") or {}
            depth.add_metric([model], _num(queues.get(model, m.get("queued"))))
            copies.add_metric([model], float(len(m.get("loaded_on") or ())))
            loads.add_metric([model], _num(s.get("loads")))
            unloads.add_metric([model], _num(s.get("unloads")))
            evictions.add_metric([model], _num(s.get("evictions")))
            failures.add_metric([model], _num(s.get("load_failures")))
        total = GaugeMetricFamily("lipsync_queued_requests", "Requests waiting in the broker, all models")
        total.add_metric([], _num(snap.get("queued")))
        yield from (info, depth, total, copies, loads, unloads, evictions, failures)
        load_h = (hist or {}).get("load")
        fam = HistogramMetricFamily("lipsync_model_load_duration_seconds",
                                    "Model load latency as reported by the workers ('loaded' events)")
        if load_h:
            fam.add_metric([], _buckets(load_h), sum_value=_num(load_h.get("sum")))
        yield fam

    def _workers(self, snap: dict, hist: dict) -> Iterable:
        workers = snap.get("workers") or []
        present = {w.get("worker") for w in workers}
        up = GaugeMetricFamily("lipsync_worker_up", "1 for a registered worker, 0 for one seen before that left",
                               labels=["worker"])
        # No pid label: a restarted worker keeps its series (lipsync_worker_restarts_total counts restarts).
        info = GaugeMetricFamily("lipsync_worker_info", "Worker identity (value 1)",
                                 labels=["worker", "host", "gpu", "device", "provider"])
        gauges = {
            "models": GaugeMetricFamily("lipsync_models_loaded", "Models loaded on the worker", labels=["worker"]),
            "slots": GaugeMetricFamily("lipsync_worker_model_slots", "Models the worker may hold (max_models)",
                                       labels=["worker"]),
            "in_flight": GaugeMetricFamily("lipsync_worker_in_flight", "Requests the worker is handling now",
                                           labels=["worker"]),
            "credits": GaugeMetricFamily("lipsync_worker_credits", "Requests the worker takes at once",
                                         labels=["worker"]),
            "mem": GaugeMetricFamily("lipsync_worker_memory_bytes", "Memory used by the worker's loaded models",
                                     labels=["worker"]),
            "budget": GaugeMetricFamily("lipsync_worker_memory_budget_bytes",
                                        "The worker's memory budget (the whole process: capacity.max_memory_gb)",
                                        labels=["worker"]),
            "used": GaugeMetricFamily("lipsync_worker_memory_used_bytes",
                                      "Memory the worker's budget holds: process, models and workspace, or its "
                                      "measured size when that is more", labels=["worker"]),
            "free": GaugeMetricFamily("lipsync_worker_memory_free_bytes",
                                      "Memory the worker's budget can still take (placement puts models by it)",
                                      labels=["worker"]),
            "draining": GaugeMetricFamily("lipsync_worker_draining", "1 while the worker is draining",
                                          labels=["worker"]),
        }
        gpu = {key: GaugeMetricFamily(name, doc, labels=["worker"]) for key, name, doc in GPU_GAUGES}
        restarts = CounterMetricFamily("lipsync_worker_restarts",
                                       "Times a worker name registered again under a new process id",
                                       labels=["worker"])
        seen = (hist or {}).get("workers_seen") or {}
        for w in workers:
            name = str(w.get("worker"))
            up.add_metric([name], 1.0)
            info.add_metric([name, str(w.get("host", "")), "" if w.get("gpu") is None else str(w.get("gpu")),
                             str(w.get("device") or ""), str(w.get("provider") or "")], 1.0)
            gauges["models"].add_metric([name], _num(w.get("loaded_models")))
            gauges["slots"].add_metric([name], _num(w.get("max_models")))
            gauges["in_flight"].add_metric([name], _num(w.get("in_flight")))
            gauges["credits"].add_metric([name], _num(w.get("credits")))
            gauges["mem"].add_metric([name], _num(w.get("total_memory_bytes")))
            gauges["budget"].add_metric([name], _num(w.get(vocab.MEM_BUDGET, w.get("max_memory_bytes"))))
            gauges["used"].add_metric([name], _num(w.get(vocab.MEM_USED)))
            gauges["free"].add_metric([name], _num(w.get(vocab.MEM_FREE)))
            gauges["draining"].add_metric([name], 1.0 if w.get("draining") else 0.0)
            for key, fam in gpu.items():  # only what the worker measured (GPU workers, NVML)
                if _num(w.get(key), -1.0) >= 0:
                    fam.add_metric([name], _num(w.get(key)))
        for name in sorted(set(seen) | present):
            if name not in present:
                up.add_metric([str(name)], 0.0)
            restarts.add_metric([str(name)], _num((seen.get(name) or {}).get("restarts")))
        count = GaugeMetricFamily("lipsync_workers", "Registered workers")
        count.add_metric([], float(len(workers)))
        yield from (up, count, info, *gauges.values(), *gpu.values(), restarts)


HISTOGRAMS = (
    ("request", "lipsync_request_duration_seconds",
     "Successful infer requests: broker arrival to reply (queue + load + compute + transfer)"),
    ("queue", "lipsync_queue_duration_seconds",
     "Successful infer requests: time waiting in the broker queue (arrival to dispatch)"),
    ("compute", "lipsync_compute_duration_seconds",
     "Successful infer requests: time on the worker (dispatch to reply) minus any model load"),
)

GPU_GAUGES = (
    ("gpu_memory_used_bytes", "lipsync_worker_gpu_memory_used_bytes",
     "GPU memory this worker process holds (NVML; absent when NVML cannot tell, e.g. in a container)"),
    ("gpu_device_memory_used_bytes", "lipsync_worker_gpu_device_memory_used_bytes",
     "GPU memory used on the worker's device by every process (NVML)"),
    ("gpu_memory_total_bytes", "lipsync_worker_gpu_memory_total_bytes", "GPU memory of the worker's device (NVML)"),
    ("gpu_utilization", "lipsync_worker_gpu_utilization",
     "Fraction of the last sample period the worker's GPU was busy, 0..1 (NVML; not for MIG instances)"),
)


def _active(model: dict, snap: dict) -> bool:
    """A model with traffic, a queue or a copy gets its per-model series; an idle one does not."""
    s = model.get("stats") or {}
    if model.get("loaded_on") or model.get("loading_on") or _num((snap.get("queues") or {}).get(model["model_id"])):
        return True
    return any(_num(s.get(k)) for k in ("ok", "frames", "cold_loads", "retried", "loads", "unloads", "evictions",
                                        "load_failures")) or bool(s.get("errors"))


def _merge(hists: list) -> Optional[dict]:
    """Histograms with the same bounds summed (the cluster-wide view of per-model ones)."""
    hists = [h for h in hists if h and sum(h.get("counts", ()))]
    if not hists:
        return None
    counts = [0.0] * len(hists[0].get("counts", ()))
    total = 0.0
    for h in hists:
        for i, c in enumerate(h.get("counts", ())[:len(counts)]):
            counts[i] += c
        total += _num(h.get("sum"))
    return {"bounds": hists[0].get("bounds", ()), "counts": counts, "sum": total}


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("metrics http: " + format, *args)


class _BoundedWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    """A thread per connection, but at most MAX_CONNECTIONS of them, each with I/O timeouts and a
    deadline: a client that opens connections and sends nothing (or a byte at a time) holds at
    most MAX_CONNECTIONS threads for at most CONNECTION_DEADLINE_S."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 64

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._open: dict[socket.socket, float] = {}   # connection -> deadline (monotonic)
        self._open_lock = threading.Lock()
        self._reaper_stop = threading.Event()
        super().__init__(*args, **kwargs)
        threading.Thread(target=self._reap, name="lipsync-metrics-reaper", daemon=True).start()

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:  # full: say so at once rather than queue behind slow clients
                request.settimeout(0.5)
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        request.settimeout(IO_TIMEOUT_S)
        with self._open_lock:
            self._open[request] = time.monotonic() + CONNECTION_DEADLINE_S
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._finished(request)
            raise

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._finished(request)

    def _finished(self, request: socket.socket) -> None:
        with self._open_lock:
            if self._open.pop(request, None) is None:
                return
        self._slots.release()

    def open_connections(self) -> int:
        with self._open_lock:
            return len(self._open)

    def _reap(self) -> None:
        """Cut connections past their deadline: the blocked read in their thread returns at once."""
        while not self._reaper_stop.wait(0.5):
            now = time.monotonic()
            with self._open_lock:
                late = [r for r, deadline in self._open.items() if deadline <= now]
            for request in late:
                try:
                    request.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def server_close(self) -> None:
        self._reaper_stop.set()
        super().server_close()


def metrics_bind(config: Any) -> tuple[str, int]:
    """Where the metrics HTTP server binds: ``cluster.metrics_host`` (default ``server.host``) and
    ``cluster.metrics_port``. The loopback rule of the ZeroMQ sockets (docs/SECURITY.md) holds:
    another address only when the operator named it in ``cluster.metrics_host`` or the cluster runs
    CurveZMQ (keys exist: it is meant to be reached from other hosts). Raises ``OSError`` otherwise."""
    from ..common.security import is_loopback  # noqa: PLC0415 - small; keeps this module's imports light

    explicit = getattr(config.cluster, "metrics_host", None)
    host = explicit or config.server.host
    port = config.cluster.metrics_port
    if not explicit and not config.security.curve and not is_loopback(f"tcp://{host}:{port}"):
        raise OSError(f"refusing to serve metrics on http://{host}:{port} (server.host) without CurveZMQ: only "
                      "loopback is allowed by default. Set cluster.metrics_host to the address Prometheus "
                      "scrapes (plain HTTP, no authentication: see docs/SECURITY.md) or enable security.curve")
    return host, port


class MetricsServer:
    """``/metrics``, ``/health/live``, ``/health/ready`` (and ``/v2/health/...``) on ``host:port``.

    ``model_histograms``: per-model latency histograms for that many of the busiest models (0 =
    cluster-wide histograms only). Build it with :meth:`from_config` to apply the bind rule.
    """

    def __init__(self, host: str, port: int, model_histograms: int = 0) -> None:
        self.host, self.port = host, port
        self.model_histograms = max(0, int(model_histograms))
        self.latest: tuple[Optional[dict], Optional[dict], float] = (None, None, 0.0)
        self.started = time.monotonic()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(BrokerCollector(self))
        try:
            ProcessCollector(registry=self.registry)  # process_cpu_seconds_total etc. (Linux)
        except Exception:  # pragma: no cover - platforms without /proc
            pass
        self._metrics_app = make_wsgi_app(self.registry)
        self._httpd: Optional[WSGIServer] = None
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def from_config(cls, config: Any) -> "MetricsServer":
        host, port = metrics_bind(config)
        return cls(host, port, getattr(config.cluster, "metrics_model_histograms", 0))

    # --- called on the broker thread ----------------------------------------------------------

    def update(self, snapshot: dict, histograms: dict) -> None:
        """Hand over a finished snapshot; the broker must not modify these objects afterwards."""
        self.latest = (snapshot, histograms, time.monotonic())

    # --- health ------------------------------------------------------------------------------

    def live(self) -> tuple[bool, dict]:
        snap, _, received = self.latest
        now = time.monotonic()
        if snap is None:
            ok = now - self.started < START_GRACE_S
            return ok, {"live": ok, "reason": "starting" if ok else "the broker has published no snapshot"}
        age = now - received
        ok = age < LIVE_STALE_S
        body: dict[str, Any] = {"live": ok, "snapshot_age_s": round(age, 3)}
        if not ok:
            body["reason"] = f"no broker snapshot for {age:.0f} s (the broker loop is stuck)"
        return ok, body

    def ready(self) -> tuple[bool, dict]:
        snap = self.latest[0]
        live, _ = self.live()
        if snap is None:
            return False, {"ready": False, "reason": "starting: no broker snapshot yet"}
        health = dict(snap.get("health") or {})
        ok = bool(health.get("ready")) and live
        health["ready"] = ok
        if live is False:
            health["reason"] = "the broker is not live"
        return ok, health

    # --- HTTP ----------------------------------------------------------------------------------

    def app(self, environ: dict, start_response: Any) -> list[bytes]:
        path = environ.get("PATH_INFO", "/").rstrip("/") or "/"
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        if path in HEALTH_PATHS:
            ok, body = self.ready() if HEALTH_PATHS[path] == "ready" else self.live()
            data = json.dumps(body, default=str).encode()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
            return [data]
        if path == "/":
            data = b"lipsync-cluster broker: /metrics /health/live /health/ready /v2/health/live /v2/health/ready\n"
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
            return [data]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found; try /metrics, /health/live or /health/ready\n"]

    def start(self) -> "MetricsServer":
        try:
            self._httpd = make_server(self.host, self.port, self.app, _BoundedWSGIServer,
                                      handler_class=_QuietHandler)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on http://{self.host}:{self.port} "
                                     f"(cluster.metrics_port): {exc.strerror}") from None
        self.port = self._httpd.server_port
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="lipsync-metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics (health: /health/live, /health/ready)", self.host, self.port)
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
