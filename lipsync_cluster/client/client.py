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
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

import numpy as np
import zmq
import zmq.asyncio

from ..common.errors import LipsyncError, Unavailable, error_from_wire  # noqa: F401 - re-exported
from ..common.security import CurveKeys, client_keys_from_env
from .results import InferResult, infer_request, infer_result
from .transport import DEFAULT_RETRY, NOT_RUNNING_HINT, RetryPolicy, Transport

if TYPE_CHECKING:
    from .stream import AsyncStreamSession, StreamSession

DEFAULT_ENDPOINT = os.environ.get("LIPSYNC_BROKER", "tcp://127.0.0.1:5555")


def _raise_for(header: dict) -> dict:
    if not header.get("ok", False):
        raise error_from_wire(header.get("error"))
    return header


class _Call(NamedTuple):
    """One op's request (header, payload frames, reply timeout) and how its reply is read."""

    header: dict
    payloads: list
    timeout: Optional[float]
    parse: Callable[[dict, list], Any]


def _header(header: dict, payloads: list) -> dict:  # noqa: ARG001 - the reply parser shape
    return header


class _BaseClient:
    """What both clients share: their settings, the transport, and every op's request and reply
    (as httpx's BaseClient does). :class:`Client` and :class:`AsyncClient` differ only in how they
    wait for a reply: on a future, or awaiting it."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = 30.0,
                 ctx: Optional[zmq.Context] = None, *, retry: Optional[RetryPolicy] = DEFAULT_RETRY,
                 curve: Optional[CurveKeys] = None) -> None:
        """``timeout``: seconds a request may take in all, retries included. ``retry``: resend
        policy (``None`` sends once; see transport.py). ``curve``: CurveZMQ keys; default from
        the environment (LIPSYNC_KEYS_DIR), else plain ZMTP for a loopback cluster."""
        self.endpoint = endpoint
        self.timeout = timeout
        # One transport for both (an I/O thread; futures, bridged into the event loop for
        # AsyncClient), so both get the same retries and deduplication. The I/O thread needs a
        # plain context: an asyncio one is shadowed.
        if ctx is None:
            ctx = zmq.Context.instance()
        elif isinstance(ctx, zmq.asyncio.Context):
            ctx = zmq.Context.shadow(ctx.underlying)
        self._ctx = ctx
        curve = curve if curve is not None else client_keys_from_env()
        self._transport = Transport(endpoint, self._ctx, retry=retry, curve=curve, timeout=timeout)

    def _no_reply(self, what: Any, timeout: float) -> Unavailable:
        return Unavailable(f"no reply to '{what}' from the broker at {self.endpoint} within {timeout:.1f}s; "
                           f"{NOT_RUNNING_HINT}")

    # --- the ops' requests and replies ---------------------------------------------------

    def _infer(self, model_id: str, *, start_frame_idx: int, batch_size: Optional[int],
               audio_features: Optional[np.ndarray], audio_pcm: Optional[np.ndarray],
               audio_frame_offset: Optional[int], visual_frames: Optional[np.ndarray], format: str,
               quality: Optional[int], deadline_ms: Optional[float]) -> _Call:
        header, payloads = infer_request(
            model_id, start_frame_idx=start_frame_idx, batch_size=batch_size, audio_features=audio_features,
            audio_pcm=audio_pcm, audio_frame_offset=audio_frame_offset, visual_frames=visual_frames,
            format=format, quality=quality, deadline_ms=deadline_ms)
        timeout = self.timeout if deadline_ms is None else max(self.timeout, deadline_ms / 1000 + 1)
        return _Call(header, payloads, timeout, infer_result)

    @staticmethod
    def _list_models() -> _Call:
        return _Call({"op": "list_models"}, [], None, lambda header, _: header["models"])

    @staticmethod
    def _load_model(model_id: str, force_reload: bool, worker: Optional[str], gpu: Optional[int]) -> _Call:
        header: dict = {"op": "load_model", "model_id": model_id, "force_reload": force_reload}
        if worker is not None:
            header["worker"] = worker
        if gpu is not None:
            header["gpu"] = gpu
        return _Call(header, [], None, _header)

    @staticmethod
    def _unload_model(model_id: str) -> _Call:
        return _Call({"op": "unload_model", "model_id": model_id}, [], None, _header)

    @staticmethod
    def _model_stats(model_id: Optional[str]) -> _Call:
        header: dict = {"op": "model_stats"}
        if model_id is not None:
            header["model_id"] = model_id
        return _Call(header, [], None, _header)

    @staticmethod
    def _health() -> _Call:
        return _Call({"op": "health"}, [], None, _header)


class Client(_BaseClient):
    """Blocking client of a lipsync-cluster broker. Thread-safe; close it (or use ``with``)."""

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
            raise self._no_reply(what, timeout) from None
        return _raise_for(header), payloads

    def _run(self, call: _Call) -> Any:
        return call.parse(*self.request(call.header, call.payloads, call.timeout))

    # --- ops --------------------------------------------------------------------------------

    def infer(self, model_id: str, *, start_frame_idx: int = 0, batch_size: Optional[int] = None,
              audio_features: Optional[np.ndarray] = None, audio_pcm: Optional[np.ndarray] = None,
              audio_frame_offset: Optional[int] = None, visual_frames: Optional[np.ndarray] = None,
              format: str = "png", quality: Optional[int] = None,
              deadline_ms: Optional[float] = None) -> InferResult:
        return self._run(self._infer(
            model_id, start_frame_idx=start_frame_idx, batch_size=batch_size, audio_features=audio_features,
            audio_pcm=audio_pcm, audio_frame_offset=audio_frame_offset, visual_frames=visual_frames,
            format=format, quality=quality, deadline_ms=deadline_ms))

    def list_models(self) -> list[dict]:
        return self._run(self._list_models())

    def load_model(self, model_id: str, force_reload: bool = False, *, worker: Optional[str] = None,
                   gpu: Optional[int] = None) -> dict:
        return self._run(self._load_model(model_id, force_reload, worker, gpu))

    def unload_model(self, model_id: str) -> dict:
        return self._run(self._unload_model(model_id))

    def model_stats(self, model_id: Optional[str] = None) -> dict:
        return self._run(self._model_stats(model_id))

    def health(self) -> dict:
        return self._run(self._health())

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


class AsyncClient(_BaseClient):
    """The asyncio twin of :class:`Client`, for use inside one event loop."""

    async def request(self, header: dict, payloads: list = (), timeout: Optional[float] = None) -> tuple[dict, list]:
        timeout = self.timeout if timeout is None else timeout
        future = self._transport.submit(dict(header), list(payloads), timeout)
        try:
            reply, frames = await asyncio.wait_for(asyncio.wrap_future(future), timeout + 1.0)
        except asyncio.TimeoutError:
            future.cancel()
            raise self._no_reply(header.get("op", "request"), timeout) from None
        return _raise_for(reply), frames

    async def _run(self, call: _Call) -> Any:
        return call.parse(*await self.request(call.header, call.payloads, call.timeout))

    async def infer(self, model_id: str, *, start_frame_idx: int = 0, batch_size: Optional[int] = None,
                    audio_features: Optional[np.ndarray] = None, audio_pcm: Optional[np.ndarray] = None,
                    audio_frame_offset: Optional[int] = None, visual_frames: Optional[np.ndarray] = None,
                    format: str = "png", quality: Optional[int] = None,
                    deadline_ms: Optional[float] = None) -> InferResult:
        return await self._run(self._infer(
            model_id, start_frame_idx=start_frame_idx, batch_size=batch_size, audio_features=audio_features,
            audio_pcm=audio_pcm, audio_frame_offset=audio_frame_offset, visual_frames=visual_frames,
            format=format, quality=quality, deadline_ms=deadline_ms))

    async def list_models(self) -> list[dict]:
        return await self._run(self._list_models())

    async def load_model(self, model_id: str, force_reload: bool = False, *, worker: Optional[str] = None,
                         gpu: Optional[int] = None) -> dict:
        return await self._run(self._load_model(model_id, force_reload, worker, gpu))

    async def unload_model(self, model_id: str) -> dict:
        return await self._run(self._unload_model(model_id))

    async def model_stats(self, model_id: Optional[str] = None) -> dict:
        return await self._run(self._model_stats(model_id))

    async def health(self) -> dict:
        return await self._run(self._health())

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
