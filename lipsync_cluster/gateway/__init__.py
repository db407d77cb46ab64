"""Browser gateway: a page + WebSocket that streams microphone audio through the cluster (see server.py)."""
from .server import Gateway, make_app, pack_frame, unpack_frame

__all__ = ["Gateway", "make_app", "pack_frame", "unpack_frame"]
