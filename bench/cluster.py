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
side, the baseline and this checkout share every round. Two figures per cluster, both labelled:
cold start (frames over the whole window, both loads inside it) and steady (from the moment both
workers have replied once to the end of the window); and where the time went: when each worker's
first request started on it, its first reply, the share of the window its UNet ran. A new request
goes out as soon as any reply comes back (``--in-order``: only when the oldest one does, the count
of issue 18's first measurements, in which a reply that overtook the oldest left its worker idle).

    python bench/cluster.py --hot --rounds 3 --seconds 15 --baseline /tmp/base   # base: git worktree add --detach /tmp/base main
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent import futures
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
          per_worker: dict | None = None, in_order: bool = False) -> float:
    """Frames per second with ``in_flight`` requests outstanding at all times: a new request goes
    out as soon as any reply comes back (``in_order``: only when the oldest one does, the count
    of issue 18's first measurements, where a reply that overtook the oldest left its worker idle
    until the oldest came back).

    ``per_worker`` (filled when given): for each worker that answered, its frames, the ms its
    UNet ran, when (s after the start) its first request started on it and its first reply came;
    and under ``"_steady"`` the frames per second from the moment every worker had answered once
    (every copy loaded and serving) to the end of the window."""
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
    replies: list[tuple[float, str]] = []
    while time.perf_counter() - started < seconds:
        if in_order:
            done = [pending[0]]
        else:
            done = list(futures.wait(pending, timeout=120, return_when=futures.FIRST_COMPLETED).done)
            if not done:
                raise SystemExit("no reply within 120 s")
        for f in done:
            pending.remove(f)
            header, _ = client.wait(f, timeout=120)
            now = time.perf_counter() - started
            frames += BATCH
            name = str(header.get("worker"))
            replies.append((now, name))
            if per_worker is not None:
                timings = header.get("timings", {})
                start = now - float(timings.get("worker_ms", 0.0)) / 1000  # about when it reached the worker
                w = per_worker.setdefault(name, {"frames": 0, "unet_ms": 0.0, "first_s": now, "start_s": start})
                w["start_s"] = min(w["start_s"], start)
                w["frames"] += BATCH
                w["unet_ms"] += float(timings.get("inference_ms", 0.0))
            pending.append(send(k))
            k += 1
    elapsed = time.perf_counter() - started
    for f in pending:
        client.wait(f, timeout=120)
    if per_worker is not None:
        firsts = [w["first_s"] for w in per_worker.values()]
        both = max(firsts) if firsts else elapsed
        after = sum(BATCH for t, _ in replies if t > both)
        per_worker["_steady"] = {"from_s": both, "fps": after / (elapsed - both) if elapsed > both else 0.0}
    return frames / elapsed


def cluster_fps(folder: Path, model_id: str, workers: int, threads: int, seconds: float,
                warm: bool = True, per_worker: dict | None = None, in_order: bool = False) -> float:
    cfg = config(folder, workers, threads)
    sup = Supervisor(cfg, 0, workers)
    sup.start()
    try:
        sup.wait_ready(timeout_s=120)
        with Client(cfg.frontend, timeout=120) as client:
            return drive(client, model_id, seconds, in_flight=4, warm=warm, per_worker=per_worker, in_order=in_order)
    finally:
        sup.stop()


def _hot_cluster(checkout: Path | None, folder: Path, model_id: str, seconds: float,
                 in_order: bool) -> dict:
    """cluster_fps(2 workers, 1 thread, no warm-up): ``fps`` over the window, ``steady`` fps once
    every copy served, ``second_s`` when the last worker's first request started on it, ``both_s``
    when every worker had replied once. ``checkout``: that checkout's code, in a child process
    (None: this one, here)."""
    if checkout is None:
        per_worker: dict = {}
        fps = cluster_fps(folder, model_id, 2, 1, seconds, warm=False, per_worker=per_worker, in_order=in_order)
        label = "this checkout"
    else:
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--hot-cluster-once", "--seconds",
                              str(seconds), "--models", str(folder)] + (["--in-order"] if in_order else []),
                             env=env, cwd=str(checkout), check=True, capture_output=True, text=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        if Path(res["checkout"]).resolve() != checkout.resolve():
            raise SystemExit(f"the child imported {res['checkout']}, not {checkout}")
        fps, per_worker, label = float(res["fps"]), res["workers"], checkout.name
    steady = per_worker.pop("_steady")
    # Where the time went: when each worker's first request started on it (its copy was placed
    # then: a load comes first), its first reply, and the share of the window its UNet ran.
    print(f"  {label}: " + "; ".join(
        f"{name} {w['frames']} frames, first request started at {w['start_s']:.1f} s, first reply at "
        f"{w['first_s']:.1f} s, UNet busy {w['unet_ms'] / 10 / seconds:.0f} %"
        for name, w in sorted(per_worker.items()))
        + f"; every copy serving from {steady['from_s']:.1f} s: {steady['fps']:.2f} fps", flush=True)
    return {"fps": fps, "steady": float(steady["fps"]), "both_s": float(steady["from_s"]),
            "second_s": max(w["start_s"] for w in per_worker.values())}


def _one_thread_raw(model_path: str, seconds: float, start, out) -> None:
    """(A child process) raw ONNX Runtime with 1 intra-op thread, the worker's session options."""
    from lipsync_cluster.worker.sessions import SessionOptions, make_session

    session = make_session(model_path, SessionOptions(intra_op_threads=1))
    start.wait()  # both children run together
    out.put(raw_fps(session, BATCH, seconds))


def two_one_thread_fps(model_path: str, seconds: float) -> float:
    """Raw ONNX Runtime in 2 processes of 1 intra-op thread each, at once: the UNet-only ceiling of
    the cluster's configuration (what 2 workers x 1 thread could give with no pipeline around it)."""
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_one_thread_raw, args=(model_path, seconds, start, out)) for _ in range(2)]
    for p in procs:
        p.start()
    total = out.get(timeout=seconds + 120) + out.get(timeout=seconds + 120)
    for p in procs:
        p.join()
    return total


def _load() -> str:
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


def hot_model(folder: Path, model_id: str, seconds: float, rounds: int, baseline: Path | None = None,
              write: bool = True, in_order: bool = False, ceiling: bool = False) -> None:
    """One hot model on 2 workers vs raw ONNX Runtime with 2 threads, interleaved rounds
    (``ceiling``: also raw ONNX Runtime in 2 processes x 1 thread)."""
    cfg = config(folder, 1, 2)
    service = WorkerService(cfg, shm_namespace=f"bench-{uuid.uuid4().hex[:6]}")
    here = Path(__file__).resolve().parent.parent
    codes = [("this checkout", None)] + ([("baseline", baseline)] if baseline is not None else [])
    raws: list[float] = []
    ceilings: list[float] = []
    runs: dict[str, list[dict]] = {label: [] for label, _ in codes}
    loads = [_load()]
    try:
        pipeline_fps(service, model_id, 1, "jpeg", 0.1)  # load it; its session is the raw side's
        session = service.cache.get(model_id).session
        for _ in range(rounds):
            raws.append(raw_fps(session, BATCH, seconds))
            if ceiling:
                ceilings.append(two_one_thread_fps(str(service.cache.get(model_id).package.onnx_path), seconds))
            for label, checkout in reversed(codes):  # the baseline first, as before
                # With a baseline both run in a child process, so that neither has an advantage.
                runs[label].append(_hot_cluster(here if (checkout is None and baseline is not None) else checkout,
                                                folder, model_id, seconds, in_order))
            loads.append(_load())
            print(f"raw ORT 2 threads {raws[-1]:.2f} fps | "
                  + (f"raw ORT 2 processes x 1 thread {ceilings[-1]:.2f} fps ({ceilings[-1] / raws[-1]:.2f}x) | "
                     if ceilings else "") + " | ".join(
                f"{label}: {r[-1]['fps']:.2f} fps, ratio {r[-1]['fps'] / raws[-1]:.2f}, "
                f"steady {r[-1]['steady']:.2f} fps, ratio {r[-1]['steady'] / raws[-1]:.2f}"
                for label, r in runs.items()) + f" | load {loads[-1]}", flush=True)
    finally:
        service.close()
        service.cache.frame_store.cleanup()
    if not write:
        return

    def med(xs: list[float]) -> float:
        return float(np.median(xs))

    def row(label: str, code: str) -> str:
        r = runs[label]
        return (f"| {code} | {med([x['fps'] for x in r]):.2f} | **{med([x['fps'] / w for x, w in zip(r, raws)]):.2f}** "
                f"| {med([x['second_s'] for x in r]):.1f} | {med([x['both_s'] for x in r]):.1f} "
                f"| {med([x['steady'] for x in r]):.2f} | {med([x['steady'] / w for x, w in zip(r, raws)]):.2f} |")

    count = ("the oldest reply is awaited before the next request goes out (in order)" if in_order else
             "a new request goes out as soon as any reply comes back")
    lines = [
        "## One hot model on two workers (`bench/cluster.py --hot`)",
        "",
        f"Machine: {machine()}, no GPU. Date: {today()}. Load average (1/5/15 min) before: {loads[0]}, after each "
        f"round: {'; '.join(loads[1:])}. Model: `unet` demo, batch {BATCH}, jpeg, audio as PCM; "
        f"the client keeps 4 requests in flight ({count}) against a fresh cluster of 2 CPU workers (1 ONNX Runtime "
        f"thread each, 2 credits: what `lipsync-cluster start` gives on 2 cores) with no warm-up, so the broker "
        f"places both copies itself. Raw = ONNX Runtime alone on the same model with 2 intra-op threads, inputs "
        f"prepared in advance, {med(raws):.2f} fps (median). {rounds} interleaved rounds of {seconds:g} s, medians "
        "(ratios: the median of each round's ratio)."
        + (f" Baseline: `{baseline}` ({git_head(baseline)}); this checkout {git_head(here)}; each cluster in a child "
           "process." if baseline is not None else ""),
        "",
        "Cold start = frames over the whole window, counted from the first request (both loads inside it); "
        "steady = frames per second from the moment both workers had replied once (both copies loaded and "
        "serving) to the end of the window.",
        "",
        "| code | cold start fps | **cold / raw** | second copy's first request starts, s | both copies serving from, s "
        "| steady fps | steady / raw |",
        "|---|---:|---:|---:|---:|---:|---:|",
        row("this checkout", f"this checkout ({git_head(here)})"),
    ]
    if baseline is not None:
        lines.append(row("baseline", f"baseline ({git_head(baseline)})"))
    lines += [
        "",
        "Per round, cold / raw: " + "; ".join(
            f"{label} " + ", ".join(f"{x['fps'] / w:.2f}" for x, w in zip(r, raws)) for label, r in runs.items()) + ".",
        "",
    ] + ([
        f"The cluster's configuration without its pipeline (raw ONNX Runtime in 2 processes x 1 intra-op thread, "
        f"at once, same rounds): {med(ceilings):.2f} fps, **{med([c / w for c, w in zip(ceilings, raws)]):.2f}x** "
        "the 2-thread raw side (per round: " + ", ".join(f"{c / w:.2f}" for c, w in zip(ceilings, raws)) + ").",
        "",
    ] if ceilings else []) + [
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
    ap.add_argument("--in-order", action="store_true",
                    help="--hot: send the next request only when the oldest one is answered (the count of the "
                         "first measurements; default: as soon as any one is)")
    ap.add_argument("--ceiling", action="store_true",
                    help="--hot: also raw ONNX Runtime in 2 processes x 1 thread each (the cluster's configuration "
                         "without its pipeline), every round")
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
        fps = cluster_fps(folder, model_id, 2, 1, seconds, warm=False, per_worker=per_worker, in_order=args.in_order)
        print(json.dumps({"fps": fps, "workers": per_worker, "checkout": str(Path(lipsync_cluster.__file__).parent.parent)}))
        return
    if args.hot:
        hot_model(folder, model_id, args.seconds or 15.0, args.rounds,
                  Path(args.baseline) if args.baseline else None, write=not args.quick, in_order=args.in_order,
                  ceiling=args.ceiling)
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
