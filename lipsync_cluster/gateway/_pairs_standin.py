"""A minimal stand-in for the pairing core (client/av.py, written on another branch): frames of an
AsyncStreamSession with exactly their 40 ms of the pushed audio. Replaced when that lands."""
from __future__ import annotations

from collections import deque
from typing import Any, Optional

import numpy as np

from ..common.audio import SAMPLES_PER_FRAME


class AVPairs:
    def __init__(self, session: Any, sample_rate: int = 48000) -> None:
        self.session = session
        self.rate = sample_rate
        self.per_frame = sample_rate // 25
        self.audio = np.zeros(0, np.int16)  # 16 kHz samples from frame `base` on
        self.base = 0
        self.pending: deque = deque()

    def push(self, pcm: np.ndarray) -> None:
        pcm = np.asarray(pcm)
        if pcm.dtype != np.int16:
            pcm = np.round(np.clip(pcm, -1, 1) * 32767).astype(np.int16)
        before = self.session.stats()["samples"]
        self.session.push(pcm)
        # the session's own clock of samples (listening silence included) places this chunk
        start = before - self.base * SAMPLES_PER_FRAME
        need = start + pcm.size
        if self.audio.size < need:
            self.audio = np.concatenate([self.audio, np.zeros(need - self.audio.size, np.int16)])
        self.audio[start:need] = pcm

    def interrupt(self, at_frame: Optional[int] = None) -> int:
        core = self.session._core
        if at_frame is None:  # the cut is the next frame not yet shown (not the next one made)
            at_frame = core.delivered - len(core.ready) - len(self.pending)
        cut = self.session.interrupt(at_frame)
        keep = max(0, (cut - self.base) * SAMPLES_PER_FRAME)
        self.audio = self.audio[:keep]
        self.pending = deque(p for p in self.pending if p[0] < cut)
        return cut

    def switch(self, model_id: str, at_frame: Optional[int] = None) -> int:
        return self.session.switch(model_id, at_frame)

    def set_listening(self, on: bool = True) -> None:
        self.session.set_listening(on)

    def stats(self) -> dict:
        return self.session.stats()

    def close(self) -> None:
        self.session.close()

    def check(self) -> None:
        err = self.session._core.error
        if err is not None:
            raise err

    @property
    def backlog_frames(self) -> int:
        return self.session.backlog_frames

    @property
    def waiting(self) -> int:
        return len(self.pending)

    def poll(self) -> Optional[tuple]:
        core = self.session._core
        if not self.pending and core.ready:  # one at a time: what is not shown yet can still be cut
            self.pending.append(core.ready.popleft())
            self.session._pump()
        if not self.pending:
            return None
        frame = self.pending.popleft()
        k = frame.index
        a = (k - self.base) * SAMPLES_PER_FRAME
        chunk = self.audio[a:a + SAMPLES_PER_FRAME] if a >= 0 else np.zeros(0, np.int16)
        if chunk.size < SAMPLES_PER_FRAME:
            chunk = np.concatenate([chunk, np.zeros(SAMPLES_PER_FRAME - chunk.size, np.int16)])
        drop = max(0, k + 1 - self.base)
        self.audio = self.audio[drop * SAMPLES_PER_FRAME:]
        self.base += drop
        return k, frame, np.repeat(chunk, self.rate // 16000)
