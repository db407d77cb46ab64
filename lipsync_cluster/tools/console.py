"""``lipsync-cluster stats``: a live terminal view of a running cluster.

Fed by the broker's PUB socket (default ``tcp://127.0.0.1:5557``): a ``b"stats"`` snapshot about
every second (the ``model_stats`` body plus queues, per-worker detail, rates, recent events and
health) and ``b"event"`` messages as models load, get evicted or fail. When the PUB socket says
nothing within ``--timeout`` the console asks the broker's client endpoint (``model_stats``)
instead; when neither answers it says so and exits 1.

    lipsync-cluster stats                                  # live view (Ctrl-C to quit)
    lipsync-cluster stats --once                           # one rendered snapshot
    lipsync-cluster stats --once --json | jq .totals       # one snapshot for scripts
    lipsync-cluster stats --broker tcp://10.0.0.5:5555     # stats socket: same host, port + 2
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from datetime import datetime
from typing import Any, Iterable, Optional
from urllib.parse import urlparse

import click
import msgpack
import zmq

from ..common import vocab
from ..common.extras import require
from ..common.security import client_keys_from_env

DEFAULT_BROKER = os.environ.get("LIPSYNC_BROKER", "tcp://127.0.0.1:5555")
DEFAULT_STATS = os.environ.get("LIPSYNC_BROKER_STATS", "tcp://127.0.0.1:5557")


class NoBroker(RuntimeError):
    """Nothing answered on the stats socket nor on the client endpoint."""


def broker_endpoint_for(stats: str) -> str:
    """The broker's client endpoint next to its PUB endpoint: same host, port - 2 (5557 -> 5555)."""
    url = urlparse(stats)
    if url.scheme != "tcp" or url.port is None or url.port <= 2:
        return DEFAULT_BROKER
    host = url.hostname or "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"tcp://{host}:{url.port - 2}"


def stats_endpoint_for(broker: str) -> str:
    """The broker's PUB endpoint next to its client endpoint: same host, port + 2 (5555 -> 5557)."""
    url = urlparse(broker)
    if url.scheme != "tcp" or url.port is None:
        return DEFAULT_STATS
    host = url.hostname or "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"tcp://{host}:{url.port + 2}"


class StatsFeed:
    """A SUB socket on the broker's PUB endpoint; keeps the latest snapshot and recent events."""

    def __init__(self, endpoint: str, ctx: Optional[zmq.Context] = None, keep_events: int = 50) -> None:
        self.endpoint = endpoint
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"stats")
        self.sock.setsockopt(zmq.SUBSCRIBE, b"event")
        keys = client_keys_from_env()  # a CURVE cluster's stats socket wants a listed client key
        if keys is not None:
            keys.apply(self.sock)
        self.sock.connect(endpoint)
        self.snapshot: Optional[dict] = None
        self.received_at = 0.0
        self.events: deque[dict] = deque(maxlen=keep_events)
        self._seen: set = set()

    def _add_event(self, event: dict) -> None:
        key = (event.get("time"), event.get("worker"), event.get("event"), event.get("model_id"))
        if key in self._seen:
            return
        self._seen.add(key)
        if len(self._seen) > 10 * (self.events.maxlen or 50):
            self._seen = {(e.get("time"), e.get("worker"), e.get("event"), e.get("model_id")) for e in self.events}
        self.events.append(event)

    def poll(self, timeout_s: float) -> bool:
        """Read what arrives within ``timeout_s``; True when a new snapshot came."""
        deadline = time.monotonic() + timeout_s
        got = False
        while True:
            wait = max(0.0, deadline - time.monotonic())
            if not self.sock.poll(int(wait * 1000) if not got else 0):
                return got
            try:
                topic, body = self.sock.recv_multipart(zmq.NOBLOCK)[:2]
                data = msgpack.unpackb(body, raw=False, strict_map_key=False)
            except (zmq.Again, ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
                continue
            if not isinstance(data, dict):
                continue
            if topic == b"stats":
                for event in data.get("events") or ():
                    if isinstance(event, dict):
                        self._add_event(event)
                self.snapshot, self.received_at, got = data, time.monotonic(), True
            elif topic == b"event":
                self._add_event(data)
            if time.monotonic() >= deadline and got:
                return True

    def close(self) -> None:
        self.sock.close(0)


def snapshot_from_broker(endpoint: str, timeout_s: float) -> dict:
    """The same shape as a PUB snapshot (less rates history and events), asked over the frontend."""
    from ..client import Client, LipsyncError

    with Client(endpoint, timeout=timeout_s) as client:
        try:
            body = client.model_stats()
            body["health"] = client.health()
        except LipsyncError as exc:
            raise NoBroker(f"the broker at {endpoint} did not answer: {exc.message}") from None
    body.pop("id", None)
    body.pop("ok", None)
    body["time"] = time.time()
    body["source"] = "model_stats"
    return body


def split_wait(timeout_s: float, fallback: bool) -> tuple[float, float]:
    """``timeout_s`` shared between the PUB socket and the client endpoint (when there is a
    fallback), so "no broker answered within N s" takes N s, not twice that. The PUB socket
    speaks about every second: half of the default 5 s is plenty."""
    return (timeout_s / 2, timeout_s / 2) if fallback else (timeout_s, 0.0)


def take_snapshot(stats_endpoint: str, broker: Optional[str], timeout_s: float) -> tuple[dict, list[dict]]:
    """One snapshot (and recent events) from the PUB socket, else from the client endpoint, all
    within ``timeout_s``."""
    pub_wait, broker_wait = split_wait(timeout_s, bool(broker))
    feed = StatsFeed(stats_endpoint)
    try:
        if feed.poll(pub_wait) and feed.snapshot is not None:
            feed.snapshot["source"] = "pub"
            return feed.snapshot, list(feed.events)
    finally:
        feed.close()
    if broker:
        try:
            return snapshot_from_broker(broker, broker_wait), []
        except NoBroker:
            pass
    where = f"{stats_endpoint} (stats)" + (f" nor at {broker} (clients)" if broker else "")
    raise NoBroker(f"no broker answered at {where} within {timeout_s:g} s; is the cluster running? "
                   "(lipsync-cluster start, or pass --broker-stats / --broker)")


# --- rendering ---------------------------------------------------------------------------------

def _mb(n: Any) -> str:
    return "-" if not isinstance(n, (int, float)) else f"{n / 2**20:,.0f}"


def _ms(v: Any) -> str:
    return "-" if not isinstance(v, (int, float)) else (f"{v:.0f}" if v >= 100 else f"{v:.1f}")


def _ago(v: Any) -> str:
    if not isinstance(v, (int, float)):
        return "never"
    if v < 120:
        return f"{v:.0f}s ago"
    if v < 7200:
        return f"{v / 60:.0f}m ago"
    return f"{v / 3600:.1f}h ago"


def _dur(v: Any) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    if v < 120:
        return f"{v:.0f}s"
    if v < 7200:
        return f"{v / 60:.0f}m"
    return f"{v / 3600:.1f}h"


def _rate(v: Any) -> str:
    return "-" if not isinstance(v, (int, float)) else f"{v:.1f}"


def _sorted_models(models: list[dict]) -> list[dict]:
    def key(m: dict) -> tuple:
        s = m.get("stats") or {}
        return (-(s.get("requests_per_s") or 0.0), -int(bool(m.get("loaded_on"))), -(m.get("queued") or 0),
                -(s.get("requests") or 0), m.get("model_id", ""))
    return sorted(models, key=key)


def render(snapshot: dict, events: Iterable[dict], *, stats_endpoint: str = "", top: int = 25,
           stale_s: float = 0.0) -> Any:
    """A rich renderable of one snapshot: totals, workers, models, recent events."""
    from rich import box
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    totals = snapshot.get("totals") or {}
    health = snapshot.get("health") or {}
    workers = snapshot.get("workers") or []
    detail = {w.get("worker"): w for w in snapshot.get("workers_detail") or []}
    models = snapshot.get("models") or []
    queues = snapshot.get("queues") or {}

    ready = health.get("ready")
    state = Text("ready", style="bold green") if ready else Text(
        "not ready" + (f": {health.get('reason')}" if health.get("reason") else ""), style="bold red")
    errors = totals.get("errors") or {}
    head = Text.assemble(
        ("lipsync-cluster ", "bold"), (stats_endpoint or snapshot.get("source", ""), "dim"), "   ", state,
        f"   up {_dur(totals.get('uptime_s'))}   policy {snapshot.get('eviction_policy', '-')}\n",
        f"workers {len(workers)}   models loaded {snapshot.get('loaded_models', 0)}/{snapshot.get('max_models', 0)}"
        f" slots   memory {_mb(snapshot.get('total_memory_bytes'))}/{_mb(snapshot.get('max_memory_bytes'))} MB"
        f"   queued {snapshot.get('queued', 0)}\n",
        ("requests/s ", "dim"), (_rate(totals.get("requests_per_s")), "bold cyan"),
        ("   frames/s ", "dim"), (_rate(totals.get("frames_per_s")), "bold cyan"),
        f"   requests {totals.get('requests', 0)}  ok {totals.get('ok', 0)}  ",
        # errors count every op's, refusals at the door included (a bad header never becomes a
        # request): ok + errors may exceed requests, so the label says what they count
        (f"errors, all ops incl. refused {sum(errors.values())}"
         + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) + ")" if errors else ""),
         "red" if errors else ""),
        f"   frames {totals.get('frames', 0)}   cold loads {totals.get('cold_loads', 0)}"
        f"   loads {totals.get('loads', 0)}   evictions {totals.get('evictions', 0)}",
    )
    if stale_s > 3:
        head.append(f"\nno snapshot for {stale_s:.0f} s: is the broker still running?", style="bold yellow")
    parts: list[Any] = [Panel(head, box=box.ROUNDED)]

    wt = Table(title="Workers", box=box.SIMPLE_HEAD, title_justify="left", expand=True)
    for col, kw in (("worker", {"no_wrap": True, "min_width": 6}), ("host", {}), ("gpu", {"justify": "right"}), ("pid", {"justify": "right"}),
                    ("in flight", {"justify": "right"}), ("credits", {"justify": "right"}),
                    ("models", {"justify": "right"}), ("loaded", {"ratio": 1}), ("memory MB", {"justify": "right"}),
                    ("restarts", {"justify": "right"}), ("state", {})):
        wt.add_column(col, **kw)
    for w in workers:
        d = detail.get(w.get("worker"), {})
        loaded = ", ".join(w.get("loaded") or []) or "-"
        if w.get("loading"):
            loaded += "  [yellow](loading " + ", ".join(w["loading"]) + ")[/]"
        state_s = "[yellow]draining[/]" if w.get("draining") else "ok"
        if isinstance(d.get("last_seen_s"), (int, float)) and d["last_seen_s"] > 2.5:
            state_s = f"[red]silent {d['last_seen_s']:.0f}s[/]"
        wt.add_row(str(w.get("worker")), str(w.get("host", "")), "cpu" if w.get("gpu") is None else str(w.get("gpu")),
                   str(w.get("pid", "")), str(w.get("in_flight", 0)), str(w.get("credits", "")),
                   f"{w.get('loaded_models', 0)}/{w.get('max_models', 0)}", loaded,
                   # the worker's whole measured memory (mem_used) against its budget, where reported
                   f"{_mb(w.get(vocab.MEM_USED, w.get('total_memory_bytes')))}/{_mb(w.get(vocab.MEM_BUDGET, w.get('max_memory_bytes')))}",
                   str(w.get("restarts", 0)), state_s)
    if not workers:
        wt.add_row("[red]no worker registered[/]", *[""] * 10)
    parts.append(wt)

    mt = Table(title="Models", box=box.SIMPLE_HEAD, title_justify="left", expand=True)
    for col, kw in (("model", {"no_wrap": True, "min_width": 8}), ("loaded on", {"ratio": 1}), ("req/s", {"justify": "right"}),
                    ("frames/s", {"justify": "right"}), ("p50 ms", {"justify": "right"}),
                    ("p99 ms", {"justify": "right"}), ("queue", {"justify": "right"}),
                    ("requests", {"justify": "right"}), ("errors", {"justify": "right"}),
                    ("loads", {"justify": "right"}), ("evictions", {"justify": "right"}),
                    ("load ms", {"justify": "right"}), ("last used", {"justify": "right"})):
        mt.add_column(col, **kw)
    ordered = _sorted_models(models)
    for m in ordered[:top]:
        s = m.get("stats") or {}
        where = ", ".join(m.get("loaded_on") or []) or "[dim]-[/]"
        if m.get("loading_on"):
            where += " [yellow](loading on " + ", ".join(m["loading_on"]) + ")[/]"
        errs = s.get("errors") or {}
        queued = queues.get(m["model_id"], m.get("queued", 0))
        mt.add_row(m.get("model_id", "?"), where, _rate(s.get("requests_per_s")), _rate(s.get("frames_per_s")),
                   _ms(s.get("latency_p50_ms")), _ms(s.get("latency_p99_ms")),
                   f"[bold yellow]{queued}[/]" if queued else "0", str(s.get("requests", 0)),
                   f"[red]{sum(errs.values())}[/]" if errs else "0", str(s.get("loads", 0)),
                   str(s.get("evictions", 0)), _ms(s.get("load_ms_avg") if s.get("load_ms_avg") is not None
                                                   else s.get("load_ms")),
                   _ago(s.get("last_used_s")))
    if len(ordered) > top:
        mt.caption = f"{len(ordered) - top} more model(s) not shown (--top)"
    parts.append(mt)

    et = Table(title="Recent model events", box=box.SIMPLE_HEAD, title_justify="left", expand=True)
    for col in ("time", "worker", "event", "model", "detail"):
        et.add_column(col, ratio=1 if col == "detail" else None)
    shown = [e for e in events if e.get("event") != vocab.LOADING][-10:]
    colours = {vocab.LOADED: "green", vocab.EVICTED: "yellow", vocab.IDLE_UNLOADED: "yellow",
               vocab.UNLOADED: "yellow", vocab.LOAD_FAILED: "bold red", vocab.WORKER_LEFT: "red",
               vocab.WORKER_JOINED: "cyan"}
    for e in reversed(shown):
        t = e.get("time")
        when = datetime.fromtimestamp(t).strftime("%H:%M:%S") if isinstance(t, (int, float)) else "-"
        detail_s = []
        if isinstance(e.get("load_ms"), (int, float)):
            detail_s.append(f"{e['load_ms']:.0f} ms")
        if e.get("reason"):
            detail_s.append(str(e["reason"]))
        ev = str(e.get("event"))
        et.add_row(when, str(e.get("worker", "")), f"[{colours.get(ev, 'white')}]{ev}[/]",
                   str(e.get("model_id", "") or ""), ", ".join(detail_s))
    if not shown:
        et.add_row("-", "", "[dim]none yet[/]", "", "")
    parts.append(et)
    return Group(*parts)


# --- command --------------------------------------------------------------------------------------

@click.command("stats")
@click.option("--broker-stats", "stats_endpoint", default=None, envvar="LIPSYNC_BROKER_STATS",
              help="The broker's stats PUB endpoint [default: --broker's host, port + 2; else tcp://127.0.0.1:5557].")
@click.option("--broker", "broker", default=None, envvar="LIPSYNC_BROKER",
              help="The broker's client endpoint; asked (model_stats) when the stats socket is silent.")
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
@click.option("--json", "as_json", is_flag=True, help="JSON: one snapshot with --once, else one JSON line per snapshot.")
@click.option("--timeout", type=float, default=5.0, show_default=True,
              help="Seconds to wait for the broker before saying it does not answer (exit 1).")
@click.option("--top", type=click.IntRange(1, 10_000), default=25, show_default=True, help="Models shown.")
@click.argument("model_id", required=False)
def stats(stats_endpoint: Optional[str], broker: Optional[str], once: bool, as_json: bool, timeout: float,
          top: int, model_id: Optional[str]) -> None:
    """Live view of the cluster: workers, models, rates, latency, loads and evictions.

    \b
    Examples:
      lipsync-cluster stats
      lipsync-cluster stats --once --json
      lipsync-cluster stats --broker tcp://10.0.0.5:5555
      lipsync-cluster stats demo_ada --once          (one model only)
    """
    if not as_json:  # the rendered views draw with rich; JSON needs only the plain install
        require("lipsync-cluster stats (without --json)", "console")
    if stats_endpoint is None:
        stats_endpoint = stats_endpoint_for(broker) if broker else DEFAULT_STATS
    # The fallback asks the same broker's client endpoint: never another cluster's default one.
    fallback = broker or broker_endpoint_for(stats_endpoint)

    def only(snapshot: dict) -> dict:
        if model_id:
            known = sorted(str(m.get("model_id")) for m in snapshot.get("models") or [])
            if model_id not in known:  # an empty table would read as "idle", not "no such model"
                shown = ", ".join(known[:10]) + (f", ... ({len(known)} in all)" if len(known) > 10 else "")
                raise click.ClickException(f"model {model_id!r} is not in the broker's catalog; "
                                           f"configured: {shown or 'none'}")
            snapshot = dict(snapshot)
            snapshot["models"] = [m for m in snapshot.get("models") or [] if m.get("model_id") == model_id]
        return snapshot

    if once:
        try:
            snapshot, events = take_snapshot(stats_endpoint, fallback, timeout)
        except NoBroker as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        snapshot = only(snapshot)
        if as_json:
            snapshot.setdefault("events", events)
            click.echo(json.dumps(snapshot, indent=2, default=str))
        else:
            _console().print(render(snapshot, events, stats_endpoint=stats_endpoint, top=top))
        return
    _live(stats_endpoint, fallback, timeout, as_json, top, only)


def _console() -> Any:
    from rich.console import Console

    # Piped or captured output gets a wide page instead of rich's 80-column fallback.
    return Console() if sys.stdout.isatty() else Console(width=160)


def _live(stats_endpoint: str, broker: str, timeout: float, as_json: bool, top: int, only) -> None:
    feed = StatsFeed(stats_endpoint)
    use_broker = False
    pub_wait, broker_wait = split_wait(timeout, True)
    try:
        if not feed.poll(pub_wait):
            try:
                feed.snapshot = snapshot_from_broker(broker, broker_wait)
                feed.received_at = time.monotonic()
                use_broker = True
            except NoBroker:
                click.echo(f"Error: no broker answered at {stats_endpoint} (stats) nor at {broker} (clients) "
                           f"within {timeout:g} s; is the cluster running? (lipsync-cluster start)", err=True)
                sys.exit(1)
        if as_json:
            while True:
                click.echo(json.dumps(only(feed.snapshot), default=str))
                sys.stdout.flush()
                _next(feed, broker, timeout, use_broker)
        from rich.live import Live

        console = _console()
        with Live(render(only(feed.snapshot), feed.events, stats_endpoint=stats_endpoint, top=top),
                  console=console, refresh_per_second=4, screen=False) as live:
            while True:
                _next(feed, broker, timeout, use_broker, wait_s=0.5)
                live.update(render(only(feed.snapshot), feed.events, stats_endpoint=stats_endpoint, top=top,
                                   stale_s=time.monotonic() - feed.received_at))
    except KeyboardInterrupt:
        pass
    finally:
        feed.close()


def _next(feed: StatsFeed, broker: str, timeout: float, use_broker: bool, wait_s: float = 1.0) -> None:
    if not use_broker:
        feed.poll(wait_s)
        return
    time.sleep(wait_s)
    try:
        feed.snapshot = snapshot_from_broker(broker, timeout)
        feed.received_at = time.monotonic()
    except NoBroker:
        pass
