#!/usr/bin/env python3
"""Admission that keeps its word: goodput, refusals and served latency under overload.

A local cluster of ``--workers`` CPU workers (``--slots`` models each) over ``--models`` light demo
models (what ``lipsync-cluster loadtest --demo-models`` starts), requests drawn Zipf(``--zipf``) so
that the tail asks for models no worker holds (cold loads), with a ``--deadline-ms`` deadline,
batch 5, jpeg:

1. capacity: a closed loop keeping ``--concurrency`` requests in flight; capacity = ok per second;
2. open loop (Poisson arrivals) at each of ``--loads`` x capacity: goodput (ok per second), how the
   refusals split by code (the share that are ``timeout``: admitted, then waited out the deadline),
   the p99 of the served requests against the deadline, and how fast refusals came back (from the
   request's scheduled arrival, so client lag counts against it).

Targets (issue 17), at 2x, 3x and 4x: <= 5 % of refusals are ``timeout``; p99 of served <= 0.8x the
deadline; goodput >= 0.9x the closed-loop capacity; a refusal answers in < 50 ms.

    python bench/admission.py                         # ~1.5 min, writes docs/BENCHMARKS.md "admission"
    python bench/admission.py --quick                 # shorter runs, prints only
    git worktree add /tmp/base main
    python bench/admission.py --baseline /tmp/base    # before and after side by side, measured in turn
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine, today, write_section  # noqa: E402
from lipsync_cluster.client.client import Client  # noqa: E402
from lipsync_cluster.supervisor import demo_cluster  # noqa: E402
from lipsync_cluster.tools.loadtest import LoadSpec, _Run  # noqa: E402


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def run(client: Client, spec: LoadSpec) -> dict:
    r = _Run(client, spec, lambda done: None)
    r.run()
    recs = r.records
    span = max(rec.done for rec in recs) - r.t0 if recs else 1.0
    ok = [rec for rec in recs if rec.ok]
    refused = [rec for rec in recs if not rec.ok]
    codes: dict[str, int] = {}
    for rec in refused:
        codes[rec.code or "?"] = codes.get(rec.code or "?", 0) + 1
    lat = [1000.0 * (rec.done - rec.sent) for rec in ok]
    ref_lat = [1000.0 * (rec.done - rec.sent) for rec in refused]
    # Refused from the queue by the re-check (admission.py), after waiting: their answer is not at once.
    early = [1000.0 * (rec.done - rec.sent) for rec in refused if rec.message.startswith("refused after")]
    at_once = [1000.0 * (rec.done - rec.sent) for rec in refused
               if rec.code == "overloaded" and not rec.message.startswith("refused after")]
    slow = [rec for rec in ok if 1000.0 * (rec.done - rec.sent) > 0.8 * (spec.deadline_ms or 1e12)]
    return {"early": len(early), "early_p50_ms": _pct(early, 50), "slow": len(slow), "slow_cold": sum(1 for rec in slow if rec.cold),
            "slow_load_ms": float(np.mean([rec.load_ms for rec in slow if rec.cold])) if any(r.cold for r in slow) else 0.0,
            "sent": len(recs), "ok": len(ok), "goodput": len(ok) / span, "offered": len(recs) / spec.duration,
            "refused": len(refused), "codes": codes, "cold": sum(1 for rec in ok if rec.cold),
            "timeout_share": codes.get("timeout", 0) / len(refused) if refused else 0.0,
            "fast_share": sum(1 for x in ref_lat if x <= 50.0) / len(refused) if refused else 1.0,
            "at_once_p50_ms": _pct(at_once, 50), "at_once_p99_ms": _pct(at_once, 99),
            "refusal_p50_ms": _pct(ref_lat, 50), "refusal_p99_ms": _pct(ref_lat, 99),
            "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99)}


def load_avg() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


@contextlib.contextmanager
def cluster_running(args: argparse.Namespace, code: Optional[str]) -> Iterator[str]:
    """A demo cluster whose broker and workers run the code in ``code`` (a checkout of another
    commit, through PYTHONPATH and as the working directory, which ``python -m`` puts first;
    None: this checkout); yields its client endpoint."""
    old, cwd = os.environ.get("PYTHONPATH"), os.getcwd()
    if code:
        os.environ["PYTHONPATH"] = code
        os.chdir(code)
    else:
        os.environ.pop("PYTHONPATH", None)
        os.chdir(REPO)
    try:
        cm = demo_cluster(args.models, args.demo_dir, args.workers, args.slots, eviction_policy="lfu")
        endpoint = cm.__enter__()
    finally:  # the processes have started: they keep what they were given
        os.chdir(cwd)
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    try:
        yield endpoint
    finally:
        cm.__exit__(None, None, None)


def measure(args: argparse.Namespace, seconds: float) -> dict[str, dict]:
    """Every variant (``--baseline`` first when given, then this checkout) on its own cluster, all
    running at once and measured in turn, phase by phase, so that a change in the machine's load
    falls on both; the open loop offers each variant the same rate (x the mean capacity)."""
    variants = ([("before", args.baseline)] if args.baseline else []) + [(args.label, None)]
    res: dict[str, dict] = {label: {"load_start": load_avg(), "rows": [], "closed": {}} for label, _ in variants}
    with contextlib.ExitStack() as stack:
        clients = {}
        for label, code in variants:
            endpoint = stack.enter_context(cluster_running(args, code))
            clients[label] = stack.enter_context(Client(endpoint, timeout=60))
        models = sorted(m["model_id"] for m in clients[args.label].list_models())[: args.models]
        base = dict(models=models, zipf=args.zipf, deadline_ms=args.deadline_ms, duration=seconds)
        for label, client in clients.items():
            run(client, LoadSpec(concurrency=args.concurrency[0], **dict(base, duration=3.0)))  # warm up
        for conc in args.concurrency:
            for label, client in clients.items():
                cap = run(client, LoadSpec(concurrency=conc, **base))
                res[label]["closed"][str(conc)] = round(cap["goodput"], 1)
                print(f"[{label}] closed loop, {conc} in flight: {cap['goodput']:.1f} req/s, p50 "
                      f"{cap['p50_ms']:.0f} ms, p99 {cap['p99_ms']:.0f} ms, refused {cap['codes']}", flush=True)
        for r in res.values():
            r["capacity"] = max(r["closed"].values())
        common = sum(r["capacity"] for r in res.values()) / len(res)
        for mult in (float(x) for x in args.loads.split(",")):
            for label, client in clients.items():
                r = run(client, LoadSpec(rate=mult * common, **base))
                r["mult"], r["rate"] = mult, mult * common
                res[label]["rows"].append(r)
                capacity = res[label]["capacity"]
                print(f"[{label}] {mult:.1f}x ({mult * common:.1f} req/s offered, {r['offered']:.1f} sent/s): "
                      f"goodput {r['goodput']:.1f} req/s = {r['goodput'] / capacity:.2f}x its capacity; refused "
                      f"{r['refused']} {r['codes']}; timeout {100 * r['timeout_share']:.1f}% of refusals; refusal "
                      f"p50 {r['refusal_p50_ms']:.0f} ms p99 {r['refusal_p99_ms']:.0f} ms, within 50 ms "
                      f"{100 * r['fast_share']:.1f}%; ok p50 {r['p50_ms']:.0f} ms p99 {r['p99_ms']:.0f} ms "
                      f"({r['p99_ms'] / args.deadline_ms:.2f}x deadline), cold {r['cold']}; served past 0.8x the deadline "
                      f"{r['slow']} ({r['slow_cold']} cold, load {r['slow_load_ms']:.0f} ms); refused at arrival p50 "
                      f"{r['at_once_p50_ms']:.0f} ms p99 {r['at_once_p99_ms']:.0f} ms; re-check refusals {r['early']} "
                      f"(p50 {r['early_p50_ms']:.0f} ms)", flush=True)
    for r in res.values():
        r["load_end"] = load_avg()
    return res


def table(runs: list[tuple[str, dict]], deadline_ms: float) -> list[str]:
    """One row per load and code, the codes of one load next to each other."""
    lines = ["| offered | code | goodput req/s | x its capacity / x the mean | refused | by code | `timeout` share of refusals "
             "| refusal p50 / p99 ms | within 50 ms | at arrival: p50 / p99 ms | from the queue (re-check): n, p50 ms "
             "| ok p50 ms | ok p99 ms | ok p99 / deadline | cold served |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i in range(len(runs[0][1]["rows"])):
        for label, res in runs:
            r = res["rows"][i]
            codes = ", ".join(f"{k} {v}" for k, v in sorted(r["codes"].items())) or "-"
            lines.append(
                f"| {r['mult']:.1f}x ({r['rate']:.1f}/s) | {label} | {r['goodput']:.1f} | "
                f"**{r['goodput'] / res['capacity']:.2f}** / {r['goodput'] * r['mult'] / r['rate']:.2f} | {r['refused']} | {codes} | **{100 * r['timeout_share']:.1f}%** | "
                f"{r['refusal_p50_ms']:.0f} / {r['refusal_p99_ms']:.0f} | {100 * r['fast_share']:.1f}% | "
                f"{r['at_once_p50_ms']:.0f} / {r['at_once_p99_ms']:.0f} | {r['early']}, {r['early_p50_ms']:.0f} | {r['p50_ms']:.0f} | "
                f"{r['p99_ms']:.0f} | **{r['p99_ms'] / deadline_ms:.2f}** | {r['cold']} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, default=30)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--slots", type=int, default=3)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--deadline-ms", type=float, default=5000.0)
    ap.add_argument("--concurrency", default=None,
                    help="closed loops that measure capacity, the best counts (default: the workers' credits "
                         "(2 each: every credit busy, nothing queued) and 4x that (queues full; the cold "
                         "models' requests are then refused at once and sent again))")
    ap.add_argument("--loads", default="2.0,3.0,4.0", help="open-loop rates as multiples of capacity")
    ap.add_argument("--seconds", type=float, default=None, help="per run (default 15, 8 with --quick)")
    ap.add_argument("--demo-dir", default=None, help="keep the demo models here (reused next time)")
    ap.add_argument("--label", default="this", help="names this code's rows in the table (e.g. after)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--baseline", default=None, metavar="DIR",
                    help="also run a checkout of the code before (e.g. `git worktree add /tmp/base main`) on a "
                         "cluster of its own, measured in turn with this one (rows labelled `before`)")
    ap.add_argument("--quick", action="store_true", help="shorter runs; prints only (unless --write)")
    ap.add_argument("--write", action="store_true", help="with --quick: write docs/BENCHMARKS.md anyway")
    args = ap.parse_args()
    seconds = args.seconds or (8.0 if args.quick else 15.0)
    credits = 2 * args.workers  # cluster.worker_credits defaults to 2
    args.concurrency = [int(x) for x in args.concurrency.split(",")] if args.concurrency else [credits]
    res = measure(args, seconds)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(res, seconds=seconds)))
    if args.quick and not args.write:
        return
    runs = list(res.items())
    caps = "; ".join(f"{label}: **{r['capacity']:.1f} req/s** (" + ", ".join(
        f"{v} req/s at {k} in flight" for k, v in r["closed"].items()) + f"), load average {r['load_start']} at the "
        f"start, {r['load_end']} at the end" for label, r in runs)
    lines = [
        "## Admission under overload (`bench/admission.py`)",
        "",
        f"Machine: {machine()}, no GPU. Date: {today()}. Command: `python bench/admission.py"
        f"{' --quick --write' if args.quick else ''}{' --baseline <checkout of main>' if args.baseline else ''}"
        f"{f' --seconds {seconds:g}' if args.seconds else ''}`.",
        "",
        f"A local cluster ({args.workers} CPU workers x {args.slots} slots, `lipsync-cluster loadtest "
        f"--demo-models {args.models}`'s setup) over {args.models} light demo models; requests Zipf({args.zipf:g}) "
        f"(the tail asks for models no worker holds: cold loads), batch 5, jpeg, deadline "
        f"{args.deadline_ms / 1000:g} s; {seconds:g} s per run, the load test's own driver. Capacity = a closed "
        f"loop, the best of {' and '.join(map(str, args.concurrency))} in flight (every credit busy), measured by "
        f"each code on its own cluster: {caps}. Open loop = Poisson arrivals at a multiple of the mean of those "
        "capacities, the same rate for each code; the clusters run side by side and are measured in turn, phase "
        "by phase. Latencies count from the request's scheduled arrival.",
        "",
        *table(runs, args.deadline_ms),
        "",
        "Targets (issue 17), at 2x, 3x, 4x: <= 5 % of refusals are `timeout`; p99 of served <= 0.8x the deadline; "
        "goodput >= 0.9x the closed-loop capacity; a refusal answers in < 50 ms.",
    ]
    write_section("admission", "\n".join(lines) + "\n")
    print("wrote docs/BENCHMARKS.md (admission)")


if __name__ == "__main__":
    main()
