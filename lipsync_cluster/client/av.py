"""Paired audio and video: each frame of a stream together with exactly its 40 ms of the caller's audio.

Voice-agent stacks (Pipecat, LiveKit Agents, WebRTC) hand the avatar TTS audio at their own rate
(often 24 or 48 kHz) and must play it back in step with the frames. ``AsyncAVSession`` (asyncio)
and ``AVSession`` (threads) wrap a :class:`~lipsync_cluster.client.stream.AsyncStreamSession` /
:class:`~lipsync_cluster.client.stream.StreamSession` and yield :class:`AVFrame` items::

    async with AsyncClient(endpoint) as client:
        av = AsyncAVSession(AsyncStreamSession(client, "demo_ada", lookahead_frames=4), sample_rate=24000)
        av.push(tts_pcm_int16)            # the caller's samples, any chunk size
        av.end_segment()                  # end of an utterance: the frame that plays its last sample says so
        av.interrupt()                    # barge-in: frames not yet read and audio not yet turned into frames go
        async for item in av.frames():    # index, pts, frame (StreamFrame), audio (the caller's samples) ...
            show(item.frame.decode()); play(item.audio)

The rules (what makes it exact):

* One timeline at the caller's rate ``R``. Frame ``k`` plays samples ``[k*R//25, (k+1)*R//25)`` of it
  (integer arithmetic, so a rate that is not a multiple of 25 carries its remainder and never drifts).
  Those are the caller's own samples (dtype and channels kept); the model gets them resampled to
  16 kHz mono, once, as they arrive.
* Resampling is a causal windowed-sinc filter in numpy: 16 kHz sample ``j`` is read at caller time
  ``j/16000 - delay`` (delay = half the filter, 0.5 ms at 24/48 kHz), so everything the caller has
  pushed is turned into 16 kHz at once (no sample is held back for later) and after ``k*R/25`` caller
  samples the stream has exactly ``640*k`` (the frame grid of both timelines is the same).
* Listening (on by default): when no audio comes, silence is appended to the caller's timeline in
  whole frames once its end is ``idle_grace_s`` behind the wall clock, keeping the end at the wall
  clock (and the push that ends a pause first gets the rest of it): a real-time caller's pauses keep
  their length, so a player at 25 fps never runs out of frames; it is resampled like speech, so the
  workers serve it from their idle cache and both timelines hold it at the same place. The stream's own
  ``set_listening`` must stay off: silence made there would exist on the 16 kHz timeline only.
* ``interrupt()`` cuts at the first frame not yet read (frames made but unread are dropped too, as
  barge-in wants); both timelines are cut at that frame's start and go on from there.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator, Optional

import numpy as np

from ..common.audio import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, to_float_pcm
from ..common.errors import BadRequest, InternalError, RequestTimeout
from .stream import IDLE_GRACE_S, IDLE_TICK_S, ListeningClock, StreamFrame, idle_grace_property

MIN_RATE, MAX_RATE = 8000, 192000
MAX_CHANNELS = 8
ZERO_CROSSINGS = 8  # half the resampling filter, in zero crossings of its sinc (8: about -80 dB with Kaiser 8.6)
KAISER_BETA = 8.6
PASSBAND = 0.95  # the filter's cutoff as a fraction of the lower Nyquist (7.6 kHz at 16 kHz: the mel's top)


@dataclass
class AVFrame:
    """One frame and exactly its audio."""

    index: int  # the stream's frame index (continuous across interrupts)
    pts: float  # seconds: index / 25
    frame: StreamFrame  # the image (``frame.decode()`` -> BGR array), model, worker, latency
    audio: np.ndarray  # the caller's samples of this frame: [n] (mono) or [n, channels], the caller's dtype
    sample_rate: int
    sample_offset: int  # the audio's first sample on the caller's timeline: index * rate // 25 (audio pts)
    speech: bool  # holds pushed audio (False: listening silence or the zero padding after close())
    segment_ends: int  # end_segment() marks whose last sample is in this frame (usually 0 or 1)

    def decode(self) -> np.ndarray:
        return self.frame.decode()

    @property
    def num_samples(self) -> int:
        return int(self.audio.shape[0])


def frame_boundary(k: int, rate: int) -> int:
    """First caller sample of frame ``k`` at ``rate`` Hz: ``k*rate//25`` (exact, no drift)."""
    return k * rate // FPS


class Resampler:
    """Causal windowed-sinc resampling of one timeline from ``rate`` to 16 kHz, in segments.

    A segment starts at (caller sample ``a_in``, 16 kHz sample ``a_out``); its 16 kHz sample ``j``
    is the filter read at caller time ``a_in + (j - a_out) * rate / 16000 - delay``, from samples up
    to that time only. The weights repeat with the fractional position, whose period is
    ``16000 / gcd(rate, 16000)`` outputs: they are tabulated once.
    """

    def __init__(self, rate: int) -> None:
        self.rate = rate
        if rate == SAMPLE_RATE:
            self.taps, self.delay, self._period = 1, 0.0, 1
            self._table = np.ones((1, 1), np.float64)
            return
        fc = PASSBAND * 0.5 * min(rate, SAMPLE_RATE) / rate  # cycles per caller sample
        half = ZERO_CROSSINGS / (2 * fc)  # caller samples
        self.delay = half
        self.taps = int(math.ceil(2 * half)) + 1
        self._period = SAMPLE_RATE // math.gcd(rate, SAMPLE_RATE)
        frac = (np.arange(self._period, dtype=np.int64) * rate % SAMPLE_RATE) / SAMPLE_RATE
        # tap m reads caller sample floor(t) - m; its distance from the filter's centre t - delay:
        d = frac[:, None] - half + np.arange(self.taps)[None, :]
        inside = np.abs(d) <= half
        w = np.where(inside, np.i0(KAISER_BETA * np.sqrt(np.clip(1 - (d / half) ** 2, 0, 1))) / np.i0(KAISER_BETA), 0)
        h = 2 * fc * np.sinc(2 * fc * d) * w
        self._table = h / h.sum(axis=1, keepdims=True)  # unit gain at DC for every phase

    def outputs_for(self, caller_samples: int) -> int:
        """16 kHz samples a segment has once ``caller_samples`` of it are in: ceil(n * 16000 / rate)."""
        return -(-caller_samples * SAMPLE_RATE // self.rate)

    def run(self, mono: Callable[[np.ndarray], np.ndarray], a_in: int, j0: int, j1: int) -> np.ndarray:
        """16 kHz samples ``j0 .. j1-1`` of a segment (relative to its start) starting at caller ``a_in``.

        ``mono(idx)``: the caller's timeline (float32 mono) at absolute positions ``idx`` (zeros before 0).
        """
        j = np.arange(j0, j1, dtype=np.int64)
        if self.rate == SAMPLE_RATE:
            return mono(a_in + j).astype(np.float32)
        base = a_in + (j * self.rate) // SAMPLE_RATE
        idx = base[:, None] - np.arange(self.taps)[None, :]
        y = np.einsum("ij,ij->i", mono(idx).astype(np.float64), self._table[j % self._period])
        return np.clip(y, -1.0, 1.0).astype(np.float32)


class AVCore:
    """The pairing logic without I/O: the caller's timeline, its 16 kHz copy, marks, cuts.

    ``push`` returns the 16 kHz samples to push into the stream; ``pair(frame)`` returns the
    :class:`AVFrame`; ``cut(c)`` follows an interrupt of the stream at frame ``c``.
    """

    def __init__(self, sample_rate: int, *, channels: int = 1, dtype: Any = np.int16,
                 idle_grace_s: float = IDLE_GRACE_S, listening: bool = True, idle_ahead_frames: int = 40,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) \
                or not MIN_RATE <= sample_rate <= MAX_RATE:
            raise BadRequest(f"sample_rate must be an integer in {MIN_RATE}..{MAX_RATE} Hz; got {sample_rate!r}",
                             field="sample_rate")
        if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) \
                or not 1 <= channels <= MAX_CHANNELS:
            raise BadRequest(f"channels must be an integer in 1..{MAX_CHANNELS}; got {channels!r}", field="channels")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.int16), np.dtype(np.float32)):
            raise BadRequest(f"dtype must be int16 or float32; got {self.dtype}", field="dtype")
        self.rate = int(sample_rate)
        self.channels = int(channels)
        self.clock = clock
        self.resampler = Resampler(self.rate)
        # the caller's timeline: samples [base, n) in orig[:n-base] (the caller's dtype) and mono (float32)
        self._orig = np.zeros((self.rate * 2, self.channels), self.dtype)
        self._mono = np.zeros(self.rate * 2, np.float32)
        self._base = 0
        self.n = 0
        self.n16 = 0  # 16 kHz samples pushed into the stream
        self._seg = (0, 0)  # the resampler's segment start: (caller sample, 16 kHz sample)
        self.closed = False
        self.next_index = 0  # the next frame to pair
        self._idle: list[list[int]] = []  # [a, z) caller ranges of silence this core made (merged)
        self.marks: list[int] = []  # end_segment() positions not yet paired
        self.listening = bool(listening)
        # where the listening silence goes: the wall clock, held on the caller's timeline
        self._wall = ListeningClock(self.rate, float(idle_grace_s), clock())
        self.last_push_t = self._wall.ref[0]  # diagnostics: when audio was last pushed
        self.idle_samples = 0
        # Listening silence never runs more than this many frames ahead of the reader: a reader slower
        # than real time must not pile up silence that a new utterance would then queue behind.
        self.idle_ahead_frames = int(idle_ahead_frames)
        self.cuts: list[dict] = []

    idle_grace_s = idle_grace_property

    # --- input ----------------------------------------------------------------------------------

    def _as_caller(self, pcm: Any) -> np.ndarray:
        """``pcm`` as [n, channels] in the caller's dtype ([n], or 1-D interleaved for channels > 1)."""
        x = np.asarray(pcm)
        if x.ndim == 1:
            if x.size % self.channels:
                raise BadRequest(f"audio has {x.size} samples, not a multiple of channels={self.channels}",
                                 field="audio")
            x = x.reshape(-1, self.channels)
        if x.ndim != 2 or x.shape[1] != self.channels:
            raise BadRequest(f"audio must be [n] or [n, {self.channels}] samples; got shape {list(x.shape)}",
                             field="audio")
        if x.dtype == np.int16:
            return x if self.dtype == np.int16 else x.astype(np.float32) * np.float32(1 / 32768)
        if x.dtype not in (np.float32, np.float64):
            raise BadRequest(f"audio must be int16, float32 or float64; got dtype {x.dtype}", field="audio")
        f = to_float_pcm(x.reshape(-1), "audio").reshape(x.shape)  # finite and in [-1, 1], or a clear error
        return f if self.dtype == np.float32 else np.round(f * 32767).astype(np.int16)

    def _append(self, x: np.ndarray, mono: np.ndarray) -> None:
        used = self.n - self._base
        if used + len(x) > len(self._mono):
            keep_from = min(frame_boundary(self.next_index, self.rate),
                            self.n - self.resampler.taps - 1)  # the resampler's history
            drop = max(0, keep_from - self._base)
            kept = used - drop
            size = len(self._mono)
            while kept + len(x) > size:
                size *= 2
            orig = np.zeros((size, self.channels), self.dtype)
            m = np.zeros(size, np.float32)
            orig[:kept] = self._orig[drop:used]
            m[:kept] = self._mono[drop:used]
            self._orig, self._mono = orig, m
            self._base += drop
            used = kept
        self._orig[used:used + len(x)] = x
        self._mono[used:used + len(x)] = mono
        self.n += len(x)

    def _mono_at(self, idx: np.ndarray) -> np.ndarray:
        rel = idx - self._base
        assert rel.size == 0 or rel.max() < self.n - self._base, "the resampler read past the timeline"
        ok = idx >= 0
        assert bool(np.all(rel[ok] >= 0)), "the resampler read trimmed history"
        return np.where(ok, self._mono[np.clip(rel, 0, None)], np.float32(0))

    def _to_16k(self) -> np.ndarray:
        a_in, a_out = self._seg
        j0 = self.n16 - a_out
        j1 = self.resampler.outputs_for(self.n - a_in)
        if j1 <= j0:
            return np.zeros(0, np.float32)
        y = self.resampler.run(self._mono_at, a_in, j0, j1)
        self.n16 = a_out + j1
        return y

    def push(self, pcm: Any) -> np.ndarray:
        """Append the caller's audio; returns its 16 kHz mono float32 (to push into the stream)."""
        if self.closed:
            raise BadRequest("push() after close(): the stream's audio has ended", field="audio")
        if np.asarray(pcm).size == 0:
            return np.zeros(0, np.float32)
        x = self._as_caller(pcm)
        mono = x.astype(np.float32).mean(axis=1)
        if self.dtype == np.int16:
            mono *= np.float32(1 / 32768)
        now = self.clock()
        gap = self._pause_before_push(now)
        pre = self._silence(gap) if gap else np.zeros(0, np.float32)
        self._append(x, mono)
        self.last_push_t = now
        return np.concatenate([pre, self._to_16k()]) if pre.size else self._to_16k()

    def _pause_before_push(self, now: float) -> int:
        """Samples of silence that go before audio pushed at ``now``: the rest of a pause
        (:class:`~lipsync_cluster.client.stream.ListeningClock`), up to ``idle_ahead_frames`` past
        the reader (what that cap holds back is not owed: the speech follows at once)."""
        gap = self._wall.gap_before_push(self.n, now, self.listening and not self.closed)
        cap = self._idle_cap()
        if self.n + gap > cap:
            gap = max(0, cap - self.n)
            self._wall.forget(self.n + gap, now)
        return gap

    def _idle_cap(self) -> int:
        """The farthest the listening silence may reach: ``idle_ahead_frames`` past the reader."""
        return frame_boundary(self.next_index + self.idle_ahead_frames, self.rate)

    def end_segment(self) -> bool:
        """Mark the end of an utterance: the frame holding the last sample pushed so far counts it.

        Returns True when that frame has been paired already (or nothing was pushed): the
        segment has ended now and no frame will carry the mark.
        """
        if self.n <= frame_boundary(self.next_index, self.rate):
            return True
        self.marks.append(self.n)
        return False

    def set_listening(self, on: bool) -> None:
        if on and not self.listening:
            self._wall.restart(self.n, self.clock())
        self.listening = bool(on)

    def _silence(self, n: int) -> np.ndarray:
        a = self.n
        self.idle_samples += n
        self._append(np.zeros((n, self.channels), self.dtype), np.zeros(n, np.float32))
        if self._idle and self._idle[-1][1] == a:
            self._idle[-1][1] = self.n
        else:
            self._idle.append([a, self.n])
        return self._to_16k()

    def idle_due_at(self) -> Optional[float]:
        """When the next frame of listening silence is due (clock time), or None when not listening."""
        if not self.listening or self.closed:
            return None
        k = -(-self.n * FPS // self.rate)  # the first frame boundary at or after n ...
        target = frame_boundary(k, self.rate)
        if target <= self.n:
            target = frame_boundary(k + 1, self.rate)  # ... and past it
        if target > self._idle_cap():
            return None  # far enough ahead of the reader: nothing is due until it reads on
        # half a sample late, so that fill_idle's int() sees the boundary reached
        return self._wall.due_at(self.n, target)

    def fill_idle(self, now: Optional[float] = None) -> np.ndarray:
        """Listening silence due by ``now``, up to a frame boundary; returns its 16 kHz copy (maybe empty)."""
        if not self.listening or self.closed:
            return np.zeros(0, np.float32)
        now = self.clock() if now is None else now
        due = self._wall.due(self.n, now)  # the wall clock in a pause; n (nothing) while the talk may go on
        target = min(frame_boundary((due * FPS) // self.rate, self.rate), self._idle_cap())
        return self._silence(target - self.n) if target > self.n else np.zeros(0, np.float32)

    def close(self) -> None:
        self.closed = True

    # --- output ---------------------------------------------------------------------------------

    def cut(self, c: int) -> None:
        """The stream was interrupted at frame ``c``: both timelines restart at frame ``c``'s start."""
        b = frame_boundary(c, self.rate)
        dropped = max(0, self.n - b)
        if self.n > b:
            self.n = b
        elif self.n < b:  # the 16 kHz copy ran up to a few samples past the caller's (ceil): pad
            self._append(np.zeros((b - self.n, self.channels), self.dtype), np.zeros(b - self.n, np.float32))
        self._idle = [[a, min(z, b)] for a, z in self._idle if a < b]
        dropped_marks = sum(1 for p in self.marks if p > b)
        self.marks = [p for p in self.marks if p <= b]
        self.n16 = c * SAMPLES_PER_FRAME
        self._seg = (b, self.n16)
        self.next_index = min(self.next_index, c)
        self._wall.forget(self.n, self.clock())
        self.cuts.append({"cut": c, "dropped_samples": dropped, "dropped_marks": dropped_marks})

    def pair(self, frame: StreamFrame) -> AVFrame:
        k = frame.index
        a, z = frame_boundary(k, self.rate), frame_boundary(k + 1, self.rate)
        if a < self._base:  # a bug, not the caller's: frames are paired in order
            raise InternalError(f"frame {k} came after its audio was dropped (next expected {self.next_index})")
        audio = np.zeros((z - a, self.channels), self.dtype)
        have = min(z, self.n)
        if have > a:  # past the end only after close(): the last frame's zero padding
            audio[:have - a] = self._orig[a - self._base:have - self._base]
        idle = sum(max(0, min(z, iz) - max(a, ia)) for ia, iz in self._idle) + max(0, z - max(a, self.n))
        ends = sum(1 for p in self.marks if p <= z)
        self.marks = [p for p in self.marks if p > z]
        self.next_index = k + 1
        self._idle = [r for r in self._idle if r[1] > z]
        return AVFrame(index=k, pts=frame.pts, frame=frame, audio=audio[:, 0] if self.channels == 1 else audio,
                       sample_rate=self.rate, sample_offset=a, speech=idle < z - a, segment_ends=ends)

    def stats(self) -> dict:
        return {"sample_rate": self.rate, "channels": self.channels, "samples": self.n, "samples_16k": self.n16,
                "seconds": self.n / self.rate, "next_index": self.next_index, "listening": self.listening,
                "idle_seconds": self.idle_samples / self.rate, "pending_marks": len(self.marks),
                "cuts": list(self.cuts), "resampler_delay_ms": round(1000 * self.resampler.delay / self.rate, 3)}


IDLE_MARGIN_FRAMES = 8  # listening silence ahead of the reader beyond what its next batch needs


def _wait_for(core: AVCore) -> Optional[float]:
    """How long a reader may wait for the next frame before the silence needs topping up.

    Until the stream is closed it looks again at least every frame (``IDLE_TICK_S``): an interrupt,
    ``set_listening(True)`` or the reader catching up can make silence due while it waits, and no
    frame would come to wake it.
    """
    if core.closed:
        return None
    due = core.idle_due_at()
    left = IDLE_TICK_S if due is None else due - core.clock()
    return max(0.0, min(left, IDLE_TICK_S))


def _idle_ahead(session) -> int:
    """Frames of silence the reader may have ahead: its next batch and lookahead, plus a margin."""
    info = session.latency(breakdown=False)  # says batch_size and lookahead_frames (public)
    return int(info["batch_size"]) + int(info["lookahead_frames"]) + IDLE_MARGIN_FRAMES


_AV_DOC = """
    ``session``: the stream to drive (its own listening must stay off: this session makes the silence);
    ``sample_rate``/``channels``/``dtype`` (int16 or float32): the caller's audio, kept as it is for the
    output (other dtypes pushed are converted); ``listening``: idle frames with silence when no audio
    comes (default on); ``idle_grace_s``: how far the audio may fall behind the wall clock (a late
    chunk) before a pause's silence starts.
"""


class AsyncAVSession:
    """Frames with their audio over an :class:`~lipsync_cluster.client.stream.AsyncStreamSession` (asyncio).

    ``push``/``end_segment``/``interrupt``/``switch``/``set_listening``/``close`` never block;
    ``frames()`` is an async iterator of :class:`AVFrame`; ``await cancel()`` (or ``async with``) stops it.
    """ + _AV_DOC

    def __init__(self, session, sample_rate: int, *, channels: int = 1, dtype: Any = np.int16,
                 listening: bool = True, idle_grace_s: float = IDLE_GRACE_S) -> None:
        self.session = session
        self.core = AVCore(sample_rate, channels=channels, dtype=dtype, listening=listening,
                           idle_grace_s=idle_grace_s, idle_ahead_frames=_idle_ahead(session))

    def push(self, pcm: Any) -> None:
        """Append the caller's audio (any number of samples, at ``sample_rate``)."""
        y = self.core.push(pcm)
        if y.size:
            self.session.push(y)

    def end_segment(self) -> bool:
        """End of an utterance (see :meth:`AVCore.end_segment`); True when it has been played out already."""
        return self.core.end_segment()

    def interrupt(self) -> int:
        """Barge-in: drop the frames not yet read and the audio not yet turned into frames; returns the cut."""
        cut = self.session.interrupt(at_frame=self.core.next_index)
        self.core.cut(cut)
        return cut

    def switch(self, model_id: str, at_frame: Optional[int] = None) -> int:
        return self.session.switch(model_id, at_frame)

    def set_listening(self, on: bool = True) -> None:
        self.core.set_listening(on)

    def close(self) -> None:
        """End of audio: the frames of what was pushed are read out, then ``frames()`` ends."""
        self.core.close()
        self.session.close()

    def _idle(self) -> Optional[float]:
        y = self.core.fill_idle()
        if y.size:
            self.session.push(y)
        return _wait_for(self.core)

    def fill_idle(self) -> None:
        """Make the listening silence due now. ``get``/``poll`` do it; a caller that does not read for
        a while (a player waiting for its clock to start) calls this about once per frame time, or
        the silence, and so the idle frames, come late."""
        self._idle()

    async def get(self) -> Optional[AVFrame]:
        """The next frame with its audio; None when the stream has ended."""
        while True:
            wait = self._idle()
            try:
                frame = await self.session.get(timeout=wait)
            except RequestTimeout:
                if wait is None or self.session.stats()["error"] is not None:
                    raise
                continue  # the next frame of silence is due
            return None if frame is None else self.core.pair(frame)

    async def poll(self) -> Optional[AVFrame]:
        """The next frame with its audio if one is ready now, else None: never waits.

        For a player that takes one frame per tick of its own clock (WebRTC): a frame it has not
        taken yet can still be cut by :meth:`interrupt`. Listening silence is made here too, so call
        it at least once per frame time.
        """
        self._idle()
        try:
            frame = await self.session.get(timeout=0)
        except RequestTimeout:
            if self.session.stats()["error"] is not None:
                raise
            return None
        return None if frame is None else self.core.pair(frame)

    @property
    def backlog_frames(self) -> int:
        """Frames whose audio is here but not yet sent to the cluster (see the stream's)."""
        return self.session.backlog_frames

    async def frames(self) -> AsyncIterator[AVFrame]:
        while True:
            item = await self.get()
            if item is None:
                return
            yield item

    def stats(self) -> dict:
        return {**self.session.stats(), "av": self.core.stats()}

    async def cancel(self) -> None:
        await self.session.cancel()

    async def __aenter__(self) -> "AsyncAVSession":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.cancel()


class AVSession:
    """The blocking twin of :class:`AsyncAVSession` over a :class:`~lipsync_cluster.client.stream.StreamSession`.

    Thread-safe: one thread may push while another reads ``frames()``.
    """ + _AV_DOC

    def __init__(self, session, sample_rate: int, *, channels: int = 1, dtype: Any = np.int16,
                 listening: bool = True, idle_grace_s: float = IDLE_GRACE_S) -> None:
        self.session = session
        self.core = AVCore(sample_rate, channels=channels, dtype=dtype, listening=listening,
                           idle_grace_s=idle_grace_s, idle_ahead_frames=_idle_ahead(session))
        # Taken before the session's own lock, never the other way round: the caller's timeline and
        # the stream's 16 kHz copy change together.
        self._lock = threading.Lock()

    def push(self, pcm: Any) -> None:
        with self._lock:
            y = self.core.push(pcm)
            if y.size:
                self.session.push(y)

    def end_segment(self) -> bool:
        with self._lock:
            return self.core.end_segment()

    def interrupt(self) -> int:
        with self._lock:
            cut = self.session.interrupt(at_frame=self.core.next_index)
            self.core.cut(cut)
            return cut

    def switch(self, model_id: str, at_frame: Optional[int] = None) -> int:
        return self.session.switch(model_id, at_frame)

    def set_listening(self, on: bool = True) -> None:
        with self._lock:
            self.core.set_listening(on)

    def close(self) -> None:
        with self._lock:
            self.core.close()
            self.session.close()

    def get(self, timeout: Optional[float] = None) -> Optional[AVFrame]:
        """The next frame with its audio; None when the stream has ended. ``timeout``: seconds for any one frame."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                y = self.core.fill_idle()
                if y.size:
                    self.session.push(y)
                wait = _wait_for(self.core)
            if deadline is not None:
                left = max(0.0, deadline - time.monotonic())
                wait = left if wait is None else min(wait, left)
            try:
                frame = self.session.get(timeout=wait)
            except RequestTimeout:
                if wait is None or self.session.stats()["error"] is not None \
                        or (deadline is not None and time.monotonic() >= deadline):
                    raise
                continue
            if frame is None:
                return None
            with self._lock:
                return self.core.pair(frame)

    def frames(self, timeout: Optional[float] = None) -> Iterator[AVFrame]:
        while True:
            item = self.get(timeout)
            if item is None:
                return
            yield item

    def stats(self) -> dict:
        with self._lock:
            return {**self.session.stats(), "av": self.core.stats()}

    def cancel(self) -> None:
        self.session.cancel()

    def __enter__(self) -> "AVSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cancel()


__all__ = ["AVFrame", "AVCore", "AsyncAVSession", "AVSession", "Resampler", "frame_boundary"]
