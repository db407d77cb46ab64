"""Chaos: a steady load while workers and the broker are killed, frozen and restarted.

A real cluster (supervisor, broker, CPU workers, `light` demo models) serves C client threads, each
keeping a few `infer` requests in flight through the ordinary `Client` (its default retry policy).
Meanwhile, on a schedule:

    kill -9 a worker           the supervisor restarts it; the broker re-dispatches its requests once
    SIGSTOP a worker, SIGCONT  declared dead after the heartbeat liveness; its late replies dropped
    kill -9 the broker         the supervisor restarts it on the same ports; workers re-register by
                               themselves; clients resend what was in flight (Lazy Pirate)
    SIGTERM a worker           a graceful drain, then the supervisor starts it again
    SIGSTOP the broker, SIGCONT  workers reconnect when it is silent; clients keep their requests

Every request is accounted for: answered ok, answered with an error code, or lost (the client
heard nothing before its own timeout). Lost and duplicated (a reply delivered twice, or more
replies than tries) must both be 0.

    python bench/chaos.py            # ~2 minutes; writes docs/RELIABILITY.md
    python bench/chaos.py --quick    # ~25 s; prints only
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, today, write_section  # noqa: E402

from lipsync_cluster.client import Client, LipsyncError  # noqa: E402
from lipsync_cluster.client.results import infer_request  # noqa: E402
from lipsync_cluster.config import load_config  # noqa: E402
from lipsync_cluster.supervisor import Supervisor  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "RELIABILITY.md"
MODELS = ("demo_ada", "demo_ben", "demo_cleo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Event:
    at: float           # seconds after the load starts
    action: str         # kill | stop | term | kill-broker | stop-broker
    target: int = 0     # worker index (ignored for the broker)
    hold: float = 0.0   # how long a SIGSTOP lasts


def schedule(quick: bool, duration: float) -> list[Event]:
    one = [Event(3, "kill", 0), Event(6, "stop", 1, 2.0), Event(10, "kill-broker"),
           Event(14, "term", 2), Event(17, "stop-broker", hold=2.0)]
    if quick:
        return one
    events, offset = [], 0.0
    while offset + 20 <= duration:
        events += [Event(e.at + offset, e.action, e.target, e.hold) for e in one]
        offset += 22
    return events


@dataclass
class Outcome:
    sent_at: float
    done_at: float = 0.0
    code: Optional[str] = None        # None while pending; "ok" or the error code
    tries: int = 1                    # times the client sent it
    broker_retried: int = 0           # times the broker re-dispatched it


@dataclass
class Results:
    outcomes: list[Outcome] = field(default_factory=list)
    duplicates: int = 0
    late_replies: int = 0
    resent: int = 0
    reconnects: int = 0
    events: list[str] = field(default_factory=list)
    elapsed: float = 0.0


def _client_loop(endpoint: str, stop: threading.Event, results: Results, lock: threading.Lock,
                 in_flight: int, seed: int, timeout: float) -> None:
    rng = random.Random(seed)
    feats = {b: np.full((b, 32, 16, 16), 0.3, np.float32) for b in (1, 2)}
    with Client(endpoint, timeout=timeout) as client:
        waiting: list[tuple[Outcome, object]] = []

        def settle(block: bool) -> None:
            keep = []
            for outcome, future in waiting:
                if not block and not future.done():
                    keep.append((outcome, future))
                    continue
                try:
                    header, _ = future.result(timeout + 5)
                    outcome.code = "ok" if header.get("ok") else (header.get("error") or {}).get("code", "internal")
                    outcome.broker_retried = int(header.get("retried") or 0)
                except LipsyncError as exc:
                    outcome.code = "lost" if exc.code == "unavailable" and "no reply" in exc.message else exc.code
                except Exception:  # noqa: BLE001 - a future that never resolved counts as lost
                    outcome.code = "lost"
                outcome.done_at = time.monotonic()
                outcome.tries = getattr(future, "tries", 1)
            waiting[:] = keep

        i = 0
        while not stop.is_set():
            while len(waiting) < in_flight and not stop.is_set():
                batch = rng.choice((1, 2))
                header, payloads = infer_request(rng.choice(MODELS), audio_features=feats[batch], batch_size=batch,
                                                 start_frame_idx=i, format="jpeg", quality=70,
                                                 deadline_ms=int(timeout * 1000))
                outcome = Outcome(time.monotonic())
                with lock:
                    results.outcomes.append(outcome)
                waiting.append((outcome, client.submit(header, payloads)))
                i += 1
            time.sleep(0.005)
            settle(block=False)
        settle(block=True)
        c = client._transport.counters
        with lock:
            results.duplicates += c["duplicates"]
            results.late_replies += c["late_replies"]
            results.resent += c["resent"]
            results.reconnects += c["reconnects"]


def _inject(sup: Supervisor, events: list[Event], start: float, stop: threading.Event, log: list[str]) -> None:
    for e in events:
        if stop.wait(max(0.0, start + e.at - time.monotonic())):
            return
        child = sup.children[0] if e.action.endswith("broker") else sup.children[1 + e.target % (len(sup.children) - 1)]
        proc = child.proc
        if proc is None or proc.poll() is not None:
            log.append(f"{e.at:5.1f}s skip {e.action} {child.name} (not running)")
            continue
        t = time.monotonic() - start
        if e.action in ("kill", "kill-broker"):
            os.kill(proc.pid, signal.SIGKILL)
            log.append(f"{t:5.1f}s kill -9 {child.name}")
        elif e.action == "term":
            os.kill(proc.pid, signal.SIGTERM)
            log.append(f"{t:5.1f}s SIGTERM {child.name} (drain, then restarted)")
        elif e.action in ("stop", "stop-broker"):
            os.kill(proc.pid, signal.SIGSTOP)
            stop.wait(e.hold)
            os.kill(proc.pid, signal.SIGCONT)
            log.append(f"{t:5.1f}s SIGSTOP {child.name} for {e.hold:.1f}s")


def run_chaos(models_dir: Path, *, workers: int = 3, clients: int = 4, in_flight: int = 3,
              duration: float = 25.0, quick: bool = True, seed: int = 0, timeout: float = 30.0,
              verbose: bool = False) -> Results:
    """Start a cluster on ``models_dir``, load it while the schedule runs, stop; return the tally."""
    cfg = load_config({
        "server": {"frontend_port": free_port(), "backend_port": free_port(), "stats_port": free_port()},
        "models_dir": str(models_dir), "audio_encoder": str(models_dir / "audio_encoder.onnx"),
        "onnx": {"intra_op_threads": 1},
        "capacity": {"max_models": 3, "max_memory_gb": 2},
        "cluster": {"gpus": 0, "per_gpu": workers, "heartbeat_interval_s": 0.25, "heartbeat_liveness": 3,
                    "restart_backoff_s": 0.2, "restart_backoff_max_s": 2.0},
        "logging": {"level": "info" if verbose else "error", "stats_report_minutes": 0,
                    "log_model_operations": verbose},
    })
    sup = Supervisor(cfg, 0, workers)
    results = Results()
    sup.start()
    try:
        sup.wait_ready(timeout_s=120)
        sup.watch_in_background()
        with Client(cfg.frontend, timeout=60) as warm:  # every model resident once, so the run measures faults
            for model in MODELS:
                warm.infer(model, audio_features=np.zeros((32, 16, 16), np.float32), format="jpeg")
        stop, lock = threading.Event(), threading.Lock()
        start = time.monotonic()
        threads = [threading.Thread(target=_client_loop, args=(cfg.frontend, stop, results, lock, in_flight,
                                                                seed + k, timeout), daemon=True)
                   for k in range(clients)]
        injector = threading.Thread(target=_inject, args=(sup, schedule(quick, duration), start, stop,
                                                          results.events), daemon=True)
        for t in threads:
            t.start()
        injector.start()
        time.sleep(duration)
        stop.set()
        injector.join(10)
        for t in threads:
            t.join(timeout + 15)
        results.elapsed = time.monotonic() - start
    finally:
        sup.stop(drain_timeout_s=10)
    return results


def summarize(r: Results) -> dict:
    codes: dict[str, int] = {}
    for o in r.outcomes:
        codes[o.code or "lost"] = codes.get(o.code or "lost", 0) + 1
    ok = [o for o in r.outcomes if o.code == "ok"]
    lat = sorted((o.done_at - o.sent_at) * 1000 for o in ok)
    retried = [o for o in ok if o.tries > 1 or o.broker_retried]
    return {
        "sent": len(r.outcomes), "ok": codes.pop("ok", 0), "lost": codes.pop("lost", 0), "errors": codes,
        "duplicated": r.duplicates, "client_resent": sum(1 for o in r.outcomes if o.tries > 1),
        "broker_retried": sum(1 for o in r.outcomes if o.broker_retried),
        "reconnects": r.reconnects, "late_replies_dropped": r.late_replies,
        "p50_ms": lat[len(lat) // 2] if lat else None, "p99_ms": lat[int(len(lat) * 0.99)] if lat else None,
        "worst_retried_ms": max(((o.done_at - o.sent_at) * 1000 for o in retried), default=None),
        "seconds": r.elapsed,
    }


def table(s: dict, events: list[str]) -> str:
    def ms(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.0f} ms"

    errors = ", ".join(f"{k} {v}" for k, v in sorted(s["errors"].items())) or "none"
    rows = [("requests sent", s["sent"]), ("answered ok", s["ok"]), ("answered with an error", errors),
            ("lost (no answer)", s["lost"]), ("duplicated", s["duplicated"]),
            ("resent by a client", s["client_resent"]), ("re-dispatched by the broker", s["broker_retried"]),
            ("client reconnects", s["reconnects"]), ("late replies dropped (client)", s["late_replies_dropped"]),
            ("latency ok p50 / p99", f"{ms(s['p50_ms'])} / {ms(s['p99_ms'])}"),
            ("worst latency of a retried request", ms(s["worst_retried_ms"])),
            ("run", f"{s['seconds']:.0f} s")]
    out = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    out += ["", "Faults injected:", "", *[f"    {e}" for e in events]]
    return "\n".join(out)


def write_doc(body: str) -> None:
    write_section("chaos", body, doc=DOC, title="# Reliability\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one round of faults in ~25 s; print only")
    ap.add_argument("--duration", type=float, default=None, help="seconds of load (default 90, quick 22)")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--in-flight", type=int, default=3, help="requests each client keeps in flight")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models-dir", type=Path, default=None, help="demo models to use (built when omitted)")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/RELIABILITY.md")
    ap.add_argument("--verbose", action="store_true", help="cluster logs on stderr")
    args = ap.parse_args()
    duration = args.duration or (22.0 if args.quick else 90.0)
    with tempfile.TemporaryDirectory(prefix="lsc-chaos-") as tmp:
        models = args.models_dir
        if models is None:
            from lipsync_cluster.demo.build import build_demo_models

            models = Path(tmp) / "models"
            build_demo_models(models, count=3, kind="light", frames=12, size=(640, 360), seed=0, progress=False)
        r = run_chaos(models, workers=args.workers, clients=args.clients, in_flight=args.in_flight,
                      duration=duration, quick=args.quick, seed=args.seed, verbose=args.verbose)
    s = summarize(r)
    text = table(s, r.events)
    print(text)
    if not args.quick and not args.no_write:
        cmd = "python bench/chaos.py" + "".join(f" {a}" for a in sys.argv[1:])
        write_doc(f"Measured {today()} on {machine()}; `{cmd}`: {args.workers} CPU workers, "
                  f"{args.clients} clients x {args.in_flight} requests in flight, `light` demo models at "
                  f"640x360, batch 1-2, JPEG.\n\n{text}")
        print(f"\nwritten to {DOC}")
    sys.exit(0 if s["lost"] == 0 and s["duplicated"] == 0 else 1)


if __name__ == "__main__":
    main()
