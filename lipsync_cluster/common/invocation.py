"""Commands to print for a user to paste: they name this very interpreter and its entry point.

A banner that says ``lipsync-cluster models`` fails when the venv is not activated (the command
is not on PATH, and the system ``python`` has no zmq). These give the path of the running
interpreter's own ``lipsync-cluster`` script (relative to the current folder when under it, e.g.
``.venv/bin/lipsync-cluster``), so what is printed works as pasted.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path


def _shown(path: str | os.PathLike) -> str:
    """``path`` relative to the current folder when it lies under it, else absolute; shell-quoted."""
    absolute = os.path.abspath(path)
    try:
        relative = os.path.relpath(absolute)
    except ValueError:  # another drive (Windows)
        relative = absolute
    shown = relative if not relative.startswith("..") else absolute
    if os.sep not in shown:  # a bare name would be looked up on PATH
        shown = os.path.join(".", shown)
    return shlex.quote(shown)


def python_command() -> str:
    """The running interpreter, as a command to paste (e.g. ``.venv/bin/python``)."""
    return _shown(sys.executable)


def cli_command() -> str:
    """``lipsync-cluster`` as a command to paste: the script installed beside this interpreter,
    else ``PYTHON -m lipsync_cluster.cli`` (which needs no script on PATH)."""
    script = Path(sys.executable).parent / ("lipsync-cluster.exe" if os.name == "nt" else "lipsync-cluster")
    if script.is_file() and os.access(script, os.X_OK):
        return _shown(script)
    return f"{python_command()} -m lipsync_cluster.cli"
