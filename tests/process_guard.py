"""Keeps the test tiers honest: a test that starts a process must carry the `processes` marker.

`make test-fast` runs ``-m "not processes"`` (the in-process tier). A test that starts a process
but carries no marker would slow that tier down, or fail on a machine that cannot start it, so
conftest fails it, naming what it started. Three signals, none of which patches anything:

- Python's audit events for process creation (``subprocess.Popen``, ``os.fork``, ``os.posix_spawn``,
  ``os.system``, ...) raised from any thread while the test runs;
- descendants of this process alive after the test's call that were not there before its setup
  (psutil): catches what no audit event names, e.g. multiprocessing's forkserver/spawn helpers;
- children reaped meanwhile by this process or any descendant that existed before (``cminflt`` in
  /proc/<pid>/stat rises whenever a waited-for child had run): catches a short-lived process that
  was started and finished without an audit event, e.g. a worker of a process pool.

The window is the test's setup and call (not its teardown: stopping a module's cluster at the last
test of a module reaps children the module's earlier tests started).
"""
from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Optional

import psutil

MARKER = "processes"
MARKER_HELP = "processes: starts processes or servers (the slow tier)"

# Audit events that create a process (https://docs.python.org/3/library/audit_events.html).
# os.exec* replaces this process rather than adding one, so it is not here.
SPAWN_EVENTS = frozenset({"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
                          "os.system", "os.startfile", "pty.spawn"})

_lock = threading.Lock()
_recording: Optional[list[str]] = None  # the spawn events seen while a test's window is open


def _audit(event: str, args: tuple) -> None:
    # Runs on every audit event in every thread: return at once unless it is a spawn while recording.
    if event not in SPAWN_EVENTS:
        return
    with _lock:
        if _recording is not None:
            what = args[1] if event == "subprocess.Popen" and len(args) > 1 else args[:1]
            _recording.append(f"{event} {what!r}"[:200])


_installed = False


def install() -> None:
    """Adds the audit hook once per interpreter (audit hooks cannot be removed)."""
    global _installed
    if not _installed:
        sys.addaudithook(_audit)
        _installed = True


def _reaped_faults(pid: int) -> Optional[int]:
    """Page faults of the waited-for children of ``pid`` (cminflt), None where unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat.rsplit(b")", 1)[1].split()
    return int(fields[8])  # field 11 of proc(5), counted from field 3 (state)


def _tree() -> dict[int, str]:
    me = psutil.Process()
    out = {}
    for p in me.children(recursive=True):
        try:
            out[p.pid] = " ".join(p.cmdline())[:160] or p.name()
        except psutil.Error:
            out[p.pid] = "?"
    return out


@dataclass
class Window:
    """What a test's process tree looked like when its setup began."""

    children: dict[int, str]
    reaped: dict[int, Optional[int]]
    events: list[str] = field(default_factory=list)


def open_window() -> Window:
    global _recording
    children = _tree()
    reaped = {pid: _reaped_faults(pid) for pid in [os.getpid(), *children]}
    window = Window(children, reaped)
    with _lock:
        _recording = window.events
    return window


def close_window(window: Window) -> list[str]:
    """What the test started since ``open_window``: empty when it started nothing."""
    global _recording
    with _lock:
        _recording = None
    found = list(window.events)
    new = {pid: cmd for pid, cmd in _tree().items() if pid not in window.children}
    found += [f"process {pid} still running: {cmd}" for pid, cmd in sorted(new.items())]
    for pid, before in window.reaped.items():
        after = _reaped_faults(pid)
        if before is not None and after is not None and after > before:
            who = "this test process" if pid == os.getpid() else f"process {pid} ({window.children[pid]})"
            found.append(f"{who} reaped a child that ran during the test")
    return found


def verdict(nodeid: str, found: list[str]) -> str:
    shown = "\n  ".join(found[:8]) + (f"\n  ... and {len(found) - 8} more" if len(found) > 8 else "")
    return (f"{nodeid} started processes but carries no `{MARKER}` marker, so `make test-fast` "
            f"(-m 'not {MARKER}') would run it. Mark it (pytestmark = pytest.mark.{MARKER} in the module, "
            f"or @pytest.mark.{MARKER} on the test), or keep it in-process. What it started:\n  {shown}")
