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
import subprocess
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
    # The driver's lag behind its schedule (the time from the scheduled arrival to the hand-over to
    # the client), and the at-arrival refusals counted from that hand-over instead: what is left
    # is the client library's thread, the broker and the loopback, both ways.
    lag = [1000.0 * (rec.submitted - rec.sent) for rec in recs if rec.submitted]
    ref_lat = [1000.0 * (rec.done - rec.sent) for rec in refused]
    # Refused from the queue by the re-check (admission.py), after waiting: their answer is not at once.
    early = [1000.0 * (rec.done - rec.sent) for rec in refused if rec.message.startswith("refused after")]
    at_once = [1000.0 * (rec.done - rec.sent) for rec in refused
               if rec.code == "overloaded" and not rec.message.startswith("refused after")]
    at_once_send = [1000.0 * (rec.done - rec.submitted) for rec in refused if rec.submitted
                    and rec.code == "overloaded" and not rec.message.startswith("refused after")]
    slow = [rec for rec in ok if 1000.0 * (rec.done - rec.sent) > 0.8 * (spec.deadline_ms or 1e12)]
    return {"early": len(early), "early_p50_ms": _pct(early, 50), "slow": len(slow), "slow_cold": sum(1 for rec in slow if rec.cold),
            "slow_load_ms": float(np.mean([rec.load_ms for rec in slow if rec.cold])) if any(r.cold for r in slow) else 0.0,
            "sent": len(recs), "ok": len(ok), "goodput": len(ok) / span, "offered": len(recs) / spec.duration,
            "refused": len(refused), "codes": codes, "cold": sum(1 for rec in ok if rec.cold),
            "timeout_share": codes.get("timeout", 0) / len(refused) if refused else 0.0,
            "fast_share": sum(1 for x in ref_lat if x <= 50.0) / len(refused) if refused else 1.0,
            "at_once_p50_ms": _pct(at_once, 50), "at_once_p99_ms": _pct(at_once, 99),
            "at_once_send_p50_ms": _pct(at_once_send, 50), "at_once_send_p99_ms": _pct(at_once_send, 99),
            "lag_p50_ms": _pct(lag, 50), "lag_p99_ms": _pct(lag, 99),
            "refusal_p50_ms": _pct(ref_lat, 50), "refusal_p99_ms": _pct(ref_lat, 99),
            "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99)}


def load_avg() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def broker_pid(endpoint: str) -> Optional[int]:
    """The pid of this process's child listening on ``endpoint`` (a demo cluster's broker)."""
    import psutil

    port = int(endpoint.rsplit(":", 1)[1])
    for child in psutil.Process().children(recursive=True):
        try:
            if any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
                   for c in child.net_connections("tcp")):
                return child.pid
        except (psutil.Error, OSError):
            continue
    return None


def run_delay_s(pid: Optional[int]) -> float:
    """Seconds the threads of ``pid`` have waited on a run queue, ready but not running
    (/proc/PID/task/*/schedstat, field 2; Linux): the broker starved of CPU by other processes."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[1])
    except (OSError, TypeError):
        return 0.0
    return total / 1e9


_CLUSTER_SCRIPT = """
import sys
from lipsync_cluster.supervisor import demo_cluster
models, demo_dir, workers, slots = int(sys.argv[1]), sys.argv[2] or None, int(sys.argv[3]), int(sys.argv[4])
with demo_cluster(models, demo_dir, workers, slots, eviction_policy="lfu") as endpoint:
    print(endpoint, flush=True)
    sys.stdin.read()  # until the bench closes it
"""


@contextlib.contextmanager
def cluster_running(args: argparse.Namespace, code: Optional[str], nice: Optional[int] = None) -> Iterator[str]:
    """A demo cluster running the code in ``code`` (a checkout of another commit: its supervisor,
    broker and workers, in a process of their own with that checkout first on the path, so that
    its config schema reads the config its supervisor writes; None: this checkout, in this
    process, its workers at ``cluster.worker_nice`` ``nice`` (None: the default)); yields its client
    endpoint."""
    if not code:
        with demo_cluster(args.models, args.demo_dir, args.workers, args.slots, eviction_policy="lfu",
                          worker_nice=nice) as endpoint:
            yield endpoint
        return
    env = dict(os.environ, PYTHONPATH=code)
    proc = subprocess.Popen([sys.executable, "-c", _CLUSTER_SCRIPT, str(args.models), args.demo_dir or "",
                             str(args.workers), str(args.slots)], cwd=code, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        endpoint = proc.stdout.readline().strip()
        if not endpoint:
            raise RuntimeError(f"the baseline cluster in {code} did not start (exit code {proc.wait()})")
        yield endpoint
    finally:
        proc.stdin.close()  # the script leaves demo_cluster: the cluster stops
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(args: argparse.Namespace, seconds: float) -> dict[str, dict]:
    """Every variant (``--baseline`` first when given, then this checkout) on its own cluster, all
    running at once and measured in turn, phase by phase, so that a change in the machine's load
    falls on both; the open loop offers each variant the same rate (x the mean capacity)."""
    variants = ([("before", args.baseline, None)] if args.baseline else []) + (
        [(f"{args.label}, worker_nice {n}", None, n) for n in args.worker_nice] if args.worker_nice
        else [(args.label, None, None)])
    res: dict[str, dict] = {label: {"load_start": load_avg(), "rows": [], "closed": {}} for label, _, _ in variants}
    with contextlib.ExitStack() as stack:
        clients, pids = {}, {}
        for label, code, nice in variants:
            endpoint = stack.enter_context(cluster_running(args, code, nice))
            clients[label] = stack.enter_context(Client(endpoint, timeout=60))
            pids[label] = broker_pid(endpoint)
        models = sorted(m["model_id"] for m in clients[variants[-1][0]].list_models())[: args.models]
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
                waited = run_delay_s(pids[label])
                r = run(client, LoadSpec(rate=mult * common, **base))
                r["broker_wait_ms_per_s"] = 1000.0 * (run_delay_s(pids[label]) - waited) / seconds
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
                      f"{r['at_once_p50_ms']:.0f} ms p99 {r['at_once_p99_ms']:.0f} ms (from the send: p50 "
                      f"{r['at_once_send_p50_ms']:.1f} ms p99 {r['at_once_send_p99_ms']:.1f} ms; client lag p50 "
                      f"{r['lag_p50_ms']:.1f} ms p99 {r['lag_p99_ms']:.1f} ms; broker run-queue wait "
                      f"{r['broker_wait_ms_per_s']:.0f} ms/s); re-check refusals {r['early']} "
                      f"(p50 {r['early_p50_ms']:.0f} ms)", flush=True)
    for r in res.values():
        r["load_end"] = load_avg()
    return res


def table(runs: list[tuple[str, dict]], deadline_ms: float) -> list[str]:
    """One row per load and code, the codes of one load next to each other."""
    lines = ["| offered | code | goodput req/s | x its capacity / x the mean | refused | by code | `timeout` share of refusals "
             "| refusal p50 / p99 ms | within 50 ms | at arrival: p50 / p99 ms | at arrival, from the send: p50 / p99 ms "
             "| client lag p50 / p99 ms | broker run-queue wait ms/s | from the queue (re-check): n, p50 ms "
             "| ok p50 ms | ok p99 ms | ok p99 / deadline | cold served |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i in range(len(runs[0][1]["rows"])):
        for label, res in runs:
            r = res["rows"][i]
            codes = ", ".join(f"{k} {v}" for k, v in sorted(r["codes"].items())) or "-"
            lines.append(
                f"| {r['mult']:.1f}x ({r['rate']:.1f}/s) | {label} | {r['goodput']:.1f} | "
                f"**{r['goodput'] / res['capacity']:.2f}** / {r['goodput'] * r['mult'] / r['rate']:.2f} | {r['refused']} | {codes} | **{100 * r['timeout_share']:.1f}%** | "
                f"{r['refusal_p50_ms']:.0f} / {r['refusal_p99_ms']:.0f} | {100 * r['fast_share']:.1f}% | "
                f"{r['at_once_p50_ms']:.0f} / {r['at_once_p99_ms']:.0f} | "
                f"**{r['at_once_send_p50_ms']:.1f} / {r['at_once_send_p99_ms']:.1f}** | "
                f"{r['lag_p50_ms']:.1f} / {r['lag_p99_ms']:.1f} | {r['broker_wait_ms_per_s']:.0f} | "
                f"{r['early']}, {r['early_p50_ms']:.0f} | {r['p50_ms']:.0f} | "
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
    ap.add_argument("--worker-nice", default=None, metavar="N,N",
                    help="run this checkout once per cluster.worker_nice value (e.g. 0,10: the workers at the "
                         "broker's priority and below it), side by side (default: once, at the config default)")
    ap.add_argument("--section", default="admission", help="the docs/BENCHMARKS.md section to write")
    ap.add_argument("--quick", action="store_true", help="shorter runs; prints only (unless --write)")
    ap.add_argument("--write", action="store_true", help="with --quick: write docs/BENCHMARKS.md anyway")
    args = ap.parse_args()
    args.worker_nice = [int(x) for x in args.worker_nice.split(",")] if args.worker_nice else None
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
        "## Refusals and the workers' CPU priority (`bench/admission.py --worker-nice`)" if args.worker_nice
        else "## Admission under overload (`bench/admission.py`)",
        "",
        f"Machine: {machine()}, no GPU. Date: {today()}. Command: `python bench/admission.py"
        f"{' --quick --write' if args.quick else ''}{' --baseline <checkout of main>' if args.baseline else ''}"
        f"{f' --seconds {seconds:g}' if args.seconds else ''}"
        f"{' --worker-nice ' + ','.join(map(str, args.worker_nice)) if args.worker_nice else ''}"
        f"{' --section ' + args.section if args.section != 'admission' else ''}`.",
        "",
        f"A local cluster ({args.workers} CPU workers x {args.slots} slots, `lipsync-cluster loadtest "
        f"--demo-models {args.models}`'s setup) over {args.models} light demo models; requests Zipf({args.zipf:g}) "
        f"(the tail asks for models no worker holds: cold loads), batch 5, jpeg, deadline "
        f"{args.deadline_ms / 1000:g} s; {seconds:g} s per run, the load test's own driver. Capacity = a closed "
        f"loop, the best of {' and '.join(map(str, args.concurrency))} in flight (every credit busy), measured by "
        f"each code on its own cluster: {caps}. Open loop = Poisson arrivals at a multiple of the mean of those "
        "capacities, the same rate for each code; the clusters run side by side and are measured in turn, phase "
        "by phase. Latencies count from the request's scheduled arrival, except \"from the send\" (from the moment "
        "the driver handed the request to the client library: the driver's lag behind its schedule left out). "
        "Broker run-queue wait: the time the broker's threads were ready to run but waited for a core "
        "(/proc/PID/task/*/schedstat), per second of the phase.",
        "",
        *table(runs, args.deadline_ms),
        "",
        "Targets (issue 17), at 2x, 3x, 4x: <= 5 % of refusals are `timeout`; p99 of served <= 0.8x the deadline; "
        "goodput >= 0.9x the closed-loop capacity; a refusal answers in < 50 ms.",
    ]
    write_section(args.section, "\n".join(lines) + "\n")
    print(f"wrote docs/BENCHMARKS.md ({args.section})")


if __name__ == "__main__":
    main()
