"""Concurrent real-time streams on the `light` demo model: how many 25 fps sessions this machine sustains.

A local cluster (broker + CPU workers, started through the Supervisor) serves 3 light demo models
(1280x720). For N = 1, 2, 3, ... concurrent sessions (AsyncStreamSession, batch 5, jpeg), each
session pushes speech-like audio in 20 ms chunks on a real-time clock for D seconds (sessions on
all three models, starts staggered), then closes. A level N is sustained when every session

  * produced exactly round(seconds x 25) frames with pts = k/25 (no drift in count or time),
  * kept p99 latency (audio pushed -> frame ready, in order) under 1 s, and
  * did not fall behind: the median latency of the last third is within 150 ms of the first third.

Every model is loaded on every worker first (as a preloaded cluster is). A level that fails is run
once more (the machine may be busy with something else); the sweep stops at the first level that
fails twice. Reported: the largest sustained N, per-level
p50/p99 latency and frame rate, and the latency breakdown at the largest sustained level
(lookahead = waiting for the 12 frames of future audio the model needs, slot = waiting for a
free in-flight slot, round trip = request sent -> reply, reorder = waiting for an earlier batch,
plus the worker's own stage timings).

Conversation (issue 13), in the same run:

  * silence sweep: the same search with 0 %, 50 % and 80 % of each session's time digital silence
    (the avatar listening: 4 s cycles, the silent part at a random phase per session). Silent
    batches are served from the workers' idle cache (no features, no UNet); the share of frames
    served so is reported.
  * lookahead curve: for lookahead_frames 12 (exact), 7, 4, 0 and batch 1 and 2, one session of
    real-time speech: latency p50/p99; and the mouth region's difference from the exact result
    (the same speech pushed at once, png, the 128x128 box around the mouth in the 320 face crop:
    mean abs error and PSNR over all frames).

    python bench/stream.py            # full run (20 s per level), writes docs/BENCHMARKS.md
    python bench/stream.py --quick    # a short smoke run (6 s per level, up to 3 sessions), prints only
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, today, write_section  # noqa: E402

from lipsync_cluster.client import AsyncClient, Client  # noqa: E402
from lipsync_cluster.client.stream import AsyncStreamSession, total_frames_for  # noqa: E402
from lipsync_cluster.demo.build import build_demo_models  # noqa: E402

SR = 16000
CHUNK = 320  # 20 ms, what a browser sends
P99_LIMIT_MS = 1000.0
DRIFT_LIMIT_MS = 150.0


LISTEN_CYCLE_S = 4.0  # silence sweep: each 4 s cycle is talk then listen
LOOKAHEADS = (12, 7, 4, 0)
MOUTH_BOX = (slice(129, 257), slice(96, 224))  # 128x128 around the light model's mouth (160, 193) in the 320 crop


def speech(seconds: float, seed: int, silence: float = 0.0) -> np.ndarray:
    """Speech-like audio; ``silence`` of the time (0..1) is digital silence, in 4 s talk/listen cycles."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(SR * seconds))) / SR
    voiced = sum(np.sin(2 * np.pi * f * t) / (k + 1) for k, f in enumerate((140, 280, 420, 700, 1100)))
    env = (np.sin(2 * np.pi * 1.3 * t + seed) > -0.2).astype(np.float64)
    if silence > 0:
        phase = (t / LISTEN_CYCLE_S + rng.random()) % 1.0
        env *= phase >= silence
    return (0.3 * env * (voiced / 3 + 0.2 * rng.standard_normal(t.size))).astype(np.float32)


def light_models(models_dir: Path, size: tuple[int, int] = (1280, 720), say=None) -> Path:
    """``models_dir`` with 3 light demo models in it (built when absent), as every stream bench uses."""
    if not (models_dir / "audio_encoder.onnx").exists():
        (say or (lambda text: print(text, flush=True)))(f"building 3 light demo models in {models_dir} ...")
        build_demo_models(models_dir, count=3, kind="light", frames=12, size=size, seed=0, progress=False)
    return models_dir


def start_cluster(models_dir: Path, workers: int):
    import socket

    import yaml

    from lipsync_cluster.config import load_config
    from lipsync_cluster.supervisor import Supervisor

    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    cfg = {"server": {"frontend_port": port(), "backend_port": port(), "stats_port": port()},
           "models_dir": str(models_dir), "audio_encoder": str(models_dir / "audio_encoder.onnx"),
           "capacity": {"max_models": 3, "max_memory_gb": 4, "eviction_policy": "lru"},
           "onnx": {"intra_op_threads": 1},
           "cluster": {"gpus": 0, "per_gpu": workers},
           "logging": {"level": "warning", "stats_report_minutes": 0}}
    path = models_dir / "bench-stream.yaml"
    path.write_text(yaml.safe_dump(cfg))
    config = load_config(path)
    sup = Supervisor(config, 0, workers)
    sup.start()
    sup.wait_ready(timeout_s=120)
    return sup


async def one_session(client: AsyncClient, model: str, pcm: np.ndarray, delay: float, batch: int,
                      lookahead: int = 12) -> dict:
    await asyncio.sleep(delay)
    async with AsyncStreamSession(client, model, batch_size=batch, max_in_flight=3,
                                  lookahead_frames=lookahead) as session:
        frames: list = []

        async def read() -> None:
            async for f in session.frames():
                frames.append((f.index, f.pts, f.latency_ms, time.monotonic()))

        reader = asyncio.ensure_future(read())
        t0 = time.monotonic()
        for i, a in enumerate(range(0, pcm.size, CHUNK)):
            wait = t0 + i * CHUNK / SR - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            session.push(pcm[a:a + CHUNK])
        closed_at = time.monotonic()
        session.close()
        await reader
        lat = session.latency()
        idle_frames = session.stats()["idle_frames"]
    expected = total_frames_for(pcm.size)
    lats = np.array([f[2] for f in frames])
    third = max(1, len(lats) // 3)
    return {
        "model": model, "frames": len(frames), "expected": expected,
        "exact": [f[0] for f in frames] == list(range(expected)) and all(f[1] == f[0] / 25 for f in frames),
        "latencies": lats, "drift_ms": float(np.median(lats[-third:]) - np.median(lats[:third])) if len(lats) else 0.0,
        "tail_s": (frames[-1][3] - closed_at) if frames else float("nan"),
        "breakdown": lat["breakdown"], "retries": lat["retries"], "idle_frames": idle_frames,
    }


CLUSTER_PIDS: list[int] = []  # broker + workers when this script started the cluster (for CPU time)


def cluster_cpu_s(pids: Optional[list[int]] = None) -> float:
    """CPU seconds (user + system) the given processes (default: the cluster's) have used so far."""
    import psutil

    total = 0.0
    for pid in CLUSTER_PIDS if pids is None else pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


async def run_level(endpoint: str, n: int, seconds: float, batch: int, models: list[str], silence: float = 0.0,
                    lookahead: int = 12) -> dict:
    cpu0, own0 = cluster_cpu_s(), sum(os.times()[:2])
    async with AsyncClient(endpoint, timeout=30) as client:
        started = time.monotonic()
        results = await asyncio.gather(*[
            one_session(client, models[i % len(models)], speech(seconds, seed=i, silence=silence),
                        delay=0.2 * i / max(1, n), batch=batch, lookahead=lookahead)
            for i in range(n)])
        wall = time.monotonic() - started
    cpu, own = cluster_cpu_s() - cpu0, sum(os.times()[:2]) - own0
    lats = np.concatenate([r["latencies"] for r in results])
    p50, p99 = float(np.percentile(lats, 50)), float(np.percentile(lats, 99))
    frames = sum(r["frames"] for r in results)
    exact = all(r["exact"] and r["frames"] == r["expected"] for r in results)
    drift = max(r["drift_ms"] for r in results)
    ok = exact and p99 < P99_LIMIT_MS and drift < DRIFT_LIMIT_MS
    breakdown: dict = {}
    for r in results:
        for k, v in r["breakdown"].items():
            if v.get("p50_ms") is not None:
                breakdown.setdefault(k, []).append((v["p50_ms"], v["p99_ms"]))
    merged = {k: (float(np.median([a for a, _ in v])), float(np.max([b for _, b in v]))) for k, v in breakdown.items()}
    return {"n": n, "ok": ok, "exact": exact, "p50": p50, "p99": p99, "drift": drift, "fps": frames / wall,
            "per_session_fps": frames / wall / n, "tail_s": max(r["tail_s"] for r in results),
            "retries": sum(r["retries"] for r in results), "breakdown": merged,
            "idle_share": sum(r["idle_frames"] for r in results) / max(1, frames),
            # CPU seconds per second of one 25 fps stream: immune to how busy the machine is otherwise
            "cluster_cpu": cpu * 25 / max(1, frames), "client_cpu": own * 25 / max(1, frames)}


def sweep(endpoint: str, start: int, max_n: int, seconds: float, batch: int, models: list[str],
          silence: float) -> tuple[list, Optional[dict]]:
    """Levels N = start, start+1, ... until one fails twice (down from start when start fails)."""
    levels: list = []
    best = None
    n, step = max(1, start), 1
    while 1 <= n <= max_n:
        for attempt in (1, 2):  # a failing level is run once more: the machine may be busy elsewhere
            r = asyncio.run(run_level(endpoint, n, seconds, batch, models, silence=silence))
            r["attempt"], r["load"] = attempt, os.getloadavg()[0]
            rt = r["breakdown"].get("round_trip_ms", (0, 0))
            print(f"silence {silence:4.0%} {n:3d} session(s): p50 {r['p50']:6.0f} ms  p99 {r['p99']:6.0f} ms  "
                  f"drift {r['drift']:+5.0f} ms  {r['fps']:6.1f} frames/s  round trip p50 {rt[0]:.0f} / p99 "
                  f"{rt[1]:.0f} ms  idle {r['idle_share']:.0%}  cpu/stream-s {r['cluster_cpu']:.3f}+"
                  f"{r['client_cpu']:.3f}  exact={r['exact']}  load {r['load']:.1f}  "
                  f"{'OK' if r['ok'] else 'FAIL'}", flush=True)
            if r["ok"]:
                break
        levels.append(r)
        if r["ok"]:
            if best is None or r["n"] > best["n"]:
                best = r
            if step < 0:
                break
            n += 1
        else:
            if best is not None or n == 1:
                break
            step = -1
            n -= 1
    levels.sort(key=lambda r: r["n"])
    return levels, best


def mouth_crops(frames: list) -> np.ndarray:
    from lipsync_cluster.common import imageops

    return np.stack([imageops.crop_face(f.decode(), f.rect)[4:324, 4:324][MOUTH_BOX] for f in frames])


async def exact_run(endpoint: str, model: str, pcm: np.ndarray, lookahead: int, batch: int) -> np.ndarray:
    """The mouth crops of ``pcm`` streamed with ``lookahead`` (pushed at once, png: lossless)."""
    async with AsyncClient(endpoint, timeout=30) as client:
        async with AsyncStreamSession(client, model, batch_size=batch, format="png", lookahead_frames=lookahead,
                                      max_in_flight=3) as session:
            session.push(pcm)
            session.close()
            frames = [f async for f in session.frames()]
    return mouth_crops(frames)


def lookahead_curve(endpoint: str, model: str, seconds: float, batches: list[int], rounds: int) -> list[dict]:
    """Mouth difference per lookahead, then latency in interleaved rounds (medians of the rounds)."""
    pcm = speech(seconds, seed=11)
    reference = asyncio.run(exact_run(endpoint, model, pcm, 12, 1)).astype(np.float64)
    accuracy = {}
    for lookahead in LOOKAHEADS:
        got = asyncio.run(exact_run(endpoint, model, pcm, lookahead, 1)).astype(np.float64)
        err = np.abs(got - reference)
        mse = float((err ** 2).mean())
        psnr = float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
        per_frame = err.reshape(len(err), -1).mean(axis=1)
        accuracy[lookahead] = {"mae": float(err.mean()), "worst_frame_mae": float(per_frame.max()), "psnr": psnr}
        print(f"lookahead {lookahead:2d}: mouth MAE {err.mean():.2f} (worst frame {per_frame.max():.2f}) "
              f"PSNR {psnr:.1f} dB", flush=True)
    runs: dict = {}
    for k in range(rounds):  # interleaved, so a busy spell on the shared machine hits every setting alike
        for lookahead in LOOKAHEADS:
            for batch in batches:
                r = asyncio.run(run_level(endpoint, 1, seconds, batch, [model], lookahead=lookahead))
                runs.setdefault((lookahead, batch), []).append(r)
                print(f"round {k + 1} lookahead {lookahead:2d} batch {batch}: latency p50 {r['p50']:5.0f} ms "
                      f"p99 {r['p99']:5.0f} ms  load {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for (lookahead, batch), rs in runs.items():
        best = min(rs, key=lambda r: r["p50"])  # the round least disturbed by other jobs
        rows.append({"lookahead": lookahead, "batch": batch, "rounds": len(rs),
                     "best_p50": best["p50"], "best_p99": best["p99"],
                     "p50": float(np.median([r["p50"] for r in rs])), "p99": float(np.median([r["p99"] for r in rs])),
                     "round_trip": float(np.median([r["breakdown"].get("round_trip_ms", (0, 0))[0] for r in rs])),
                     "exact": all(r["exact"] for r in rs), **accuracy[lookahead]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run (6 s per level, at most 3 sessions); prints only")
    ap.add_argument("--seconds", type=float, default=None, help="seconds of audio per session per level")
    ap.add_argument("--max-sessions", type=int, default=None, help="stop the sweep here")
    ap.add_argument("--start", type=int, default=1, help="the sweep's first level (it goes down when that fails)")
    ap.add_argument("--workers", type=int, default=None, help="CPU workers (default: one per core)")
    ap.add_argument("--batch-size", type=int, default=5)
    ap.add_argument("--silence", default="0,50,80", help="silence sweep: percentages of listening time")
    ap.add_argument("--curve-batches", default="1,2", help="lookahead curve: batch sizes")
    ap.add_argument("--curve-seconds", type=float, default=None, help="lookahead curve: seconds of speech")
    ap.add_argument("--curve-rounds", type=int, default=None, help="lookahead curve: interleaved rounds (medians)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the sessions sweep")
    ap.add_argument("--no-curve", action="store_true", help="skip the lookahead curve")
    ap.add_argument("--models", default=None, help="a folder of light demo models (built if absent)")
    ap.add_argument("--endpoint", default=None, help="use a running cluster instead of starting one")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/BENCHMARKS.md")
    args = ap.parse_args()
    seconds = args.seconds or (6.0 if args.quick else 20.0)
    curve_seconds = args.curve_seconds or (6.0 if args.quick else 8.0)
    curve_rounds = args.curve_rounds or (1 if args.quick else 3)
    max_n = args.max_sessions or (3 if args.quick else 64)
    workers = args.workers or os.cpu_count() or 2
    silences = [float(x) / 100 for x in args.silence.split(",") if x.strip()]
    curve_batches = [int(x) for x in args.curve_batches.split(",") if x.strip()]

    tmp = None
    sup = None
    endpoint = args.endpoint
    if endpoint is None:
        if args.models:
            models_dir = Path(args.models)
        else:
            tmp = tempfile.TemporaryDirectory(prefix="bench-stream-")
            models_dir = Path(tmp.name)
        light_models(models_dir)
        print(f"starting a cluster: broker + {workers} CPU worker(s) ...", flush=True)
        sup = start_cluster(models_dir, workers)
        endpoint = sup.config.frontend
        CLUSTER_PIDS.extend(c.proc.pid for c in sup.children if c.proc is not None)
    load_before = os.getloadavg()
    sweeps: list = []
    curve: list = []
    try:
        with Client(endpoint) as client:
            models = sorted(m["model_id"] for m in client.list_models())[:3]
            # Warm: every model loaded on every worker before the clock starts, as a preloaded
            # production cluster is (a load mid-run would be measured as latency).
            names = [w["worker"] for w in client.model_stats().get("workers", [])]
            for m in models:
                for w in names:
                    client.load_model(m, worker=w)
                for _ in range(2 * max(1, len(names))):
                    client.infer(m, audio_pcm=np.zeros(SR, np.float32), batch_size=args.batch_size, format="jpeg")
        if not args.no_sweep:
            start = args.start
            for silence in silences:
                levels, best = sweep(endpoint, start, max_n, seconds, args.batch_size, models, silence)
                sweeps.append((silence, levels, best))
                start = max(args.start, best["n"] if best else 1)  # more silence never needs fewer
        if not args.no_curve:
            curve = lookahead_curve(endpoint, models[0], curve_seconds, curve_batches, curve_rounds)
    finally:
        if sup is not None:
            sup.stop(drain_timeout_s=10)
        if tmp is not None:
            tmp.cleanup()
    load_after = os.getloadavg()

    load_line = [f"Load average (1/5/15 min) at the start {load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f}, "
             f"at the end {load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f}: "
             + ("a quiet machine." if load_before[1] < 2.5 else
                "other jobs shared the 2 cores during this run, so its numbers are worse than a quiet machine gives."), ""]
    lines = list(load_line)
    if sweeps:
        lines.append(f"Concurrent 25 fps sessions sustained (p99 latency < 1 s, no drift, exact frames; {workers} "
                     f"CPU worker(s), batch {args.batch_size}, jpeg 85, 1280x720, `light` model, {seconds:.0f} s "
                     f"of real-time audio per session in 20 ms chunks), by the share of time the avatar listens:")
        lines.append("")
        lines.append("| silence | sessions sustained | p50 latency ms | p99 latency ms | frames/s (all) | "
                     "frames served idle | cluster CPU s per stream-s | + client | 2 cores / CPU per stream |")
        lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for silence, levels, best in sweeps:
            # CPU per stream-second: the median over every level run (it does not depend on N)
            cpu = float(np.median([r["cluster_cpu"] for r in levels])) if levels else float("nan")
            client = float(np.median([r["client_cpu"] for r in levels])) if levels else float("nan")
            capacity = 2.0 / (cpu + client) if CLUSTER_PIDS and cpu + client > 0 else float("nan")
            tail = (f"{best['idle_share']:.0%}" if best else f"{levels[-1]['idle_share']:.0%}" if levels else "-")
            cpu_cols = f"{cpu:.3f} | {client:.3f} | {capacity:.1f}" if CLUSTER_PIDS else "- | - | -"
            if best:
                lines.append(f"| {silence:.0%} | **{best['n']}** | {best['p50']:.0f} | {best['p99']:.0f} | "
                             f"{best['fps']:.1f} | {tail} | {cpu_cols} |")
            else:
                lines.append(f"| {silence:.0%} | 0 | - | - | - | {tail} | {cpu_cols} |")
        lines.append("")
        lines.append("CPU per stream-second is what the cluster's processes (broker + workers) and the benchmark "
                     "client used per second of one 25 fps stream, measured from their own CPU time: it does not "
                     "depend on what else runs on the machine, so its ratio across silence levels is the fair "
                     "side-by-side comparison; `2 cores / CPU per stream` is the session count it allows on an "
                     "otherwise idle 2-core machine.")
        lines.append("")
        lines.append("Every level run (a failing level is run once more):")
        lines.append("")
        lines.append("| silence | sessions | p50 ms | p99 ms | drift ms | frames/s | idle | exact | load | result |")
        lines.append("|---:|---:|---:|---:|---:|---:|---:|:--:|---:|:--:|")
        for silence, levels, _ in sweeps:
            for r in levels:
                verdict = "sustained" if r["ok"] else "fails"
                if r["attempt"] > 1:
                    verdict += " (2nd run)" if r["ok"] else " (twice)"
                lines.append(f"| {silence:.0%} | {r['n']} | {r['p50']:.0f} | {r['p99']:.0f} | {r['drift']:+.0f} | "
                             f"{r['fps']:.1f} | {r['idle_share']:.0%} | {'yes' if r['exact'] else 'NO'} | "
                             f"{r['load']:.1f} | {verdict} |")
        best = sweeps[0][2]
        if best:
            lines.append("")
            lines.append(f"Latency breakdown at {best['n']} session(s), {sweeps[0][0]:.0%} silence "
                         f"(ms; median of the sessions' p50, worst p99):")
            lines.append("")
            lines.append("| part | p50 | p99 |")
            lines.append("|---|---:|---:|")
            labels = {"lookahead_ms": "lookahead (future audio the batch needs)",
                      "slot_wait_ms": "waiting for an in-flight slot",
                      "round_trip_ms": "round trip (sent -> reply)", "reorder_ms": "waiting for an earlier batch"}
            for key, label in labels.items():
                if key in best["breakdown"]:
                    a, b = best["breakdown"][key]
                    lines.append(f"| {label} | {a:.0f} | {b:.0f} |")
            for key, (a, b) in sorted(best["breakdown"].items()):
                if key.startswith("server_"):
                    lines.append(f"| worker: {key[len('server_'):].replace('_ms', '')} (per batch) | {a:.1f} | {b:.1f} |")
    curve_lines = list(load_line)
    if curve:
        lines, sweep_lines = curve_lines, lines
        lines.append(f"Lookahead curve (`lookahead_frames`; one session of {curve_seconds:.0f} s of speech pushed "
                     f"in real time, `light` model, {workers} CPU worker(s), jpeg 85; latency: the median of "
                     f"{curve_rounds} interleaved round(s), and the least disturbed round). Mouth difference: the same "
                     f"speech at batch 1, png, the 128x128 box around the mouth in the 320 face crop, against "
                     f"lookahead 12 (exact); mean abs error in 8-bit levels over all frames, the worst frame's, "
                     f"and PSNR:")
        lines.append("")
        lines.append("| lookahead frames | batch | latency p50 ms | latency p99 ms | best round p50 / p99 ms | "
                     "round trip p50 ms | mouth MAE | worst frame MAE | PSNR dB |")
        lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in curve:
            psnr = "exact" if r["psnr"] == float("inf") else f"{r['psnr']:.1f}"
            lines.append(f"| {r['lookahead']} | {r['batch']} | {r['p50']:.0f} | {r['p99']:.0f} | "
                         f"{r['best_p50']:.0f} / {r['best_p99']:.0f} | {r['round_trip']:.0f} "
                         f"| {r['mae']:.2f} | {r['worst_frame_mae']:.2f} | {psnr} |")
        lines.append("")
        lines.append("The latency floor is the lookahead: a batch is sent once the audio `lookahead_frames` past its "
                     "last frame has arrived (12 = exact: 480 ms plus the rest of the batch, plus the 20 ms "
                     "chunking); the rest is the round trip. See docs/STREAMING.md for the fill rule of a shorter "
                     "lookahead.")
        lines = sweep_lines
    head = (f"Measured {today()} on {machine()}; the benchmark client shares the cores with the workers.\n"
            f"Command: `python bench/stream.py{' --quick' if args.quick else ''}`\n\n")
    sections = []
    if sweeps:
        sections.append(("stream", "## Real-time streams (`bench/stream.py`)\n\n" + head + "\n".join(lines)))
    if curve:
        sections.append(("stream-lookahead", "## Stream latency vs lookahead (`bench/stream.py`)\n\n" + head
                         + "\n".join(curve_lines)))
    for name, body in sections:
        print()
        print(body)
        if not args.quick and not args.no_write:
            write_section(name, body)
            print(f"\nwritten to docs/BENCHMARKS.md (section {name})")


if __name__ == "__main__":
    main()
