"""WebRTC out of the gateway: ``POST /webrtc/offer`` -> one video and one audio track on one clock.

A peer offers (``{"sdp", "type": "offer", "model", "lookahead_frames"?}``) with a video and an
audio transceiver it receives on and, to talk, a data channel; the answer's tracks are

* video: 25 fps, pts ``n x 3600`` at 90 kHz, H.264 when the offer has it, else VP8;
* audio: the avatar's speech (the PCM pushed on the data channel; Opus, RTP clock 48 kHz), pts in samples;

and frame ``n`` and its 40 ms of audio leave together: one :class:`Player` decides what tick ``n``
shows (the next paired frame of the stream, or, while the cluster has none ready, the last
picture again with 40 ms of silence) and both tracks are paced off its clock, which starts a
round trip after the first pair exists (adaptive batching, the default; fixed batches: once the
second batch is on its way) and the connection is up (aiortc stamps RTP with wall time at send,
so a track that started late would stay late). Neither track ever stalls: a video encoder behind
real time skips ticks, the audio is encoded on the event loop (never queued behind video), and
silent frames are passed over while more frames wait than the pipeline needs (the avatar catches
up in the silence). The data channel carries what the WebSocket carries (binary 16 kHz s16le PCM, JSON
``switch``/``interrupt``/``listen``/``ping``), handled by the same code
(:class:`~lipsync_cluster.gateway.server.StreamControl`).

The session listens from the start (silence appended in real time when no audio comes, so the
workers' idle frames flow). It ends when the peer's connection fails or closes, when no RTCP
report came from the peer for the gateway's ``webrtc_peer_timeout_s``, or when the gateway stops;
its StreamSession is cancelled at once. docs/INTEGRATIONS.md ("WebRTC") is the user's view.

Imported only when a peer offers: the ``gateway`` extra does not need aiortc.
"""
from __future__ import annotations

import asyncio
import fractions
import json
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from aiohttp import web

try:
    import av
    from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError
    from aiortc.rtcrtpsender import RTCRtpSender
except ImportError as exc:  # the webrtc extra is optional; server.py turns this into a 501
    from ..common.extras import MissingExtra

    raise MissingExtra("WebRTC (POST /webrtc/offer)", "webrtc", exc.name) from exc

from ..client.av import AsyncAVSession
from ..client.stream import AsyncStreamSession, percentiles
from ..common.audio import FPS, SAMPLE_RATE
from ..common.errors import LipsyncError
from ..common.infer_request import require_int
from .server import StreamControl, _short_latency, LIVE_WINDOW

if TYPE_CHECKING:
    from .server import Gateway

log = logging.getLogger("lipsync_cluster.gateway.webrtc")

AUDIO_RATE = 48000  # Opus's clock
VIDEO_CLOCK = 90000
MAX_OFFER_BYTES = 64 * 1024  # a real offer is a few kB
MAX_CHANNEL_MESSAGE = 64 * 1024  # the SCTP max-message-size aiortc announces (2 s of PCM)
MAX_CHANNEL_BUFFER = 1 << 20  # bytes waiting on the data channel before a peer that does not read is dropped
STATS_INTERVAL_S = 0.5
CATCHUP_BATCHES = 2  # idle frames are passed over while more than this many batches (+ 4) are ready
MAX_TICKS_AHEAD = 25  # ticks decided but not yet taken by both tracks (one track's encoder lagging)
KEYFRAME_S = 2
X264_PRESET = "veryfast"  # half the CPU of libx264's default (medium) at the same bit rate
VP8_CPU_USED = 8  # libvpx realtime speed (aiortc uses -6: slower, a little sharper)
LATENCY_WINDOW = 3000  # speech ticks whose latency is kept (2 minutes of speech)
QUIET_PEAK = 0.01  # -40 dBFS: a frame whose pushed audio peaks below this is a pause (catch-up may pass it over)
DEPTH_WINDOW = 100  # frames whose round trip sets the adaptive player's depth
START_WAIT_S = 2.0  # the clock waits at most this long after the first pair (for the second batch / a round trip)
FILLER_LOG = 50  # filler ticks remembered with why (status: "filler_log")
STAMP_BLOCK = 16  # px per bit of the frame-index stamp (tests, benchmarks)
STAMP_BITS = 20


class OfferError(Exception):
    """A refused offer: ``status`` and the wire error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# --- the frame-index stamp (debug: lets a receiver read which frame it got) ----------------------


def stamp_index(image: np.ndarray, index: int) -> np.ndarray:
    """Write ``index`` as ``STAMP_BITS`` black/white blocks along the bottom-left edge (a copy).

    Blocks of 16 px on the macroblock grid survive H.264 and VP8 at their default bit rates.
    """
    out = image.copy()
    h = out.shape[0]
    y0 = (h // STAMP_BLOCK - 1) * STAMP_BLOCK
    for bit in range(STAMP_BITS):
        x0 = bit * STAMP_BLOCK
        out[y0:y0 + STAMP_BLOCK, x0:x0 + STAMP_BLOCK] = 255 if (index >> bit) & 1 else 0
    return out


def read_stamp(image: np.ndarray) -> int:
    """The index :func:`stamp_index` wrote (``image`` BGR or grey, the size it was stamped at)."""
    grey = image if image.ndim == 2 else image.mean(axis=2)
    h = grey.shape[0]
    y0 = (h // STAMP_BLOCK - 1) * STAMP_BLOCK
    value = 0
    for bit in range(STAMP_BITS):
        x0 = bit * STAMP_BLOCK
        block = grey[y0 + 4:y0 + STAMP_BLOCK - 4, x0 + 4:x0 + STAMP_BLOCK - 4]
        if block.mean() > 128:
            value |= 1 << bit
    return value


def _silent(item: Any) -> bool:
    """A pair the player may pass over to catch up: listening silence, or quiet pushed audio."""
    if not item.speech:
        return True
    a = np.asarray(item.audio)
    if a.size == 0:
        return True
    peak = float(np.abs(a).max())
    return peak < (QUIET_PEAK * 32768 if a.dtype == np.int16 else QUIET_PEAK)


# --- the clock both tracks follow --------------------------------------------------------------


class Player:
    """Tick ``n`` of the session clock: one picture and its 40 ms of audio, for both tracks.

    ``pairs`` is the pairing core (:class:`~lipsync_cluster.client.av.AsyncAVSession`):
    ``await poll()`` gives the next :class:`~lipsync_cluster.client.av.AVFrame` or None. A tick is
    decided once, by the first track that reaches it; a tick with no pair ready repeats the last
    picture with silence (a filler), so a late cluster delays both tracks alike, never one
    against the other. Taking one pair per tick leaves the rest to ``interrupt()``: barge-in cuts
    right after the frame on screen.
    """

    def __init__(self, pairs: Any, *, fps: int = FPS, stamp: bool = False, batch_size: int = 5,
                 adaptive: bool = False) -> None:
        self.pairs = pairs
        # Frames that may wait for their tick before silent ones are passed over. Fixed batches:
        # two batches and 4 (a batch arrives whole). Adaptive batching (StreamCore ``adaptive``):
        # what the pipeline needs, the clock's start margin in frames (:meth:`_depth`), kept up to
        # date with the round trip; at most the fixed rule's.
        self.catchup_frames = CATCHUP_BATCHES * batch_size + 4
        self.batch_size = batch_size
        self.adaptive = adaptive
        self.start_margin_s: Optional[float] = None  # adaptive: how long the clock waited after the first pair
        # Adaptive: frames of depth the fillers showed were needed. A filler moves the picture one
        # tick later, so the depth grows by one; this keeps catch-up from taking it back. The round
        # trip alone misses how the audio arrives: a talker that sends 100 ms chunks and nothing
        # while silent leaves its last frames waiting for the listening silence (idle_grace_s).
        self.learned_depth = 0
        self.fps = fps
        self.samples = pairs.core.rate // fps  # audio per tick, at the pairing core's rate
        self.stamp = stamp
        self.t0: Optional[float] = None
        self.started = asyncio.Event()
        self.closed = False
        self.error: Optional[BaseException] = None
        self.ticks: dict[int, list] = {}  # tick -> [(index, frame), audio, takers left]
        self.decided = 0
        self.frames = self.fillers = self.dropped_ticks = self.caught_up = 0
        self.last_index = -1
        self._last: Any = None  # the last real (index, frame) shown: fillers repeat it
        self._last_speech = False
        self.filler_log: deque = deque(maxlen=FILLER_LOG)
        self.speech_latency: deque = deque(maxlen=LATENCY_WINDOW)  # ms, speech ticks
        self._lock = asyncio.Lock()
        self._image_index = -2
        self._image: Any = None
        self._jpeg: Any = None  # libav's JPEG decoder (the encoder thread's)

    async def _poll(self) -> Any:
        if self.error is not None:
            return None
        try:
            return await self.pairs.poll()
        except LipsyncError as exc:  # the stream failed for good: fillers from now on, the session ends it
            self.error = exc
            return None

    async def start(self) -> None:
        """Wait for the first pair and the second batch on its way (both tracks wait on this); the
        clock starts when a track first asks for it after that (:meth:`begin`): aiortc pulls only
        once the connection is up.

        Started at the first pair, frame ``batch_size`` was due a batch's duration later, but its
        batch was only sent once its audio and lookahead were there: it came back late (a filler
        at tick 5 in every session). Once the second batch is sent, each frame has a batch's
        duration for its round trip.
        """
        while not self.closed and not self.started.is_set():
            first = await self._poll()
            if first is not None:
                self._store(0, first)
                self.decided = 1
                now = time.monotonic()
                deadline = now + START_WAIT_S  # a stream that stops short starts anyway
                if self.adaptive:
                    # Each later frame comes back at most a round trip (waiting for the batch in
                    # flight) plus its own round trip after its audio; the first one came back
                    # after its own only. So the clock starts that one round trip (and a frame
                    # for the audio's 20 ms chunking) after the first pair, not a batch later:
                    # the latency a viewer sees is what the pipeline needs, no more.
                    self.start_margin_s = min(START_WAIT_S, self._margin_s())
                    deadline = now + self.start_margin_s
                    self.catchup_frames = self._depth()
                while not self.closed and time.monotonic() < deadline:
                    st = self.pairs.session.stats()
                    if st["closed"] or st["error"] is not None:
                        break
                    if not self.adaptive and st["planned"] >= 2 * self.batch_size:
                        break
                    self.pairs.fill_idle()  # nobody reads yet: the listening silence is made here
                    await asyncio.sleep(0.01)
                self.started.set()
                return
            await asyncio.sleep(0.01)

    def _margin_s(self) -> float:
        """Adaptive: how much later than its audio's round trip a frame may come back: another round
        trip (the batch in flight when its audio came) and a frame (the audio's 20 ms chunking)."""
        rt = self.pairs.session.latency(recent=DEPTH_WINDOW)["breakdown"]["round_trip_ms"].get("p99_ms") or 0.0
        return rt / 1000.0 + 1.0 / self.fps

    def _depth(self) -> int:
        """Adaptive: the frames ready to keep (catch-up passes silent ones over beyond it): the margin
        in frames, or what fillers showed, within 2 .. the fixed batches' rule."""
        frames = max(int(np.ceil(self._margin_s() * self.fps)), self.learned_depth)
        return max(2, min(CATCHUP_BATCHES * self.batch_size + 4, frames))

    async def begin(self) -> None:
        await self.started.wait()
        if self.closed:
            raise MediaStreamError
        if self.t0 is None:
            self.t0 = time.monotonic()

    async def _next_pair(self) -> Any:
        """The next pair to show. Silent frames that wait while more than ``catchup_frames`` frames
        are ready (a batch or two and 4: a batch arrives whole) are passed over, picture and audio
        together (the pairing stays exact): after a stall, or the connection's set-up, the picture
        and its sound catch up with the conversation in the silence instead of staying late.
        Silent: idle frames (listening silence), and pushed audio that is quiet (peak below
        ``QUIET_PEAK``): a page streams its microphone all the time, so its pauses are pushed
        audio, and without this a stall stayed as delay for the rest of the call."""
        item = await self._poll()
        while item is not None and _silent(item) and self.pairs.session.stats()["ready"] > self.catchup_frames:
            self.caught_up += 1
            item = await self._poll()
        return item

    def _store(self, tick: int, item: Any) -> None:
        audio = np.asarray(item.audio, np.int16).reshape(-1)
        self.ticks[tick] = [(item.index, item.frame), audio, 2]
        self._last = (item.index, item.frame)
        self._last_speech = bool(item.speech)
        if item.speech and self.t0 is not None:
            # audio pushed -> the tick that shows it is due to leave (the latency a viewer sees, less the network)
            leaves = max(time.monotonic(), self.t0 + tick / self.fps)
            self.speech_latency.append(item.frame.latency_ms + 1000 * (leaves - item.frame.ready_t))
        self.last_index = item.index
        self.frames += 1

    async def tick(self, n: int) -> list:
        """Decide the ticks up to ``n`` (each a pair if one is ready, else a filler)."""
        async with self._lock:
            while self.decided <= n:
                if self.adaptive and self.decided % self.fps == 0:
                    self.catchup_frames = self._depth()  # once a second: the round trip moves with the load
                item = await self._next_pair()
                if item is not None:
                    self._store(self.decided, item)
                else:
                    self.ticks[self.decided] = [self._last, np.zeros(self.samples, np.int16), 2]
                    self.fillers += 1
                    self._log_filler(self.decided)
                    if self.adaptive and self.t0 is not None:
                        self.learned_depth = max(self.learned_depth, self.catchup_frames) + 1
                        self.catchup_frames = self._depth()
                self.decided += 1
            while len(self.ticks) > MAX_TICKS_AHEAD:  # one track stopped taking: forget its old ticks
                del self.ticks[min(self.ticks)]
                self.dropped_ticks += 1
        return self.ticks.get(n) or [self._last, np.zeros(self.samples, np.int16), 2]

    def _log_filler(self, tick: int) -> None:
        """Why tick ``tick`` had no pair: where its frame was (the last ``FILLER_LOG`` fillers)."""
        now = time.monotonic()
        where = self.pairs.session.whereabouts(self.last_index + 1)
        where.update(tick=tick, at_ms=round((now - self.t0) * 1000, 1) if self.t0 is not None else None,
                     since_push_ms=round((now - self.pairs.core.last_push_t) * 1000, 1),
                     last_speech=self._last_speech)
        self.filler_log.append(where)

    def now_tick(self) -> int:
        return int((time.monotonic() - self.t0) * self.fps) if self.t0 is not None else 0

    def taken(self, n: int) -> None:
        """One track is done with tick ``n``."""
        entry = self.ticks.get(n)
        if entry is not None:
            entry[2] -= 1
            if entry[2] <= 0:
                del self.ticks[n]

    async def wait(self, t: float) -> None:
        """Sleep until ``t`` seconds on the session clock."""
        await self.begin()
        delay = self.t0 + t - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    def picture(self, shown: tuple) -> "av.VideoFrame":
        """The picture of ``(index, frame)`` as a yuv420p frame, made once (fillers reuse it).

        JPEG goes straight to YUV with libav's decoder (1.7 ms at 720p here, against 6.8 ms for
        OpenCV's decode to BGR and the conversion back). Runs in the video track's encoder thread.
        """
        index, frame = shown
        if index != self._image_index:
            if frame.format == "jpeg":
                if self._jpeg is None:
                    self._jpeg = av.CodecContext.create("mjpeg", "r")
                (decoded,) = self._jpeg.decode(av.Packet(frame.image))
                picture = decoded.reformat(format="yuv420p")
            else:  # png / raw / patch: the client library's decoder
                picture = av.VideoFrame.from_ndarray(frame.decode(), format="bgr24").reformat(format="yuv420p")
            if self.stamp:
                planes = picture.to_ndarray()  # I420: the Y plane's rows first
                planes[:picture.height] = stamp_index(planes[:picture.height], index)
                picture = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            self._image, self._image_index = picture, index
        return self._image


class VideoEncoder:
    """H.264 (libx264, baseline, zerolatency) or VP8 (libvpx, realtime) at a fixed bit rate.

    The gateway encodes itself and hands aiortc finished packets: aiortc's own encoders run
    libx264 at its default preset (twice the CPU of ``veryfast`` for the same picture) with no way
    to choose. A key frame every ``KEYFRAME_S`` and when the peer asks (``keyframe``). No bit rate
    adaptation: a fixed target (``webrtc_video_kbps``). ``cpu_s`` counts encode CPU time.
    """

    def __init__(self, codec: str, kbps: int, fps: int = FPS) -> None:
        self.name = codec
        self.kbps, self.fps = kbps, fps
        self.ctx: Any = None
        self.keyframe = False  # the peer asked for one (PLI/FIR: it lost a picture)
        self.cpu_s = 0.0
        self.frames = 0
        self.bytes = 0

    def _open(self, width: int, height: int) -> None:
        name = "libx264" if self.name == "h264" else "libvpx"
        ctx = av.CodecContext.create(name, "w")
        ctx.width, ctx.height = width, height
        ctx.pix_fmt = "yuv420p"
        ctx.bit_rate = self.kbps * 1000
        ctx.framerate = fractions.Fraction(self.fps, 1)
        ctx.time_base = fractions.Fraction(1, self.fps)
        ctx.gop_size = KEYFRAME_S * self.fps
        if name == "libx264":
            ctx.profile = "Baseline"
            ctx.options = {"preset": X264_PRESET, "tune": "zerolatency", "level": "31"}
        else:
            ctx.options = {"deadline": "realtime", "cpu-used": str(VP8_CPU_USED), "lag-in-frames": "0",
                           "static-thresh": "1", "undershoot-pct": "100", "overshoot-pct": "15",
                           "bufsize": str(self.kbps * 1000), "minrate": str(self.kbps * 1000),
                           "maxrate": str(self.kbps * 1000)}
        self.ctx = ctx

    def encode(self, picture: "av.VideoFrame", n: int) -> "av.Packet":
        t = time.thread_time()
        if self.ctx is None:
            self._open(picture.width, picture.height)
        frame = picture  # a filler encodes the same picture again: its type and pts are set each time
        frame.pict_type = av.video.frame.PictureType.I if self.keyframe else av.video.frame.PictureType.NONE
        self.keyframe = False
        frame.pts = n
        frame.time_base = self.ctx.time_base
        data = b"".join(bytes(p) for p in self.ctx.encode(frame))
        packet = av.Packet(data)
        packet.pts = n * (VIDEO_CLOCK // self.fps)
        packet.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        self.cpu_s += time.thread_time() - t
        self.frames += 1
        self.bytes += len(data)
        return packet


class AvatarVideoTrack(MediaStreamTrack):
    """Tick ``n``'s picture, encoded, at ``t0 + n / 25``. An encoder that falls more than a tick
    behind skips ticks (counted in ``skipped``): the picture stays on time with its sound."""

    kind = "video"

    def __init__(self, player: Player, encoder: Optional[VideoEncoder] = None) -> None:
        super().__init__()
        self.player = player
        self.encoder = encoder
        self.n = 0
        self.skipped = 0

    async def recv(self) -> "av.Packet":
        if self.readyState != "live":
            raise MediaStreamError
        player = self.player
        await player.begin()
        n = self.n
        late = player.now_tick() - 1
        if n > 0 and late > n:
            for m in range(n, late):
                await player.tick(m)
                player.taken(m)
            self.skipped += late - n
            n = late
        self.n = n + 1
        await player.wait(n / player.fps)
        shown = (await player.tick(n))[0]
        player.taken(n)
        loop = asyncio.get_running_loop()
        # decoding a 720p JPEG and encoding take milliseconds: off the event loop (both release the GIL)
        return await loop.run_in_executor(None, self._encode, shown, n)

    def _encode(self, shown: tuple, n: int) -> "av.Packet":
        return self.encoder.encode(self.player.picture(shown), n)


class AudioEncoder:
    """Opus straight from the pairing core's rate (16 kHz: what the peer pushes), one packet per 20 ms.

    Encoded here, on the event loop (a tenth of a millisecond), not by aiortc in its thread pool:
    there it would wait behind the video encoder, and audio that leaves late stays late. The RTP
    clock of Opus is 48 kHz whatever the input rate: tick ``n``'s audio is RTP ``n x 1920``.
    (libopus's look-ahead makes the decoded sound 6.5 ms later than its timestamp.)
    """

    def __init__(self, rate: int, kbps: int = 32) -> None:
        ctx = av.CodecContext.create("libopus", "w")
        ctx.sample_rate, ctx.format, ctx.layout = rate, "s16", "mono"
        ctx.bit_rate = kbps * 1000
        ctx.time_base = fractions.Fraction(1, rate)
        ctx.options = {"application": "voip"}
        self.ctx, self.rate = ctx, rate
        self.bytes = 0

    def encode(self, pcm: np.ndarray, h: int) -> "av.Packet":
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm, np.int16).reshape(1, -1), format="s16",
                                           layout="mono")
        frame.sample_rate = self.rate
        frame.pts = h * pcm.size
        frame.time_base = self.ctx.time_base
        data = b"".join(bytes(p) for p in self.ctx.encode(frame))
        self.bytes += len(data)
        packet = av.Packet(data)
        packet.pts = h * (AUDIO_RATE // 50)
        packet.time_base = fractions.Fraction(1, AUDIO_RATE)
        return packet


class AvatarAudioTrack(MediaStreamTrack):
    """Tick ``n``'s audio as two 20 ms Opus packets (see :class:`AudioEncoder`)."""

    kind = "audio"

    def __init__(self, player: Player) -> None:
        super().__init__()
        self.player = player
        self.encoder = AudioEncoder(player.pairs.core.rate)
        self.h = 0  # 20 ms packets: two per tick

    async def recv(self) -> "av.Packet":
        if self.readyState != "live":
            raise MediaStreamError
        player = self.player
        h = self.h
        self.h += 1
        await player.wait(h / (2 * player.fps))
        n, half = divmod(h, 2)
        audio = (await player.tick(n))[1]
        if half:
            player.taken(n)
        size = player.samples // 2
        return self.encoder.encode(audio[half * size:(half + 1) * size], h)


# --- one peer --------------------------------------------------------------------------------------


class PeerSession(StreamControl):
    """One WebRTC peer: its connection, its StreamSession (through the pairing core), its tracks."""

    def __init__(self, gateway: "Gateway", sid: str, peer: str, model: str, lookahead: int) -> None:
        self.gateway, self.id, self.peer = gateway, sid, peer
        self.model = model
        self.started_at = time.time()
        g = gateway
        adaptive = g.webrtc_batching == "adaptive"  # the stream's batching and the player's depth rule
        self.session = AsyncStreamSession(g.client, model, batch_size=g.batch_size, format=g.format,
                                          quality=g.quality, max_in_flight=g.max_in_flight,
                                          request_timeout=g.request_timeout, lookahead_frames=lookahead,
                                          adaptive=adaptive)
        # the pairing core makes the listening silence (idle frames while nobody speaks); the peer
        # pushes 16 kHz, so that is the audio's rate until aiortc's Opus encoder resamples it
        self.stream = AsyncAVSession(self.session, sample_rate=SAMPLE_RATE)
        self.player = Player(self.stream, stamp=g.webrtc_stamp, batch_size=g.batch_size, adaptive=adaptive)
        self.video_track = AvatarVideoTrack(self.player)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=list(g.ice_servers)))
        self.channel: Any = None
        self.closed = False
        self.reason = ""
        self.done = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.messages_in = 0

    # --- signalling ----------------------------------------------------------------------------

    async def answer(self, sdp: str) -> RTCSessionDescription:
        pc = self.pc
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except Exception as exc:  # noqa: BLE001 - aiortc's parser fails with anything (even AssertionError)
            why = str(exc) or type(exc).__name__
            raise OfferError(400, "bad_request", f"the offer's SDP could not be read: {why}") from None
        kinds = {t.kind: t for t in pc.getTransceivers()}
        missing = [k for k in ("video", "audio") if k not in kinds]
        if missing:
            raise OfferError(400, "bad_request", f"the offer has no {' and no '.join(missing)} section: add "
                                                 "addTransceiver('video', {direction: 'recvonly'}) and the same "
                                                 "for 'audio' before createOffer")
        for kind, t in kinds.items():
            if t.direction not in ("recvonly", "sendrecv"):
                raise OfferError(400, "bad_request", f"the offer's {kind} section is {t.direction}; the avatar "
                                                     "sends, so it must be recvonly or sendrecv")
        video = kinds["video"]
        caps = RTCRtpSender.getCapabilities("video").codecs
        prefer = [c for c in caps if c.mimeType.lower() == "video/h264"] + \
                 [c for c in caps if c.mimeType.lower() == "video/vp8"] + \
                 [c for c in caps if c.mimeType.lower() == "video/rtx"]
        video.setCodecPreferences(prefer)
        video_sender = pc.addTrack(self.video_track)
        # a peer that lost a picture asks for a key frame (PLI/FIR); aiortc tells only its own
        # encoder (private _send_keyframe): pass it on to ours
        ask = video_sender._send_keyframe

        def send_keyframe() -> None:
            ask()
            if self.video_track.encoder is not None:
                self.video_track.encoder.keyframe = True

        video_sender._send_keyframe = send_keyframe
        self.audio_track = AvatarAudioTrack(self.player)
        pc.addTrack(self.audio_track)

        @pc.on("datachannel")
        def on_datachannel(channel: Any) -> None:
            if self.channel is not None:
                channel.close()  # one control channel per peer
                return
            self.channel = channel
            channel.on("message", self._on_message)
            self.put_control({"type": "hello", "session": self.id, "fps": FPS, "sample_rate": 16000,
                              "pcm": "s16le", "model_id": self.model, "audio_rate": AUDIO_RATE,
                              "max_message": MAX_CHANNEL_MESSAGE})

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            state = pc.connectionState
            log.info("webrtc %s (%s): connection %s", self.id, self.peer, state)
            if state in ("failed", "closed"):
                await self.close(f"connection {state}")

        try:
            answer = await pc.createAnswer()
        except (ValueError, RuntimeError) as exc:  # e.g. no codec in common
            raise OfferError(400, "bad_request", f"no answer to this offer: {exc}") from None
        await pc.setLocalDescription(answer)  # gathers the candidates (no trickle)
        codec = self.video_codec()
        if codec is None:
            raise OfferError(400, "bad_request", "the offer's video accepts neither H.264 nor VP8")
        self.video_track.encoder = VideoEncoder(codec, self.gateway.webrtc_video_kbps)
        self._tasks = [asyncio.ensure_future(self.player.start()), asyncio.ensure_future(self._stats_loop()),
                       asyncio.ensure_future(self._watchdog())]
        return pc.localDescription

    def video_codec(self) -> Optional[str]:
        desc = self.pc.localDescription
        if desc is None:
            return None
        in_video = False
        for line in desc.sdp.splitlines():
            if line.startswith("m="):
                in_video = line.startswith("m=video")
            elif in_video and line.startswith("a=rtpmap:"):
                name = line.split(" ", 1)[1].split("/")[0].lower()
                if name in ("h264", "vp8"):
                    return name
        return None

    # --- data channel (StreamControl) -------------------------------------------------------------

    def _on_message(self, data: Any) -> None:
        self.messages_in += 1
        if len(data) > MAX_CHANNEL_MESSAGE:
            self._error("bad_request", f"data channel messages are at most {MAX_CHANNEL_MESSAGE} bytes; "
                                       f"got {len(data)}")
            return
        if isinstance(data, bytes):
            self._guarded(self._on_pcm, data)
        else:
            asyncio.ensure_future(self._control(data))

    async def _control(self, text: str) -> None:
        try:
            await self._on_control(text)
        except Exception as exc:  # noqa: BLE001 - a bug must not pass in silence: say it, keep serving
            log.exception("webrtc %s: control message failed", self.id)
            self._error("internal", f"{type(exc).__name__}: {exc}")

    def _guarded(self, fn: Any, data: Any) -> None:
        try:
            fn(data)
        except Exception as exc:  # noqa: BLE001
            log.exception("webrtc %s: PCM message failed", self.id)
            self._error("internal", f"{type(exc).__name__}: {exc}")

    def put_control(self, message: dict) -> None:
        ch = self.channel
        if ch is None or ch.readyState != "open" or self.closed:
            return
        if ch.bufferedAmount > MAX_CHANNEL_BUFFER:
            if message.get("type") == "stats":
                return  # the next one will do
            log.warning("webrtc %s (%s): the peer does not read its data channel; closing", self.id, self.peer)
            asyncio.ensure_future(self.close("data channel not read"))
            return
        ch.send(json.dumps(message))

    async def _start(self, msg: dict) -> None:
        self._error("bad_request", "a WebRTC stream starts with its offer (POST /webrtc/offer names the model); "
                                   "use switch to change it")

    def _stop(self) -> None:
        self._error("bad_request", "a WebRTC stream stops when the peer connection closes")

    async def _stop_stream(self) -> None:
        await self.close("audio backlog")

    # --- running and ending ----------------------------------------------------------------------

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            stats = self.status()
            del stats["filler_log"]  # /api/status only: the peer gets the counts twice a second
            self.put_control({"type": "stats", **stats})
            exc = self.player.error
            if isinstance(exc, LipsyncError):  # the stream failed for good (a batch failed twice)
                self._error(exc.code, exc.message)
                await self.close(f"stream failed: {exc.code}")
                return

    async def _watchdog(self) -> None:
        """A peer that vanished without a word: no RTCP receiver report for ``webrtc_peer_timeout_s``
        (ICE consent alone takes about 30 s to notice)."""
        last = time.monotonic()
        seen: Any = None
        while True:
            await asyncio.sleep(1.0)
            newest = None
            for sender in self.pc.getSenders():
                try:
                    stats = await sender.getStats()
                except Exception:  # noqa: BLE001 - a closing transport
                    continue
                for s in stats.values():
                    if s.type == "remote-inbound-rtp":
                        newest = max(newest or s.timestamp, s.timestamp)
            if newest is not None and newest != seen:
                seen, last = newest, time.monotonic()
            if time.monotonic() - last > self.gateway.webrtc_peer_timeout_s:
                await self.close(f"no report from the peer for {self.gateway.webrtc_peer_timeout_s:g} s")
                return

    async def close(self, reason: str = "closed") -> None:
        """End at once: the stream (in-flight requests abandoned), the tracks, the connection."""
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        self.player.closed = True
        self.player.started.set()  # tracks waiting for the first pair give up
        me = asyncio.current_task()
        for task in self._tasks:
            if task is not me:
                task.cancel()
        await self.stream.cancel()
        try:
            await self.pc.close()
        except Exception as exc:  # noqa: BLE001 - closing anyway
            log.debug("webrtc %s: close: %s", self.id, exc)
        self.gateway.session_ended(self.id)
        log.info("webrtc %s (%s) closed: %s (%d frames, %d fillers; %d open)", self.id, self.peer, reason,
                 self.player.frames, self.player.fillers, len(self.gateway.sessions))
        self.done.set()

    def status(self) -> dict:
        st = self.session.stats()
        enc = self.video_track.encoder
        return {"session": self.id, "peer": self.peer, "transport": "webrtc", "streaming": not self.closed,
                "connection": self.pc.connectionState, "codec": self.video_codec(), "model_id": st["model_id"],
                "sent": self.player.decided, "frames": self.player.frames, "fillers": self.player.fillers,
                "video_skipped": self.video_track.skipped, "caught_up": self.player.caught_up,
                "encode_cpu_s": round(enc.cpu_s, 3) if enc else 0.0, "video_bytes": enc.bytes if enc else 0,
                "audio_bytes": self.audio_track.encoder.bytes if hasattr(self, "audio_track") else 0,
                "last_index": self.player.last_index, "drops": 0, "queued": st["ready"],
                "latency": _short_latency(self.session.latency(recent=LIVE_WINDOW, breakdown=False)),
                "audio_seconds": round(st["seconds"], 3), "in_flight": st["in_flight"], "retries": st["retries"],
                "batches_sent": st["batches_sent"],
                "listening": st["listening"], "idle_frames": st["idle_frames"],
                "batching": "adaptive" if self.player.adaptive else "fixed", "depth": self.player.catchup_frames,
                "start_margin_ms": None if self.player.start_margin_s is None
                else round(self.player.start_margin_s * 1000, 1),
                "interrupts": [i["cut"] for i in st["interrupts"]][-10:], "filler_log": list(self.player.filler_log),
                "speech_to_tick_ms": _tick_latency(self.player.speech_latency)}


def _tick_latency(values: deque) -> dict:
    """p50/p99 (and mean, max) of audio pushed -> its tick due to leave (ms), over the last
    ``LATENCY_WINDOW`` speech ticks, as the stream's own latency figures."""
    return {**percentiles(values), "frames": len(values)}


async def offer(gateway: "Gateway", request: web.Request) -> web.Response:
    """``POST /webrtc/offer``: answer an SDP offer with the avatar's tracks (or a 4xx naming why)."""
    if request.content_length is None or request.content_length > MAX_OFFER_BYTES:
        raise OfferError(413 if request.content_length else 411, "bad_request",
                         f"an offer is a JSON body of at most {MAX_OFFER_BYTES} bytes with a Content-Length")
    body = await request.content.read(MAX_OFFER_BYTES + 1)
    if len(body) > MAX_OFFER_BYTES:
        raise OfferError(413, "bad_request", f"an offer is at most {MAX_OFFER_BYTES} bytes")
    try:
        msg = json.loads(body)
    except ValueError as exc:
        raise OfferError(400, "bad_request", f"the offer is not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise OfferError(400, "bad_request", "the offer is a JSON object {sdp, type, model, lookahead_frames?}")
    if msg.get("type") != "offer":
        raise OfferError(400, "bad_request", f"type must be 'offer'; got {msg.get('type')!r}")
    sdp = msg.get("sdp")
    if not isinstance(sdp, str) or not sdp.startswith("v=0"):
        raise OfferError(400, "bad_request", "sdp must be the offer's SDP text (it starts with 'v=0')")
    model = msg.get("model")
    problem = await gateway.model_problem(model)
    if problem is not None:
        raise OfferError(404 if problem[0] == "unknown_model" else 400, *problem)
    try:
        lookahead = require_int(msg, "lookahead_frames", 0, 12, gateway.lookahead_frames)
    except LipsyncError as exc:
        raise OfferError(400, exc.code, exc.message) from None
    if len(gateway.sessions) >= gateway.max_sessions:
        raise OfferError(503, "capacity_full", f"this gateway serves at most {gateway.max_sessions} sessions")
    sid = gateway.new_session_id("r")
    try:
        peer = PeerSession(gateway, sid, request.remote or "?", model, lookahead)
    except LipsyncError as exc:
        raise OfferError(400, exc.code, exc.message) from None
    gateway.sessions[sid] = peer
    try:
        answer = await peer.answer(sdp)
    except BaseException:
        await peer.close("offer refused")
        raise
    log.info("webrtc %s opened from %s on %s (%s; %d open)", sid, peer.peer, model, peer.video_codec(),
             len(gateway.sessions))
    return web.json_response({"sdp": answer.sdp, "type": answer.type, "session": sid,
                              "video_codec": peer.video_codec()})


__all__ = ["offer", "OfferError", "PeerSession", "Player", "stamp_index", "read_stamp", "AUDIO_RATE"]
