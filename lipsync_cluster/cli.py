"""The ``lipsync-cluster`` command. Cluster commands live here; others beside the code they drive."""
from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from typing import Any, Optional

import click

from . import __version__
from .common.extras import MissingExtra, extra_providing, require

DEFAULT_BROKER = "tcp://127.0.0.1:5555"

# The extras each command needs beyond the plain install (client library + management commands).
# Modules load inside the commands, so `--help` and the management commands run on a plain install.
NEEDS: dict[str, tuple[str, ...]] = {
    "start": ("cpu",), "broker": ("cpu",), "worker": ("cpu",),
    "demo-models": ("tools",), "prepare": ("tools",), "check-model": ("tools",), "render": ("tools",),
    "loadtest": ("console",), "gateway": ("gateway",),
}


class _Commands(click.Group):
    """Checks a command's extras before it runs, and turns a missing one into one line."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None and not any(a in ("-h", "--help") for a in rest):
            require(f"lipsync-cluster {command.name}", *NEEDS.get(command.name or "", ()))
        return name, command, rest

    def invoke(self, ctx: click.Context) -> Any:
        from .common.errors import LipsyncError
        from .common.security import SecurityError

        try:
            return super().invoke(ctx)
        except MissingExtra as exc:
            raise click.ClickException(str(exc)) from None
        except SecurityError as exc:  # a key file's mode, a missing keys folder: one line, not a traceback
            raise click.ClickException(str(exc)) from None
        except LipsyncError as exc:  # the server's (or the client's own) error code and message
            raise click.ClickException(f"{exc.code}: {exc.message}") from None
        except ModuleNotFoundError as exc:  # a module of an extra the table above did not foresee
            command = ctx.invoked_subcommand or "this command"
            extra = extra_providing(exc.name, NEEDS.get(command, ()))
            if extra is None:
                raise
            raise click.ClickException(str(MissingExtra(f"lipsync-cluster {command}", extra, exc.name))) from None


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="lipsync-cluster")
def main() -> None:
    """Serve many lip-sync avatars to many viewers from a pool of workers.

    \b
    Quick start (CPU, demo models):
      lipsync-cluster demo-models demo_models --count 3 --kind light
      lipsync-cluster start --config demo_models/cluster.yaml --gpus 0 --per-gpu 2
      lipsync-cluster models
    """


def _load_config(config_path: Optional[str], overrides: dict[str, Any]):
    from .config import ConfigError, load_config

    try:
        return load_config(config_path, overrides)
    except ConfigError as exc:
        raise click.ClickException(f"bad config: {exc}") from None


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum, frame):  # noqa: ARG001 - signal API
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


# --- cluster ------------------------------------------------------------------------------


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Cluster YAML (see docs/CONFIG.md).")
@click.option("--models-dir", type=click.Path(file_okay=False), help="Serve every model package in this folder.")
@click.option("--gpus", default=None,
              help="GPUs to use: a number (0 = CPU workers), 'auto' (every visible GPU), or a list of indices "
                   "or GPU-/MIG- UUIDs (2,3). An inherited CUDA_VISIBLE_DEVICES is what is visible.")
@click.option("--per-gpu", type=click.IntRange(1, 64), default=None, help="Worker processes per GPU (or CPU workers with --gpus 0).")
@click.option("--frontend-port", type=click.IntRange(1, 65535), default=None, help="Client port (default 5555).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve Prometheus /metrics and /health/{live,ready} on this port (0 = off; docs/METRICS.md).")
def start(config_path: Optional[str], models_dir: Optional[str], gpus: Optional[str], per_gpu: Optional[int],
          frontend_port: Optional[int], metrics_port: Optional[int]) -> None:
    """Start a broker and GPUS x PER_GPU workers on this host, and keep them running.

    \b
    Examples:
      lipsync-cluster start --config demo_models/cluster.yaml --gpus 0 --per-gpu 2
      lipsync-cluster start --models-dir /srv/avatars --gpus 4 --per-gpu 6
      lipsync-cluster start --config cluster.yaml --gpus auto --metrics-port 5558
      lipsync-cluster start --config cluster.yaml --gpus 2,3 --per-gpu 4

    Stops cleanly on Ctrl-C / SIGTERM: workers finish what they hold, shared frames are removed.
    """
    from .common.logs import setup_logging
    from .gpu_select import GpuSelectionError, parse_request
    from .supervisor import StartError, Supervisor, select_devices

    try:
        request = parse_request(gpus)
    except GpuSelectionError as exc:
        raise click.BadParameter(str(exc), param_hint="--gpus") from None
    cfg = _load_config(config_path, {"cluster.gpus": request if isinstance(request, int) else None,
                                     "cluster.per_gpu": per_gpu,
                                     "models_dir": models_dir, "server.frontend_port": frontend_port,
                                     "cluster.metrics_port": metrics_port})
    setup_logging(cfg.logging.level, "supervisor")
    try:  # before anything starts: a GPU that is not there stops here, saying what is visible
        devices = select_devices(cfg.cluster.gpus if request is None else request)
    except StartError as exc:
        raise click.ClickException(str(exc)) from None
    sup = Supervisor(cfg, cfg.cluster.gpus if request is None else request, cfg.cluster.per_gpu, devices=devices)
    stop = threading.Event()
    try:
        sup.start()
        _stop_on_signals(stop)
        health = sup.wait_ready()
    except StartError as exc:
        sup.stop(drain_timeout_s=5)
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        sup.stop()
        sys.exit(130)
    from .common.catalog import Catalog

    models = sorted(Catalog(cfg.models_dir, cfg.models).packages())
    kind = (f"{len(devices)} GPU(s) x {cfg.cluster.per_gpu}: " + ", ".join(d.describe() for d in devices)
            if devices else f"{cfg.cluster.per_gpu} CPU")
    click.echo("=" * 72)
    click.echo(f"lipsync-cluster ready: {health.get('workers')} workers ({kind})")
    click.echo(f"  clients connect to   {cfg.frontend}")
    click.echo(f"  workers join at      {cfg.backend}")
    click.echo(f"  stats published on   {cfg.stats_endpoint}   (lipsync-cluster stats)")
    if cfg.cluster.metrics_port:
        click.echo(f"  metrics served on    http://{cfg.cluster.metrics_host or cfg.server.host}:{cfg.cluster.metrics_port}/metrics")
    click.echo(f"📦 Available models: {', '.join(models)}")
    # Commands that work as pasted, venv activated or not: this interpreter's own entry point.
    from .common.invocation import cli_command, python_command

    click.echo(f"  try:  {cli_command()} models --broker {cfg.frontend}")
    click.echo(f"        {python_command()} -c \"from lipsync_cluster.client import Client; "
               f"print(Client('{cfg.frontend}').health())\"")
    click.echo("=" * 72, nl=True)
    sys.stdout.flush()
    try:
        while not stop.is_set():
            sup.watch_once()
            stop.wait(0.2)
    finally:
        logging.getLogger("lipsync_cluster.supervisor").info("stopping: draining workers...")
        sup.stop()


@main.command()
@click.option("--broker", "backend", default=None, help="The broker's worker endpoint, e.g. tcp://HOST:5556.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Cluster YAML (models, capacity).")
@click.option("--models-dir", type=click.Path(file_okay=False), help="Model packages folder on this host.")
@click.option("--gpu", default=None,
              help="GPU to pin this worker to: an index among the visible GPUs or a GPU-/MIG- UUID (omit for CPU).")
@click.option("--gpu-index", type=click.IntRange(0, 4096), default=None, hidden=True,
              help="The GPU's number in stats (set by 'start'; default: its index among the visible GPUs).")
@click.option("--name", default=None, help="Worker name in stats (default: HOST-PID).")
@click.option("--credits", type=click.IntRange(1, 64), default=None, help="Requests taken at once (default from config).")
@click.option("--shm-namespace", default=None, help="Shared-memory name prefix (set by 'start').", hidden=True)
@click.option("--workers-on-host", type=int, default=1, hidden=True)
@click.option("--preload-share", default="0/1", hidden=True)
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False), default=None,
              help="CurveZMQ: the folder from 'keys generate' (uses worker.key_secret and broker.key).")
@click.option("--worker-key", type=click.Path(dir_okay=False), default=None,
              help="CurveZMQ: this worker's secret key file (*.key_secret).")
@click.option("--broker-key", type=click.Path(dir_okay=False), default=None,
              help="CurveZMQ: the broker's public key file (broker.key).")
def worker(backend: Optional[str], config_path: Optional[str], models_dir: Optional[str], gpu: Optional[str],
           gpu_index: Optional[int], name: Optional[str], credits: Optional[int], shm_namespace: Optional[str], workers_on_host: int,
           preload_share: str, keys_dir: Optional[str] = None, worker_key: Optional[str] = None,
           broker_key: Optional[str] = None) -> None:
    """Run one worker process that joins a broker (for workers on other hosts).

    It runs below the broker's CPU priority: cluster.worker_nice (default 10) is added to its
    nice value at start (docs/CONFIG.md, "Worker priority").

    \b
    Examples:
      lipsync-cluster worker --broker tcp://10.0.0.5:5556 --gpu 0 --config cluster.yaml
      lipsync-cluster worker --broker tcp://127.0.0.1:5556 --models-dir demo_models
    """
    import os
    import socket

    device_label: Optional[str] = None
    if gpu is not None:
        # Pin before ONNX Runtime initialises CUDA: the worker sees its GPU alone, as device 0.
        from .gpu_select import GpuSelectionError, pin_one, probe_physical, universe

        try:
            physical = probe_physical()
            device = pin_one(gpu, os.environ, physical)
        except GpuSelectionError as exc:
            raise click.ClickException(str(exc)) from None
        if gpu_index is None:
            gpu_index = universe(os.environ, physical)[0].index(device)
        os.environ["CUDA_VISIBLE_DEVICES"] = device.pin
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        device_label = device.pin
    given = {k: os.path.abspath(v) for k, v in (("security.keys_dir", keys_dir), ("security.worker_key", worker_key),
                                                ("security.server_key", broker_key)) if v}
    cfg = _load_config(config_path, {"models_dir": models_dir, "cluster.backend": backend,
                                     "cluster.worker_credits": credits, **given,
                                     "security.curve": True if given else None})
    from .common.security import worker_keys

    curve = worker_keys(cfg.security)  # a SecurityError is one line (the command wrapper)
    from .common.logs import setup_logging
    from .supervisor import shm_namespace as default_namespace
    from .worker.loop import WorkerLoop
    from .worker.service import WorkerService

    name = name or f"{socket.gethostname()}-{os.getpid()}"
    setup_logging(cfg.logging.level, name)
    from .worker.priority import lower_priority

    lower_priority(cfg.cluster.worker_nice)  # before ONNX Runtime and ZeroMQ start their threads
    if gpu is not None and not cfg.onnx.cuda_enabled:
        logging.getLogger("lipsync_cluster.worker").warning("onnx.cuda_enabled is false: running on the CPU")
        gpu_index = device_label = None
    service = WorkerService(cfg, gpu=gpu_index, device=device_label,
                            shm_namespace=shm_namespace or default_namespace(cfg), workers_on_host=workers_on_host)
    index, _, total = preload_share.partition("/")
    service.preload(share=(int(index), int(total or 1)))
    loop = WorkerLoop(cfg.backend, service, name=name, credits=cfg.cluster.worker_credits,
                      heartbeat_interval_s=cfg.cluster.heartbeat_interval_s,
                      heartbeat_liveness=cfg.cluster.heartbeat_liveness, gpu=gpu_index, curve=curve,
                      max_message_bytes=cfg.server.max_message_size_mb * 2**20)
    stop = threading.Event()
    _stop_on_signals(stop)
    try:
        loop.run(stop)
    finally:
        service.close()


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Cluster YAML.")
@click.option("--models-dir", type=click.Path(file_okay=False), help="Model packages folder.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve Prometheus /metrics and /health/{live,ready} on this port (0 = off).")
def broker(config_path: Optional[str], models_dir: Optional[str], metrics_port: Optional[int]) -> None:
    """Run the broker alone (the 'start' command runs it for you).

    \b
    Example:
      lipsync-cluster broker --config cluster.yaml
    """
    cfg = _load_config(config_path, {"models_dir": models_dir, "cluster.metrics_port": metrics_port})
    from .broker import BindError, run_broker
    from .common.catalog import Catalog
    from .common.logs import setup_logging

    setup_logging(cfg.logging.level, "broker")
    catalog = Catalog(cfg.models_dir, cfg.models)
    stop = threading.Event()
    _stop_on_signals(stop)
    try:
        # The broker decides when to re-read (periodically, and when an unknown id arrives).
        # Broken packages are listed too, so their requests hear `model_load_failed` and why.
        from .broker.hardening import catalog_reader
        run_broker(cfg, catalog_reader(catalog), stop)
    except (OSError, BindError) as exc:
        raise click.ClickException(str(exc)) from None


# --- management -------------------------------------------------------------------------

broker_option = click.option("--broker", "endpoint", default=DEFAULT_BROKER, show_default=True, envvar="LIPSYNC_BROKER",
                             help="The broker's client endpoint.")
timeout_option = click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for an answer.")


SHOWN_MODELS = 10  # an unknown model's error lists at most this many of the configured ones


def _call(endpoint: str, timeout: float, fn):
    """``fn(client)``; errors become one line (the command wrapper words them); an unknown model's
    error lists the configured models (the first :data:`SHOWN_MODELS` and how many in all)."""
    from .client import Client, LipsyncError
    from .common.errors import UnknownModel

    with Client(endpoint, timeout=timeout) as client:
        try:
            return fn(client)
        except UnknownModel as exc:
            try:
                ids = sorted(m["model_id"] for m in client.list_models())
            except LipsyncError:
                raise exc from None
            shown = ", ".join(ids[:SHOWN_MODELS]) + (f", ... ({len(ids)} in all)" if len(ids) > SHOWN_MODELS else "")
            raise UnknownModel(f"{exc.message}; configured: {shown or 'none'} (lipsync-cluster models)",
                               **exc.details) from None


@main.command()
@broker_option
@timeout_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(endpoint: str, timeout: float, as_json: bool) -> None:
    """List every configured model, loaded or not, and where it is loaded.

    \b
    Example:
      lipsync-cluster models --broker tcp://127.0.0.1:5555
    """
    rows = _call(endpoint, timeout, lambda c: c.list_models())
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    click.echo(f"{'MODEL':<24} {'VERSION':<17} {'LOADED ON':<30} {'USAGE':>7} {'AVG MS':>8}")
    for m in rows:
        stats = m.get("stats") or {}
        where = ", ".join(m.get("loaded_on") or []) or "-"
        click.echo(f"{m['model_id']:<24} {str(m.get('version', ''))[:16]:<17} {where:<30} "
                   f"{stats.get('usage_count', 0):>7} {stats.get('avg_inference_ms', 0):>8.1f}")


@main.command()
@click.argument("model_id")
@click.option("--force", is_flag=True, help="Reload even if loaded (e.g. after re-preparing it).")
@click.option("--worker", "worker_name", default=None, help="Load on this worker (name as in 'stats').")
@click.option("--gpu", type=int, default=None, help="Load on a worker of this GPU.")
@broker_option
@timeout_option
def load(model_id: str, force: bool, worker_name: Optional[str], gpu: Optional[int], endpoint: str, timeout: float) -> None:
    """Load MODEL_ID now instead of on its first request.

    \b
    Examples:
      lipsync-cluster load demo_ada
      lipsync-cluster load demo_ada --force --gpu 1
    """
    reply = _call(endpoint, max(timeout, 60.0), lambda c: c.load_model(model_id, force, worker=worker_name, gpu=gpu))
    where = ", ".join(reply.get("workers") or [str(reply.get("worker", "?"))])
    if reply.get("loaded") is False:  # the worker had it already: nothing was loaded (--force reloads)
        click.echo(f"✅ '{model_id}' already loaded on {where}")
        return
    click.echo(f"✅ '{model_id}' loaded on {where} in {reply.get('load_ms', 0):.0f} ms")


@main.command()
@click.argument("model_id")
@broker_option
@timeout_option
def unload(model_id: str, endpoint: str, timeout: float) -> None:
    """Unload MODEL_ID from every worker.

    \b
    Example:
      lipsync-cluster unload demo_ada
    """
    reply = _call(endpoint, timeout, lambda c: c.unload_model(model_id))
    where = ", ".join(reply.get("workers") or []) or "no worker (it was not loaded)"
    click.echo(f"🗑️  '{model_id}' unloaded from {where}")


@main.command()
@broker_option
@timeout_option
@click.option("--json", "as_json", is_flag=True, help="Print the health reply as JSON.")
def health(endpoint: str, timeout: float, as_json: bool) -> None:
    """Say whether the cluster is live and ready; exit 1 when not ready.

    \b
    Examples:
      lipsync-cluster health && echo ready
      lipsync-cluster health --json
    """
    reply = _call(endpoint, timeout, lambda c: c.health())
    body = {k: v for k, v in reply.items() if k not in ("id", "ok")}  # the protocol's envelope is no news
    if as_json:
        click.echo(json.dumps(body, default=str))
    else:
        providers = ", ".join(f"{name} x{n}" for name, n in sorted((body.get("providers") or {}).items())) or "-"
        state = "ready" if body.get("ready") else f"not ready: {body.get('reason', 'unknown reason')}"
        click.echo(f"{state}; {body.get('workers', 0)} worker(s) at {endpoint}; providers: {providers}")
    if not body.get("ready"):
        sys.exit(1)


# --- keys ---------------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """CurveZMQ keys: needed to bind the broker to any address other than loopback.

    \b
    Example:
      lipsync-cluster keys generate /etc/lipsync/keys
    """


@keys.command("generate")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace keys that already exist (locks out every peer using them).")
def keys_generate(directory: str, force: bool) -> None:
    """Write key pairs for the broker, workers, clients and admins into DIRECTORY.

    \b
    Example:
      lipsync-cluster keys generate /etc/lipsync/keys
    \b
    Then, in the cluster YAML:
      security: {curve: true, keys_dir: DIRECTORY}
    copy worker.key_secret + broker.key to worker hosts, client.key_secret + broker.key to
    applications (LIPSYNC_KEYS_DIR=DIR), and see docs/SECURITY.md.
    """
    from .common.security import generate_keys

    made = generate_keys(directory, force=force)  # a SecurityError is one line (the command wrapper)
    for role, path in made.items():
        click.echo(f"{role:<7} {path}  (public: {path.with_suffix('.key').name})")
    click.echo(f"allow-lists: {directory}/allowed_workers, {directory}/allowed_clients, {directory}/admins")


def _register() -> None:
    # Subcommands are defined next to what they drive; importing here keeps `cli` on top.
    from .demo.cli import demo_models
    from .gateway.cli import gateway
    from .prepare.cli import check_model, prepare
    from .tools.console import stats
    from .tools.loadtest import loadtest_command
    from .tools.render import render

    def demo_cluster(*args: Any, **kwargs: Any):
        from .supervisor import demo_cluster

        return demo_cluster(*args, **kwargs)

    for command in (demo_models, prepare, check_model, stats, loadtest_command(demo_cluster), render, gateway):
        main.add_command(command)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
