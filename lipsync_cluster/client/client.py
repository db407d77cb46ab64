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
import itertools
import os
import threading
import uuid
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import zmq
import zmq.asyncio

from ..common.errors import LipsyncError, Unavailable, error_from_wire
from ..common.protocol import decode, encode
from .results import InferResult, infer_request, infer_result

if TYPE_CHECKING:
    from .stream import AsyncStreamSession, StreamSession

DEFAULT_ENDPOINT = os.environ.get("LIPSYNC_BROKER", "tcp://127.0.0.1:5555")


def _raise_for(header: dict) -> dict:
    if not header.get("ok", False):
        raise error_from_wire(header.get("error"))
    return header


class _Transport:
    """A DEALER socket owned by one I/O thread; any thread may ``submit`` a request."""

    def __init__(self, endpoint: str, ctx: zmq.Context) -> None:
        self.endpoint = endpoint
        self._ctx = ctx
        self._ids = itertools.count(1)
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._wake_addr = f"inproc://lsc-client-{uuid.uuid4().hex}"
        self._inbox = ctx.socket(zmq.PULL)
        self._inbox.bind(self._wake_addr)
        self._outbox = ctx.socket(zmq.PUSH)
        self._outbox.connect(self._wake_addr)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="lipsync-client-io", daemon=True)
        self._thread.start()

    def submit(self, header: dict, payloads: list) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise Unavailable("the client is closed")
            request_id = next(self._ids)
            header["id"] = request_id
            self._pending[request_id] = future
            self._outbox.send_multipart(encode(header, payloads), copy=False)
        return future

    def forget(self, request_id: Any) -> None:
        with self._lock:
            self._pending.pop(request_id, None)

    def _run(self) -> None:
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(self._inbox, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if self._inbox in events:
                    frames = self._inbox.recv_multipart(copy=False)
                    if len(frames) == 1 and frames[0].bytes == b"STOP":
                        return
                    dealer.send_multipart(frames, copy=False)
                if dealer in events:
                    frames = dealer.recv_multipart(copy=False)
                    try:
                        header, payloads = decode(frames)
                    except LipsyncError:
                        continue  # not ours to answer; the waiter times out with a clear message
                    with self._lock:
                        future = self._pending.pop(header.get("id"), None)
                    if future is not None and not future.done():
                        future.set_result((header, payloads))
        finally:
            dealer.close(0)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._outbox.send(b"STOP")
        self._thread.join(timeout=5)
        self._outbox.close(0)
        self._inbox.close(0)
        with self._lock:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(Unavailable("the client was closed before the reply arrived"))
            self._pending.clear()


class Client:
    """Blocking client of a lipsync-cluster broker. Thread-safe; close it (or use ``with``)."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = 30.0,
                 ctx: Optional[zmq.Context] = None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._ctx = ctx or zmq.Context.instance()
        self._transport = _Transport(endpoint, self._ctx)

    # --- plumbing ---------------------------------------------------------------------------

    def request(self, header: dict, payloads: list = (), timeout: Optional[float] = None) -> tuple[dict, list]:
        """Send one request and wait for its reply; raises the server's error as an exception."""
        future = self.submit(header, list(payloads))
        return self.wait(future, header.get("op", "request"), timeout)

    def submit(self, header: dict, payloads: list = ()) -> Future:
        """Send without waiting; the future resolves to ``(header, payload frames)``."""
        return self._transport.submit(dict(header), list(payloads))

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
                 ctx: Optional[zmq.asyncio.Context] = None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._socket = self._ctx.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(endpoint)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._reader: Optional[asyncio.Task] = None

    async def _read(self) -> None:
        while True:
            frames = await self._socket.recv_multipart(copy=False)
            try:
                header, payloads = decode(frames)
            except LipsyncError:
                continue
            future = self._pending.pop(header.get("id"), None)
            if future is not None and not future.done():
                future.set_result((header, payloads))

    async def request(self, header: dict, payloads: list = (), timeout: Optional[float] = None) -> tuple[dict, list]:
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read())
        header = dict(header)
        request_id = next(self._ids)
        header["id"] = request_id
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        await self._socket.send_multipart(encode(header, list(payloads)), copy=False)
        timeout = self.timeout if timeout is None else timeout
        try:
            reply, frames = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            self._pending.pop(request_id, None)
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
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        for future in self._pending.values():
            if not future.done():
                future.set_exception(Unavailable("the client was closed before the reply arrived"))
        self._pending.clear()
        self._socket.close(0)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()



