"""Avatars per GPU: one command, one report (JSON + a markdown table) in a folder you name.

On one GPU, with the `unet` demo models (the SyncTalk_2D 328 topology at 1280x720):

  raw        the UNet alone in ONNX Runtime (inputs prepared in advance), frames/s at batch 1, 5, 25,
             fp32 and fp16, on each engine the runtime has (cuda = IO binding into device buffers,
             cuda_graph = the same replayed as one CUDA graph per batch size; worker/engine.py),
             and fp16's error against fp32 on the mouth region (max abs diff, PSNR; the bound in
             worker/precision.py)
  cluster    for N = 1, 2, 4, 6 workers on the GPU (`start --gpus 1 --per-gpu N`) and batch 1, 5, 25:
             end-to-end frames/s through broker and workers (PCM audio in, JPEG out, 2 requests in
             flight per worker), GPU utilisation (NVML, sampled every 100 ms), host CPU per frame by
             stage (the workers' own stage timings) and in all (the cluster's processes, psutil),
             GPU memory per worker and per model (NVML)
  real time  per N: the most StreamSessions (batch 5, real-time audio in 20 ms chunks) that all get
             every frame at 25 fps with p99 latency < 1 s and no drift (bench/stream.py's rule),
             searched from the end-to-end rate down/up

It runs inside one 10-minute command on a fresh GPU host (`bash bench/gpu.sh OUT`, which makes the
environment with bench/gpu_env.sh first); cells that do not fit ``--budget-s`` are reported as
skipped, and the report is rewritten after every cell, so a run cut short still leaves one.

    python bench/gpu.py --out /tmp/gpu-report                 # on a GPU host (the gpu extra installed)
    python bench/gpu.py --out /tmp/gpu-report --docs          # ... and write its table into docs/BENCHMARKS.md
    python bench/gpu.py --cpu --quick --out /tmp/smoke        # every code path but NVML, on the CPU, < 1 min
    python bench/gpu.py --cpu --raw-only --batches 1,5 --out /tmp/raw   # fp16 error and IO binding on the CPU
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stream as stream_bench  # noqa: E402  (bench/stream.py: the real-time session runner and its rule)
from common import machine, today, write_section  # noqa: E402

SR = 16000
STAGES = ("features_ms", "inputs_ms", "inference_ms", "composite_ms", "encode_ms")


# --- the GPU through NVML -----------------------------------------------------------------------

class Nvml:
    """The GPU's name, driver, memory and utilisation (NVML); every method answers None on the CPU."""

    def __init__(self, enabled: bool) -> None:
        self.handle = None
        self.error = "" if enabled else "not read (--cpu)"
        if not enabled:
            return
        try:
            import pynvml  # noqa: PLC0415 - the gpu extra (nvidia-ml-py)

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception as exc:  # noqa: BLE001 - the report says why there are no readings
            self.error = f"NVML unavailable: {exc}"

    def describe(self) -> dict:
        if self.handle is None:
            return {"gpu": None, "nvml": self.error}
        n, h = self.nvml, self.handle
        name = n.nvmlDeviceGetName(h)
        driver = n.nvmlSystemGetDriverVersion()
        return {"gpu": name.decode() if isinstance(name, bytes) else name,
                "driver": driver.decode() if isinstance(driver, bytes) else driver,
                "gpu_memory_total_bytes": int(n.nvmlDeviceGetMemoryInfo(h).total)}

    def sample(self) -> Optional[tuple[float, int]]:
        if self.handle is None:
            return None
        return (self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu / 100.0,
                int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used))


class Sampler:
    """GPU utilisation and device memory, sampled every ``period`` s while a cell runs."""

    def __init__(self, nvml: Nvml, period: float = 0.1) -> None:
        self.nvml, self.period = nvml, period
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                reading = self.nvml.sample()
            except Exception:  # noqa: BLE001 - a MIG instance has no utilisation counter: no reading
                return
            if reading is not None:
                self.samples.append(reading)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict:
        if not self.samples:
            return {"gpu_util": None, "gpu_device_memory_peak_bytes": None}
        return {"gpu_util": round(float(np.mean([u for u, _ in self.samples])), 3),
                "gpu_device_memory_peak_bytes": max(m for _, m in self.samples)}


# --- raw ONNX Runtime -------------------------------------------------------------------------

def _real_inputs(package, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Visual inputs from the model's own frames and crop rects (real crops), random audio windows."""
    import cv2

    from lipsync_cluster.common import imageops

    frames = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in package.frame_paths[:batch]]
    frames += [frames[i % len(frames)] for i in range(batch - len(frames))]
    rects = [package.crop_rects[i % len(package.crop_rects)] for i in range(batch)]
    visual, _ = imageops.build_visual_batch(frames, rects)
    audio = np.random.default_rng(0).standard_normal((batch, 32, 16, 16)).astype(np.float32)
    return visual, audio


def raw_section(package, cpu: bool, batches: list[int], seconds: float, engines: list[str],
                nvml: Nvml, extra_packages: tuple = ()) -> dict:
    """UNet frames/s per precision, engine and batch (the worker's own runner, inputs prepared in
    advance; the engines of a precision in interleaved rounds, median), and fp16's error against
    fp32 at batch 5 on the first engine, for ``package`` and ``extra_packages``."""
    from lipsync_cluster.common.model_package import bind_unet_io
    from lipsync_cluster.worker.binding import DeviceBuffers, UnetRunner, runner_mode
    from lipsync_cluster.worker.precision import FP16_BOUND, model_source, mouth_error, within_bound
    from lipsync_cluster.worker.sessions import SessionOptions, make_session

    opts = SessionOptions(gpu=None if cpu else 0, intra_op_threads=0)
    buffers = None if cpu else DeviceBuffers(0)
    rows, outputs, notes = [], {}, []
    probe_batch = 5 if 5 in batches else batches[0]
    probe = _real_inputs(package, probe_batch)
    rounds = 3  # interleaved: whatever else the machine does lands on every engine alike
    for precision in ("fp32", "fp16"):
        source, convert_ms = model_source(package.onnx_path, precision)
        runners = {}
        for engine in engines:
            t0 = time.perf_counter()
            session = make_session(source, dataclasses.replace(opts, precision=precision),
                                   engine="cpu" if engine.startswith("cpu") else engine)
            mode = "bind_cpu" if engine == "cpu+bind" else runner_mode(engine)
            runners[engine] = UnetRunner(session, *bind_unet_io(session.get_inputs()), mode=mode, buffers=buffers)
            rows.append({"precision": precision, "engine": engine, "convert_ms": round(convert_ms, 1),
                         "open_ms": round((time.perf_counter() - t0) * 1000, 1)})
        outputs[precision] = runners[engines[0]].run(*probe)
        for batch in batches:
            visual, audio = probe if batch == probe_batch else _real_inputs(package, batch)
            for runner in runners.values():
                for _ in range(4):  # warm, check the binding against session.run, capture a graph
                    runner.run(visual, audio)
            runs: dict[str, list] = {e: [] for e in engines}
            for _ in range(rounds):
                for engine, runner in runners.items():
                    frames, started = 0, time.perf_counter()
                    with Sampler(nvml) as sampler:
                        while time.perf_counter() - started < seconds / rounds or frames == 0:
                            runner.run(visual, audio)
                            frames += batch
                    runs[engine].append((frames / (time.perf_counter() - started), sampler.result()))
            for engine, runner in runners.items():
                fps, util = sorted(runs[engine], key=lambda r: r[0])[len(runs[engine]) // 2]
                rows.append({"precision": precision, "engine": engine, "mode": runner.mode, "batch": batch,
                             "fps": round(fps, 1), **util})
                print(f"raw {precision} {engine:>10} ({runner.mode}) batch {batch:>2}: {fps:8.1f} fps "
                      f"(median of {rounds} interleaved)", flush=True)
        notes += [f"{precision} {e}: {r.note}" for e, r in runners.items() if r.note]
        del runners
    errors = {package.model_id: mouth_error(outputs["fp32"], outputs["fp16"])}
    for other in extra_packages:  # the same comparison on more avatars: the bound holds for each
        out = {}
        for precision in ("fp32", "fp16"):
            session = make_session(model_source(other.onnx_path, precision)[0],
                                   dataclasses.replace(opts, precision=precision),
                                   engine="cpu" if engines[0].startswith("cpu") else engines[0])
            out[precision] = UnetRunner(session, *bind_unet_io(session.get_inputs()), mode="plain").run(
                *_real_inputs(other, probe_batch))
        errors[other.model_id] = mouth_error(out["fp32"], out["fp16"])
    worst = min(errors.values(), key=lambda e: (e["psnr_db"], -e["max_abs"]))
    error = {**worst, "max_abs": max(e["max_abs"] for e in errors.values()),
             "max_abs_8bit": max(e["max_abs_8bit"] for e in errors.values()),
             "within_bound": all(within_bound(e) for e in errors.values()), "bound": FP16_BOUND,
             "batch": probe_batch, "engine": engines[0], "models": errors}
    print(f"fp16 vs fp32 on the mouth region: {error}", flush=True)
    return {"rows": rows, "fp16_error": error, "notes": notes}


def raw_in_child(package_dirs: list[str], cpu: bool, batches: list[int], seconds: float, engines: list[str]) -> dict:
    from lipsync_cluster.common.model_package import load_package

    packages = [load_package(d) for d in package_dirs]
    return raw_section(packages[0], cpu, batches, seconds, engines, Nvml(enabled=not cpu), tuple(packages[1:]))


# --- the cluster ----------------------------------------------------------------------------------

def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(models_dir: Path, workers: int, cpu: bool, budget_gb: float, onnx: dict, work: Path):
    import yaml

    from lipsync_cluster.config import load_config
    from lipsync_cluster.supervisor import Supervisor

    cfg = {"server": {"frontend_port": _port(), "backend_port": _port(), "stats_port": _port()},
           "models_dir": str(models_dir.resolve()), "audio_encoder": str((models_dir / "audio_encoder.onnx").resolve()),
           "capacity": {"max_models": 6, "max_memory_gb": budget_gb, "eviction_policy": "lru",
                        "idle_unload_minutes": 0},
           "onnx": {"intra_op_threads": 1 if cpu else 0, **onnx},
           "cluster": {"gpus": 0 if cpu else 1, "per_gpu": workers},
           "logging": {"level": "warning", "stats_report_minutes": 0}}
    path = work / f"cluster-{workers}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    config = load_config(path)
    sup = Supervisor(config, 0 if cpu else 1, workers)
    sup.start()
    sup.wait_ready(timeout_s=180)
    stream_bench.CLUSTER_PIDS[:] = [c.proc.pid for c in sup.children if c.proc is not None]
    return sup


def end_to_end(endpoint: str, models: list[str], batch: int, seconds: float, in_flight: int, nvml: Nvml,
               worker_pids: list[int]) -> dict:
    """frames/s through the cluster with ``in_flight`` requests outstanding (PCM in, JPEG out)."""
    from lipsync_cluster.client import Client

    rng = np.random.default_rng(batch)
    pcm = np.clip(0.3 * rng.standard_normal(SR * 4), -1, 1).astype(np.float32)  # 100 frames of audio
    lock = threading.Lock()
    done = {"frames": 0, "requests": 0, "errors": 0}
    stages = {k: 0.0 for k in STAGES}
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    def loop(k: int) -> None:
        with Client(endpoint, timeout=60) as client:
            i = k
            while time.monotonic() < stop:
                model = models[i % len(models)]
                start = (i * batch) % (75 - batch)
                t = time.perf_counter()
                try:
                    r = client.infer(model, audio_pcm=pcm, audio_frame_offset=0, start_frame_idx=start,
                                     batch_size=batch, format="jpeg")
                except Exception:  # noqa: BLE001 - counted, reported
                    with lock:
                        done["errors"] += 1
                    i += in_flight
                    continue
                with lock:
                    done["frames"] += len(r.frames)
                    done["requests"] += 1
                    latencies.append((time.perf_counter() - t) * 1000)
                    for key in STAGES:
                        stages[key] += float(r.timings.get(key, 0.0))
                i += in_flight

    cpu0 = stream_bench.cluster_cpu_s(worker_pids)
    started = time.monotonic()
    with Sampler(nvml) as sampler:
        threads = [threading.Thread(target=loop, args=(k,)) for k in range(in_flight)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    wall = time.monotonic() - started
    frames = max(1, done["frames"])
    cpu_ms = (stream_bench.cluster_cpu_s(worker_pids) - cpu0) * 1000 / frames
    return {"batch": batch, "fps": round(done["frames"] / wall, 1), "requests": done["requests"],
            "errors": done["errors"],
            "latency_p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
            "latency_p99_ms": round(float(np.percentile(latencies, 99)), 1) if latencies else None,
            # stage times are the workers' own (thread time per frame); inference is GPU wall time
            "stage_ms_per_frame": {k.removesuffix("_ms"): round(v / frames, 3) for k, v in stages.items()},
            "host_cpu_ms_per_frame": round(cpu_ms, 3), **sampler.result()}


def realtime(endpoint: str, models: list[str], first_guess: int, seconds: float, deadline: float,
             max_levels: int) -> dict:
    """The most concurrent 25 fps StreamSessions sustained (bench/stream.py's rule: every frame, in
    time, p99 < 1 s, no drift), searched from ``first_guess``."""
    levels: list[dict] = []
    best: Optional[dict] = None
    n, failed_at = max(1, first_guess), None
    while len(levels) < max_levels and time.monotonic() + seconds + 5 < deadline:
        r = asyncio.run(stream_bench.run_level(endpoint, n, seconds, 5, models))
        row = {"sessions": n, "ok": r["ok"], "p50_ms": round(r["p50"], 1), "p99_ms": round(r["p99"], 1),
               "drift_ms": round(r["drift"], 1), "fps": round(r["fps"], 1), "exact": r["exact"],
               # core-seconds per stream-second: the cluster's, and this one client process's (a
               # level can fail because the client, not the GPU, ran out of CPU)
               "cluster_cpu": round(r["cluster_cpu"], 3), "client_cpu": round(r["client_cpu"], 3)}
        levels.append(row)
        print(f"  real time {n:3d} session(s): p50 {r['p50']:6.0f} ms p99 {r['p99']:6.0f} ms "
              f"drift {r['drift']:+5.0f} ms {'OK' if r['ok'] else 'FAIL'}", flush=True)
        if r["ok"]:
            best = row if best is None or n > best["sessions"] else best
            if failed_at is not None and n + 1 >= failed_at:
                break
            n = n + max(1, n // 4) if failed_at is None else (n + failed_at) // 2
            if failed_at is not None:
                n = min(n, failed_at - 1)
        else:
            failed_at = n if failed_at is None else min(failed_at, n)
            if n == 1:
                break
            n = max(1, n // 2) if best is None else (best["sessions"] + n) // 2
            if best is not None and n <= best["sessions"]:
                break
    return {"sustained": best["sessions"] if best else 0, "levels": levels,
            "complete": best is not None and failed_at is not None and best["sessions"] + 1 >= failed_at}


def memory_readings(endpoint: str) -> dict:
    from lipsync_cluster.client import Client

    with Client(endpoint, timeout=30) as client:
        deadline = time.monotonic() + 5
        while True:  # the workers' next periodic stats carry their readings after the runs
            workers = client.model_stats()["workers"]
            if all("mem_used" in w for w in workers) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        models = client.list_models()
    per_worker = [{"worker": w["worker"], "engine": w.get("engine"), "engine_note": w.get("engine_note"),
                   "precision": w.get("precision"), "provider": w.get("provider"),
                   "gpu_memory_used_bytes": w.get("gpu_memory_used_bytes"), "mem_used": w.get("mem_used"),
                   "mem_workspace_bytes": w.get("mem_workspace_bytes"), "loaded": w.get("loaded")}
                  for w in workers]
    per_model = [{"model_id": e["model_id"], "worker": w["worker"], "memory_bytes": w.get("memory_bytes"),
                  "runner": w.get("runner")}
                 for e in models for w in e["stats"]["workers"]]
    return {"workers": per_worker, "models": per_model}


def cluster_section(models_dir: Path, models: list[str], cpu: bool, workers_list: list[int], batches: list[int],
                    seconds: float, rt_seconds: float, nvml: Nvml, deadline: float, onnx: dict,
                    report: dict, save, work: Path, rt_levels: int = 3) -> None:
    total_gb = (nvml.describe().get("gpu_memory_total_bytes") or 0) / 2**30
    for n in workers_list:
        row: dict = {"workers": n, "cells": [], "realtime": None, "memory": None}
        report["cluster"].append(row)
        if time.monotonic() + 30 > deadline:
            row["skipped"] = "time budget"
            save()
            continue
        budget = 4.0 if cpu or not total_gb else max(1.0, round(0.85 * total_gb / n, 1))
        sup = start_cluster(models_dir, n, cpu, budget, onnx, work)
        endpoint = sup.config.frontend
        try:
            from lipsync_cluster.client import Client

            with Client(endpoint, timeout=180) as client:
                for m in models[: max(n, 1)]:  # one model per worker to begin; copies follow demand
                    client.load_model(m)
            worker_pids = [c.proc.pid for c in sup.children[1:] if c.proc is not None]
            for batch in batches:
                if time.monotonic() + seconds + 5 > deadline:
                    row["cells"].append({"batch": batch, "skipped": "time budget"})
                    continue
                end_to_end(endpoint, models, batch, min(1.0, seconds), 2 * n, nvml, worker_pids)  # warm
                cell = end_to_end(endpoint, models, batch, seconds, 2 * n, nvml, worker_pids)
                row["cells"].append(cell)
                print(f"N={n} batch {batch:>2}: {cell['fps']:8.1f} frames/s  util {cell['gpu_util']}  "
                      f"host CPU {cell['host_cpu_ms_per_frame']:.2f} ms/frame  errors {cell['errors']}", flush=True)
                save()
            at5 = next((c for c in row["cells"] if c.get("batch") == 5 and "fps" in c), None)
            guess = int(0.7 * at5["fps"] / 25) if at5 else 1
            row["realtime"] = realtime(endpoint, models, max(1, guess), rt_seconds, deadline,
                                       max_levels=rt_levels)
            row["memory"] = memory_readings(endpoint)
        finally:
            sup.stop(drain_timeout_s=10)
        save()


# --- the report -----------------------------------------------------------------------------------

def _mb(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def markdown(report: dict) -> str:
    env = report["env"]
    gpu = env.get("gpu") or "no GPU (CPU smoke run: NVML not read)"
    lines = [f"Machine: {env['machine']}; GPU: {gpu}"
             + (f", driver {env['driver']}" if env.get("driver") else "")
             + f"; onnxruntime {env['onnxruntime']} ({', '.join(env['providers'])}). Date: {env['date']}. "
             f"Command: `{env['command']}`. Models: `{env['kind']}` demo at 1280x720; engine `{env['engine']}`, "
             f"precision `{env['precision']}` in the cluster.", ""]
    raw = report.get("raw")
    if raw:
        lines += ["UNet alone (raw ONNX Runtime, inputs prepared in advance), frames/s:", "",
                  "| precision | engine (runner) | " + " | ".join(f"batch {b}" for b in report["batches"]) + " |",
                  "|---|---|" + "---:|" * len(report["batches"])]
        keys = sorted({(r["precision"], r["engine"]) for r in raw["rows"] if "fps" in r}, key=lambda k: (k[0] != "fp32", k[1]))
        for p, e in keys:
            cells = {r["batch"]: r for r in raw["rows"] if r.get("precision") == p and r.get("engine") == e and "fps" in r}
            mode = next(iter(cells.values()))["mode"] if cells else "-"
            lines.append(f"| {p} | {e} ({mode}) | " + " | ".join(
                f"{cells[b]['fps']:.1f}" if b in cells else "-" for b in report["batches"]) + " |")
        err = raw["fp16_error"]
        lines += ["", f"fp16 vs fp32 on the mouth region ({len(err.get('models', {})) or 1} model(s), batch {err['batch']}, "
                      f"real crops; the worst): max abs diff "
                      f"{err['max_abs']:.4f} ({err['max_abs_8bit']} of 255 after the paste-back's truncation), "
                      f"PSNR {err['psnr_db']} dB; bound {err['bound']['max_abs_8bit']} / {err['bound']['psnr_db']} dB: "
                      f"{'within' if err['within_bound'] else 'NOT within'}."]
        opened = [r for r in raw["rows"] if "open_ms" in r]
        convert = max((r["convert_ms"] for r in opened if r["precision"] == "fp16"), default=0)
        lines += ["", f"fp16 conversion at load: {convert / 1000:.1f} s; session open: "
                      + ", ".join(f"{r['precision']} {r['engine']} {r['open_ms'] / 1000:.1f} s" for r in opened) + "."]
        if raw["notes"]:
            lines += ["", "Runner notes: " + "; ".join(raw["notes"])]
    lines += ["", "Through the cluster (`start --gpus 1 --per-gpu N`, PCM in, JPEG out, 2 requests in flight per "
                  "worker); host CPU = the workers' processes per frame; stages = the workers' own timings per frame:", "",
              "| N workers | batch | frames/s | GPU util | host CPU ms/frame | features | inputs | UNet | composite | encode | errors |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["cluster"]:
        if row.get("skipped"):
            lines.append(f"| {row['workers']} | - | skipped ({row['skipped']}) | | | | | | | | |")
        for c in row["cells"]:
            if "fps" not in c:
                lines.append(f"| {row['workers']} | {c['batch']} | skipped ({c['skipped']}) | | | | | | | | |")
                continue
            s = c["stage_ms_per_frame"]
            util = "-" if c["gpu_util"] is None else f"{100 * c['gpu_util']:.0f} %"
            lines.append(f"| {row['workers']} | {c['batch']} | {c['fps']:.1f} | {util} | {c['host_cpu_ms_per_frame']:.2f} | "
                         f"{s['features']:.2f} | {s['inputs']:.2f} | {s['inference']:.2f} | {s['composite']:.2f} | "
                         f"{s['encode']:.2f} | {c['errors']} |")
    lines += ["", "Real-time sessions (StreamSession, batch 5, 25 fps, p99 < 1 s, no drift) and memory:", "",
              "| N workers | sessions sustained | levels tried (sessions: p99 ms) | GPU memory per worker (MiB, NVML) | per model (MiB) | engine |",
              "|---:|---:|---|---|---|---|"]
    for row in report["cluster"]:
        rt, mem = row.get("realtime"), row.get("memory")
        if rt is None:
            lines.append(f"| {row['workers']} | - | not run | | | |")
            continue
        tried = ", ".join(f"{lv['sessions']}: {lv['p99_ms']:.0f}{'' if lv['ok'] else ' FAIL'}" for lv in rt["levels"])
        sustained = f"{rt['sustained']}" + ("" if rt["complete"] else " (search cut short)")
        per_worker = ", ".join(_mb(w["gpu_memory_used_bytes"]) if w["gpu_memory_used_bytes"] is not None
                               else f"host {_mb(w['mem_used'])}" for w in mem["workers"]) if mem else "-"
        per_model = ", ".join(sorted({_mb(m["memory_bytes"]) for m in mem["models"]})) if mem else "-"
        engines = ", ".join(sorted({str(w["engine"]) for w in mem["workers"]})) if mem else "-"
        lines.append(f"| {row['workers']} | {sustained} | {tried} | {per_worker} | {per_model} | {engines} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu.json and gpu.md (made if absent)")
    ap.add_argument("--cpu", action="store_true", help="CPU workers and the CPU provider (NVML is not read)")
    ap.add_argument("--quick", action="store_true", help="one small cell of each kind: the smoke run")
    ap.add_argument("--workers", default=None, help="workers per GPU to try (default 1,2,4,6; --quick: 1)")
    ap.add_argument("--batches", default=None, help="batch sizes (default 1,5,25; --quick: 1)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per end-to-end cell (default 5)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting cells after this long")
    ap.add_argument("--models", default=None, help="demo models folder (built if absent)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16"), help="the cluster's onnx.precision")
    ap.add_argument("--engine", default="cuda", help="the cluster's onnx.gpu_engine (default cuda)")
    ap.add_argument("--kind", default=None, choices=("unet", "light"),
                    help="demo model kind (default unet; --cpu --quick: light)")
    ap.add_argument("--raw-only", action="store_true", help="only the raw ONNX Runtime part (fp16 vs fp32, binding)")
    ap.add_argument("--docs", action="store_true", help="write the table into docs/BENCHMARKS.md (GPU runs only)")
    args = ap.parse_args()
    started = time.monotonic()
    deadline = started + args.budget_s
    quick = args.quick
    workers_list = [int(x) for x in (args.workers or ("1" if quick else "1,2,4,6")).split(",")]
    batches = [int(x) for x in (args.batches or ("1" if quick else "1,5,25")).split(",")]
    # sized so that a fresh host's install plus every cell fits one 10-minute command (bench/gpu.sh)
    seconds = args.seconds or (1.5 if quick else 5.0)
    rt_seconds = 2.0 if quick else 6.0
    kind = args.kind or ("light" if args.cpu and quick else "unet")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import onnxruntime as ort

    from lipsync_cluster.demo.build import build_demo_models
    from lipsync_cluster.worker.engine import plan_engine

    nvml = Nvml(enabled=not args.cpu)
    models_dir = Path(args.models) if args.models else out / f"models-{kind}"
    build_demo_models(models_dir, count=1 if quick else 3 if args.raw_only else 6, kind=kind, frames=12 if quick else 25,
                      size=(1280, 720), progress=False)
    models = sorted(p.name for p in models_dir.iterdir() if (p / "model.yaml").exists())
    if args.cpu:
        engines = ["cpu", "cpu+bind"]  # on the CPU: is IO binding worth it (worker/binding.py)?
    else:
        plan = plan_engine("cuda_graph", True, ort.get_available_providers(), ort.__version__)
        engines = [plan.engine, *plan.fallbacks][::-1]  # cuda first (the default), then cuda_graph
    report: dict = {
        "env": {"machine": machine(), **nvml.describe(), "onnxruntime": ort.__version__,
                "providers": ort.get_available_providers(), "date": today(), "kind": kind,
                "engine": args.engine, "precision": args.precision,
                "command": "python bench/gpu.py " + " ".join(sys.argv[1:]), "load": os.getloadavg()[0]},
        "batches": batches, "raw": None, "cluster": [],
    }

    def save() -> None:
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        (out / "gpu.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "gpu.md").write_text("## GPU: avatars per GPU (`bench/gpu.py`)\n\n" + markdown(report) + "\n")

    # The raw runs get a process of their own: the CUDA arena they grow stays with a process until
    # it exits, and the workers measured next must find the GPU as a fresh host would.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        report["raw"] = pool.submit(raw_in_child, [str(models_dir / m) for m in models[:3]], args.cpu, batches,
                                    0.5 if quick else 2.0, engines).result()
    save()
    if args.raw_only:
        print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'} (raw only)")
        return
    cluster_section(models_dir, models, args.cpu, workers_list, batches, seconds, rt_seconds, nvml, deadline,
                    {"precision": args.precision, "gpu_engine": args.engine}, report, save, out,
                    rt_levels=1 if quick else 3)
    save()
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'} in {time.monotonic() - started:.0f} s")
    if args.docs and not args.cpu:
        write_section("gpu", "## GPU: avatars per GPU (`bench/gpu.py`)\n\n" + markdown(report))
        print("wrote docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
