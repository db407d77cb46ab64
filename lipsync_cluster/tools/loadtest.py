"""``lipsync-cluster loadtest``: drive a cluster with real requests and report what it sustained.

* Closed loop (``--concurrency C``: C requests always in flight) or open loop (``--rate R``:
  Poisson arrivals at R requests/s, whatever the cluster does -- the honest way to find where
  latency turns).
* Models drawn uniformly or by Zipf popularity (``--zipf S``: the model of rank k is asked with
  probability ~ 1/k^S, rank 1 = the first model named).
* Each request is an ``infer`` of ``--batch`` frames with real audio: 16 kHz int16 PCM of a
  speech-like signal, exactly the span the batch needs (``common.audio.pcm_span_for_batch``).
* Reports requests/s, frames/s, latency p50/p95/p99/max, errors by code, cold loads (replies that
  say ``model_loaded``) and the cache hit ratio, a per-model breakdown and a per-second timeline;
  ``--json`` writes it all, ``--plot`` draws throughput and p99 per second with loads marked.
* ``--demo-models K`` (without ``--broker``) builds K light demo models (kept in ``--demo-dir``)
  and starts a local CPU cluster on free ports for the run, then stops it.

The earlier server's multi-process test script's options map onto it: ``--ports P`` = ``--broker tcp://127.0.0.1:P``,
``--model-names`` = ``--models``, ``--num-requests`` = ``--requests``.

Python use: ``run_loadtest(client, LoadSpec(models=[...], concurrency=8, requests=200))``.
"""
from __future__ import annotations

import bisect
import contextlib
import json
import math
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

import click
import numpy as np

from ..common.audio import SAMPLES_PER_FRAME, pcm_span_for_batch
from ..common.errors import BadRequest
from ..common.infer_request import FORMATS, MAX_BATCH_SIZE, check_quality
from ..common.extras import require
from ..client.client import DEFAULT_ENDPOINT, Client
from ..client.results import infer_request

AUDIO_SECONDS = 20.0
AUDIO_VARIANTS = 32


@dataclass
class LoadSpec:
    models: list[str]
    zipf: Optional[float] = None          # None: uniform
    concurrency: Optional[int] = None     # closed loop
    rate: Optional[float] = None          # open loop (requests/s, Poisson)
    duration: Optional[float] = None      # seconds of sending
    requests: Optional[int] = None        # or a number of requests
    batch: int = 5
    format: str = "jpeg"
    quality: Optional[int] = None
    deadline_ms: Optional[float] = None
    timeout_s: float = 120.0              # a request with no reply by then counts as client_timeout
    max_outstanding: int = 4096           # open loop: beyond this many in flight, arrivals are dropped
    seed: int = 0

    def check(self) -> None:
        if not self.models:
            raise ValueError("no models to ask for")
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.rate is not None and not self.rate > 0:
            raise ValueError("rate must be positive")
        if self.duration is None and self.requests is None:
            raise ValueError("give a duration or a number of requests")
        if self.zipf is not None and self.zipf < 0:
            raise ValueError("the Zipf exponent must be >= 0")
        if not 1 <= self.batch <= MAX_BATCH_SIZE:  # the broker's own limit (common/infer_request.py)
            raise ValueError(f"batch must be in 1..{MAX_BATCH_SIZE}")

    @property
    def mode(self) -> str:
        return "closed" if self.concurrency is not None else "open"


@dataclass
class Record:
    model: str
    sent: float                # the scheduled arrival (open loop) or the send (closed loop)
    done: float = 0.0
    submitted: float = 0.0     # when it was handed to the client: sent + the driver's own lag
    ok: bool = False
    code: Optional[str] = None
    message: str = ""          # the server's (or client's) error message, for the report
    frames: int = 0
    cold: bool = False
    load_ms: float = 0.0
    worker: str = ""


# --- workload pieces -------------------------------------------------------------------------------

def speech(seconds: float, seed: int = 0, rate: int = 16000) -> np.ndarray:
    """A speech-like signal as int16 PCM: voiced bursts (harmonics + noise) at syllable rate."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    voiced = sum(np.sin(2 * np.pi * f * t) / (k + 1) for k, f in enumerate((140, 280, 420, 700, 1100)))
    pitch = 1.0 + 0.1 * np.sin(2 * np.pi * 0.7 * t)  # a little intonation
    envelope = (np.sin(2 * np.pi * 4 * t * pitch) > -0.2).astype(np.float32)
    x = 0.3 * envelope * (voiced / 3 + 0.2 * rng.standard_normal(t.size))
    return np.clip(x * 32767, -32768, 32767).astype(np.int16)


def zipf_weights(n: int, s: Optional[float]) -> np.ndarray:
    """Popularity of ranks 1..n: uniform (s None or 0) or proportional to 1/k^s."""
    if not s:
        return np.full(n, 1.0 / n)
    w = 1.0 / np.arange(1, n + 1) ** float(s)
    return w / w.sum()


class Workload:
    """Draws (model, start frame, PCM span) for each request, reproducibly from a seed."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        self.models = list(spec.models)
        self.cdf = np.cumsum(zipf_weights(len(self.models), spec.zipf)).tolist()
        self.cdf[-1] = 1.0
        audio = speech(AUDIO_SECONDS, spec.seed)
        total = len(audio) // SAMPLES_PER_FRAME
        self.variants = []
        for _ in range(AUDIO_VARIANTS):
            start = int(self.rng.integers(0, max(1, total - spec.batch)))
            first, end = pcm_span_for_batch(start, spec.batch, total)
            self.variants.append((start, first, audio[first * SAMPLES_PER_FRAME:end * SAMPLES_PER_FRAME]))

    def model(self) -> str:
        return self.models[bisect.bisect_left(self.cdf, self.rng.random())]

    def request(self, model: str) -> tuple[dict, list]:
        start, first, pcm = self.variants[int(self.rng.integers(len(self.variants)))]
        return infer_request(model, start_frame_idx=start, batch_size=self.spec.batch, audio_pcm=pcm,
                             audio_frame_offset=first, format=self.spec.format, quality=self.spec.quality,
                             deadline_ms=self.spec.deadline_ms)


# --- the run -----------------------------------------------------------------------------------------

class _Run:
    def __init__(self, client: Client, spec: LoadSpec, on_progress: Callable[[int], None]) -> None:
        self.client, self.spec = client, spec
        self.work = Workload(spec)
        self.records: list[Record] = []
        self.outstanding: dict[int, tuple[Any, Record]] = {}
        self.lock = threading.Lock()
        self.slots = threading.Semaphore(spec.concurrency or 1)
        self.completed = 0
        self.on_progress = on_progress
        self.t0 = 0.0
        self._keys = 0

    def _finish(self, key: int, future: Any) -> None:
        now = time.perf_counter()
        with self.lock:
            item = self.outstanding.pop(key, None)
        if item is None:
            return
        rec = item[1]
        rec.done = now
        try:
            header, _ = future.result()
        except BaseException as exc:  # cancelled / transport closed
            rec.code = getattr(exc, "code", None) or "client_error"
            rec.message = str(getattr(exc, "message", None) or exc)
        else:
            if header.get("ok"):
                rec.ok = True
                images = header.get("images")
                rec.frames = len(images) if images else self.spec.batch
                rec.cold = bool(header.get("model_loaded"))
                load_ms = header.get("model_load_ms")
                rec.load_ms = float(load_ms) if isinstance(load_ms, (int, float)) else 0.0
                rec.worker = str(header.get("worker", ""))
            else:
                error = header.get("error")
                rec.code = (error.get("code") if isinstance(error, dict) else None) or "internal"
                rec.message = str(error.get("message", "")) if isinstance(error, dict) else ""
        with self.lock:
            self.completed += 1
        if self.spec.concurrency is not None:
            self.slots.release()

    def _send(self, model: str, now: float) -> None:
        rec = Record(model, now)
        self.records.append(rec)
        if self.spec.rate is not None and len(self.outstanding) >= self.spec.max_outstanding:
            rec.done, rec.code = now, "client_overrun"
            with self.lock:
                self.completed += 1
            return
        header, payloads = self.work.request(model)
        key = self._keys = self._keys + 1
        rec.submitted = time.perf_counter()
        future = self.client.submit(header, payloads)
        with self.lock:
            self.outstanding[key] = (future, rec)
        future.add_done_callback(lambda f, k=key: self._finish(k, f))

    def _more(self, now: float) -> bool:
        spec = self.spec
        if spec.requests is not None and len(self.records) >= spec.requests:
            return False
        return spec.duration is None or now - self.t0 < spec.duration

    def run(self) -> None:
        self.t0 = time.perf_counter()
        last_tick = 0.0
        if self.spec.concurrency is not None:
            while True:
                now = time.perf_counter()
                if not self._more(now):
                    break
                if self.slots.acquire(timeout=0.1):
                    self._send(self.work.model(), time.perf_counter())
                if now - last_tick > 0.2:
                    last_tick = now
                    self.on_progress(self.completed)
        else:
            rng = np.random.default_rng(self.spec.seed + 1)
            due = self.t0
            while True:
                due += float(rng.exponential(1.0 / self.spec.rate))
                if not self._more(due):
                    break
                while True:
                    now = time.perf_counter()
                    if now >= due:
                        break
                    time.sleep(min(due - now, 0.05))
                    if now - last_tick > 0.2:
                        last_tick = now
                        self.on_progress(self.completed)
                self._send(self.work.model(), due)  # latency counts from the scheduled arrival
        # Drain what is still in flight.
        give_up = time.perf_counter() + self.spec.timeout_s
        while self.outstanding and time.perf_counter() < give_up:
            time.sleep(0.05)
            self.on_progress(self.completed)
        with self.lock:
            left = list(self.outstanding.items())
            self.outstanding.clear()
        now = time.perf_counter()
        for _, (future, rec) in left:
            future.cancel()
            rec.done, rec.code = now, "client_timeout"
        self.on_progress(self.completed + len(left))


def run_loadtest(client: Client, spec: LoadSpec, *, progress: bool = False,
                 broker_totals: Optional[Callable[[], Optional[dict]]] = None) -> dict:
    """Run ``spec`` against the broker behind ``client``; returns the report (see :func:`report`)."""
    spec.check()
    bar = None
    if progress:
        from tqdm import tqdm

        if spec.requests is not None:
            bar = tqdm(total=spec.requests, unit="req", desc=f"loadtest ({spec.mode} loop)", file=sys.stderr)
        else:
            bar = tqdm(total=None, unit="req", desc=f"loadtest ({spec.mode} loop, {spec.duration:g} s)",
                       file=sys.stderr)
    shown = [0]

    def tick(done: int) -> None:
        if bar is not None and done > shown[0]:
            bar.update(done - shown[0])
            shown[0] = done

    before = broker_totals() if broker_totals else None
    r = _Run(client, spec, tick)
    try:
        r.run()
    finally:
        if bar is not None:
            bar.close()
    after = broker_totals() if broker_totals else None
    rep = report(r.records, spec, r.t0)
    if before and after:
        rep["broker"] = {k: (after.get(k) or 0) - (before.get(k) or 0)
                         for k in ("loads", "evictions", "cold_loads", "requests", "ok")}
    return rep


# --- the report ----------------------------------------------------------------------------------------

def _pct(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    return float(np.percentile(np.asarray(values), q))


def _latency(values: list[float]) -> dict:
    return {"p50": _pct(values, 50), "p95": _pct(values, 95), "p99": _pct(values, 99),
            "max": max(values) if values else None, "mean": float(np.mean(values)) if values else None}


def report(records: list[Record], spec: LoadSpec, t0: float) -> dict:
    ok = [r for r in records if r.ok]
    end = max((r.done for r in records), default=t0)
    elapsed = max(end - t0, 1e-9)
    lat = [(r.done - r.sent) * 1000.0 for r in ok]
    errors = Counter(r.code for r in records if not r.ok)
    cold = sum(r.cold for r in ok)
    frames = sum(r.frames for r in ok)
    per_model: dict[str, dict] = {}
    by_model: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_model[r.model].append(r)
    for m in spec.models:
        rs = by_model.get(m, [])
        mok = [r for r in rs if r.ok]
        mlat = [(r.done - r.sent) * 1000.0 for r in mok]
        mcold = sum(r.cold for r in mok)
        per_model[m] = {
            "requests": len(rs), "share": len(rs) / len(records) if records else 0.0, "ok": len(mok),
            "errors": dict(Counter(r.code for r in rs if not r.ok)),
            "requests_per_s": len(mok) / elapsed, "frames_per_s": sum(r.frames for r in mok) / elapsed,
            "latency_ms": _latency(mlat), "cold_loads": mcold,
            "hit_ratio": (1 - mcold / len(mok)) if mok else None,
        }
    seconds = int(math.ceil(elapsed)) if records else 0
    timeline = []
    buckets: list[list[Record]] = [[] for _ in range(seconds)]
    for r in records:
        buckets[min(seconds - 1, max(0, int(r.done - t0)))].append(r)
    for i, rs in enumerate(buckets):
        rok = [r for r in rs if r.ok]
        blat = [(r.done - r.sent) * 1000.0 for r in rok]
        timeline.append({
            "t": i, "completed": len(rs), "ok": len(rok), "frames": sum(r.frames for r in rok),
            "errors": len(rs) - len(rok), "p50_ms": _pct(blat, 50), "p99_ms": _pct(blat, 99),
            "cold_loads": sum(r.cold for r in rok),
            "loads": sorted({f"{r.model}@{r.worker}" for r in rok if r.cold}),
        })
    workers = Counter(r.worker for r in ok)
    return {
        "config": {**asdict(spec), "mode": spec.mode},
        "duration_s": elapsed,
        "requests": len(records), "ok": len(ok), "errors": dict(errors),
        # the first message of each error code: what the server said, not only how often
        "error_messages": {code: next(r.message for r in records if not r.ok and r.code == code)
                           for code in errors},
        "error_rate": (len(records) - len(ok)) / len(records) if records else 0.0,
        "requests_per_s": len(ok) / elapsed, "frames_per_s": frames / elapsed,
        "offered_per_s": len(records) / elapsed, "frames": frames,
        "latency_ms": _latency(lat),
        "cold_loads": cold, "hit_ratio": (1 - cold / len(ok)) if ok else None,
        "cold_load_ms": _latency([r.load_ms for r in ok if r.cold]),
        "per_model": per_model, "workers": dict(workers),
        "timeline": timeline,
        "load_events": [{"t": r.done - t0, "model": r.model, "worker": r.worker, "load_ms": r.load_ms}
                        for r in sorted(ok, key=lambda r: r.done) if r.cold],
    }


def _f(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def print_report(rep: dict, out: Any = None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    if out is not None:
        console = Console(file=out, width=160)
    else:  # piped or captured output: a wide page instead of rich's 80-column fallback
        console = Console() if sys.stdout.isatty() else Console(width=160)
    c = rep["config"]
    how = (f"closed loop, {c['concurrency']} in flight" if c["mode"] == "closed"
           else f"open loop, {c['rate']:g} req/s offered (Poisson)")
    pick = f"Zipf({c['zipf']:g})" if c.get("zipf") else "uniform"
    lat = rep["latency_ms"]
    console.print(f"[bold]loadtest[/]: {how}; {len(c['models'])} model(s), {pick}; batch {c['batch']}, "
                  f"format {c['format']}; {rep['duration_s']:.1f} s")
    errors = ", ".join(f"{k} {v}" for k, v in sorted(rep["errors"].items())) or "none"
    hit = "-" if rep["hit_ratio"] is None else f"{100 * rep['hit_ratio']:.1f}%"
    console.print(
        f"  requests {rep['requests']}  ok {rep['ok']}  errors {sum(rep['errors'].values())} ({errors})\n"
        f"  [bold cyan]{rep['requests_per_s']:.2f} req/s   {rep['frames_per_s']:.1f} frames/s[/]   "
        f"(offered {rep['offered_per_s']:.2f} req/s)\n"
        f"  latency ms  p50 {_f(lat['p50'])}  p95 {_f(lat['p95'])}  p99 {_f(lat['p99'])}  max {_f(lat['max'])}\n"
        f"  cold loads {rep['cold_loads']}  cache hit ratio {hit}"
        + (f"  (load p50 {_f(rep['cold_load_ms']['p50'])} ms)" if rep["cold_loads"] else "")
        + (f"   broker: {rep['broker']['loads']} loads, {rep['broker']['evictions']} evictions"
           if rep.get("broker") else ""))
    t = Table(box=box.SIMPLE_HEAD, title="per model", title_justify="left")
    for col in ("model", "share", "requests", "ok", "errors", "req/s", "frames/s", "p50 ms", "p99 ms",
                "cold loads", "hit ratio"):
        t.add_column(col, justify="left" if col in ("model", "errors") else "right")
    rows = sorted(rep["per_model"].items(), key=lambda kv: -kv[1]["requests"])
    for m, s in rows[:30]:
        t.add_row(m, f"{100 * s['share']:.1f}%", str(s["requests"]), str(s["ok"]),
                  ", ".join(f"{k} {v}" for k, v in sorted(s["errors"].items())) or "0",
                  f"{s['requests_per_s']:.2f}", f"{s['frames_per_s']:.1f}", _f(s["latency_ms"]["p50"]),
                  _f(s["latency_ms"]["p99"]), str(s["cold_loads"]),
                  "-" if s["hit_ratio"] is None else f"{100 * s['hit_ratio']:.0f}%")
    if len(rows) > 30:
        t.caption = f"{len(rows) - 30} more in --json"
    console.print(t)
    tl = Table(box=box.SIMPLE_HEAD, title="per second", title_justify="left")
    for col in ("t", "ok", "frames", "errors", "p50 ms", "p99 ms", "cold loads"):
        tl.add_column(col, justify="right")
    timeline = rep["timeline"]
    step = max(1, len(timeline) // 30)
    for row in timeline[::step]:
        tl.add_row(str(row["t"]), str(row["ok"]), str(row["frames"]), str(row["errors"]), _f(row["p50_ms"]),
                   _f(row["p99_ms"]), str(row["cold_loads"]))
    if step > 1:
        tl.caption = f"every {step}th second; all of them in --json"
    console.print(tl)


def plot_report(rep: dict, path: str) -> None:
    """Throughput (ok req/s and frames/s) and p99 per second, with a mark at each cold load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = rep["timeline"]
    t = [row["t"] + 0.5 for row in tl]
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=110)
    ax.plot(t, [row["ok"] for row in tl], color="tab:blue", marker=".", label="requests/s (ok)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("requests/s", color="tab:blue")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(t, [row["p99_ms"] if row["p99_ms"] is not None else float("nan") for row in tl],
             color="tab:red", marker=".", label="p99 latency (ms)")
    ax2.set_ylabel("p99 latency (ms)", color="tab:red")
    ax2.set_ylim(bottom=0)
    loads = rep.get("load_events", [])
    for i, ev in enumerate(loads):
        ax.axvline(ev["t"], color="tab:orange", alpha=0.5, linewidth=0.9, linestyle="--",
                   label="cold load (reply with model_loaded)" if i == 0 else None)
    c = rep["config"]
    how = f"C={c['concurrency']}" if c["mode"] == "closed" else f"R={c['rate']:g}/s"
    pick = f"Zipf({c['zipf']:g})" if c.get("zipf") else "uniform"
    ax.set_title(f"loadtest {c['mode']} loop {how}, {len(c['models'])} models {pick}, batch {c['batch']}: "
                 f"{rep['requests_per_s']:.1f} req/s, p99 {_f(rep['latency_ms']['p99'], 0)} ms, "
                 f"{rep['cold_loads']} cold loads", fontsize=9)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# --- a local cluster for --demo-models ------------------------------------------------------------------

# --- command -------------------------------------------------------------------------------------------

def _split(value: Optional[str]) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


LocalCluster = Callable[[int, Optional[str], int, int], ContextManager[str]]


def loadtest_command(local_cluster: LocalCluster) -> click.Command:
    """The ``loadtest`` command. ``local_cluster(count, demo_dir, workers, slots)`` is what
    ``--demo-models`` runs against: the supervisor's ``demo_cluster``, handed in by the CLI,
    because the tools sit below the supervisor and never import it.
    """

    @click.command("loadtest")
    @click.option("--broker", default=None, envvar="LIPSYNC_BROKER",
                  help=f"The broker's client endpoint [default: {DEFAULT_ENDPOINT}].")
    @click.option("--ports", default=None, help="The earlier test script's form: broker port(s) on 127.0.0.1 (the first is used).")
    @click.option("--models", "models_opt", default=None, help="Models to ask for, comma-separated (Zipf rank order).")
    @click.option("--model-names", default=None, help="The earlier test script's name for --models.")
    @click.option("--model-count", type=click.IntRange(1, 100_000), default=None,
                  help="Use the first K models the broker lists (sorted by id).")
    @click.option("--zipf", type=click.FloatRange(0, 10), default=None,
                  help="Zipf exponent S of model popularity (rank k ~ 1/k^S); default uniform.")
    @click.option("--concurrency", "-c", type=click.IntRange(1, 100_000), default=None,
                  help="Closed loop: requests kept in flight (default 4 unless --rate).")
    @click.option("--rate", "-r", type=click.FloatRange(0, None, min_open=True), default=None,
                  help="Open loop: Poisson arrivals at R requests/s.")
    @click.option("--duration", "-d", type=click.FloatRange(0, None, min_open=True), default=None,
                  help="Seconds of sending (default 10 unless --requests).")
    @click.option("--requests", "-n", "num_requests", type=click.IntRange(1, None), default=None,
                  help="Number of requests.")
    @click.option("--num-requests", "script_num_requests", type=click.IntRange(1, None), default=None,
                  help="The earlier test script's name for --requests.")
    @click.option("--batch", "-b", type=click.IntRange(1, MAX_BATCH_SIZE), default=5, show_default=True,
                  help="Frames per request (the broker's limit).")
    @click.option("--format", "fmt", type=click.Choice(FORMATS), default="jpeg",
                  show_default=True, help="Frame encoding asked for.")
    @click.option("--quality", type=click.IntRange(0, 100), default=None,
                  help="jpeg quality 1..100 / png compression 0..9 (checked against --format).")
    @click.option("--deadline-ms", type=click.FloatRange(1, None), default=None, help="Per-request deadline.")
    @click.option("--timeout", type=float, default=120.0, show_default=True,
                  help="Seconds to wait for a reply before counting it as client_timeout.")
    @click.option("--seed", type=int, default=0, show_default=True, help="Seed of the model draws and audio.")
    @click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
                  help="Write the full report (per model, per second) as JSON ('-' for stdout).")
    @click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
                  help="Write a PNG: throughput and p99 per second, with model loads marked.")
    @click.option("--demo-models", type=click.IntRange(1, 1000), default=None,
                  help="Without --broker: build K light demo models and run against a local cluster started for it.")
    @click.option("--demo-dir", type=click.Path(file_okay=False), default=None,
                  help="Where --demo-models keeps the models (reused next time) [default: a temporary folder].")
    @click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True,
                  help="With --demo-models: CPU workers of the local cluster.")
    @click.option("--slots", type=click.IntRange(1, 1000), default=3, show_default=True,
                  help="With --demo-models: models each worker holds (capacity.max_models).")
    @click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
    def loadtest(broker: Optional[str], ports: Optional[str], models_opt: Optional[str], model_names: Optional[str],
                 model_count: Optional[int], zipf: Optional[float], concurrency: Optional[int], rate: Optional[float],
                 duration: Optional[float], num_requests: Optional[int], script_num_requests: Optional[int], batch: int,
                 fmt: str, quality: Optional[int], deadline_ms: Optional[float], timeout: float, seed: int,
                 json_path: Optional[str], plot_path: Optional[str], demo_models: Optional[int],
                 demo_dir: Optional[str], workers: int, slots: int, quiet: bool) -> None:
        """Load-test a cluster: closed or open loop, uniform or Zipf models, a report per model and per second.

        \b
        Examples:
          lipsync-cluster loadtest --models demo_ada,demo_ben -c 8 -d 30
          lipsync-cluster loadtest --model-count 3 --zipf 1.0 --rate 20 -d 60 --json out.json --plot out.png
          lipsync-cluster loadtest --demo-models 6 --slots 2 --zipf 1 -c 4 -n 200
          lipsync-cluster loadtest --ports 5555 --model-names demo_ada --num-requests 100   (the earlier script's form)
        """
        if ports:
            port_list = _split(ports)
            if broker:
                raise click.UsageError("give --broker or --ports, not both")
            if not port_list or not all(p.isdigit() for p in port_list):
                raise click.BadParameter(f"expected port numbers, got {ports!r}", param_hint="--ports")
            broker = f"tcp://127.0.0.1:{port_list[0]}"
            if len(port_list) > 1:
                click.echo(f"note: one broker routes for every worker; using port {port_list[0]}", err=True)
        if models_opt and model_names:
            raise click.UsageError("give --models or --model-names, not both")
        models = _split(models_opt or model_names)
        if models and model_count:
            raise click.UsageError("give --models or --model-count, not both")
        if num_requests and script_num_requests:
            raise click.UsageError("give --requests or --num-requests, not both")
        num_requests = num_requests or script_num_requests
        if concurrency is not None and rate is not None:
            raise click.UsageError("give --concurrency (closed loop) or --rate (open loop), not both")
        if concurrency is None and rate is None:
            concurrency = 4
        if duration is None and num_requests is None:
            duration = 10.0
        if demo_models and broker:
            raise click.UsageError("--demo-models starts its own local cluster; leave out --broker/--ports")
        try:  # the request rules' range for this format, before any request goes out
            check_quality(fmt, quality)
        except BadRequest as exc:
            raise click.BadParameter(exc.message, param_hint="--quality") from None
        if plot_path:
            require("lipsync-cluster loadtest --plot", "plot")
        if demo_models:
            require("lipsync-cluster loadtest --demo-models", "cpu", "tools")

        with contextlib.ExitStack() as stack:
            if demo_models:
                try:
                    broker = stack.enter_context(local_cluster(demo_models, demo_dir, workers, slots))
                except Exception as exc:  # StartError, build errors: one clear line
                    raise click.ClickException(f"could not start the demo cluster: {exc}") from None
            endpoint = broker or DEFAULT_ENDPOINT
            client = stack.enter_context(Client(endpoint, timeout=timeout))
            try:
                catalog = [m["model_id"] for m in client.request({"op": "list_models"}, timeout=min(5.0, timeout))[0]["models"]]
            except Exception as exc:
                raise click.ClickException(f"no broker answered at {endpoint}: {getattr(exc, 'message', exc)}") from None
            if not models:
                if not catalog:
                    raise click.ClickException(f"the broker at {endpoint} serves no models")
                count = model_count or (demo_models or len(catalog))
                if count > len(catalog):
                    raise click.ClickException(f"--model-count {count}: the broker serves only {len(catalog)} model(s)")
                models = sorted(catalog)[:count]
            unknown = [m for m in models if m not in catalog]
            if unknown:
                click.echo(f"note: not in the broker's catalog (expect unknown_model): {', '.join(unknown)}", err=True)
            spec = LoadSpec(models=models, zipf=zipf, concurrency=concurrency, rate=rate, duration=duration,
                            requests=num_requests, batch=batch, format=fmt, quality=quality, deadline_ms=deadline_ms,
                            timeout_s=timeout, seed=seed)

            def broker_totals() -> Optional[dict]:
                try:
                    return client.request({"op": "model_stats"}, timeout=5.0)[0].get("totals")
                except Exception:
                    return None

            rep = run_loadtest(client, spec, progress=not quiet, broker_totals=broker_totals)
            rep["broker_endpoint"] = endpoint
        if json_path == "-":
            click.echo(json.dumps(rep, indent=2, default=str))
        else:
            print_report(rep)
            if json_path:
                Path(json_path).parent.mkdir(parents=True, exist_ok=True)
                Path(json_path).write_text(json.dumps(rep, indent=2, default=str))
                click.echo(f"report written to {json_path}", err=True)
        if plot_path:
            plot_report(rep, plot_path)
            click.echo(f"plot written to {plot_path}", err=True)
        if rep["ok"] == 0:
            said = "; ".join(f"{code}: {message}" for code, message in sorted(rep.get("error_messages", {}).items()))
            click.echo("Error: no request succeeded" + (f" ({said})" if said else ""), err=True)
            sys.exit(1)

    return loadtest
