"""Worker memory by resident `unet` models and batch size, next to the budget and what it reports.

Each row is a fresh worker process (a `WorkerService`, the worker's own request path) with
``capacity.max_memory_gb`` as given, holding 1, 2 or 3 `unet` demo models and serving one
request per model at batch 5, then one per model at batch 25. Measured per row: the process's
peak RSS during those requests (VmHWM, reset before them; on a GPU also the process's GPU memory
from NVML), its RSS after, what the worker reports (``mem_used`` and the sum of ``model_stats``
memory), the shared workspace, how many batches ran in chunks, and frames/s.

    python bench/memory.py                # 3 GB budget, writes docs/BENCHMARKS.md
    python bench/memory.py --quick        # 1 and 3 models, prints only
    python bench/memory.py --gpu --budget-gb 6 --no-docs   # on a GPU (bench/gpu_memory.sh)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, today, write_section  # noqa: E402

MB = 2**20


def peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def one_row(folder: str, models: int, batches: list[int], budget_gb: float, gpu: bool) -> dict:
    """Runs in its own process: load ``models`` models, one request per model per batch size."""
    from lipsync_cluster.common.protocol import attach_arrays
    from lipsync_cluster.config import load_config
    from lipsync_cluster.worker.memory import process_rss
    from lipsync_cluster.worker.service import WorkerService

    cfg = load_config({"models_dir": folder, "capacity": {"max_memory_gb": budget_gb, "max_models": 3},
                       "onnx": {"intra_op_threads": os.cpu_count() or 1}})
    service = WorkerService(cfg, gpu=0 if gpu else None, device=os.environ.get("CUDA_VISIBLE_DEVICES", "0") if gpu else None,
                            shm_namespace=f"bench-mem-{uuid.uuid4().hex[:6]}")
    ids = sorted(service.catalog.packages())[:models]
    out: dict = {"models": models, "budget": service.cache.max_memory_bytes, "cells": []}
    try:
        for model_id in ids:
            service.cache.load(model_id)
        for batch in batches:
            feats = np.random.default_rng(0).uniform(-1, 1, (batch, 32, 16, 16)).astype(np.float32)
            peak_reset()
            gpu_peak = 0
            started = time.perf_counter()
            for model_id in ids:
                header = {"client_op": "infer", "model_id": model_id, "batch_size": batch, "start_frame_idx": 0,
                          "format": "jpeg"}
                service.handle(header, attach_arrays(header, {"audio_features": feats}))
                gpu_peak = max(gpu_peak, service.gpu_monitor.read().get("gpu_memory_used_bytes", 0))
            elapsed = time.perf_counter() - started
            stats = service.stats()
            out["cells"].append({
                "batch": batch, "peak_rss": peak_rss(), "rss_after": process_rss(), "gpu_used": gpu_peak or None,
                "mem_used": stats["mem_used"], "models_reported": stats["total_memory_bytes"],
                "workspace": stats["mem_workspace_bytes"], "process": stats["mem_process_bytes"],
                "chunked": stats["mem_chunked_batches"], "fps": batch * len(ids) / elapsed,
                "loaded": stats["loaded_models"],
            })
    finally:
        service.close()
        service.cache.frame_store.cleanup()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 and 3 models only, do not write docs")
    ap.add_argument("--budget-gb", type=float, default=3.0, help="capacity.max_memory_gb of the worker")
    ap.add_argument("--gpu", action="store_true", help="run the worker on GPU 0 (CUDA provider)")
    ap.add_argument("--no-docs", action="store_true", help="print only")
    ap.add_argument("--models", default=None, help="a demo folder with 3 unet models (built if absent)")
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: one row in this process
    args = ap.parse_args()
    folder = args.models or str(Path(tempfile.gettempdir()) / "lipsync-bench-unet3")
    batches = [5, 25]
    if args.row:
        print(json.dumps(one_row(folder, int(args.row), batches, args.budget_gb, args.gpu)))
        return
    from lipsync_cluster.demo.build import build_demo_models

    build_demo_models(folder, count=3, kind="unet", frames=12, size=(1280, 720), progress=False)
    rows = []
    for n in ([1, 3] if args.quick else [1, 2, 3]):
        cmd = [sys.executable, __file__, "--row", str(n), "--models", folder, "--budget-gb", str(args.budget_gb)]
        proc = subprocess.run(cmd + (["--gpu"] if args.gpu else []), capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"row {n} failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        for c in row["cells"]:
            gpu = f"  GPU {c['gpu_used'] / MB:6.0f} MB" if c["gpu_used"] else ""
            print(f"{n} models  batch {c['batch']:>2}: peak RSS {c['peak_rss'] / MB:6.0f} MB  after {c['rss_after'] / MB:6.0f}"
                  f"  reported used {c['mem_used'] / MB:6.0f}  models {c['models_reported'] / MB:5.0f}"
                  f"  workspace {c['workspace'] / MB:5.0f}{gpu}  budget {row['budget'] / MB:.0f}"
                  f"  chunked {c['chunked']}  {c['fps']:.2f} fps", flush=True)
    if args.quick or args.no_docs:
        return
    lines = [
        "## Worker memory by resident models and batch size (`bench/memory.py`)",
        "",
        f"Machine: {machine()} (2-core CPU, no GPU). Date: {today()}. One worker process per row (the worker's own",
        f"request path, `WorkerService`), `capacity.max_memory_gb: {args.budget_gb:g}`, `unet` demo models (1280x720, 12",
        "frames), one jpeg request per model at batch 5, then one per model at batch 25. Peak RSS: the process's",
        "high-water mark during those requests (VmHWM, reset before them). Reported: `mem_used` from `model_stats`",
        "(process + models + workspace), models: the sum of the per-model `memory_bytes`. Chunked: batches that",
        "ran in smaller chunks because the whole batch's workspace would not fit.",
        "",
        "| models | batch | peak RSS (MB) | RSS after (MB) | reported mem_used (MB) | models reported (MB) | workspace (MB) | budget (MB) | peak / budget | chunked | fps |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        for c in row["cells"]:
            lines.append(f"| {row['models']} | {c['batch']} | {c['peak_rss'] / MB:.0f} | {c['rss_after'] / MB:.0f} | "
                         f"{c['mem_used'] / MB:.0f} | {c['models_reported'] / MB:.0f} | {c['workspace'] / MB:.0f} | "
                         f"{row['budget'] / MB:.0f} | {c['peak_rss'] / row['budget']:.2f} | {c['chunked']} | {c['fps']:.2f} |")
    lines += ["", "Before this (issue 11, same machine, 3 models, 3 GB budget, batch 5 then 25): RSS 18.3 GB while "
              "`model_stats` reported 1.08 GB (a private ONNX Runtime arena per session, grown to its largest batch)."]
    write_section("memory", "\n".join(lines))
    print("wrote docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
