"""Real-time streaming: audio goes in (any chunk size), frames come out in order at 25 fps.

    with Client() as client, StreamSession(client, "demo_ada") as session:
        session.push(pcm_chunk)          # 16 kHz mono, float32 in [-1, 1] or int16, any size
        session.switch("demo_ben")       # from the batch boundary at the audio pushed so far
        session.interrupt()              # barge-in: drop the unsaid audio, go on from the cut
        session.close()                  # end of audio: the tail is flushed
        for frame in session.frames():   # index, pts, background_index, model_id, image ...
            ...
        print(session.latency())         # {"p50_ms": ..., "p99_ms": ..., "breakdown": {...}}

``AsyncStreamSession(async_client, model_id)`` is the asyncio twin (``push``/``switch``/``close``
are plain calls that never block; ``frames()`` is an async iterator).

How it works (the workers stay stateless; the session keeps the audio and the frame cursor):

* Frames are cut into batches ``[s, s+B)``. A batch is sent as soon as the audio it needs has
  been pushed: :func:`~lipsync_cluster.common.audio.pcm_span_for_batch` says which, the batch
  plus 9 frames before and 12 after (the UNet's 8/7-frame window plus the encoder's and the
  STFT's reach). The request carries exactly that PCM with ``audio_frame_offset`` = the span's
  first frame, so every window is bit-identical to a whole-clip computation and any worker can
  serve any batch.
* ``close()`` fixes the stream's length: ``total_frames = round(samples / 640)`` (Python's
  ``round``), i.e. ``round(seconds x 25)``; the tail batches are clamped to it (the last frames' windows
  repeat the edge audio, as on a whole clip). Frame ``k`` has ``pts = k / 25`` exactly: no drift.
* Up to ``max_in_flight`` batches are in flight at once (replies may come back in any order; the
  session hands frames out in order). No new batch is sent while ``max_ready_frames`` frames wait
  unread, so memory stays bounded when the reader is slow (the audio waits instead).
* A batch that fails with a retryable error (``unavailable``, ``timeout``, ``overloaded``, no reply
  within ``request_timeout`` + 2 s) is sent once more; the broker itself re-dispatches a dead
  worker's requests once, so a worker's death costs a delay, not a frame. A second failure, or a
  non-retryable error (``unknown_model``, ``bad_request``...), ends the session: ``frames()``
  raises it.
* ``switch(model_id)`` lands at the first batch boundary at or after the audio pushed so far
  (or at ``at_frame``), whatever the sender has sent; frames carry the model that drew them.
* ``interrupt()`` drops the audio not yet turned into frames and the batches past the cut; the
  next audio goes on from the cut frame (indices and pts continuous). ``set_listening(True)``
  appends silence in real time when no audio comes (idle frames, which workers serve from their
  idle cache without the UNet).
* ``lookahead_frames`` (default 12 = exact) trades mouth accuracy for latency: a batch waits for
  only that many frames of future audio and is computed as if the audio ended there.

Latency of frame ``k`` = (time frame ``k`` is ready, in order) - (time the push that completed
frame ``k``'s own audio returned). It is the lookahead (the batch's later frames plus 12 frames of
future audio: 17 frames = 680 ms for the first frame of a 5-frame batch, 12 = 480 ms for its last,
when audio arrives in real time) + waiting for a slot + the round trip + waiting for an earlier
batch. :meth:`StreamSession.latency` reports p50/p99 of it and of each part.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator, Optional

import numpy as np

from ..common.audio import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, SPAN_AFTER, SPAN_BEFORE, pcm_span_for_batch, to_float_pcm
from ..common.errors import (BadRequest, InternalError, LipsyncError, Overloaded, RequestTimeout, Unavailable,
                             error_from_wire)
from ..common.infer_request import (MAX_BATCH_SIZE, MAX_FRAME_INDEX, MODEL_ID_RE, check_quality, is_model_id,
                                     require_int)
from .results import decode_image, infer_request, infer_result

RETRYABLE = (Unavailable, RequestTimeout, Overloaded)
MAX_ATTEMPTS = 2  # a batch is retried once
LATENCY_WINDOW = 20000  # latency samples kept (the most recent), per session
IDLE_TICK_S = 0.04  # listening: how often the silence is topped up (one frame)
IDLE_GRACE_S = 0.12  # listening: silence starts this long after the last audio (real-time chunks never wait on it)


@dataclass
class StreamFrame:
    """One frame of a stream, handed out in order."""

    index: int  # 0, 1, 2, ... from the stream's start
    pts: float  # seconds from the stream's start: index / fps
    background_index: int  # which of the model's background frames was drawn on
    model_id: str
    model_version: str
    format: str  # jpeg / png / patch: ``image`` is the encoded bytes (patch: the face rect only, jpeg);
    # raw: a BGR uint8 array
    image: Any
    rect: list  # the face box [x1, y1, x2, y2] on the background
    worker: str
    latency_ms: float  # audio pushed -> frame ready
    ready_t: float = 0.0  # when it was ready (the session's clock, time.monotonic by default)

    def decode(self) -> np.ndarray:
        """The image as a BGR uint8 array (decodes jpeg/png/patch; raw is returned as it is)."""
        return decode_image(self.image, self.format, f"frame {self.index}")


class _Batch:
    __slots__ = ("seq", "start", "size", "model_id", "first", "end", "header", "payloads", "attempts",
                 "ready_t", "first_sent_t", "sent_t", "reply_t", "retry_at", "result", "handle", "errors")

    def __init__(self, seq: int, start: int, size: int, model_id: str, first: int, end: int,
                 header: dict, payloads: list, ready_t: float) -> None:
        self.seq, self.start, self.size, self.model_id = seq, start, size, model_id
        self.first, self.end = first, end
        self.header, self.payloads = header, payloads
        self.attempts = 0
        self.ready_t = ready_t
        self.first_sent_t = self.sent_t = self.reply_t = 0.0
        self.retry_at: Optional[float] = None
        self.result = None
        self.handle: Any = None  # the driver's future / task of the current attempt
        self.errors: list[str] = []


def percentiles(values) -> dict:
    """p50/p99/mean/max of latencies in ms (None each when there are none)."""
    if not len(values):
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None}
    a = np.asarray(values, np.float64)
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "mean_ms": round(float(a.mean()), 2), "max_ms": round(float(a.max()), 2)}


def _check_frame(at_frame: Any) -> None:
    if isinstance(at_frame, bool) or not isinstance(at_frame, int) or not 0 <= at_frame <= MAX_FRAME_INDEX:
        raise BadRequest(f"at_frame must be an integer in 0..{MAX_FRAME_INDEX}; got {at_frame!r}", field="at_frame")


class ListeningClock:
    """Where a listening session's silence goes: the wall clock, held on a timeline of ``rate`` Hz.

    Sample ``ref[1] + (t - ref[0]) * rate`` of the timeline is due at clock time ``t``. A pause
    begins when the timeline's end ``n`` is ``grace_s`` behind that (its audio has played out and
    nothing new came; a chunk less late than that is the same utterance: no silence inside speech,
    the next pause makes the lateness up). From then on the silence keeps the end at the wall clock
    (:meth:`due`), and the push that ends the pause first gets the rest of it, to the sample
    (:meth:`gap_before_push`). So a caller that talks in real time and sends nothing while silent
    keeps its pauses' length and the timeline never falls behind the wall clock: a player that
    takes one frame per 40 ms (the WebRTC gateway) never runs out. Audio pushed ahead of real time
    (TTS) stays ahead: the silence waits until the wall clock has reached its end. (The silence used
    to start ``grace_s`` after the last push and count from there: each pause cost the timeline the
    grace less a chunk, plus the part of a frame not yet filled, for good; issue 19.)
    """

    def __init__(self, rate: int, grace_s: float, now: float) -> None:
        self.rate, self.grace_s = rate, float(grace_s)
        self.ref = (now, 0)
        self.pausing = False

    def behind(self, n: int, now: float) -> float:
        """Samples the timeline's end ``n`` is behind the wall clock (negative: audio pushed ahead)."""
        t, m = self.ref
        return m + (now - t) * self.rate - n

    def in_pause(self, n: int, now: float) -> bool:
        if not self.pausing and self.behind(n, now) >= self.grace_s * self.rate:
            self.pausing = True
        return self.pausing

    def due(self, n: int, now: float) -> int:
        """Where the silence ends now: the wall clock in a pause, else ``n`` (none due)."""
        return n + max(0, int(self.behind(n, now))) if self.in_pause(n, now) else n

    def gap_before_push(self, n: int, now: float, listening: bool) -> int:
        """Samples of silence that go before audio pushed at ``now``: the rest of a pause, exact. Ends the pause."""
        gap = 0
        if listening and self.in_pause(n, now):
            gap = max(0, int(round(self.behind(n, now))))
        elif not listening and self.behind(n, now) > 0:
            self.ref = (now, n)  # not listening: nothing is owed for the time nothing came
        self.pausing = False
        return gap

    def restart(self, n: int, now: float) -> None:
        """Listening turned on: silence from now, not for the time it was off (audio ahead stays ahead)."""
        if self.behind(n, now) > 0:
            self.ref = (now, n)
        self.pausing = False

    def forget(self, n: int, now: float) -> None:
        """The wall clock is at ``n`` now: after a cut, or what a cap held back is not owed."""
        self.ref = (now, n)
        self.pausing = False

    def due_at(self, n: int, target: int) -> float:
        """Clock time when the silence may reach sample ``target`` (half a sample late: ``int()`` sees it)."""
        t, m = self.ref
        at = t + (target - m + 0.5) / self.rate
        return at if self.pausing else max(at, t + (n - m) / self.rate + self.grace_s)


def _idle_grace(core: Any) -> float:
    return core._wall.grace_s


def _set_idle_grace(core: Any, value: float) -> None:
    core._wall.grace_s = float(value)


# ``idle_grace_s`` of a core whose listening silence follows its ``_wall`` ListeningClock (StreamCore, AVCore)
idle_grace_property = property(_idle_grace, _set_idle_grace,
                               doc="Listening: how far the audio's end may fall behind the wall clock "
                                   "before silence starts.")


def total_frames_for(num_samples: int) -> int:
    """Frames a stream of ``num_samples`` 16 kHz samples has: ``round(num_samples / 640)``.

    That is Python's ``round(seconds * 25)`` (an exact half, 320 samples past a frame, rounds to
    the even count, as ``round`` does).
    """
    return int(round(int(num_samples) / SAMPLES_PER_FRAME))


class StreamCore:
    """The session's state machine, without I/O: audio, batch plan, retries, in-order delivery.

    The drivers (:class:`StreamSession`, :class:`AsyncStreamSession`) call it under their own
    lock / on their own loop: ``push``/``close``/``switch``; ``plan(now)`` -> batches to send now;
    ``sent``; ``completed``/``failed``; frames appear in ``ready``.
    """

    def __init__(self, model_id: str, *, fps: int = FPS, batch_size: int = 5, format: str = "jpeg",
                 quality: Optional[int] = None, max_in_flight: int = 3, max_ready_frames: int = 250,
                 request_timeout: float = 10.0, lookahead_frames: int = SPAN_AFTER, adaptive: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if fps != FPS:
            raise BadRequest(f"fps must be {FPS}: the models' audio front end is fixed at {FPS} frames per second "
                             f"({SAMPLES_PER_FRAME} samples of {SAMPLE_RATE} Hz audio per frame); got {fps}",
                             field="fps")
        # The request rules' own checks and words (common/infer_request.py), as the broker says them.
        require_int({"batch_size": batch_size}, "batch_size", 1, MAX_BATCH_SIZE)
        check_quality(format, quality)  # the format too
        if max_in_flight < 1:
            raise BadRequest(f"max_in_flight must be >= 1; got {max_in_flight}", field="max_in_flight")
        if isinstance(lookahead_frames, bool) or not isinstance(lookahead_frames, int) \
                or not 0 <= lookahead_frames <= SPAN_AFTER:
            raise BadRequest(f"lookahead_frames must be an integer in 0..{SPAN_AFTER} ({SPAN_AFTER} = exact); "
                             f"got {lookahead_frames!r}", field="lookahead_frames")
        self._check_model(model_id)
        self.lookahead_frames = lookahead_frames
        self.adaptive = bool(adaptive)
        self.fps = fps
        self.batch_size = batch_size
        self.format = format
        self.quality = quality
        self.max_in_flight = max_in_flight
        self.max_ready_frames = max(batch_size, max_ready_frames)
        self.request_timeout = float(request_timeout)
        self.clock = clock
        self.model_id = model_id
        # audio: samples [buf_base, n) live in buf[:n - buf_base]
        self._buf = np.zeros(SAMPLE_RATE * 4, np.float32)
        self._buf_base = 0
        self.samples = 0
        # when each frame's own audio was complete: audio_t[k - audio_t_base]
        self._audio_t: deque[float] = deque()
        self._audio_t_base = 0
        self.closed = False
        self.total_frames: Optional[int] = None
        self.next_frame = 0  # the first frame not yet planned
        self.delivered = 0  # frames handed to `ready` so far (= the next index to deliver)
        self._seq = itertools.count()
        self.inflight: dict[int, _Batch] = {}  # sent (or waiting for a retry), no result yet
        self._results: dict[int, _Batch] = {}  # by start frame, waiting for an earlier batch
        self.ready: deque[StreamFrame] = deque()
        self.error: Optional[LipsyncError] = None
        self.switches: list[tuple[int, str]] = [(0, model_id)]  # (first frame, model) of each planned model run
        # Requested models by frame: (first frame, order, model); the model of frame k is the last
        # entry with first frame <= k. Planned batches never cross an entry's first frame.
        self._schedule: list[tuple[int, int, str]] = [(0, 0, model_id)]
        self._order = itertools.count(1)
        # Where the batch grid restarts: 0, every cut, every switch at an explicit frame. Batches
        # are [a, a+B), [a+B, a+2B) ... from the last anchor a, whatever the sender has done.
        self._anchors: list[int] = [0]
        self.interrupts: list[dict] = []  # {"cut", "dropped_frames", "dropped_samples"} per interrupt()
        # listening: silence is appended when no audio comes, so idle frames keep flowing
        self.listening = False
        self._wall = ListeningClock(SAMPLE_RATE, IDLE_GRACE_S, clock())  # where listening silence goes
        self.idle_samples = 0  # silence appended by listening
        self.idle_frames = 0  # frames the workers served from their idle cache (no UNet)
        self.batches_sent = 0
        self.retries = 0
        self.retry_log: list[dict] = []
        self._lat: dict[str, deque] = {k: deque(maxlen=LATENCY_WINDOW) for k in
                                       ("latency", "lookahead", "slot_wait", "round_trip", "reorder")}
        self._server: dict[str, deque] = {}

    idle_grace_s = idle_grace_property

    # --- input ------------------------------------------------------------------------------

    @staticmethod
    def _check_model(model_id: str) -> None:
        if not is_model_id(model_id):
            raise BadRequest(f"model_id must match {MODEL_ID_RE.pattern}; got {model_id!r}", field="model_id")

    def push(self, pcm: np.ndarray) -> None:
        if self.closed:
            raise BadRequest("push() after close(): the stream's audio has ended", field="audio_pcm")
        x = np.asarray(pcm)
        if x.size == 0:
            return
        x = to_float_pcm(x, "audio_pcm")
        now = self.clock()
        gap = self._wall.gap_before_push(self.samples, now, self.listening)
        if gap:  # the rest of a pause goes before the speech
            self._silence(gap)
        self._append(x)
        self._mark_complete(now)

    def _mark_complete(self, now: float) -> None:
        complete = self.samples // SAMPLES_PER_FRAME
        have = self._audio_t_base + len(self._audio_t)
        if complete > have:
            self._audio_t.extend([now] * (complete - have))

    def _append(self, x: np.ndarray) -> None:
        used = self.samples - self._buf_base
        if used + x.size > self._buf.size:
            # Drop what no future batch needs (sent batches carry their own copy), then grow. An
            # interrupt() may re-plan from the first frame not yet handed out: keep its context.
            handed_out = self.delivered - len(self.ready)
            keep_from = max(0, min(self.next_frame, handed_out) - SPAN_BEFORE) * SAMPLES_PER_FRAME
            drop = max(0, min(keep_from, self.samples) - self._buf_base)
            kept = used - drop
            size = self._buf.size
            while kept + x.size > size:
                size *= 2
            if size == self._buf.size and drop:
                self._buf[:kept] = self._buf[drop:used]
            else:
                new = np.zeros(size, np.float32)
                new[:kept] = self._buf[drop:used]
                self._buf = new
            self._buf_base += drop
            used = kept
        self._buf[used:used + x.size] = x
        self.samples += x.size

    def _slice(self, a: int, z: int) -> np.ndarray:
        """A copy of samples [a, z); past the end of the audio it is zeros (only at the tail)."""
        out = np.zeros(z - a, np.float32)
        have = min(z, self.samples)
        if have > a:
            out[:have - a] = self._buf[a - self._buf_base:have - self._buf_base]
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.total_frames = total_frames_for(self.samples)
        have = self._audio_t_base + len(self._audio_t)
        if self.total_frames > have:
            self._audio_t.extend([self.clock()] * (self.total_frames - have))

    def _grid_boundary(self, frame: int) -> int:
        """The first batch boundary at or after ``frame`` (on the grid of the last anchor before it)."""
        a = max(x for x in self._anchors if x <= frame)
        return a + -(-(frame - a) // self.batch_size) * self.batch_size

    def switch(self, model_id: str, at_frame: Optional[int] = None) -> int:
        """Use ``model_id`` from a frame on; returns that frame.

        Default: the first batch boundary at or after the audio pushed so far (``samples / 640``
        rounded up), so the switch lands at the same frame whatever the sender has done.
        ``at_frame``: exactly that frame (a batch ends there). A frame already planned cannot
        change: a position before ``planned`` lands at ``planned``.
        """
        self._check_model(model_id)
        if at_frame is None:
            frame = self._grid_boundary(-(-self.samples // SAMPLES_PER_FRAME))
        else:
            _check_frame(at_frame)
            frame = at_frame
        frame = max(frame, self.next_frame)
        if at_frame is not None and frame not in self._anchors:
            self._anchors.append(frame)
            self._anchors.sort()
        self._schedule.append((frame, next(self._order), model_id))
        self._schedule.sort()
        self.model_id = model_id
        return frame

    def _model_at(self, frame: int) -> tuple[str, Optional[int]]:
        """The model of ``frame`` and the next frame where the model or the grid changes (or None).

        Called for the first unplanned frame, so what lies before it is dropped here (a long
        conversation keeps only its pending switches and the anchor in use).
        """
        current = [e for e in self._schedule if e[0] <= frame]
        self._schedule = current[-1:] + [e for e in self._schedule if e[0] > frame]
        self._anchors = [a for a in self._anchors if a <= frame][-1:] + [a for a in self._anchors if a > frame]
        model = self._schedule[0][2]
        nxt = None
        for first, _, m in self._schedule:
            if first <= frame:
                model = m
            elif nxt is None or first < nxt:
                nxt = first
        for a in self._anchors:
            if a > frame and (nxt is None or a < nxt):
                nxt = a
        return model, nxt

    # --- interruption and listening ------------------------------------------------------------

    def interrupt(self, at_frame: Optional[int] = None) -> tuple[int, list]:
        """Barge-in: drop the audio not yet turned into frames and every batch past the cut.

        The cut is ``delivered`` (frames already made are kept, read or not), or ``at_frame``
        (clamped to ``[frames handed out .. complete frames pushed]``; made frames at or past it
        are dropped too). Frame ``cut`` then takes the next audio pushed (or the listening
        silence); indices and pts go on from there. A closed stream ends at the cut. Returns
        ``(cut, handles of the dropped in-flight attempts)`` for the driver to cancel.
        """
        if at_frame is not None:
            _check_frame(at_frame)
        handed_out = self.delivered - len(self.ready)
        cut = self.delivered if at_frame is None else at_frame
        cut = max(handed_out, min(cut, self.samples // SAMPLES_PER_FRAME if not self.closed
                                  else self.total_frames))
        handles = []
        restart = self.next_frame
        for seq, b in list(self.inflight.items()):
            if b.start + b.size > cut:
                del self.inflight[seq]
                restart = min(restart, b.start)
                if b.handle is not None:
                    handles.append(b.handle)
        for start, b in list(self._results.items()):
            if b.start + b.size > cut:
                del self._results[start]
                restart = min(restart, b.start)
        dropped_ready = 0
        if cut < self.delivered:
            kept = deque(f for f in self.ready if f.index < cut)
            dropped_ready = len(self.ready) - len(kept)
            self.ready = kept
            self.delivered = cut
            restart = cut
        self.next_frame = min(restart, cut)
        # audio: keep [.., cut*640) as the context of the frames after the cut
        dropped_samples = 0
        if self.closed:
            self.total_frames = min(self.total_frames, cut)
        else:
            keep = cut * SAMPLES_PER_FRAME
            if self.samples > keep:
                dropped_samples = self.samples - keep
                self.samples = keep
            self._wall.forget(self.samples, self.clock())
        if cut >= self._audio_t_base:
            while self._audio_t_base + len(self._audio_t) > cut:
                self._audio_t.pop()
        else:
            self._audio_t.clear()
            self._audio_t_base = cut
        # the plan after the cut: switches asked for later frames apply from the cut on
        self._schedule = [(min(f, cut), o, m) for f, o, m in self._schedule]
        self._schedule.sort()
        self._anchors = sorted({a for a in self._anchors if a < cut} | {cut})
        self.switches = [s for s in self.switches if s[0] < self.next_frame] or [(0, self._schedule[0][2])]
        self.interrupts.append({"cut": cut, "dropped_frames": dropped_ready, "dropped_samples": dropped_samples})
        return cut, handles

    def set_listening(self, on: bool) -> None:
        """Listening: when no audio comes, silence is appended in real time (idle frames flow).

        The audio then never ends more than ``idle_grace_s`` behind the clock: a caller that
        pushes in real time is never interleaved with silence, and one that stops gets digital
        silence (the workers serve it from their idle cache) once its audio is ``idle_grace_s``
        behind the clock, as long as the pause (:class:`ListeningClock`).
        """
        if on and not self.listening:
            self._wall.restart(self.samples, self.clock())
        self.listening = bool(on)

    def fill_idle(self, now: Optional[float] = None) -> int:
        """Append the listening silence due by ``now`` (whole frames); returns the samples added."""
        if not self.listening or self.closed:
            return 0
        now = self.clock() if now is None else now
        target = self._wall.due(self.samples, now) // SAMPLES_PER_FRAME * SAMPLES_PER_FRAME
        if target <= self.samples:
            return 0
        n = target - self.samples
        self._silence(n)
        self._mark_complete(now)
        return n

    def _silence(self, n: int) -> None:
        """Append ``n`` samples of listening silence (counted in ``idle_samples``)."""
        self._append(np.zeros(n, np.float32))
        self.idle_samples += n

    # --- planning -----------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """Closed, every frame delivered (not necessarily read), nothing in flight."""
        return self.closed and self.delivered >= (self.total_frames or 0) and not self.inflight

    @property
    def backlog_frames(self) -> int:
        """Frames whose audio has been pushed but that no batch has been sent for yet."""
        return max(0, self.samples // SAMPLES_PER_FRAME - self.next_frame)

    def next_retry_at(self) -> Optional[float]:
        due = [b.retry_at for b in self.inflight.values() if b.retry_at is not None]
        return min(due) if due else None

    def plan(self, now: Optional[float] = None) -> list[_Batch]:
        """Batches to send now: due retries first, then new batches while slots and audio allow."""
        if self.error is not None:
            return []
        now = self.clock() if now is None else now
        out = [b for b in self.inflight.values() if b.retry_at is not None and b.retry_at <= now]
        for b in out:
            b.retry_at = None
        while len(self.inflight) < self.max_in_flight and len(self.ready) < self.max_ready_frames:
            b = self._next_batch()
            if b is None:
                break
            self.inflight[b.seq] = b
            out.append(b)
        return out

    def _next_batch(self) -> Optional[_Batch]:
        start = self.next_frame
        model_id, change = self._model_at(start)
        size = self.batch_size if change is None else min(self.batch_size, change - start)
        if self.closed:
            if start >= self.total_frames:
                return None
            size = min(size, self.total_frames - start)
        elif self.adaptive and not self.inflight:
            # Adaptive: frame k needs audio only to k + lookahead, not to the batch's last frame +
            # lookahead: while nothing is in flight, the frames whose audio is in go now, as a
            # shorter batch. With one such batch in flight at most, a batch holds what came in
            # during the last round trip: 1-2 frames on a quick cluster (lowest latency), up to
            # batch_size on a loaded one (fewer requests, as the fixed grid). Exact lookahead (12)
            # is unaffected: a frame's window does not depend on its batch.
            size = min(size, self.samples // SAMPLES_PER_FRAME - self.lookahead_frames - start)
            if size < 1:
                return None
        first, end = pcm_span_for_batch(start, size, self.total_frames if self.closed else None)
        # Fewer frames of future audio than the exact 12: the batch is computed as if the audio
        # ended there (the end-of-clip rule; docs/STREAMING.md, "lookahead_frames"). Always, not
        # only while the audio is short of it, so the video never depends on the sender's timing
        # (except with ``adaptive``, where the batch's length does).
        end = min(end, start + size + self.lookahead_frames)
        if not self.closed and self.samples < end * SAMPLES_PER_FRAME:
            return None  # the lookahead has not been pushed yet
        pcm = self._slice(first * SAMPLES_PER_FRAME, end * SAMPLES_PER_FRAME)
        quality = self.quality if self.quality is not None else (85 if self.format == "jpeg" else None)
        header, payloads = infer_request(
            model_id, start_frame_idx=start, batch_size=size, audio_pcm=pcm, audio_frame_offset=first,
            format=self.format, quality=quality, deadline_ms=int(self.request_timeout * 1000))
        ready_t = self._audio_t[end - 1 - self._audio_t_base]
        if model_id != self.switches[-1][1]:
            self.switches.append((start, model_id))
        self.next_frame = start + size
        return _Batch(next(self._seq), start, size, model_id, first, end, header, payloads, ready_t)

    def sent(self, b: _Batch, now: Optional[float] = None) -> int:
        """Record that ``b`` went out; returns the attempt number (1, 2)."""
        now = self.clock() if now is None else now
        b.attempts += 1
        b.sent_t = now
        if b.attempts == 1:
            b.first_sent_t = now
            self.batches_sent += 1
        return b.attempts

    def overdue(self, now: Optional[float] = None) -> list[_Batch]:
        """In-flight batches whose reply is later than ``request_timeout`` + 2 s (the broker is gone)."""
        now = self.clock() if now is None else now
        limit = self.request_timeout + 2.0
        return [b for b in self.inflight.values()
                if b.retry_at is None and b.attempts and now - b.sent_t > limit]

    # --- outcomes -----------------------------------------------------------------------------

    def failed(self, b: _Batch, exc: BaseException, now: Optional[float] = None) -> bool:
        """A try of ``b`` failed; True when it will be retried (``plan`` returns it when due)."""
        if b.seq not in self.inflight or self.error is not None:
            return False
        now = self.clock() if now is None else now
        b.errors.append(f"{getattr(exc, 'code', type(exc).__name__)}: {exc}")
        if isinstance(exc, RETRYABLE) and b.attempts < MAX_ATTEMPTS:
            self.retries += 1
            delay = 0.0
            if isinstance(exc, Overloaded):
                delay = min(1.0, max(0.05, float(getattr(exc, "details", {}).get("retry_after_ms", 50)) / 1000))
            b.retry_at = now + delay
            self.retry_log.append({"frames": [b.start, b.start + b.size], "error": b.errors[-1]})
            return True
        if not isinstance(exc, LipsyncError):
            exc = InternalError(f"{type(exc).__name__}: {exc}")
        what = f"frames {b.start}..{b.start + b.size - 1} of model '{b.model_id}'"
        # The last try's message is exc's own: only earlier tries are listed, so nothing is said twice.
        earlier = f"; {b.attempts} attempts, before: " + "; ".join(b.errors[:-1]) if len(b.errors) > 1 else ""
        err = type(exc)(f"{exc.message} ({what}{earlier})", **exc.details)
        self.error = err
        return False

    def completed(self, b: _Batch, header: dict, payloads: list, now: Optional[float] = None) -> None:
        """A reply for ``b`` came back: errors go to :meth:`failed`, frames wait for their turn."""
        if b.seq not in self.inflight or self.error is not None:
            return  # a late reply of an attempt that was given up on
        if not header.get("ok", False):
            self.failed(b, error_from_wire(header.get("error")), now)
            return
        idle = header.get("idle_frames", 0)
        self.idle_frames += idle if isinstance(idle, int) else 0
        now = self.clock() if now is None else now
        try:
            result = infer_result(header, payloads)
        except Exception as exc:  # noqa: BLE001 - a malformed reply ends the session with a clear error
            self.failed(b, InternalError(f"malformed reply: {exc}"), now)
            return
        want = list(range(b.start, b.start + b.size))
        if result.frame_indices != want:
            self.failed(b, InternalError(f"reply has frames {result.frame_indices}, expected {want}"), now)
            return
        del self.inflight[b.seq]
        b.reply_t = now
        b.result = result
        b.handle = None
        b.header = b.payloads = None  # the request's audio is no longer needed
        for name, value in result.timings.items():
            if isinstance(value, (int, float)):
                self._server.setdefault(name, deque(maxlen=LATENCY_WINDOW)).append(float(value))
        self._results[b.start] = b
        self._deliver(now)

    def _deliver(self, now: float) -> None:
        while self.delivered in self._results:
            b = self._results.pop(self.delivered)
            r = b.result
            for i in range(b.size):
                k = b.start + i
                audio_t = self._audio_t.popleft()
                self._audio_t_base += 1
                latency = (now - audio_t) * 1000.0
                self._lat["latency"].append(latency)
                self._lat["lookahead"].append((b.ready_t - audio_t) * 1000.0)
                self._lat["slot_wait"].append((b.first_sent_t - b.ready_t) * 1000.0)
                self._lat["round_trip"].append((b.reply_t - b.first_sent_t) * 1000.0)
                self._lat["reorder"].append((now - b.reply_t) * 1000.0)
                self.ready.append(StreamFrame(
                    index=k, pts=k / self.fps, background_index=r.background_indices[i], model_id=r.model_id,
                    model_version=r.model_version, format=r.format, image=r.frames[i], rect=r.rects[i],
                    worker=r.worker, latency_ms=latency, ready_t=now))
            self.delivered = b.start + b.size

    # --- reporting ----------------------------------------------------------------------------

    def whereabouts(self, frame: int, now: Optional[float] = None) -> dict:
        """Where frame ``frame`` is now (for a player that found it missing when it was due).

        ``state``: ``ready`` (made, unread), ``reorder`` (made, waiting for an earlier batch),
        ``in_flight`` (``sent_ago_ms``: since its batch was first sent; ``attempts``), ``waiting``
        (not planned: its batch needs audio up to frame ``needs_audio_to``; ``audio_frames`` are
        here), or ``gone`` (handed out already). ``audio_ago_ms``: since the push that completed its
        batch's audio (in flight or made).
        """
        now = self.clock() if now is None else now
        out: dict = {"frame": frame, "audio_frames": self.samples // SAMPLES_PER_FRAME,
                     "ready": len(self.ready), "in_flight": len(self.inflight), "planned": self.next_frame}
        if frame < self.delivered:
            out["state"] = "ready" if frame >= self.delivered - len(self.ready) else "gone"
            return out
        for b in list(self.inflight.values()) + list(self._results.values()):
            if b.start <= frame < b.start + b.size:
                out.update(state="in_flight" if b.result is None else "reorder", batch=[b.start, b.size],
                           attempts=b.attempts, audio_ago_ms=round((now - b.ready_t) * 1000, 1),
                           sent_ago_ms=round((now - b.first_sent_t) * 1000, 1) if b.attempts else None)
                return out
        start = self.next_frame + max(0, frame - self.next_frame) // self.batch_size * self.batch_size
        needs = frame + 1 if self.adaptive else start + self.batch_size  # adaptive: its own lookahead only
        out.update(state="waiting", needs_audio_to=needs + self.lookahead_frames)
        return out

    def latency(self, recent: Optional[int] = None, breakdown: bool = True) -> dict:
        """p50/p99 of audio pushed -> frame ready, and of its parts (ms).

        Over the last ``LATENCY_WINDOW`` frames, or the last ``recent`` ones; ``breakdown=False``
        skips the parts (cheaper, for live displays).
        """
        def tail(values: deque) -> list:
            if recent is None or len(values) <= recent:
                return values
            return list(itertools.islice(values, len(values) - recent, None))

        lat = tail(self._lat["latency"])
        out = {"frames": len(lat), **percentiles(lat)}
        parts: dict = {}
        if breakdown:
            parts = {f"{k}_ms": percentiles(tail(v)) for k, v in self._lat.items() if k != "latency"}
            parts.update({f"server_{k}": percentiles(tail(v)) for k, v in sorted(self._server.items())})
        out["breakdown"] = parts
        out["lookahead_frames"] = self.lookahead_frames
        out["batch_size"] = self.batch_size
        out["adaptive"] = self.adaptive
        out["retries"] = self.retries
        return out

    def stats(self) -> dict:
        return {"model_id": self.model_id, "samples": self.samples, "seconds": self.samples / SAMPLE_RATE,
                "closed": self.closed, "total_frames": self.total_frames, "planned": self.next_frame,
                "delivered": self.delivered, "ready": len(self.ready), "in_flight": len(self.inflight),
                "batches_sent": self.batches_sent, "retries": self.retries,
                "switches": [list(s) for s in self.switches], "interrupts": list(self.interrupts),
                "listening": self.listening, "idle_seconds": self.idle_samples / SAMPLE_RATE,
                "idle_frames": self.idle_frames,
                "lookahead_frames": self.lookahead_frames,
                "error": None if self.error is None else self.error.to_wire()}


_SESSION_DOC = """
    ``model_id``: the avatar; ``batch_size`` frames per request (1..25; 5 = 200 ms); ``format``
    jpeg (default), png, raw or patch; ``quality`` (jpeg 1..100, default 85; png 0..9);
    ``max_in_flight`` batches at once (default 3); ``max_ready_frames``: no new batch is sent while
    this many frames wait unread (default 250 = 10 s); ``request_timeout`` s per request (also the
    broker's deadline; a batch is retried once after a retryable failure); ``lookahead_frames``:
    frames of future audio a batch waits for (0..12, default 12 = exact; docs/STREAMING.md);
    ``adaptive``: while no batch is in flight, send the frames whose own lookahead is in as a
    shorter batch instead of waiting for the whole batch's (conversation: lower latency, smaller
    batches on a quick cluster; at lookahead < 12 a frame then depends on its batch's length).
"""


class StreamSession:
    """A blocking streaming session over a :class:`~lipsync_cluster.client.Client` (thread-safe).

    ``push``, ``switch`` and ``close`` never wait for the cluster; a background thread sends the
    batches and collects the replies; ``frames()`` blocks until the next frame (in order) is ready
    and ends after ``close()`` once every frame has been read. Use it as a context manager (leaving
    the block cancels what is still in flight) or call :meth:`cancel`.
    """ + _SESSION_DOC

    def __init__(self, client, model_id: str, *, fps: int = FPS, batch_size: int = 5, format: str = "jpeg",
                 quality: Optional[int] = None, max_in_flight: int = 3, max_ready_frames: int = 250,
                 request_timeout: float = 10.0, lookahead_frames: int = SPAN_AFTER,
                 adaptive: bool = False) -> None:
        self._client = client
        self._core = StreamCore(model_id, fps=fps, batch_size=batch_size, format=format, quality=quality,
                                max_in_flight=max_in_flight, max_ready_frames=max_ready_frames,
                                request_timeout=request_timeout, lookahead_frames=lookahead_frames,
                                adaptive=adaptive)
        self._cond = threading.Condition()  # guards the core; readers wait on it for frames
        self._wake = threading.Event()  # wakes the background thread (never taken by reply callbacks' lock)
        self._completions: deque[tuple[_Batch, int, Any]] = deque()
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name=f"lipsync-stream-{model_id}", daemon=True)
        self._thread.start()

    # --- the caller's side --------------------------------------------------------------------

    def push(self, pcm: np.ndarray) -> None:
        """Append 16 kHz mono audio (float32 in [-1, 1] or int16), any number of samples."""
        with self._cond:
            self._raise_if_failed()
            self._core.push(pcm)
        self._wake.set()

    def switch(self, model_id: str, at_frame: Optional[int] = None) -> int:
        """Use ``model_id`` from the first batch boundary at or after the audio pushed so far (or
        from ``at_frame``); returns the frame where the switch lands."""
        with self._cond:
            frame = self._core.switch(model_id, at_frame)
        self._wake.set()
        return frame

    def interrupt(self, at_frame: Optional[int] = None) -> int:
        """Barge-in: drop the audio not yet turned into frames and the batches past the cut; the
        next audio (or listening silence) goes on from the cut. Returns the cut frame."""
        with self._cond:
            cut, handles = self._core.interrupt(at_frame)
            self._cond.notify_all()
        for handle in handles:
            handle.cancel()
        self._wake.set()
        return cut

    def set_listening(self, on: bool = True) -> None:
        """Listening on: when no audio comes, silence is appended in real time (idle frames flow)."""
        with self._cond:
            self._core.set_listening(on)
        self._wake.set()

    def close(self) -> None:
        """End of audio: the remaining frames (up to round(seconds x fps)) are produced and read out."""
        with self._cond:
            self._core.close()
        self._wake.set()

    def frames(self, timeout: Optional[float] = None) -> Iterator[StreamFrame]:
        """Frames in order until the stream is closed and drained; raises the session's error.

        ``timeout``: seconds to wait for any one frame before raising :class:`RequestTimeout`.
        """
        while True:
            frame = self.get(timeout)
            if frame is None:
                return
            yield frame

    def get(self, timeout: Optional[float] = None) -> Optional[StreamFrame]:
        """The next frame; None when the stream has ended. Raises RequestTimeout after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._core.ready:
                    if len(self._core.ready) == self._core.max_ready_frames:
                        self._wake.set()  # below the bound again: more batches may go out
                    return self._core.ready.popleft()
                self._raise_if_failed()
                if self._core.finished or self._cancelled:
                    return None
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise RequestTimeout(f"no frame within {timeout:.1f}s ({self._core.stats()})")
                self._cond.wait(left)

    def poll(self) -> list[StreamFrame]:
        """Every frame that is ready now (never blocks); raises the session's error when there is none."""
        with self._cond:
            out = list(self._core.ready)
            self._core.ready.clear()
            if not out:
                self._raise_if_failed()
        self._wake.set()
        return out

    def latency(self, recent: Optional[int] = None, breakdown: bool = True) -> dict:
        """``{"frames", "p50_ms", "p99_ms", "mean_ms", "max_ms", "breakdown": {...}, "retries"}``.

        ``recent``: only the last so many frames; ``breakdown=False``: the total only (cheaper).
        """
        with self._cond:
            return self._core.latency(recent, breakdown)

    def stats(self) -> dict:
        with self._cond:
            return self._core.stats()

    def whereabouts(self, frame: int) -> dict:
        """Where frame ``frame`` is now: ready, in flight since when, or waiting for audio (see StreamCore)."""
        with self._cond:
            return self._core.whereabouts(frame)

    @property
    def model_id(self) -> str:
        return self._core.model_id

    @property
    def total_frames(self) -> Optional[int]:
        """Known after ``close()``: round(seconds x fps)."""
        return self._core.total_frames

    @property
    def backlog_frames(self) -> int:
        """Frames whose audio is here but not yet sent (grows when audio comes faster than frames)."""
        with self._cond:
            return self._core.backlog_frames

    @property
    def finished(self) -> bool:
        with self._cond:
            return self._core.finished and not self._core.ready

    def cancel(self) -> None:
        """Stop now: what is in flight is abandoned, unread frames are dropped, the thread ends."""
        with self._cond:
            self._cancelled = True
            handles = [b.handle for b in self._core.inflight.values() if b.handle is not None]
            self._cond.notify_all()
        for handle in handles:
            handle.cancel()
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> "StreamSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cancel()

    def _raise_if_failed(self) -> None:
        if self._core.error is not None:
            raise self._core.error

    # --- the background thread ----------------------------------------------------------------

    def _on_done(self, b: _Batch, attempt: int, future) -> None:
        # Runs on the client's I/O thread (or wherever the future completes): no locks here.
        self._completions.append((b, attempt, future))
        self._wake.set()

    def _send(self, b: _Batch) -> None:
        attempt = self._core.sent(b)
        try:
            future = self._client.submit(b.header, b.payloads)
        except LipsyncError as exc:
            self._core.failed(b, exc)
            return
        b.handle = future
        future.add_done_callback(lambda f, b=b, a=attempt: self._on_done(b, a, f))

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - a bug must end the session loudly, not hang it
            with self._cond:
                if self._core.error is None:
                    self._core.error = InternalError(f"the stream's thread failed: {type(exc).__name__}: {exc}")
                self._cond.notify_all()
            raise

    def _loop(self) -> None:
        core = self._core
        while True:
            self._wake.clear()
            with self._cond:
                if self._cancelled:
                    return
                completions = []
                while self._completions:
                    completions.append(self._completions.popleft())
                for b, attempt, future in completions:
                    if attempt != b.attempts or future.cancelled():
                        continue  # an attempt that was given up on
                    exc = future.exception()
                    if exc is not None:
                        core.failed(b, exc)
                    else:
                        header, payloads = future.result()
                        core.completed(b, header, payloads)
                for b in core.overdue():
                    if b.handle is not None:
                        b.handle.cancel()
                    core.failed(b, Unavailable(f"no reply within {core.request_timeout + 2:.0f}s"))
                core.fill_idle()
                for b in core.plan():
                    self._send(b)
                self._cond.notify_all()
                if core.error is not None or core.finished:
                    return
                wait = IDLE_TICK_S if core.listening else 0.5
                due = core.next_retry_at()
                if due is not None:
                    wait = max(0.0, min(wait, due - core.clock()))
            self._wake.wait(wait)


class AsyncStreamSession:
    """The asyncio twin of :class:`StreamSession`, over an :class:`~lipsync_cluster.client.AsyncClient`.

    ``push``/``switch``/``close`` are plain (non-async) calls that never block; ``frames()`` is an
    async iterator; ``await cancel()`` (or leaving ``async with``) stops it. One event loop only.
    """ + _SESSION_DOC

    def __init__(self, client, model_id: str, *, fps: int = FPS, batch_size: int = 5, format: str = "jpeg",
                 quality: Optional[int] = None, max_in_flight: int = 3, max_ready_frames: int = 250,
                 request_timeout: float = 10.0, lookahead_frames: int = SPAN_AFTER,
                 adaptive: bool = False) -> None:
        self._client = client
        self._core = StreamCore(model_id, fps=fps, batch_size=batch_size, format=format, quality=quality,
                                max_in_flight=max_in_flight, max_ready_frames=max_ready_frames,
                                request_timeout=request_timeout, lookahead_frames=lookahead_frames,
                                adaptive=adaptive)
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._timer: Optional[asyncio.TimerHandle] = None
        self._cancelled = False

    def push(self, pcm: np.ndarray) -> None:
        if self._core.error is not None:
            raise self._core.error
        self._core.push(pcm)
        self._pump()

    def switch(self, model_id: str, at_frame: Optional[int] = None) -> int:
        frame = self._core.switch(model_id, at_frame)
        self._pump()
        return frame

    def interrupt(self, at_frame: Optional[int] = None) -> int:
        cut, handles = self._core.interrupt(at_frame)
        for handle in handles:
            handle.cancel()
        self._pump()
        return cut

    def set_listening(self, on: bool = True) -> None:
        self._core.set_listening(on)
        self._pump()

    def close(self) -> None:
        self._core.close()
        self._pump()

    async def frames(self) -> AsyncIterator[StreamFrame]:
        while True:
            frame = await self.get()
            if frame is None:
                return
            yield frame

    async def get(self, timeout: Optional[float] = None) -> Optional[StreamFrame]:
        """The next frame in order; None when the stream has ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._core.ready:
                frame = self._core.ready.popleft()
                if len(self._core.ready) < self._core.max_ready_frames:
                    self._pump()
                return frame
            if self._core.error is not None:
                raise self._core.error
            if self._core.finished or self._cancelled:
                return None
            self._wake.clear()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise RequestTimeout(f"no frame within {timeout:.1f}s ({self._core.stats()})")
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                pass

    def poll(self) -> list[StreamFrame]:
        out = list(self._core.ready)
        self._core.ready.clear()
        if not out and self._core.error is not None:
            raise self._core.error
        self._pump()
        return out

    def latency(self, recent: Optional[int] = None, breakdown: bool = True) -> dict:
        return self._core.latency(recent, breakdown)

    def stats(self) -> dict:
        return self._core.stats()

    def whereabouts(self, frame: int) -> dict:
        """Where frame ``frame`` is now: ready, in flight since when, or waiting for audio (see StreamCore)."""
        return self._core.whereabouts(frame)

    @property
    def model_id(self) -> str:
        return self._core.model_id

    @property
    def total_frames(self) -> Optional[int]:
        return self._core.total_frames

    @property
    def backlog_frames(self) -> int:
        """Frames whose audio is here but not yet sent (grows when audio comes faster than frames)."""
        return self._core.backlog_frames

    @property
    def finished(self) -> bool:
        return self._core.finished and not self._core.ready

    async def cancel(self) -> None:
        self._cancelled = True
        if self._timer is not None:
            self._timer.cancel()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._wake.set()

    async def __aenter__(self) -> "AsyncStreamSession":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.cancel()

    # --- driving --------------------------------------------------------------------------------

    def _pump(self) -> None:
        if self._cancelled:
            return
        core = self._core
        core.fill_idle()
        for b in core.plan():
            attempt = core.sent(b)
            task = asyncio.ensure_future(self._attempt(b, attempt))
            b.handle = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        due = core.next_retry_at()
        if core.listening and not core.closed:
            tick = core.clock() + IDLE_TICK_S
            due = tick if due is None else min(due, tick)
        if due is not None and self._timer is None:
            delay = max(0.0, due - core.clock())
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)
        self._wake.set()

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    async def _attempt(self, b: _Batch, attempt: int) -> None:
        try:
            header, payloads = await self._client.request(b.header, b.payloads,
                                                          timeout=self._core.request_timeout + 2.0)
        except asyncio.CancelledError:
            return
        except Exception as exc:  # noqa: BLE001 - LipsyncError or a transport problem
            if attempt == b.attempts:
                self._core.failed(b, exc)
        else:
            if attempt == b.attempts:
                self._core.completed(b, header, payloads)
        self._pump()


__all__ = ["StreamSession", "AsyncStreamSession", "StreamFrame", "StreamCore", "total_frames_for"]
