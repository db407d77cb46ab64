#!/usr/bin/env python3
"""How long ``make test-fast`` (the in-process tier) takes, as a user gets it: wall time of the make
command. The tier shares the machine's cores with whatever else runs, so each run also says how much
CPU time other processes used meanwhile, and the load average before it.

A first run after a clean clone compiles the package and rewrites the test modules' asserts in every
xdist worker; ``--cold`` measures that first: it removes the checkout's ``__pycache__`` folders
(not the virtualenv's) before the first run. Later runs find what the Makefile kept (``KEEP_PYC``).

    python bench/test_tiers.py --runs 3 --cold                      # prints only
    git worktree add --detach /tmp/base main && make -C /tmp/base venv
    python bench/test_tiers.py --cold --runs 3 --baseline /tmp/base --base-runs 2 --write
        # runs alternate (this checkout first); --write puts them in docs/BENCHMARKS.md "test-fast"
        # and this checkout's seconds per test file in tests/file_seconds.json (tests/file_order.py)
    python bench/test_tiers.py --jobs 3 --runs 2                    # another FAST_JOBS

Run it alone on the machine (e.g. under ``flock``): two test runs at once measure each other.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import git_head, machine, today, write_section  # noqa: E402

CACHE_DIRS = ("lipsync_cluster", "tests", "bench")


def clear_bytecode(tree: Path) -> int:
    """Remove the checkout's compiled modules (as a clean clone has none); the count removed."""
    removed = 0
    for top in CACHE_DIRS:
        for cache in (tree / top).rglob("__pycache__"):
            shutil.rmtree(cache, ignore_errors=True)
            removed += 1
    return removed


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (every process, all cores; /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_once(tree: Path, jobs: Optional[int], cold: bool) -> dict:
    if cold:
        clear_bytecode(tree)
    load = os.getloadavg()[0]
    cmd = ["make", "-C", str(tree), "--no-print-directory", "test-fast"] + ([f"FAST_JOBS={jobs}"] if jobs else [])
    busy0, own0 = busy_seconds(), children_seconds()
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    own = children_seconds() - own0
    others = max(0.0, busy_seconds() - busy0 - own)
    lines = [l for l in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed)", l)]
    summary = re.sub(r"=+", "", lines[-1]).strip() if lines else proc.stdout[-300:]
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
    return {"tree": tree, "cold": cold, "wall": wall, "load": load, "rc": proc.returncode, "summary": summary,
            "cpu": own, "others": others}


def describe(r: dict, label: str) -> str:
    first = "first run (no __pycache__)" if r["cold"] else "rerun"
    return (f"| {label} | {first} | {r['wall']:.1f} s | {r['cpu']:.0f} s | {r['others']:.1f} s | {r['load']:.2f} | "
            f"{'ok' if r['rc'] == 0 else 'FAILED'}: {r['summary']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="runs of this checkout")
    ap.add_argument("--cold", action="store_true", help="the first run of each checkout starts with no __pycache__")
    ap.add_argument("--jobs", type=int, default=None, help="FAST_JOBS (default: the Makefile's)")
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout (with its .venv), runs alternating")
    ap.add_argument("--base-runs", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="write docs/BENCHMARKS.md section 'test-fast'")
    args = ap.parse_args()

    plan: list[tuple[Path, bool]] = []
    for i in range(max(args.runs, args.base_runs if args.baseline else 0)):
        if i < args.runs:
            plan.append((REPO, args.cold and i == 0))
        if args.baseline and i < args.base_runs:
            plan.append((args.baseline.resolve(), args.cold and i == 0))
    rows = []
    for tree, cold in plan:
        r = run_once(tree, args.jobs, cold)
        label = "this checkout" if tree == REPO else f"baseline {git_head(tree)}"
        rows.append(describe(r, f"{label} ({git_head(tree)})" if tree == REPO else label))
        print(rows[-1], flush=True)
    jobs = f"FAST_JOBS={args.jobs}" if args.jobs else "the Makefile's FAST_JOBS"
    body = "\n".join([
        "## `make test-fast`: the in-process tier",
        "",
        f"{machine()}; {today()}. `python bench/test_tiers.py {' '.join(sys.argv[1:])}`: wall time of "
        f"`make test-fast` ({jobs}), runs in the order listed; load = the 1-minute load average just "
        "before the run; CPU = the run's own CPU time (user + system, all its processes); others = CPU "
        "time the rest of the machine used meanwhile (from /proc/stat: near 0 is a quiet machine). "
        + ("This machine sets PYTHONDONTWRITEBYTECODE, so a checkout whose Makefile does not keep compiled "
           "modules anyway (KEEP_PYC; main before issue 17) compiles them again on every run."
           if os.environ.get("PYTHONDONTWRITEBYTECODE") else ""),
        "",
        "| checkout | run | wall | CPU | others | load before | result |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])
    if args.write:
        write_section("test-fast", body + "\n")
        copy_file_seconds()


def copy_file_seconds() -> None:
    """This checkout's last seconds per test file (the pytest cache, tests/file_order.py) into
    tests/file_seconds.json, the order the next runs start the files in."""
    sys.path.insert(0, str(REPO / "tests"))
    import file_order

    cached = REPO / ".pytest_cache" / "v" / file_order.CACHE_KEY
    seconds = json.loads(cached.read_text())
    ordered = dict(sorted(seconds.items(), key=lambda kv: (-kv[1], kv[0])))
    file_order.SECONDS_FILE.write_text(json.dumps(ordered, indent=1) + "\n")


if __name__ == "__main__":
    main()
