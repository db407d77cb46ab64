"""``Client`` and ``AsyncClient``: the cluster from Python, in the words of the task.

    with Client("tcp://127.0.0.1:5555") as client:
        result = client.infer("demo_ada", audio_pcm=pcm, batch_size=5, format="jpeg")

Both speak to the broker's frontend over one DEALER socket and may have many requests in
flight (replies are matched by ``id``). ``Client`` is safe to share between threads: a
background I/O thread owns the socket and callers wait on futures. ``AsyncClient`` is for one
asyncio event loop. Errors raise the exception of the server's error code, with its message.
"""
from __future__ import annotations

import asyncio
import os
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import zmq
import zmq.asyncio

from ..common.errors import LipsyncError, Unavailable, error_from_wire  # noqa: F401 - re-exported
from ..common.security import CurveKeys, client_keys_from_env
from .results import InferResult, infer_request, infer_result
from .transport import DEFAULT_RETRY, RetryPolicy, Transport

if TYPE_CHECKING:
    from .stream import AsyncStreamSession, StreamSession

DEFAULT_ENDPOINT = os.environ.get("LIPSYNC_BROKER", "tcp://127.0.0.1:5555")


def _raise_for(header: dict) -> dict:
    if not header.get("ok", False):
        raise error_from_wire(header.get("error"))
    return header


# The socket, its I/O thread and the retry policy live in transport.py (shared by both clients).
_Transport = Transport


class Client:
    """Blocking client of a lipsync-cluster broker. Thread-safe; close it (or use ``with``)."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = 30.0,
                 ctx: Optional[zmq.Context] = None, *, retry: Optional[RetryPolicy] = DEFAULT_RETRY,
                 curve: Optional[CurveKeys] = None) -> None:
        """``timeout``: seconds a request may take in all, retries included. ``retry``: resend
        policy (``None`` sends once; see transport.py). ``curve``: CurveZMQ keys; default from
        the environment (LIPSYNC_KEYS_DIR), else plain ZMTP for a loopback cluster."""
        self.endpoint = endpoint
        self.timeout = timeout
        self._ctx = ctx or zmq.Context.instance()
        curve = curve if curve is not None else client_keys_from_env()
        self._transport = _Transport(endpoint, self._ctx, retry=retry, curve=curve, timeout=timeout)

    # --- plumbing ---------------------------------------------------------------------------

    def request(self, header: dict, payloads: list = (), timeout: Optional[float] = None) -> tuple[dict, list]:
        """Send one request and wait for its reply; raises the server's error as an exception."""
        future = self.submit(header, list(payloads), timeout)
        return self.wait(future, header.get("op", "request"), timeout)

    def submit(self, header: dict, payloads: list = (), timeout: Optional[float] = None) -> Future:
        """Send without waiting; the future resolves to ``(header, payload frames)``, or fails with
        :class:`Unavailable` when no reply came within ``timeout`` (default: the client's)."""
        return self._transport.submit(dict(header), list(payloads), timeout)

    def wait(self, future: Future, what: str = "request", timeout: Optional[float] = None) -> tuple[dict, list]:
        timeout = self.timeout if timeout is None else timeout
        try:
            header, payloads = future.result(timeout=timeout)
        except TimeoutError:
            future.cancel()
            raise Unavailable(f"no reply to '{what}' from the broker at {self.endpoint} within {timeout:.1f}s; "
                              "is the cluster running? (lipsync-cluster health)") from None
        return _raise_for(header), payloads

    # --- ops --------------------------------------------------------------------------------

    def infer(self, model_id: str, *, start_frame_idx: int = 0, batch_size: Optional[int] = None,
              audio_features: Optional[np.ndarray] = None, audio_pcm: Optional[np.ndarray] = None,
              audio_frame_offset: Optional[int] = None, visual_frames: Optional[np.ndarray] = None,
              format: str = "png", quality: Optional[int] = None,
              deadline_ms: Optional[float] = None) -> InferResult:
        header, payloads = infer_request(
            model_id, start_frame_idx=start_frame_idx, batch_size=batch_size, audio_features=audio_features,
            audio_pcm=audio_pcm, audio_frame_offset=audio_frame_offset, visual_frames=visual_frames,
            format=format, quality=quality, deadline_ms=deadline_ms)
        timeout = self.timeout if deadline_ms is None else max(self.timeout, deadline_ms / 1000 + 1)
        reply, frames = self.request(header, payloads, timeout)
        return infer_result(reply, frames)

    def list_models(self) -> list[dict]:
        return self.request({"op": "list_models"})[0]["models"]

    def load_model(self, model_id: str, force_reload: bool = False, *, worker: Optional[str] = None,
                   gpu: Optional[int] = None) -> dict:
        header: dict = {"op": "load_model", "model_id": model_id, "force_reload": force_reload}
        if worker is not None:
            header["worker"] = worker
        if gpu is not None:
            header["gpu"] = gpu
        return self.request(header)[0]

    def unload_model(self, model_id: str) -> dict:
        return self.request({"op": "unload_model", "model_id": model_id})[0]

    def model_stats(self, model_id: Optional[str] = None) -> dict:
        header: dict = {"op": "model_stats"}
        if model_id is not None:
            header["model_id"] = model_id
        return self.request(header)[0]

    def health(self) -> dict:
        return self.request({"op": "health"})[0]

    def stream(self, model_id: str, **options: Any) -> "StreamSession":
        """A real-time session: push audio, read frames in order (docs/STREAMING.md)."""
        from .stream import StreamSession

        return StreamSession(self, model_id, **options)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of :class:`Client`, for use inside one event loop."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = 30.0,
                 ctx: Optional[zmq.Context] = None, *, retry: Optional[RetryPolicy] = DEFAULT_RETRY,
                 curve: Optional[CurveKeys] = None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        # The same transport as Client (an I/O thread; futures bridged into the event loop), so
        # both get the same retries and deduplication. An asyncio context is shadowed.
        self._ctx = zmq.Context.shadow(ctx.underlying) if ctx is not None else zmq.Context.instance()
        curve = curve if curve is not None else client_keys_from_env()
        self._transport = Transport(endpoint, self._ctx, retry=retry, curve=curve, timeout=timeout)

    async def request(self, header: dict, payloads: list = (), timeout: Optional[float] = None) -> tuple[dict, list]:
        timeout = self.timeout if timeout is None else timeout
        header = dict(header)
        future = self._transport.submit(header, list(payloads), timeout)
        try:
            reply, frames = await asyncio.wait_for(asyncio.wrap_future(future), timeout + 1.0)
        except asyncio.TimeoutError:
            future.cancel()
            raise Unavailable(f"no reply to '{header.get('op')}' from the broker at {self.endpoint} "
                              f"within {timeout:.1f}s; is the cluster running?") from None
        return _raise_for(reply), frames

    async def infer(self, model_id: str, *, start_frame_idx: int = 0, batch_size: Optional[int] = None,
                    audio_features: Optional[np.ndarray] = None, audio_pcm: Optional[np.ndarray] = None,
                    audio_frame_offset: Optional[int] = None, visual_frames: Optional[np.ndarray] = None,
                    format: str = "png", quality: Optional[int] = None,
                    deadline_ms: Optional[float] = None) -> InferResult:
        header, payloads = infer_request(
            model_id, start_frame_idx=start_frame_idx, batch_size=batch_size, audio_features=audio_features,
            audio_pcm=audio_pcm, audio_frame_offset=audio_frame_offset, visual_frames=visual_frames,
            format=format, quality=quality, deadline_ms=deadline_ms)
        timeout = self.timeout if deadline_ms is None else max(self.timeout, deadline_ms / 1000 + 1)
        reply, frames = await self.request(header, payloads, timeout)
        return infer_result(reply, frames)

    async def list_models(self) -> list[dict]:
        return (await self.request({"op": "list_models"}))[0]["models"]

    async def load_model(self, model_id: str, force_reload: bool = False, *, worker: Optional[str] = None,
                         gpu: Optional[int] = None) -> dict:
        header: dict = {"op": "load_model", "model_id": model_id, "force_reload": force_reload}
        if worker is not None:
            header["worker"] = worker
        if gpu is not None:
            header["gpu"] = gpu
        return (await self.request(header))[0]

    async def unload_model(self, model_id: str) -> dict:
        return (await self.request({"op": "unload_model", "model_id": model_id}))[0]

    async def model_stats(self, model_id: Optional[str] = None) -> dict:
        header: dict = {"op": "model_stats"}
        if model_id is not None:
            header["model_id"] = model_id
        return (await self.request(header))[0]

    async def health(self) -> dict:
        return (await self.request({"op": "health"}))[0]

    def stream(self, model_id: str, **options: Any) -> "AsyncStreamSession":
        """The asyncio session: ``async with client.stream(model_id) as session: ...``."""
        from .stream import AsyncStreamSession

        return AsyncStreamSession(self, model_id, **options)

    async def close(self) -> None:
        self._transport.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()



