"""WebRTC out of the gateway: encode CPU, bandwidth, sessions at 25 fps, A/V offset at the receiver.

    python bench/webrtc.py                      # ~6 minutes; writes docs/BENCHMARKS.md
    python bench/webrtc.py --quick --no-write   # a minute, prints only
    python bench/webrtc.py --av-seconds 600     # the A/V offset over 10 minutes

Starts a CPU cluster on 3 light demo models at 1280x720 and the gateway as its own process
(`lipsync-cluster gateway`, so its CPU time is its own), then:

1. **Cost per viewer**, side by side: N viewers over WebRTC with H.264, with VP8, and over the
   JPEG WebSocket, each talking in real time (100 ms PCM messages, half the time listening; nothing
   is sent while silent, as from a gated microphone: the gateway's listening silence fills the pauses).
   Gateway CPU per picture sent (the gateway process, user + system) and, of it, the video
   encoder's (its threads' CPU time, reported by the gateway); x 25 = CPU per session-second at
   25 fps (a starved gateway skips pictures, so per picture is what stays comparable on a busy
   machine); the measured CPU per session-second too; and the RTP payload (WebRTC) or message
   bytes (WebSocket) each viewer received per second.
2. **Sessions at 25 fps**, WebRTC H.264: 1, 2, 3 ... viewers until a level shows more than 2 % of its
   picture ticks as fillers (the cluster late) or skipped (the encoder late). Everything runs on
   this machine: cluster, gateway and the viewers. Per level also speech -> its tick leaves: p50
   (median over the viewers) / p99 (the worst viewer's) of audio pushed -> the tick that carries it
   is due to leave the gateway (its share of speech -> mouth; network and receiver come on top).
   ``--why`` prints each filler with where its frame was (the gateway's ``filler_log``).
3. **A/V offset at the receiver**: one H.264 viewer for ``--av-seconds``; every video sender
   report maps a tick (RTP ``n x 3600``) to the sender's clock, the nearest audio report maps the
   same tick's audio (RTP ``n x 1920``); the difference is the offset a browser's lip sync sees.

The viewers are Python aiortc peers (gateway/webrtc_viewer.py) in this process with video decoding
off (a null decoder: the receivers' CPU is not the gateway's); their audio is decoded.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, today, write_section  # noqa: E402
from stream import light_models, speech, start_cluster  # noqa: E402

import aiohttp  # noqa: E402
import psutil  # noqa: E402

from lipsync_cluster.client import Client  # noqa: E402

SR = 16000
CHUNK = 1600  # 100 ms messages


def null_video_decoding() -> None:
    """The viewers here do not decode video (a receiver's CPU is not the gateway's)."""
    import aiortc.rtcrtpreceiver as rr

    real = rr.get_decoder

    class Null:
        def decode(self, encoded_frame):  # noqa: ANN001
            return []

    rr.get_decoder = lambda codec: Null() if codec.mimeType.lower().startswith("video/") else real(codec)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway(endpoint: str, kbps: int, lookahead: int, batch: int = 5,
                  batching: str = "adaptive") -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lipsync_cluster.cli", "gateway", "--port", str(port),
                             "--broker", endpoint, "--max-queue", "50", "--webrtc-kbps", str(kbps),
                             "--lookahead-frames", str(lookahead), "--batch-size", str(batch),
                             "--webrtc-batching", batching],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    import urllib.request

    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "api/models", timeout=2).read()
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the gateway did not start")


def stop_gateway(proc: subprocess.Popen) -> None:
    """SIGTERM (the gateway closes its peers), then SIGKILL after 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def status(http: aiohttp.ClientSession, url: str) -> dict:
    async with http.get(url + "api/status") as r:
        return await r.json()


async def talk(send, seconds: float, seed: int, silence: float = 0.5) -> None:
    """Real-time PCM, ``silence`` of the time listening (nothing sent)."""
    pcm = np.round(speech(seconds, seed, silence) * 32767).astype("<i2")
    t0 = time.monotonic()
    for i, a in enumerate(range(0, pcm.size, CHUNK)):
        wait = t0 + i * CHUNK / SR - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        chunk = pcm[a:a + CHUNK]
        if np.any(chunk):
            send(chunk)


async def webrtc_level(url: str, n: int, seconds: float, codec: str, models: list[str], gw_pid: int,
                       cluster_pids: tuple = ()) -> dict:
    from lipsync_cluster.gateway.webrtc_viewer import Viewer

    viewers = [Viewer(url, models[i % len(models)], codecs=(codec,), read_index=False) for i in range(n)]
    async with aiohttp.ClientSession() as http:
        try:
            for v in viewers:
                await v.connect()
            deadline = time.monotonic() + 60  # every session past its first second (encoders open)
            while time.monotonic() < deadline:
                detail = (await status(http, url))["detail"]
                if len(detail) == n and all(s["sent"] >= 25 for s in detail):
                    break
                await asyncio.sleep(0.2)
            before = {s["session"]: s for s in (await status(http, url))["detail"]}
            lost0 = [await v.packets_lost() for v in viewers]
            bytes0 = [await received_bytes(v) for v in viewers]
            cpu0, t0, ccpu0 = cpu_s(gw_pid), time.monotonic(), sum(cpu_s(p) for p in cluster_pids)
            await asyncio.gather(*(talk(v.push, seconds, i) for i, v in enumerate(viewers)))
            cpu1, t1, ccpu1 = cpu_s(gw_pid), time.monotonic(), sum(cpu_s(p) for p in cluster_pids)
            after = {s["session"]: s for s in (await status(http, url))["detail"]}
            bytes1 = [await received_bytes(v) for v in viewers]
            lost1 = [await v.packets_lost() for v in viewers]
        finally:
            for v in viewers:
                await v.close()
    dt = t1 - t0
    d = [(after[k], before[k]) for k in after if k in before]
    ticks = sum(a["sent"] - b["sent"] for a, b in d)
    fillers = sum(a["fillers"] - b["fillers"] for a, b in d)
    skipped = sum(a["video_skipped"] - b["video_skipped"] for a, b in d)
    enc = sum(a["encode_cpu_s"] - b["encode_cpu_s"] for a, b in d)
    requests = sum(a["batches_sent"] - b["batches_sent"] for a, b in d)
    encoded = ticks - skipped
    rx = [(b1["video"] - b0["video"], b1["audio"] - b0["audio"]) for b0, b1 in zip(bytes0, bytes1)]
    lat = [a.get("speech_to_tick_ms", {}) for a, _ in d]
    p50 = [x["p50_ms"] for x in lat if x.get("p50_ms") is not None]
    p99 = [x["p99_ms"] for x in lat if x.get("p99_ms") is not None]
    return {"path": f"webrtc-{codec}", "n": n, "seconds": dt, "ticks_per_s": ticks / dt / n,
            "speech_p50_ms": float(np.median(p50)) if p50 else None, "speech_p99_ms": max(p99) if p99 else None,
            "filler_log": [f for a, _ in d for f in a.get("filler_log", [])],
            "fillers": fillers / max(1, ticks), "skipped": skipped / max(1, ticks),
            "gateway_cpu_per_session_s": (cpu1 - cpu0) / dt / n, "encode_cpu_per_session_s": enc / dt / n,
            "gateway_ms_per_picture": 1000 * (cpu1 - cpu0) / max(1, encoded),
            "encode_ms_per_picture": 1000 * enc / max(1, encoded),
            "video_kbps": float(np.mean([v for v, _ in rx])) * 8 / dt / 1000,
            "audio_kbps": float(np.mean([a for _, a in rx])) * 8 / dt / 1000,
            "lost": sum(sum(x.values()) for x in lost1) - sum(sum(x.values()) for x in lost0),
            # the other side of small batches: requests and the cluster's CPU (broker + workers)
            "requests_per_session_s": requests / dt / n,
            "cluster_cpu_per_session_s": (ccpu1 - ccpu0) / dt / n if cluster_pids else None}


async def received_bytes(v) -> dict:
    return dict(v.rtp_bytes)


async def ws_level(url: str, n: int, seconds: float, models: list[str], gw_pid: int) -> dict:
    ws_url = url.replace("http://", "ws://") + "ws"
    got = [{"bytes": 0, "frames": 0} for _ in range(n)]
    async with aiohttp.ClientSession() as http:
        sockets = [await http.ws_connect(ws_url, max_msg_size=1 << 24) for _ in range(n)]

        async def read(i: int, ws) -> None:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    got[i]["bytes"] += len(msg.data)
                    got[i]["frames"] += 1

        readers = [asyncio.ensure_future(read(i, ws)) for i, ws in enumerate(sockets)]
        for i, ws in enumerate(sockets):
            await ws.send_str(json.dumps({"type": "start", "model_id": models[i % len(models)]}))
            await ws.send_str(json.dumps({"type": "listen", "on": True}))
        await asyncio.sleep(2.0)
        start = [dict(g) for g in got]
        drops0 = sum(s["drops"] for s in (await status(http, url))["detail"])
        cpu0, t0 = cpu_s(gw_pid), time.monotonic()

        def sender(ws):
            return lambda chunk: asyncio.ensure_future(ws.send_bytes(chunk.tobytes()))

        await asyncio.gather(*(talk(sender(ws), seconds, i) for i, ws in enumerate(sockets)))
        cpu1, t1 = cpu_s(gw_pid), time.monotonic()
        drops1 = sum(s["drops"] for s in (await status(http, url))["detail"])
        end = [dict(g) for g in got]
        for ws in sockets:
            await ws.close()
        for r in readers:
            r.cancel()
    dt = t1 - t0
    frames = sum(e["frames"] - s["frames"] for s, e in zip(start, end))
    return {"path": "websocket-jpeg", "n": n, "seconds": dt, "ticks_per_s": frames / dt / n,
            "fillers": None, "skipped": (drops1 - drops0) / max(1, frames),
            "gateway_cpu_per_session_s": (cpu1 - cpu0) / dt / n, "encode_cpu_per_session_s": 0.0,
            "gateway_ms_per_picture": 1000 * (cpu1 - cpu0) / max(1, frames), "encode_ms_per_picture": 0.0,
            "video_kbps": float(np.mean([e["bytes"] - s["bytes"] for s, e in zip(start, end)])) * 8 / dt / 1000,
            "audio_kbps": 0.0, "lost": 0}


async def av_offset_run(url: str, seconds: float, model: str) -> dict:
    from lipsync_cluster.gateway.webrtc_viewer import Viewer

    v = Viewer(url, model, codecs=("h264",), read_index=False)
    await v.connect()
    try:
        t0 = time.monotonic()
        await talk(v.push, seconds, 7)
        offsets = v.av_offsets_ms()
        reports = len(offsets)
        lost = await v.packets_lost()
    finally:
        await v.close()
    a = np.abs(np.array(offsets)) if offsets else np.array([np.nan])
    minute = max(1, int(60 / max(1e-9, (time.monotonic() - t0) / max(1, reports))))
    first, last = np.array(offsets[:minute]), np.array(offsets[-minute:])
    return {"seconds": seconds, "reports": reports, "median_ms": float(np.median(offsets)) if offsets else None,
            "p99_abs_ms": float(np.percentile(a, 99)), "max_abs_ms": float(a.max()),
            "first_min_median_ms": float(np.median(first)) if first.size else None,
            "last_min_median_ms": float(np.median(last)) if last.size else None, "lost": lost}


def fmt_row(r: dict) -> str:
    fill = "–" if r["fillers"] is None else f"{100 * r['fillers']:.1f} %"
    lat = "–" if r.get("speech_p50_ms") is None else f"{r['speech_p50_ms']:.0f} / {r['speech_p99_ms']:.0f}"
    return (f"| {r['path']} | {r['n']} | {fill} | {100 * r['skipped']:.1f} % | {lat} | "
            f"{r['gateway_ms_per_picture']:.1f} | {r['encode_ms_per_picture']:.1f} | "
            f"{25 * r['gateway_ms_per_picture'] / 1000:.2f} | {25 * r['encode_ms_per_picture'] / 1000:.2f} | "
            f"{r['gateway_cpu_per_session_s']:.2f} | {r['video_kbps']:.0f} | {r['audio_kbps']:.0f} | "
            f"{fmt_opt(r.get('requests_per_session_s'), '.1f')} | {fmt_opt(r.get('cluster_cpu_per_session_s'), '.2f')} |")


def fmt_opt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short levels, no sweep past 2 sessions; prints only")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per level (default 30, quick 8)")
    ap.add_argument("--sessions", type=int, default=2, help="viewers in the cost comparison")
    ap.add_argument("--max-sessions", type=int, default=None, help="stop the 25 fps sweep here")
    ap.add_argument("--av-seconds", type=float, default=None, help="A/V offset run length (default 120, quick 20)")
    ap.add_argument("--kbps", type=int, default=1500, help="WebRTC video bit rate")
    ap.add_argument("--lookahead", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=5, help="frames per request (the gateway's --batch-size)")
    ap.add_argument("--batching", choices=["adaptive", "fixed"], default="adaptive",
                    help="the gateway's --webrtc-batching (fixed: whole batches, the old path)")
    ap.add_argument("--workers", type=int, default=None, help="CPU workers (default: one per core)")
    ap.add_argument("--models", default=None, help="a folder of light demo models (built if absent)")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/BENCHMARKS.md")
    ap.add_argument("--av-only", action="store_true",
                    help="only the A/V offset run (prints only; e.g. --av-only --av-seconds 600)")
    ap.add_argument("--sweep-only", action="store_true", help="only the sessions-at-25-fps sweep (prints only)")
    ap.add_argument("--why", action="store_true", help="print each filler tick of the sweep: where its frame was "
                                                       "(the gateway's filler_log)")
    args = ap.parse_args()
    seconds = args.seconds or (8.0 if args.quick else 30.0)
    av_seconds = args.av_seconds or (20.0 if args.quick else 120.0)
    max_n = args.max_sessions or (2 if args.quick else 16)
    workers = args.workers or os.cpu_count() or 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the cluster and the gateway
    null_video_decoding()

    tmp = None
    if args.models:
        models_dir = Path(args.models)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-webrtc-")
        models_dir = Path(tmp.name)
    light_models(models_dir)
    print(f"starting a cluster: broker + {workers} CPU worker(s), and the gateway ...", flush=True)
    sup = start_cluster(models_dir, workers)
    gw, url = start_gateway(sup.config.frontend, args.kbps, args.lookahead, args.batch_size, args.batching)
    cluster_pids = tuple(c.proc.pid for c in sup.children if c.proc is not None)
    load_before = os.getloadavg()
    cost: list[dict] = []
    sweep: list[dict] = []
    av = None
    try:
        with Client(sup.config.frontend) as client:
            models = sorted(m["model_id"] for m in client.list_models())[:3]
            names = [w["worker"] for w in client.model_stats().get("workers", [])]
            for m in models:
                for w in names:
                    client.load_model(m, worker=w)
        for path in () if args.sweep_only or args.av_only else ("h264", "vp8", "ws"):
            r = asyncio.run(ws_level(url, args.sessions, seconds, models, gw.pid) if path == "ws"
                            else webrtc_level(url, args.sessions, seconds, path, models, gw.pid, cluster_pids))
            cost.append(r)
            print(fmt_row(r), f"load {os.getloadavg()[0]:.1f}", flush=True)
        n, best = 1, None
        while n <= max_n and not args.av_only:
            r = asyncio.run(webrtc_level(url, n, seconds, "h264", models, gw.pid, cluster_pids))
            sweep.append(r)
            print("sweep", fmt_row(r), f"load {os.getloadavg()[0]:.1f}", flush=True)
            if args.why:
                for f in r["filler_log"]:
                    print("  filler", json.dumps(f), flush=True)
            if r["fillers"] + r["skipped"] > 0.02:
                break
            best = n
            n += 1 if n < 4 else 2
        av = None if args.sweep_only else asyncio.run(av_offset_run(url, av_seconds, models[0]))
        print("A/V offset", av, flush=True)
    finally:
        stop_gateway(gw)
        sup.stop(drain_timeout_s=10)
        if tmp is not None:
            tmp.cleanup()
    load_after = os.getloadavg()
    head = ("| path | viewers | fillers (cluster late) | skipped (encoder late) / dropped (WS) | "
            "speech -> its tick leaves, ms p50 / p99 | "
            "gateway CPU ms per picture sent | of it the video encoder | gateway CPU s per session-s at 25 fps | "
            "encoder CPU s per session-s at 25 fps | gateway CPU s per session-s measured | "
            "video kbit/s per viewer | audio kbit/s | requests per session-s | cluster CPU s per session-s |"
            "\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    body = [f"Machine: {machine()}. Date: {today()}. Load average before / after: "
            f"{load_before[0]:.1f} / {load_after[0]:.1f} (the machine is shared: numbers are noisy). "
            f"Command: `python bench/webrtc.py{' --quick' if args.quick else ''} --seconds {seconds:g} "
            f"{f'--max-sessions {max_n} ' if args.max_sessions else ''}"
            f"--av-seconds {av_seconds:g} --batching {args.batching}`. 1280x720 light demo models, {workers} CPU workers, gateway in its "
            f"own process, video {args.kbps} kbit/s (libx264 veryfast/zerolatency baseline, libvpx realtime "
            f"cpu-used 8), Opus 32 kbit/s, batch {args.batch_size} ({args.batching}), lookahead {args.lookahead}; viewers talk in real "
            f"time half the time (100 ms messages, nothing sent while silent).",
            "", "Cost per viewer, side by side:", "", head, *[fmt_row(r) for r in cost], "",
            f"Sessions at 25 fps over WebRTC (H.264), everything on this machine: "
            f"**{best if best is not None else 0}** (the last level with at most 2 % fillers + skipped ticks):",
            "", head, *[fmt_row(r) for r in sweep], ""]
    if av is not None:
        body += [f"A/V offset at the receiver (RTP timestamps vs frame index through the sender reports), one H.264 "
                 f"viewer for {av['seconds']:g} s ({av['reports']} video reports; the issue asks 10 minutes: "
                 f"`--av-seconds 600`): median {av['median_ms']:+.1f} ms, p99 |offset| {av['p99_abs_ms']:.1f} ms, "
                 f"max |offset| {av['max_abs_ms']:.1f} ms; first minute median {av['first_min_median_ms']:+.1f} ms, "
                 f"last minute {av['last_min_median_ms']:+.1f} ms (+: video leaves later than its sound); packets "
                 f"lost {av['lost']}."]
    text = "\n".join(body)
    print(text)
    if not args.no_write and not args.quick and not args.sweep_only and not args.av_only:
        write_section("webrtc", "## WebRTC out of the gateway (bench/webrtc.py)\n\n" + text)


if __name__ == "__main__":
    main()
