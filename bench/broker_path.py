#!/usr/bin/env python3
"""The broker's own per-request work, in-process: no sockets, no other processes.

``bench/broker.py`` measures the broker between real processes, so on a small shared machine its
numbers move with everything else that runs. This drives one in-process :class:`Broker` the way
that bench does -- one client keeping ``--window`` small ``infer`` requests in flight, one worker
with ``--credits`` credits answering each leg at once -- through the broker's own handlers
(``_on_client_message``, ``_on_worker_message``, ``Dispatcher.dispatch``), with the sends replaced
by appends to a list. Every frame is built before the clock starts; the clock is this process's
CPU time. What is left is the broker's Python per request: header decode, request rules,
admission, routing, the placement index, the leg header, the reply, the stats.

    python bench/broker_path.py                 # CPU us per request (best and median of --rounds)
    python bench/broker_path.py --profile       # cProfile of one round, by own time
    python bench/broker_path.py --calls         # per request: Python calls and profiled us per function
    python bench/broker_path.py --tree /tmp/pre11 --calls   # the same for another checkout (even pre-issue-11)

Compare two trees by running this file from each (it imports the package next to it).
Under ``valgrind --tool=cachegrind --cache-sim=no`` the difference of two ``--requests`` counts
divided by their difference is an instruction count per request that load does not move.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if "--tree" in sys.argv[:-1]:  # another checkout's package (read before the imports below)
    REPO = Path(sys.argv[sys.argv.index("--tree") + 1]).resolve()
sys.path.insert(0, str(REPO))

import msgpack  # noqa: E402
import numpy as np  # noqa: E402
import zmq  # noqa: E402

from lipsync_cluster.broker import Broker  # noqa: E402
from lipsync_cluster.common import protocol  # noqa: E402
from lipsync_cluster.config.schema import load_config  # noqa: E402

CATALOG = {"bench": {"version": "1", "preload": False, "num_frames": 1, "memory_estimate_mb": None}}
REPLY = {"op": "reply", "ok": True, "model_id": "bench", "model_version": "1", "format": "raw",
         "images": [], "sizes": [32], "timings": {"inference_ms": 0.01, "queue_ms": 0.1, "total_ms": 0.01},
         "model_loaded": False, "model_load_ms": 0.0}


def run(n: int, window: int, credits: int, no_gc: bool = False) -> float:
    """CPU seconds for ``n`` requests through one in-process broker."""
    cfg = load_config({"cluster": {"queue_limit_per_model": 100000, "queue_limit_total": 100000},
                       "logging": {"stats_report_minutes": 0}})
    b = Broker(cfg, lambda: CATALOG)
    b._watch.scan()
    legs: list = []
    answers: list = []
    d = getattr(b, "dispatcher", None)  # None: a checkout before issue 17 (the broker dispatched itself)
    b._send_worker = lambda w, frames: legs.append(frames) or True
    b._send_client = lambda client, header, payloads=(): answers.append(header)
    if d is not None:
        d._send_worker, d.to_client = b._send_worker, b._send_client
        dirty, dispatch = (lambda: d.dirty), d.dispatch
    else:
        dirty, dispatch = (lambda: b._dirty), b._dispatch
    b._publish = lambda topic, body: None
    pk = msgpack.Packer(use_bin_type=True)
    worker = b"\x00worker"
    b._on_worker_message([zmq.Frame(worker), zmq.Frame(protocol.TAG), zmq.Frame(pk.pack(
        {"op": "ready", "worker": "w0", "credits": credits, "max_models": 3, "loaded": ["bench"]}))])
    header = {"op": "infer", "model_id": "bench", "batch_size": 1, "format": "raw"}
    payloads = protocol.attach_arrays(header, {"audio_pcm": np.zeros(16, np.int16)})
    requests = [[zmq.Frame(b"\x00client"), zmq.Frame(protocol.TAG), zmq.Frame(pk.pack(dict(header, id=i))),
                 *(zmq.Frame(bytes(p)) for p in payloads)] for i in range(n)]
    # The broker numbers its legs 1, 2, ... (no preload here): each reply is ready before the clock.
    replies = {rid: [zmq.Frame(worker), zmq.Frame(protocol.TAG), zmq.Frame(pk.pack(dict(REPLY, rid=rid)))]
               for rid in range(1, n + 1)}
    on_client, on_worker = b._on_client_message, b._on_worker_message
    sent = 0
    if no_gc:  # the cyclic collector's share depends on this harness's heap (every frame prebuilt)
        gc.collect()
        gc.disable()
    start = time.process_time()
    while sent < min(window, n):
        on_client(requests[sent])
        sent += 1
    while len(answers) < n:
        if dirty():
            dispatch()
        out, legs[:] = legs[:], []
        for frames in out:  # the worker answers every leg at once (reading the rid: harness cost)
            on_worker(replies[msgpack.unpackb(frames[1])["rid"]])
        while sent < n and sent - len(answers) < window:
            on_client(requests[sent])
            sent += 1
    cpu = time.process_time() - start
    gc.enable()
    bad = [a for a in answers if not a.get("ok")]
    if bad:
        raise RuntimeError(f"{len(bad)} request(s) failed, e.g. {bad[0]}")
    return cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--window", type=int, default=256, help="requests in flight (as bench/broker.py)")
    ap.add_argument("--credits", type=int, default=32, help="the worker's credits (as bench/broker.py)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--calls", action="store_true",
                    help="cProfile of one round (gc off): Python calls and profiled us per request, by function "
                         "(the frames are built inside the round: compare calls, not the total us)")
    ap.add_argument("--no-gc", action="store_true", help="the cyclic collector off while timing")
    ap.add_argument("--tree", default=None, metavar="DIR", help="import the package from this checkout")
    args = ap.parse_args()
    if args.calls:
        import cProfile
        import pstats
        run(2000, args.window, args.credits)  # warm up
        prof = cProfile.Profile()
        prof.enable()
        run(args.requests, args.window, args.credits, no_gc=True)
        prof.disable()
        rows = sorted(((tt, nc, f"{Path(f).name}:{name}") for (f, _, name), (_, nc, tt, _, _)
                       in pstats.Stats(prof).stats.items() if Path(f).name != "broker_path.py"), reverse=True)
        n = args.requests
        print(f"{REPO.name}: {sum(r[1] for r in rows) / n:.1f} Python calls per request "
              f"(profiled: {sum(r[0] for r in rows) / n * 1e6:.1f} us; this harness's own left out), by own time:")
        for tt, nc, name in rows[:40]:
            print(f"{tt / n * 1e6:8.2f} us {nc / n:6.2f} calls  {name}")
        return
    if args.profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.enable()
        run(args.requests, args.window, args.credits)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        return
    us = sorted(1e6 * run(args.requests, args.window, args.credits, args.no_gc) / args.requests
                for _ in range(args.rounds))
    load = os.getloadavg()[0]
    print(f"{REPO.name}: broker Python CPU per request {us[0]:.1f} us best, {us[len(us) // 2]:.1f} us median "
          f"({args.rounds} rounds of {args.requests}; load average {load:.1f})")


if __name__ == "__main__":
    main()
