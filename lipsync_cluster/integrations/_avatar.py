"""What the integrations share: opening the cluster session for a caller's audio format, and RGB images."""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..client import AsyncClient
from ..client.av import AsyncAVSession
from ..client.stream import IDLE_GRACE_S, AsyncStreamSession, StreamFrame
from ..common.errors import BadRequest

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
# Conversation defaults (docs/STREAMING.md, "Lookahead"): p50 about 180-190 ms at lookahead 4, batch 2.
DEFAULT_SESSION = {"lookahead_frames": 4, "batch_size": 2, "format": "raw"}


class AvatarStream:
    """A cluster client (given or opened here), an :class:`AsyncStreamSession` and its :class:`AsyncAVSession`.

    ``session_options`` go to the stream session (``lookahead_frames``, ``batch_size``, ``format``
    raw/jpeg/png, ``quality``, ``max_in_flight`` ...); the default asks for raw frames, which need no
    decoder on this side (jpeg and png are decoded with Pillow or OpenCV, whichever is installed).
    """

    def __init__(self, model_id: str, sample_rate: int, *, channels: int = 1, endpoint: str = DEFAULT_ENDPOINT,
                 client: Optional[AsyncClient] = None, session_options: Optional[dict] = None,
                 client_options: Optional[dict] = None, listening: bool = True,
                 idle_grace_s: float = IDLE_GRACE_S) -> None:
        options = {**DEFAULT_SESSION, **(session_options or {})}
        if options.get("format") == "patch":
            raise BadRequest("format 'patch' carries the face only; the integrations need whole frames "
                             "(raw, jpeg or png)", field="format")
        self._own_client = client is None
        self.client = client if client is not None else AsyncClient(endpoint, **(client_options or {}))
        self.session = AsyncStreamSession(self.client, model_id, **options)
        self.av = AsyncAVSession(self.session, sample_rate, channels=channels, listening=listening,
                                 idle_grace_s=idle_grace_s)

    async def aclose(self) -> None:
        await self.av.cancel()
        if self._own_client:
            await self.client.close()


def rgb(frame: StreamFrame) -> np.ndarray:
    """The frame as an RGB uint8 array [h, w, 3] (raw frames are BGR arrays; jpeg/png are decoded)."""
    if isinstance(frame.image, np.ndarray):
        return np.ascontiguousarray(frame.image[:, :, ::-1])
    try:
        import io

        from PIL import Image
    except ModuleNotFoundError:  # no Pillow: OpenCV (the 'tools' extra) or a clear MissingExtra
        return np.ascontiguousarray(frame.decode()[:, :, ::-1])
    with Image.open(io.BytesIO(frame.image)) as im:
        return np.asarray(im.convert("RGB"))


def pcm_int16(data: bytes, channels: int, what: str) -> np.ndarray:
    """Little-endian int16 PCM bytes (Pipecat's and LiveKit's audio) as [n, channels]."""
    if len(data) % (2 * channels):
        raise BadRequest(f"{what}: {len(data)} bytes is not a whole number of {channels}-channel int16 samples",
                         field="audio")
    return np.frombuffer(data, "<i2").reshape(-1, channels)
