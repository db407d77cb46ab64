"""Pipeline vs raw ONNX Runtime on the `unet` demo model (the SyncTalk_2D 328 topology).

Side by side in one run, on the same cores:
  raw       ONNX Runtime alone, inputs prepared in advance (the ceiling)
  pipeline  the worker's whole request path (features, crops, UNet, paste back, encode), driven
            with two requests in flight as a worker with two credits is
at batch 1, 5, 10, 25, with the per-stage breakdown, and png vs jpeg vs patch at batch 5.

    python bench/pipeline.py            # full run, writes docs/BENCHMARKS.md
    python bench/pipeline.py --quick    # a short smoke run, prints only
    python bench/pipeline.py --stages --baseline /tmp/base   # host CPU per frame by stage (below)

``--stages``: host CPU time per frame outside the UNet, by stage (PCM features, audio encoder,
crops/inputs, paste/composite, encode, reply), at batch 5 and 1, formats jpeg/raw/patch; process
CPU time and wall time (bench/stages.py says how). With ``--baseline DIR`` (a checkout of other
code, e.g. `git worktree add /tmp/base main`) both checkouts run side by side, interleaved rounds,
each in its own child process; writes the table to docs/BENCHMARKS.md unless --quick.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_head, machine, today, write_section  # noqa: E402

from lipsync_cluster.common.protocol import attach_arrays  # noqa: E402
from lipsync_cluster.config import load_config  # noqa: E402
from lipsync_cluster.demo.build import build_demo_models  # noqa: E402
from lipsync_cluster.worker.service import WorkerService  # noqa: E402


def raw_fps(session, batch: int, seconds: float) -> float:
    """ONNX Runtime alone on ``session`` (the worker's own), inputs prepared in advance."""
    feeds = {}
    for inp in session.get_inputs():
        shape = [batch if not isinstance(d, int) or d <= 0 else d for d in inp.shape]
        feeds[inp.name] = np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)
    session.run(None, feeds)  # warm for this batch size
    frames, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, feeds)
        frames += batch
    return frames / (time.perf_counter() - started)


def pipeline_fps(service: WorkerService, model_id: str, batch: int, fmt: str, seconds: float,
                 in_flight: int = 2) -> tuple[float, dict]:
    rng = np.random.default_rng(1)
    pcm = np.clip(0.3 * rng.standard_normal(16000 * 4), -1, 1).astype(np.float32)
    totals: dict[str, float] = {}
    count = [0]
    lock = threading.Lock()

    def one(start: int) -> None:
        header = {"client_op": "infer", "model_id": model_id, "batch_size": batch, "start_frame_idx": start,
                  "format": fmt, "audio_frame_offset": 0}
        payloads = attach_arrays(header, {"audio_pcm": pcm})
        reply, _ = service.handle(header, payloads)
        with lock:
            count[0] += batch
            for k, v in reply["timings"].items():
                totals[k] = totals.get(k, 0.0) + v

    one(0)  # load + warm
    count[0] = 0
    totals.clear()
    stop = time.perf_counter() + seconds

    def loop(k: int) -> None:
        start = k * batch
        while time.perf_counter() < stop:
            one(start % 60)
            start += in_flight * batch

    started = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(k,)) for k in range(in_flight)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    elapsed = time.perf_counter() - started
    per_frame = {k: v / max(1, count[0]) for k, v in totals.items()}
    return count[0] / elapsed, per_frame


def _stage_run(checkout: Path, folder: Path, frames: int) -> dict:
    """bench/stages.py in a child process that imports lipsync_cluster from ``checkout``."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    here = Path(__file__).resolve().parent
    out = subprocess.run([sys.executable, str(here / "stages.py"), "--json", "--models", str(folder),
                          "--frames", str(frames)], env=env, cwd=str(checkout), check=True,
                         capture_output=True, text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if Path(res["checkout"]).resolve() != checkout.resolve():
        raise SystemExit(f"the child imported {res['checkout']}, not {checkout}")
    return res


def _load() -> str:
    return "load average " + " / ".join(f"{v:.1f}" for v in os.getloadavg())


def stages_main(args, folder: Path) -> None:
    from stages import STAGES

    here = Path(__file__).resolve().parent.parent
    sides = [("this checkout", here)]
    if args.baseline:
        sides.insert(0, ("baseline", Path(args.baseline)))
    rounds = 1 if args.quick else args.rounds
    frames = 25 if args.quick else 100
    loads = [_load()]
    runs: dict[str, list] = {name: [] for name, _ in sides}
    for r in range(rounds):  # interleaved: whatever else the machine does lands on both sides
        for name, checkout in sides:
            runs[name].append(_stage_run(checkout, folder, frames))
        loads.append(_load())
        print(f"round {r + 1}/{rounds} done ({loads[-1]})", flush=True)

    def median(name: str, cell: str, kind: str, stage: str) -> float:
        return float(np.median([run["cells"][cell][kind][stage] for run in runs[name]]))

    cells = list(runs[sides[0][0]][0]["cells"])
    header = ["format/batch", "side", *STAGES, "total CPU", "total wall"]
    table = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for cell in cells:
        for name, _ in sides:
            vals = [median(name, cell, "cpu", st) for st in STAGES]
            table.append(f"| {cell} | {name} | " + " | ".join(f"{v:.2f}" for v in vals)
                         + f" | **{median(name, cell, 'cpu', 'total'):.2f}** | {median(name, cell, 'wall', 'total'):.2f} |")
        if len(sides) == 2:
            base, new = (median(n, cell, "cpu", "total") for n, _ in sides)
            table.append(f"| {cell} | new / baseline | | | | | | | **{new / base:.2f}x** | |")
    unet = {name: {b: float(np.median([run["unet"][b]["cpu"] for run in runs[name]])) for b in runs[name][0]["unet"]}
            for name, _ in sides}
    print("\n".join(table))
    print("UNet CPU ms/frame (1 thread, one run each): " + "; ".join(
        f"{name}: " + ", ".join(f"batch {b} {v:.0f}" for b, v in u.items()) for name, u in unet.items()))
    here_env = {**os.environ, "PYTHONPATH": str(here)}
    jpeg = json.loads(subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "stages.py"), "--jpeg", "--json",
                                      "--models", str(folder)], env=here_env, cwd=str(here), check=True,
                                     capture_output=True, text=True).stdout.strip().splitlines()[-1])
    jpeg_table = ["| encoder | CPU ms per frame | bytes | max pixel difference from OpenCV's |", "|---|---:|---:|---:|"]
    jpeg_table += [f"| {name} | {e['cpu_ms']:.2f} | {e['bytes']} | {e['max_diff_vs_opencv']} |" for name, e in jpeg["encoders"].items()]
    jpeg_table += [f"| {name} | not available: {why} | | |" for name, why in jpeg["missing"].items()]
    print("\n".join(jpeg_table))
    if args.quick:
        return
    lines = [
        "## Host CPU per frame outside the UNet (`bench/pipeline.py --stages`)",
        "",
        f"Machine: {machine()}. Date: {today()}. Load while it ran: {loads[0]} before, {loads[-1]} after "
        "(2 shared cores: other engineers' jobs).",
        "",
        "The worker's own request path (`WorkerService.handle`), one request at a time, each carrying what a "
        "`StreamSession` sends (the batch's PCM span, float32); ONNX Runtime 1 intra-op thread, no spinning. "
        "ms of process CPU time (every thread) per frame, by stage; `reply` is the rest of the request (parsing, "
        "the composite pool's dispatch, the reply's entries and payload frames). The UNet's output is computed once "
        "per batch size and reused, so the cells measure only the work around it. Each cell starts after one pass over "
        "the model's 60 backgrounds, as a stream's first 2N-2 frames make (jpeg: each background's rows outside the "
        "face are cached from then on). "
        f"{rounds} interleaved rounds of {frames} frames per cell, each side a child process, medians."
        + (f" Baseline: `{sides[0][1]}` ({git_head(sides[0][1])}); this checkout {git_head(here)}." if args.baseline else ""),
        "",
        *table,
        "",
        "UNet alone, for scale (1 thread, ms of CPU per frame): " + "; ".join(
            f"{name} " + ", ".join(f"batch {b}: {v:.0f}" for b, v in u.items()) for name, u in unet.items()) + ".",
        "",
        f"JPEG encoders on a real {jpeg['shape'][1]}x{jpeg['shape'][0]} composited frame, quality {jpeg['quality']}, "
        "4:2:0 (`bench/stages.py --jpeg`; all libjpeg-turbo underneath). The worker keeps OpenCV unless another "
        "wins clearly:",
        "",
        *jpeg_table,
    ]
    write_section("pipeline-stages", "\n".join(lines))
    print("wrote docs/BENCHMARKS.md (pipeline-stages)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run, do not write docs")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per measurement")
    ap.add_argument("--models", default=None, help="a demo folder with a unet model (built if absent)")
    ap.add_argument("--stages", action="store_true", help="host CPU per frame by stage (see above)")
    ap.add_argument("--baseline", default=None, help="--stages: a checkout to run side by side with this one")
    ap.add_argument("--rounds", type=int, default=3, help="--stages: interleaved rounds")
    args = ap.parse_args()
    if args.stages:
        folder = Path(args.models) if args.models else Path(tempfile.gettempdir()) / "lipsync-bench-unet"
        build_demo_models(folder, count=1, kind="unet", frames=60, size=(1280, 720), progress=False)
        stages_main(args, folder)
        return
    seconds = args.seconds or (2.0 if args.quick else 8.0)
    batches = [5] if args.quick else [1, 5, 10, 25]
    threads = os.cpu_count() or 1

    folder = Path(args.models) if args.models else Path(tempfile.gettempdir()) / "lipsync-bench-unet"
    build_demo_models(folder, count=1, kind="unet", frames=60, size=(1280, 720), progress=False)
    cfg = load_config({"models_dir": str(folder), "audio_encoder": str(folder / "audio_encoder.onnx"),
                       "onnx": {"intra_op_threads": threads}})
    service = WorkerService(cfg, shm_namespace=f"bench-{uuid.uuid4().hex[:6]}")
    model_id = sorted(service.catalog.packages())[0]
    rows, stage_rows = [], []
    rounds = 1 if args.quick else 3
    try:
        pipeline_fps(service, model_id, 1, "jpeg", 0.1)  # load the model; its session is the raw side's too
        session = service.cache.get(model_id).session
        for batch in batches:
            # Interleaved rounds, so that whatever else the machine does lands on both sides.
            raw_runs, pipe_runs, stage_runs = [], [], []
            for _ in range(rounds):
                raw_runs.append(raw_fps(session, batch, seconds / rounds))
                fps, stages = pipeline_fps(service, model_id, batch, "jpeg", seconds / rounds)
                pipe_runs.append(fps)
                stage_runs.append(stages)
            raw, fps = float(np.median(raw_runs)), float(np.median(pipe_runs))
            rows.append((batch, raw, fps))
            stage_rows.append((batch, stage_runs[len(stage_runs) // 2]))
            print(f"batch {batch:>2}: raw {raw:6.2f} fps   pipeline(jpeg) {fps:6.2f} fps   ratio {fps / raw:.2f}", flush=True)
        fmt_rows = []
        for fmt in ("png", "jpeg", "patch"):
            fps, stages = pipeline_fps(service, model_id, 5, fmt, seconds)
            fmt_rows.append((fmt, fps, stages))
            print(f"format {fmt:>5} @ batch 5: {fps:6.1f} fps   encode {stages.get('encode_ms', 0):.2f} ms/frame", flush=True)
    finally:
        service.close()
        service.cache.frame_store.cleanup()
    if args.quick:
        return
    lines = [
        "## Pipeline vs raw ONNX Runtime (`bench/pipeline.py`)",
        "",
        f"Machine: {machine()}. Date: {today()}. Model: `unet` demo (SyncTalk_2D 328 topology), 1280x720 frames,",
        f"audio as 16 kHz PCM (mel + audio encoder on the worker). {threads} intra-op threads; the pipeline runs two",
        "requests in flight, as a worker with two credits does; the raw side runs the worker's own session.",
        f"{seconds:.0f} s per cell, in {rounds} interleaved rounds (median shown).",
        "",
        "| batch | raw ORT fps | pipeline fps (jpeg) | pipeline / raw |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {b} | {r:.1f} | {p:.1f} | {p / r:.2f} |" for b, r, p in rows]
    lines += ["", "Per-frame stage time in the pipeline (ms of thread time per frame; stages overlap across the two requests):", "",
              "| batch | features | inputs | UNet | composite | encode |", "|---:|---:|---:|---:|---:|---:|"]
    for b, s in stage_rows:
        lines.append(f"| {b} | {s.get('features_ms', 0):.2f} | {s.get('inputs_ms', 0):.2f} | {s.get('inference_ms', 0):.2f} | "
                     f"{s.get('composite_ms', 0):.2f} | {s.get('encode_ms', 0):.2f} |")
    lines += ["", "Formats at batch 5:", "", "| format | pipeline fps | encode ms/frame |", "|---|---:|---:|"]
    lines += [f"| {f} | {fps:.1f} | {s.get('encode_ms', 0):.2f} |" for f, fps, s in fmt_rows]
    write_section("pipeline", "\n".join(lines))
    print(f"wrote {Path(__file__).resolve().parent.parent / 'docs' / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
