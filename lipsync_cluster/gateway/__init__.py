"""Browser gateway: a page + WebSocket that streams microphone audio through the cluster (see server.py).

The names below load on first use, so that the CLI registers ``gateway`` without aiohttp (the
'gateway' extra), which the command needs only when it runs.
"""
from __future__ import annotations

from typing import Any

__all__ = ["Gateway", "make_app", "pack_frame", "unpack_frame"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import server

    return getattr(server, name)
