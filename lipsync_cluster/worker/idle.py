"""Idle frames without inference: a silent batch's UNet output depends only on its background frame.

*Silent* (precisely): every sample of the request's ``audio_pcm`` has ``|x| < SILENCE_THRESHOLD``.
The threshold is the largest amplitude whose log-mel is guaranteed to sit at the mel floor in
every bin: a mel value is at most ``(1 + 0.97) * sum(hann) * max_filter_sum * A`` (pre-emphasis,
window, filterbank, all non-negative), and that is below the floor ``1e-5`` for
``A < SILENCE_THRESHOLD`` (about 2.4e-7, far below one int16 step: int16 PCM is silent when every
sample is 0). So every mel value of a silent span equals digital silence's, the audio encoder sees
the same input for every frame, and the UNet's audio window is the same for every frame of every
silent batch: its output is a function of (model, version, background frame) only.

:class:`IdleCache` keeps that output per (model id, version, background index) as the uint8 planes
the paste-back makes of it (``trunc(out * 255)``, 300 KB per frame instead of 1.2 MB of float32)
and hands back ``(q + 0.5) / 255`` as float32, which the paste-back turns into exactly ``q`` again
(the product is within 1e-4 of ``q + 0.5``, far from an integer), so a cached frame is composited
bit-identically to the UNet output it came from. A listening avatar then costs composite + encode.

It also keeps the finished frame of a silent background (per format and quality; not ``raw``):
the same UNet output on the same background composites and encodes to the same bytes, so once a
model's ping-pong cycle has been seen in silence, a listening avatar costs a lookup. Both kinds
share one byte budget (least recently used out first).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Optional

import numpy as np

from ..common import audio

DEFAULT_MAX_BYTES = 96 << 20  # ~320 frames of 320x320x3


def _silence_threshold() -> float:
    window_sum = float(np.sum(audio._hann()))
    max_filter_sum = float(audio.mel_filterbank().sum(axis=1).max())
    bound = audio._AMP_FLOOR / ((1.0 + audio.PREEMPHASIS) * window_sum * max_filter_sum)
    return bound * 0.5  # margin for float rounding in the STFT


SILENCE_THRESHOLD = _silence_threshold()


def is_silent(pcm: Optional[np.ndarray]) -> bool:
    """True when every sample of ``pcm`` (float in [-1, 1] or int16) is below SILENCE_THRESHOLD."""
    if pcm is None or pcm.size == 0:
        return False
    if pcm.dtype == np.int16:
        return not pcm.any()
    return float(np.max(np.abs(pcm))) < SILENCE_THRESHOLD


class BytesLRU:
    """A thread-safe LRU of values bounded by their total bytes, clearable by the worker's budget
    (``WorkerMemory.add_cache``: ``bytes`` and ``clear()``)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, tuple] = OrderedDict()  # key -> (value, bytes)
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple):
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: tuple, value, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (value, nbytes)
            self._bytes += nbytes
            while self._bytes > self.max_bytes:
                _, (_, gone) = self._entries.popitem(last=False)
                self._bytes -= gone

    def clear(self) -> int:
        """Drop every entry (the worker's budget needs the room for a model); the bytes freed."""
        with self._lock:
            freed = self._bytes
            self._entries.clear()
            self._bytes = 0
        return freed


class IdleCache(BytesLRU):
    """UNet outputs of silent frames per (model id, version, background index), LRU-bounded."""

    def outputs(self, key: tuple, backgrounds: np.ndarray,
                compute: Callable[[list[int]], np.ndarray]) -> tuple[np.ndarray, int]:
        """UNet outputs ``[B,3,320,320]`` float32 for ``backgrounds`` of model ``key`` = (id, version).

        Frames not cached are computed with ``compute(positions)`` (the UNet on those positions
        of the batch, with the silent audio window) and stored. Returns (outputs, frames served
        from the cache).
        """
        planes: list[Optional[np.ndarray]] = []
        for b in backgrounds:
            planes.append(self.get((*key, int(b))))
        missing = [i for i, q in enumerate(planes) if q is None]
        hits = len(planes) - len(missing)
        if missing:
            out = compute(missing)
            for j, i in enumerate(missing):
                scaled = np.multiply(out[j], np.float32(255), dtype=np.float32)
                np.clip(scaled, 0, 255, out=scaled)
                q = scaled.astype(np.uint8)
                planes[i] = q
                self.put((*key, int(backgrounds[i])), q, q.nbytes)
        with self._lock:
            self.hits += hits
            self.misses += len(missing)
        stacked = np.stack(planes).astype(np.float32)
        stacked += np.float32(0.5)
        stacked /= np.float32(255)
        return stacked, hits

    def encoded(self, key: tuple, backgrounds: np.ndarray, fmt: str, quality) -> Optional[list]:
        """The finished frames (bytes) of ``backgrounds`` in ``fmt``/``quality``, or None unless all are here."""
        out = []
        for b in backgrounds:
            data = self.get(("frame", *key, int(b), fmt, quality))
            if data is None:
                return None
            out.append(data)
        with self._lock:
            self.hits += len(out)
        return out

    def keep_encoded(self, key: tuple, backgrounds: np.ndarray, fmt: str, quality, frames: list) -> None:
        for b, data in zip(backgrounds, frames):
            self.put(("frame", *key, int(b), fmt, quality), bytes(data), len(data))

    def stats(self) -> dict:
        with self._lock:
            return {"idle_cache_frames": len(self._entries), "idle_cache_bytes": self._bytes,
                    "idle_cache_hits": self.hits, "idle_cache_misses": self.misses}
