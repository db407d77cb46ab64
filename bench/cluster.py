"""End-to-end frames per second through the cluster with the `unet` demo model.

Side by side in one run:
  in-process  the worker's pipeline called directly (WorkerService.handle), two requests in flight
  cluster-1   broker + 1 CPU worker, a client keeping 4 requests in flight
  cluster-2   broker + 2 CPU workers, a client keeping 4 requests in flight
both with one ONNX Runtime thread per worker (the scaling of the process model) and with the
default threads (cores split evenly between workers: what `start` gives you).

    python bench/cluster.py            # full run, writes docs/BENCHMARKS.md
    python bench/cluster.py --quick    # short run, prints only
    python bench/cluster.py --hot      # one hot model: cluster (2 workers) vs raw ONNX Runtime (2 threads)

``--hot`` (issue 11's target): one `unet` model, batch 5, jpeg, a client keeping 4 requests in
flight against a fresh cluster of 2 CPU workers (1 ONNX Runtime thread each, what `start` gives on
2 cores), with no warm-up that would place copies by hand: the broker spreads the model as the queue
builds. Side by side, interleaved: raw ONNX Runtime on the same model with 2 intra-op threads,
inputs prepared in advance (the ceiling of the cores). With ``--baseline DIR`` (a checkout of other
code) each round also runs that checkout's cluster, in a child process started in DIR, so the raw
side, the baseline and this checkout share every round.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_head, machine, today, write_section  # noqa: E402
from pipeline import pipeline_fps, raw_fps  # noqa: E402

from lipsync_cluster.client import Client  # noqa: E402
from lipsync_cluster.client.results import infer_request  # noqa: E402
from lipsync_cluster.config import load_config  # noqa: E402
from lipsync_cluster.demo.build import build_demo_models  # noqa: E402
from lipsync_cluster.supervisor import Supervisor  # noqa: E402
from lipsync_cluster.worker.service import WorkerService  # noqa: E402

BATCH = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(folder: Path, workers: int, threads: int):
    return load_config({
        "server": {"frontend_port": free_port(), "backend_port": free_port(), "stats_port": free_port()},
        "models_dir": str(folder), "audio_encoder": str(folder / "audio_encoder.onnx"),
        "onnx": {"intra_op_threads": threads},
        "cluster": {"gpus": 0, "per_gpu": workers},
        "logging": {"level": "warning", "stats_report_minutes": 0},
    })


def drive(client: Client, model_id: str, seconds: float, in_flight: int, warm: bool = True,
          per_worker: dict | None = None) -> float:
    """Frames per second with ``in_flight`` requests outstanding at all times.

    ``per_worker`` (filled when given): for each worker that answered, its frames, the ms its
    UNet ran, and when (s after the start) its first reply came."""
    pcm = np.clip(0.3 * np.random.default_rng(1).standard_normal(16000 * 4), -1, 1).astype(np.float32)

    def send(k: int):
        header, payloads = infer_request(model_id, audio_pcm=pcm, audio_frame_offset=0,
                                         start_frame_idx=(k * BATCH) % 60, batch_size=BATCH, format="jpeg")
        return client.submit(header, payloads)

    if warm:  # load the model wherever the broker puts copies
        for f in [send(k) for k in range(in_flight * 2)]:
            client.wait(f, timeout=120)
    pending = [send(k) for k in range(in_flight)]
    frames, k, started = 0, in_flight, time.perf_counter()
    while time.perf_counter() - started < seconds:
        header, _ = client.wait(pending.pop(0), timeout=120)
        frames += BATCH
        if per_worker is not None:
            w = per_worker.setdefault(str(header.get("worker")), {"frames": 0, "unet_ms": 0.0,
                                                                  "first_s": time.perf_counter() - started})
            w["frames"] += BATCH
            w["unet_ms"] += float(header.get("timings", {}).get("inference_ms", 0.0))
        pending.append(send(k))
        k += 1
    elapsed = time.perf_counter() - started
    for f in pending:
        client.wait(f, timeout=120)
    return frames / elapsed


def cluster_fps(folder: Path, model_id: str, workers: int, threads: int, seconds: float,
                warm: bool = True, per_worker: dict | None = None) -> float:
    cfg = config(folder, workers, threads)
    sup = Supervisor(cfg, 0, workers)
    sup.start()
    try:
        sup.wait_ready(timeout_s=120)
        with Client(cfg.frontend, timeout=120) as client:
            return drive(client, model_id, seconds, in_flight=4, warm=warm, per_worker=per_worker)
    finally:
        sup.stop()


def _cluster_in(checkout: Path, folder: Path, model_id: str, seconds: float) -> float:
    """cluster_fps(2 workers, 1 thread, no warm-up) with ``checkout``'s code, in a child process."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--hot-cluster-once", "--seconds", str(seconds),
                          "--models", str(folder)], env=env, cwd=str(checkout), check=True, capture_output=True, text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if Path(res["checkout"]).resolve() != checkout.resolve():
        raise SystemExit(f"the child imported {res['checkout']}, not {checkout}")
    # Where the time went: each worker's first reply and the share of the window its UNet ran.
    print(f"  {checkout.name}: " + "; ".join(
        f"{name} {w['frames']} frames, first reply at {w['first_s']:.1f} s, UNet busy {w['unet_ms'] / 10 / seconds:.0f} %"
        for name, w in sorted(res["workers"].items())), flush=True)
    return float(res["fps"])


def _load() -> str:
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


def hot_model(folder: Path, model_id: str, seconds: float, rounds: int, baseline: Path | None = None,
              write: bool = True) -> None:
    """One hot model on 2 workers vs raw ONNX Runtime with 2 threads, interleaved rounds."""
    cfg = config(folder, 1, 2)
    service = WorkerService(cfg, shm_namespace=f"bench-{uuid.uuid4().hex[:6]}")
    here = Path(__file__).resolve().parent.parent
    raws, clusters, bases, loads = [], [], [], [_load()]
    try:
        pipeline_fps(service, model_id, 1, "jpeg", 0.1)  # load it; its session is the raw side's
        session = service.cache.get(model_id).session
        for _ in range(rounds):
            raws.append(raw_fps(session, BATCH, seconds))
            if baseline is not None:
                bases.append(_cluster_in(baseline, folder, model_id, seconds))
                clusters.append(_cluster_in(here, folder, model_id, seconds))
            else:
                clusters.append(cluster_fps(folder, model_id, 2, 1, seconds, warm=False))
            loads.append(_load())
            print(f"raw ORT 2 threads {raws[-1]:.2f} fps | cluster 2 workers {clusters[-1]:.2f} fps | "
                  f"ratio {clusters[-1] / raws[-1]:.2f}"
                  + (f" | baseline cluster {bases[-1]:.2f} fps, ratio {bases[-1] / raws[-1]:.2f}" if bases else "")
                  + f" | load {loads[-1]}", flush=True)
    finally:
        service.close()
        service.cache.frame_store.cleanup()
    if not write:
        return
    raw, clu = float(np.median(raws)), float(np.median(clusters))
    cells = [f"{raw:.2f}", f"{clu:.2f}", f"**{float(np.median([c / r for r, c in zip(raws, clusters)])):.2f}**"]
    head = "| raw ORT, 2 threads fps | cluster, 2 workers fps | cluster / raw |"
    if bases:
        base = float(np.median(bases))
        cells += [f"{base:.2f}", f"{float(np.median([b / r for r, b in zip(raws, bases)])):.2f}"]
        head += " baseline cluster fps | baseline / raw |"
    lines = [
        "## One hot model on two workers (`bench/cluster.py --hot`)",
        "",
        f"Machine: {machine()}, no GPU. Date: {today()}. Load average (1/5/15 min) before: {loads[0]}, after each "
        f"round: {'; '.join(loads[1:])}. Model: `unet` demo, batch {BATCH}, jpeg, audio as PCM; "
        f"the client keeps 4 requests in flight against a fresh cluster of 2 CPU workers (1 ONNX Runtime thread "
        f"each) with no warm-up, so the broker places the second copy itself. Raw = ONNX Runtime alone on the same "
        f"model with 2 intra-op threads, inputs prepared in advance. {rounds} interleaved rounds of {seconds:g} s, "
        "medians (ratios: the median of each round's ratio)."
        + (f" Baseline: the cluster of `{baseline}` ({git_head(baseline)}), this checkout {git_head(here)}, "
           "each in a child process." if bases else ""),
        "",
        head,
        "|---:|---:|---:|" + ("---:|---:|" if bases else ""),
        "| " + " | ".join(cells) + " |",
        "",
        "Per round, cluster / raw: " + ", ".join(f"{c / r:.2f}" for r, c in zip(raws, clusters))
        + ("; baseline / raw: " + ", ".join(f"{b / r:.2f}" for r, b in zip(raws, bases)) if bases else "") + ".",
        "",
        "Target (issue 18): >= 0.9x raw ONNX Runtime (issue 11's 0.85x; 0.57x before issue 11).",
    ]
    write_section("cluster-hot", "\n".join(lines))
    print("wrote docs/BENCHMARKS.md (cluster-hot)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run, do not write docs")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--hot", action="store_true", help="the hot-model comparison only (see above)")
    ap.add_argument("--rounds", type=int, default=3, help="--hot: interleaved rounds")
    ap.add_argument("--baseline", default=None, help="--hot: a checkout whose cluster runs in every round too")
    ap.add_argument("--models", default=None, help="a demo folder with a unet model (built if absent)")
    ap.add_argument("--hot-cluster-once", action="store_true", help=argparse.SUPPRESS)  # --baseline's child
    args = ap.parse_args()
    seconds = args.seconds or (4.0 if args.quick else 20.0)
    cores = os.cpu_count() or 1
    folder = Path(args.models) if args.models else Path(tempfile.gettempdir()) / "lipsync-bench-unet"
    build_demo_models(folder, count=1, kind="unet", frames=60, size=(1280, 720), progress=False)
    model_id = "demo_ada"
    if args.hot_cluster_once:
        import lipsync_cluster

        per_worker: dict = {}
        fps = cluster_fps(folder, model_id, 2, 1, seconds, warm=False, per_worker=per_worker)
        print(json.dumps({"fps": fps, "workers": per_worker, "checkout": str(Path(lipsync_cluster.__file__).parent.parent)}))
        return
    if args.hot:
        hot_model(folder, model_id, args.seconds or 15.0, args.rounds,
                  Path(args.baseline) if args.baseline else None, write=not args.quick)
        return

    results = {}
    for threads_label, t1, t2 in (("1 thread per worker", 1, 1), ("default threads", cores, max(1, cores // 2))):
        cfg = config(folder, 1, t1)
        service = WorkerService(cfg, shm_namespace=f"bench-{uuid.uuid4().hex[:6]}")
        try:
            inproc, _ = pipeline_fps(service, model_id, BATCH, "jpeg", seconds)
        finally:
            service.close()
            service.cache.frame_store.cleanup()
        one = cluster_fps(folder, model_id, 1, t1, seconds)
        two = cluster_fps(folder, model_id, 2, t2, seconds)
        results[threads_label] = (inproc, one, two)
        print(f"{threads_label}: in-process {inproc:.2f} fps | cluster 1 worker {one:.2f} fps | "
              f"cluster 2 workers {two:.2f} fps | 2w/1w {two / one:.2f} | cluster-1/in-process {one / inproc:.2f}",
              flush=True)
    if args.quick:
        return
    lines = [
        "## Cluster end to end (`bench/cluster.py`)",
        "",
        f"Machine: {machine()}. Date: {today()}. Model: `unet` demo, batch {BATCH}, jpeg, audio as PCM; the client",
        f"keeps 4 requests in flight; {seconds:.0f} s per cell. In-process = the worker's pipeline called directly with",
        "two requests in flight (the same work, no sockets, no broker).",
        "",
        "| ONNX Runtime threads | in-process fps | cluster, 1 worker | cluster, 2 workers | 2 workers / 1 | cluster (1 worker) / in-process |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, (inproc, one, two) in results.items():
        lines.append(f"| {label} | {inproc:.2f} | {one:.2f} | {two:.2f} | {two / one:.2f} | {one / inproc:.2f} |")
    write_section("cluster", "\n".join(lines))
    print("wrote docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
